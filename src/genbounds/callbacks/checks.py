"""Configuration checks, so that a bad argument or combination fails before step 0.

* Argument checks (``check_int``, ``check_float``, ``check_choice``, ``check_sigmas``, …) run in
  ``__init__``: type, finiteness, range and integer-ness, with a message that quotes the call,
  names the argument and states the valid range — Lightning's own style
  (``Timer(duration=...)`` is not a valid duration…).
* Environment checks (strategy, precision, optimization mode) run at ``setup``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

FULL_PRECISIONS = ("32-true", "64-true", "32", "64")
MIXED_PRECISIONS = ("16-mixed", "bf16-mixed")


# ---------------------------------------------------------------------------------- arguments
def _bad(owner: str, name: str, value: Any, expected: str) -> MisconfigurationException:
    return MisconfigurationException(f"{owner}({name}={value!r}): {name} must be {expected}.")


def check_int(owner: str, name: str, value: Any, *, minimum: int | None = 1, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """An integer (``bool`` refused; an integral float such as ``4.0`` from YAML is accepted and
    converted) within ``[minimum, maximum]``; ``None`` only when ``optional``."""
    rng = _range_text(minimum, maximum, integer=True)
    expected = f"an integer {rng}" + (" or None" if optional else "")
    if value is None:
        if optional:
            return None
        raise _bad(owner, name, value, expected)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(owner, name, value, expected)
    if isinstance(value, numbers.Integral):
        number = int(value)
    else:
        if not math.isfinite(float(value)) or float(value) != int(float(value)):
            raise _bad(owner, name, value, expected)
        number = int(float(value))
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _bad(owner, name, value, expected)
    return number


def check_float(owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False,
                allow_inf: bool = False) -> float | None:
    """A real number (``bool`` refused, NaN refused, ±inf only with ``allow_inf``) in the interval
    ``low … high`` (``*_open``: strict inequality)."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    if low is not None and high is not None:
        rng = f"in {lo}, {hi}"
    elif low is not None:
        rng = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rng = f"{'<' if high_open else '<='} {high:g}"
    else:
        rng = ""
    expected = "a " + ("" if allow_inf else "finite ") + f"number {rng}".rstrip() + (" or None" if optional else "")
    if value is None:
        if optional:
            return None
        raise _bad(owner, name, value, expected)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(owner, name, value, expected)
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise _bad(owner, name, value, expected)
    if low is not None and (number <= low if low_open else number < low):
        raise _bad(owner, name, value, expected)
    if high is not None and (number >= high if high_open else number > high):
        raise _bad(owner, name, value, expected)
    return number


