"""``BoundGate``: act when a logged metric (a bound, a gap, a curvature…) crosses a threshold —
and fail closed: a NaN, a missing value or a stale value is a violation, not a pass."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from genbounds.bounds.aggregate import ERROR
from genbounds.callbacks.checks import check_bool, check_choice, check_float
from genbounds.callbacks.hook_clock import MeasurementCallback
from genbounds.callbacks.step_log import StepLog

OnViolation = Literal["warn", "stop", "raise"]
Lenient = Literal["nan", "missing", "stale"]

GENBOUNDS_PREFIXES = ("bound/", "bound_terms/", "bound_valid/", "ci/", "gap/", "setting/", "grad/",
                      "curv/", "flat/", "sens/", "stability/", "clip/", "phase/", "perf/")


class BoundViolation(RuntimeError):
    """Raised on every rank by ``BoundGate(on_violation="raise")``."""


RAISED_TAG = "gate/raised"
"""Logged (1) at the step where ``on_violation="raise"`` ends the fit: ``genbounds gate`` reads it
(``reporting.events.RAISED_TAG``, checked equal by a test) and says so instead of "killed or crashed"."""
STALE_TOLERANCE = 1
"""Steps a value logged by a genbounds callback may lag the run's end before it is stale: one, as
``genbounds gate`` reads the logs (``reporting.gate.DEFAULT_STALE_TOLERANCE``: a measured step's
statistics describe the weights before its update)."""


def check_thresholds(values: dict[str, float], max: dict[str, float], min: dict[str, float],
                     lenient: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The violated thresholds: ``value > max`` or ``value < min``; a NaN value (unless ``"nan"`` is
    lenient), a missing one (unless ``"missing"`` is) or an infinite one violates too, with its reason."""
    violations = []
    for kind, limits in (("max", max), ("min", min)):
        for name, limit in limits.items():
            if name not in values:
                if "missing" not in lenient:
                    violations.append({"metric": name, "kind": kind, "limit": float(limit), "value": math.nan,
                                       "reason": "missing"})
                continue
            value = float(values[name])
            if math.isnan(value):
                if "nan" not in lenient:
                    violations.append({"metric": name, "kind": kind, "limit": float(limit), "value": value,
                                       "reason": "nan"})
                continue
            if math.isinf(value):  # (±inf passed a max or a min: a new user's walk, round 33)
                violations.append({"metric": name, "kind": kind, "limit": float(limit), "value": value,
                                   "reason": "infinite"})
                continue
            if value > limit if kind == "max" else value < limit:
                violations.append({"metric": name, "kind": kind, "limit": float(limit), "value": value,
                                   "reason": "threshold"})
    return violations


def format_violations(violations: list[dict[str, Any]]) -> str:
    rows = [f"{'metric':<36} {'value':>14} {'rule':>20}  reason"]
    for v in violations:
        rule = f"{'<=' if v['kind'] == 'max' else '>='} {v['limit']:g}"
        rows.append(f"{v['metric']:<36} {v['value']:>14.6g} {rule:>20}  {v.get('reason', 'threshold')}")
    return "\n".join(rows)