def _range_text(minimum: int | None, maximum: int | None, integer: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(owner, name, value, "True or False")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise _bad(owner, name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_sigmas(owner: str, value: Any, *, name: str = "sigmas", allow_zero: bool = False) -> list[float]:
    """A non-empty list of finite noise levels ``σ > 0`` (``≥ 0`` with ``allow_zero``), strictly
    increasing after sorting is not required but duplicates are refused (they would double-count
    a grid point)."""
    expected = f"a non-empty list of finite numbers {'>= 0' if allow_zero else '> 0'} without duplicates"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _bad(owner, name, value, expected + " (e.g. [0.001, 0.01, 0.1]); a single number must be written as a list")
    items = list(value)
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Real) or not math.isfinite(float(item)):
            raise _bad(owner, name, value, expected)
        s = float(item)
        if s < 0 or (s == 0 and not allow_zero):
            raise _bad(owner, name, value, expected)
        out.append(s)
    if not out or len(set(out)) != len(out):
        raise _bad(owner, name, value, expected)
    return out


def check_name_list(owner: str, name: str, value: Any, choices: Sequence[str]) -> list[str]:
    """A non-empty list of names out of ``choices`` (a bare string is refused: it would be split
    into characters)."""
    expected = "a non-empty list out of " + ", ".join(repr(c) for c in choices)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _bad(owner, name, value, expected + (f" — write [{value!r}]" if isinstance(value, str) else ""))
    items = list(value)
    if not items or any(not isinstance(i, str) or i not in choices for i in items) or len(set(items)) != len(items):
        raise _bad(owner, name, value, expected)
    return items


def check_callable(owner: str, name: str, value: Any, *, optional: bool = True) -> Any:
    if value is None and optional:
        return None
    if not callable(value):
        raise _bad(owner, name, value, "a callable (an import path in YAML)" + (" or None" if optional else ""))
    return value


def check_positive(owner: str, **values: int | float | None) -> None:
    """``__init__`` argument check: every given value is a finite number > 0 (``None`` skipped)."""
    for name, value in values.items():
        check_float(owner, name, value, low=0.0, low_open=True, optional=True)


# ---------------------------------------------------------------------------------- environment
def warn_shared_tags(owner: str, trainer: Trainer, callback: Any, tags: Sequence[str]) -> None:
    """Two callbacks of ``callback``'s class with other settings (Lightning refuses two with the
    same state key itself) write their values under the same ``tags``: interleaved in the loggers
    (each keeps its own ``step_log`` and channel, and the bounds read the first). Said once, before
    step 0, by the first of them."""
    same = [cb for cb in trainer.callbacks if type(cb) is type(callback)]
    if len(same) > 1 and same[0] is callback:
        rank_zero_warn(
            f"{owner}: the Trainer has {len(same)} {type(callback).__name__} callbacks "
            f"({'; '.join(cb.state_key for cb in same)}); they write their values under the same tags "
            f"({', '.join(tags)}), interleaved in the loggers, and the bounds read the first one only. Compare "
            "them through their own step_log or channel, or in separate fits.")


def check_strategy(owner: str, trainer: Trainer) -> None:
    """Single-device and DDP only: sharded strategies split or flatten the parameters."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    sharded = any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel", "XLA"))
    if sharded or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MisconfigurationException(
            f"{owner} supports single-device and DDP training (strategy='ddp', 'ddp_spawn', …); "
            f"{name} shards or wraps the parameters, so per-parameter statistics would be "
            "computed on shards. Use a DDP strategy for runs you measure."
        )


def check_precision(owner: str, trainer: Trainer, allow_mixed: bool = True) -> str:
    """Refuse half-precision *parameters*: finite differences, HVPs and sums of squares are
    meaningless at 3 significant digits. Mixed precision keeps fp32 parameters and is fine for
    callbacks that run their own fp32 passes."""
    precision = str(trainer.precision)
    if precision in FULL_PRECISIONS:
        return precision
    if precision in MIXED_PRECISIONS and allow_mixed:
        return precision
    allowed = FULL_PRECISIONS[:2] + (MIXED_PRECISIONS if allow_mixed else ())
    raise MisconfigurationException(
        f"{owner} does not support Trainer(precision={precision!r}): with half-precision "
        "parameters its sums of squares and finite differences lose the digits they measure. "
        f"Use one of {', '.join(allowed)}."
    )


def check_automatic_optimization(owner: str, pl_module: LightningModule) -> None:
    """For callbacks that edit or replay the optimizer step (interventions, twin runs)."""
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{owner} edits the training step's gradient through Lightning's automatic optimization hooks; "
            "manual optimization (automatic_optimization=False) is not supported. The measurement callbacks "
            "(GradientDispersion, the probes, GeneralizationBound) do support single-optimizer manual optimization."
        )


def check_batch_spread(owner: str, trainer: Trainer, accumulate: int) -> None:
    """At the fit's start: batches of one sample (and no accumulation) have no spread to measure."""
    size = getattr(trainer.train_dataloader, "batch_size", None)
    if isinstance(size, int) and size * accumulate < 2:
        raise MisconfigurationException(
            f"{owner}: batches of {size} sample(s) (accumulate_grad_batches={accumulate}) have no spread to measure; "
            "use a batch size of at least 2 (or accumulate_grad_batches ≥ 2).")


def note_small_batches(owner: str, smallest: int, largest: int, epoch: int) -> None:
    """Said once a fit, at its first epoch's end, from the sizes its optimizer steps had
    (``dispersion/step_sizes.py``): a step of at most a quarter of the largest batch. Its
    dispersion ``tr Σ/b_t`` is ``b/b_t`` times a full batch's: the bounds fill at each step's own
    size (``docs/math.md`` §6.8), but such steps weigh that much more in the trajectory terms, and
    where they end an epoch the final weights come from one."""
    if smallest <= 0 or 4 * smallest > largest:
        return
    rank_zero_warn(
        f"{owner}: the optimizer steps of epoch {epoch} had batches of {smallest} to {largest} samples (a last "
        f"batch kept by drop_last=False, an accumulation window cut short at the epoch's end?): a step of {smallest} "
        f"has a dispersion (tr Σ/b) about {largest / smallest:.0f}× a full batch's. The bounds fill the steps not "
        "measured at each step's own batch size (docs/math.md §6.8), but those steps weigh that much more in the "
        "trajectory terms, and at an epoch's end the final weights come from one of them; where the small batch is "
        "a loader's last, DataLoader(drop_last=True) avoids both.")


def check_single_optimizer(owner: str, pl_module: LightningModule) -> None:
    """Manual optimization is supported with one optimizer (its ``step`` fires Lightning's
    ``on_before_optimizer_step``); several optimizers step different parameter sets at different
    times, which the per-step statistics cannot attribute."""
    if pl_module.automatic_optimization:
        return
    trainer = pl_module.trainer
    optimizers = trainer.optimizers if trainer is not None else []
    if len(optimizers) > 1:
        raise MisconfigurationException(
            f"{owner}: manual optimization with {len(optimizers)} optimizers is not supported — the "
            "per-step statistics describe one update W_t = W_{t−1} − η_t g. Measure a run with one "
            "optimizer, or remove the genbounds callbacks from this one."
        )


BOUND_METRICS = ("bound/", "bound_terms/", "gap/", "ci/")
"""The prefixes of what a ``GeneralizationBound`` evaluation logs."""


def check_monitors_see_every_value(owner: str, trainer: Trainer, budget: Any,
                                   prefixes: tuple[str, ...] = BOUND_METRICS) -> None:
    """Refuse, before step 0, a callback or scheduler of the Trainer that monitors one of
    ``owner``'s metrics (names starting with ``prefixes``) while an overhead budget (``budget``,
    an ``OverheadBudget`` whose ``fraction`` is set) spaces its evaluations by their cost.
    Lightning's monitors read ``trainer.callback_metrics`` at every validation: before the first
    evaluation the metric is missing (``EarlyStopping`` and ``ModelCheckpoint`` stop the run), and
    afterwards it holds the last evaluation's value until the next one, so patience would run out
    — and checkpoints be ranked — on stale values."""
    if budget is None or budget.fraction is None:
        return  # (evaluated at every validation)
    watchers = [(type(cb).__name__, cb.monitor) for cb in trainer.callbacks
                if isinstance(getattr(cb, "monitor", None), str)]
    watchers += [(type(cfg.scheduler).__name__, cfg.monitor) for cfg in trainer.lr_scheduler_configs
                 if isinstance(cfg.monitor, str)]  # (a scheduler's "monitor" in configure_optimizers)
    for who, monitor in watchers:
        if monitor.startswith(prefixes):
            raise MisconfigurationException(
                f"{who}(monitor={monitor!r}) reads {owner}'s metric at every validation, but overhead_budget="
                f"{budget.fraction:g} evaluates it only when the budget affords it: the first validations have no "
                "value (Lightning stops there) and later ones would hand it the last evaluation's value again. Remove "
                f"overhead_budget (then {owner} evaluates at every validation), or gate on the final value "
                "instead (BoundGate, `genbounds gate`).")