class BoundGate(MeasurementCallback):
    r"""Gate a run on logged metrics: ``max={"bound/wang_mao_eq3": 0.5}``, ``min={"val_acc": 0.9}``.

    Checked after every validation (``on_validation_end``), or at the end of every training epoch
    when the run has no validation, and a last time on the **final** values at the end of
    training (the bounds of the final weights included); skipped during the sanity check and
    under ``fast_dev_run``, like Lightning's ``EarlyStopping``.

    Fail closed: a gated value that is NaN, missing, or — at the final check — older than the last
    evaluation is a violation, with its reason; ``lenient=["nan", "missing", "stale"]`` turns the
    listed cases into warnings. Names of genbounds metrics (``bound/…``, ``gap/…``, ``grad/…``, …)
    are checked against what the suite logs at ``setup``, with a suggestion for a misspelling.

    On a violation: ``"warn"`` — one warning at the first violation, and the verdict at the end;
    ``"stop"`` — a graceful stop, the decision reduced over DDP ranks (``min_epochs`` still
    applies); ``"raise"`` — :class:`BoundViolation` on every rank: at once at a check during
    training, and at the fit's teardown for the final values, after the fit has ended with its
    results (the table, its Text-tab copy, ``gate/passed`` and ``run/complete``: training did finish).

    The verdict is written to the loggers (``gate/violations``, ``gate/checks``, and
    ``gate/passed`` at the end) and kept in the checkpointed state.

    Args:
        max: upper thresholds ``{metric: limit}`` (a limit may be ±inf, never NaN).
        min: lower thresholds ``{metric: limit}``.
        on_violation: ``"warn"``, ``"stop"`` or ``"raise"``.
        lenient: cases not counted as violations: ``"nan"``, ``"missing"``, ``"stale"``.
        strict: an unknown genbounds metric name is an error at setup (default) instead of a warning.
    """

    def __init__(
        self,
        max: dict[str, float] | None = None,
        min: dict[str, float] | None = None,
        on_violation: OnViolation = "warn",
        lenient: list[Lenient] | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__()
        owner = "BoundGate"
        for name, given in (("max", max), ("min", min)):
            if given is not None and not isinstance(given, Mapping):
                raise MisconfigurationException(
                    f"BoundGate({name}={given!r}): thresholds are a mapping {{metric: limit}}, e.g. "
                    f"{name}={{'bound/wang_mao_eq3': {given!r}}}")
        self.max = {str(k): check_float(owner, f"max[{k!r}]", v, allow_inf=True) for k, v in (max or {}).items()}
        self.min = {str(k): check_float(owner, f"min[{k!r}]", v, allow_inf=True) for k, v in (min or {}).items()}
        if not self.max and not self.min:
            raise MisconfigurationException("BoundGate needs at least one threshold: max={...} or min={...}")
        self.on_violation = check_choice(owner, "on_violation", on_violation, ("warn", "stop", "raise"))
        self.lenient = tuple(check_choice(owner, "lenient", x, ("nan", "missing", "stale")) for x in (lenient or []))
        self.strict = check_bool(owner, "strict", strict)
        self.violations: list[dict[str, Any]] = []
        self.checks = 0
        self.stopped_step: int | None = None
        self.final: dict[str, Any] | None = None
        self._raise_at_teardown: str | None = None
        self._warned = False
        self._bound: Any = None
        self._before_validation: dict[str, Any] = {}
        self.from_validation: set[str] = set()
        """The metrics a validation run computed (their value objects changed during it)."""
        self.validated_at: int | None = None
        """The step of the last validation run of the fit."""

    @property
    def state_key(self) -> str:
        return "BoundGate"  # thresholds may change on resume: the history is kept, each entry with its rule

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from genbounds.callbacks.generalization_bound import GeneralizationBound

        self._bound = next((cb for cb in trainer.callbacks if isinstance(cb, GeneralizationBound)), None)
        known = self._known_tags(trainer)
        unknown = [m for m in [*self.max, *self.min] if m.startswith(GENBOUNDS_PREFIXES) and not _matches(m, known)]
        if unknown:
            hints = []
            for m in unknown:
                close = difflib.get_close_matches(m, sorted(known), n=1, cutoff=0.6)
                hints.append(f"{m!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            message = (f"BoundGate: {', '.join(hints)} will never be logged by the genbounds callbacks of this "
                       f"Trainer; they log: {', '.join(sorted(k for k in known if not k.endswith('/*')))[:600]} …")
            if self.strict:
                raise MisconfigurationException(message)
            rank_zero_warn(message)

    def _known_tags(self, trainer: Trainer) -> set[str]:
        from genbounds.callbacks import (
            Flatness,
            GradientDispersion,
            GradientSensitivity,
            HeldoutGradient,
            HessianContractivity,
            HessianTrace,
        )

        tags: set[str] = set()
        for cb in trainer.callbacks:
            if isinstance(cb, GradientDispersion):
                tags |= {"grad/norm_sq", "grad/trace_cov", "grad/trace_cov_se", "grad/dispersion", "grad/dispersion/*"}
            elif isinstance(cb, HeldoutGradient):
                tags |= {"grad/heldout_dist_sq", "gap/step_realized", "gap/step_predicted", "gap/predicted_cumulative",
                         "grad/heldout_dist_sq/*"}
            elif isinstance(cb, HessianTrace):
                tags |= {"curv/hessian_trace", "curv/hessian_trace_se", "curv/hessian_trace_probes",
                         "curv/hessian_top_eig", "curv/hessian_top_eig_residual", "curv/weighted_dispersion",
                         "curv/weighted_dispersion_se", "curv/hessian_trace/*", "curv/hessian_trace_se/*"}
            elif isinstance(cb, HessianContractivity):
                tags |= {"curv/contractivity_mean", "curv/contractivity_mean_se", "curv/contractivity_min",
                         "curv/contractivity_exact", "curv/contractivity_points"}
            elif isinstance(cb, (Flatness, GradientSensitivity)):
                tags |= {"flat/*", "sens/*"}
        if self._bound is not None:
            wanted = self._bound.wanted
            # (Neu's |gap| bound comes with Neu's; the test-error bound, a value alone — no SE, no
            # validity flag —, with a 0-1 error bound)
            for name in wanted + (("neu_abs",) if "neu" in wanted else ()):
                tags |= {f"bound/{name}", f"bound/{name}_se", f"bound_valid/{name}"}
            if any(b in wanted for b in ERROR):
                tags.add("bound/test_error_upper")
            tags |= {"bound/valid", "bound/heuristic", "bound_terms/*", "ci/*", "setting/*",
                     "gap/measured", "gap/measured_se", "gap/error", "gap/error_se", "gap/train_loss",
                     "gap/heldout_loss", "gap/train_error", "gap/heldout_error", "gap/measured_change",
                     "perf/overhead"}
        return tags

    # ------------------------------------------------------------------ checks
    def _skip(self, trainer: Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return bool(trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._skip(trainer):  # (the value objects: those a validation logs are new at its end)
            self._before_validation = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._skip(trainer):
            before, self._before_validation = self._before_validation, {}
            self.from_validation |= {k for k, v in trainer.callback_metrics.items() if v is not before.get(k)}
            self.validated_at = int(trainer.global_step)
            self._check(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._skip(trainer) and not trainer.enable_validation:
            self._check(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # the final check runs at fit end, after the bounds of the final weights

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from genbounds.callbacks.step_log import mark_run_complete

        if not (trainer.sanity_checking or trainer.fast_dev_run):
            self.final_check(trainer)
        mark_run_complete(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        message, self._raise_at_teardown = self._raise_at_teardown, None
        if message is not None:
            raise BoundViolation(message)

    def _values(self, trainer: Trainer) -> tuple[dict[str, float], dict[str, int], set[str]]:
        """The gated values, the step each was computed at where known, and which of those steps a
        genbounds step log wrote (stale only beyond :data:`STALE_TOLERANCE` steps)."""
        values = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        steps: dict[str, int] = {}
        logged: set[str] = set()
        # a genbounds probe's value, at the step its callback logged it (the step the logs carry): the
        # Trainer's gate passed a held-out probe's value of step 10 in a run that ended at step 630,
        # which `genbounds gate` failed as stale on the same logs (a new user's walk, round 33)
        for cb in trainer.callbacks:
            log = getattr(cb, "step_log", None)
            if cb is self._bound or not isinstance(log, StepLog):
                continue
            for key, at in log.latest_step.items():
                # (the value in callback_metrics is the step log's, as a float32 tensor)
                if key in values and math.isclose(values[key], log.latest.get(key, math.nan), rel_tol=1e-6):
                    steps[key] = at
                    logged.add(key)
        if self._bound is not None:
            for key, value in self._bound.latest.items():
                values[key] = float(value)
                if self._bound._evaluated_step is not None:
                    steps[key] = int(self._bound._evaluated_step)
                    logged.discard(key)
        return values, steps, logged

    def _check(self, trainer: Trainer, final: bool = False) -> list[dict[str, Any]]:
        values, steps, logged = self._values(trainer)
        # before the end a metric may not be logged yet (its first evaluation is still to come)
        lenient = self.lenient if final else self.lenient + ("missing",)
        if not final:
            # a bound's NaN before the end says "not computable yet" as often as "failed" (a callback on a
            # sparser schedule than the evaluations: Neu's bound waits for the sensitivity to cover the
            # steps so far), and `stop` ended healthy runs at their first validation (a new user's walk,
            # round 32): counted as missing until the final check, which fails it
            values = {k: v for k, v in values.items() if not (k.startswith("bound") and math.isnan(v))}
        found = check_thresholds(values, self.max, self.min, lenient)
        step = int(trainer.global_step)
        if final and "stale" not in self.lenient:
            # a bound of weights before the final ones; a metric of yours that validation computes, whose
            # last validation ran before the final weights (check_val_every_n_epoch, a run stopped between
            # validations): as `genbounds gate` reads the logs
            for name, limit in [*self.max.items(), *self.min.items()]:
                last = steps.get(name, self.validated_at if name in self.from_validation else None)
                slack = STALE_TOLERANCE if name in logged else 0  # (as `genbounds gate` reads the logs)
                if name in values and last is not None and last < step - slack:
                    found.append({"metric": name, "kind": "max" if name in self.max else "min", "limit": limit,
                                  "value": values[name], "reason": f"stale: last computed at step {last}, "
                                                                   f"the run ended at step {step}"})
        violated = trainer.strategy.reduce_boolean_decision(bool(found), all=False)
        self.checks += 1
        for v in found:
            self.violations.append({**v, "step": step})
        for logger in trainer.loggers:
            logger.log_metrics({"gate/violations": float(len(found)), "gate/checks": float(self.checks)}, step=step)
        if not violated:
            return found
        table = format_violations(found) if found else "(violated on another rank)"
        message = f"BoundGate: {'final values' if final else 'threshold'} violated at step {step}:\n{table}"
        if self.on_violation == "raise" and final:
            # (raised once the fit's end has run: raised here, it cut the results table, its Text-tab copy
            # and gate/passed short, a new user's walk, round 33; said by the exception, not a warning too)
            self._raise_at_teardown = message
            return found
        if self.on_violation == "raise":
            # (the run's logs say why it ends here: `genbounds gate` names the gate instead of "killed or crashed")
            for logger in trainer.loggers:
                logger.log_metrics({RAISED_TAG: 1.0}, step=step)
            raise BoundViolation(message)
        if self.on_violation == "stop" and not final:
            rank_zero_info(message + "\nStopping the run.")
            self.stopped_step = step
            trainer.should_stop = True
        elif not self._warned:
            self._warned = True
            rank_zero_warn(message + ("" if final else "\n(further violations are counted; the verdict is reported "
                                                      "at the end)"))
        return found

    def final_check(self, trainer: Trainer) -> dict[str, Any]:
        """The verdict on the final values (once; later calls return it)."""
        if self.final is not None:
            return self.final
        found = self._check(trainer, final=True)
        self.final = {"passed": not found, "violations": found, "step": int(trainer.global_step)}
        for logger in trainer.loggers:
            logger.log_metrics({"gate/passed": float(not found)}, step=int(trainer.global_step))
        return self.final

    def verdict(self) -> str:
        if self.final is None:
            return "not checked"
        if self.final["passed"]:
            return f"PASS ({len(self.max) + len(self.min)} threshold(s) on the final values)"
        items = ", ".join(f"{v['metric']} {v['reason']}" + (
            f" ({_apart(v['value'], v['limit'])} {'>' if v['kind'] == 'max' else '<'} {v['kind']} {v['limit']:g})"
            if v["reason"] == "threshold" else "") for v in self.final["violations"])
        return f"FAIL — {items}"

    def state_dict(self) -> dict[str, Any]:
        return {"violations": list(self.violations), "checks": self.checks, "stopped_step": self.stopped_step,
                "warned": self._warned, "from_validation": sorted(self.from_validation),
                "validated_at": self.validated_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.violations = list(state_dict.get("violations", []))
        self.checks = int(state_dict.get("checks", 0))
        self.stopped_step = state_dict.get("stopped_step")
        self._warned = bool(state_dict.get("warned", False))
        self.from_validation = set(state_dict.get("from_validation", ()))
        self.validated_at = state_dict.get("validated_at")


def _apart(value: float, limit: float) -> str:
    """``value`` with as many digits as it takes to read different from ``limit`` (0.5000001, not 0.5)."""
    shown = float(f"{limit:g}")
    for digits in (4, 7, 10, 17):
        text = f"{value:.{digits}g}"
        if (float(text) > shown) == (value > limit) and (float(text) < shown) == (value < limit):
            return text
    return repr(value)


def _matches(name: str, known: set[str]) -> bool:
    if name in known:
        return True
    return any(k.endswith("/*") and name.startswith(k[:-1]) for k in known)
