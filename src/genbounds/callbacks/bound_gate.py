"""``BoundGate``: act when a logged metric (a bound, a gap, a curvature…) crosses a threshold."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

OnViolation = Literal["warn", "stop", "raise"]


class BoundViolation(RuntimeError):
    """Raised on every rank by ``BoundGate(on_violation="raise")``."""


def check_thresholds(values: dict[str, float], max: dict[str, float], min: dict[str, float]) -> list[dict[str, Any]]:
    """The violated thresholds: ``value > max`` or ``value < min`` (a NaN violates both)."""
    violations = []
    for kind, limits in (("max", max), ("min", min)):
        for name, limit in limits.items():
            if name not in values:
                continue
            value = values[name]
            bad = math.isnan(value) or (value > limit if kind == "max" else value < limit)
            if bad:
                violations.append({"metric": name, "kind": kind, "limit": float(limit), "value": float(value)})
    return violations


def format_violations(violations: list[dict[str, Any]]) -> str:
    rows = [f"{'metric':<36} {'value':>14} {'rule':>20}"]
    for v in violations:
        rule = f"{'<=' if v['kind'] == 'max' else '>='} {v['limit']:g}"
        rows.append(f"{v['metric']:<36} {v['value']:>14.6g} {rule:>20}")
    return "\n".join(rows)


class BoundGate(Callback):
    r"""Gate a run on logged metrics: ``max={"bound/wang_mao_eq3": 0.5}``, ``min={...}``.

    Checked after every validation (``on_validation_end``, where every ``on_validation_epoch_end``
    — the bounds included — has logged), or at the end of every training epoch when the run has
    no validation; skipped during the sanity check and under ``fast_dev_run``, like Lightning's
    ``EarlyStopping``. On a violation:

    * ``"warn"`` — one warning with a table of the violated thresholds;
    * ``"stop"`` — a graceful stop: ``trainer.should_stop`` is set, the decision reduced over DDP
      ranks (any rank's violation stops all); ``min_epochs``/``min_steps`` still delay the stop;
    * ``"raise"`` — :class:`BoundViolation` on **every** rank (after the same reduction), so a
      distributed run fails instead of hanging.

    The verdict is written to the loggers (``gate/violations``, ``gate/checks``) and kept in the
    checkpointed state (``violations``, a list of ``{metric, kind, limit, value, step}``). A
    monitored metric that is not logged yet gets one warning (``strict=True``: an error listing the
    available metrics).

    Args:
        max: upper thresholds ``{metric: limit}``.
        min: lower thresholds ``{metric: limit}``.
        on_violation: ``"warn"``, ``"stop"`` or ``"raise"``.
        strict: a missing metric is an error instead of a warning.
    """

    def __init__(
        self,
        max: dict[str, float] | None = None,
        min: dict[str, float] | None = None,
        on_violation: OnViolation = "warn",
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.max = {k: float(v) for k, v in (max or {}).items()}
        self.min = {k: float(v) for k, v in (min or {}).items()}
        if not self.max and not self.min:
            raise MisconfigurationException("BoundGate needs at least one threshold: max={...} or min={...}")
        if on_violation not in ("warn", "stop", "raise"):
            raise MisconfigurationException(f"BoundGate(on_violation={on_violation!r}) must be 'warn', 'stop' or 'raise'")
        self.on_violation = on_violation
        self.strict = strict
        self.violations: list[dict[str, Any]] = []
        self.checks = 0
        self.stopped_step: int | None = None
        self._missing_warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(max=self.max, min=self.min, on_violation=self.on_violation)

    def _skip(self, trainer: Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return bool(trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._skip(trainer):
            self._check(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._skip(trainer) and not trainer.enable_validation:
            self._check(trainer)

    def _check(self, trainer: Trainer) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        wanted = list(self.max) + list(self.min)
        missing = [m for m in wanted if m not in metrics]
        if missing:
            if self.strict:
                raise MisconfigurationException(
                    f"BoundGate: metric(s) {missing} not logged; available: {sorted(metrics)}"
                )
            for m in missing:
                if m not in self._missing_warned:
                    self._missing_warned.add(m)
                    rank_zero_warn(f"BoundGate: {m!r} has not been logged yet; it is not checked until it is.")
        found = check_thresholds(metrics, self.max, self.min)
        violated = trainer.strategy.reduce_boolean_decision(bool(found), all=False)
        self.checks += 1
        step = int(trainer.global_step)
        for v in found:
            self.violations.append({**v, "step": step})
        for logger in trainer.loggers:
            logger.log_metrics({"gate/violations": float(len(found)), "gate/checks": float(self.checks)}, step=step)
        if not violated:
            return
        table = format_violations(found) if found else "(violated on another rank)"
        message = f"BoundGate: threshold violated at step {step}:\n{table}"
        if self.on_violation == "warn":
            rank_zero_warn(message)
        elif self.on_violation == "stop":
            rank_zero_info(message + "\nStopping the run.")
            self.stopped_step = step
            trainer.should_stop = True
        else:
            raise BoundViolation(message)

    def state_dict(self) -> dict[str, Any]:
        return {"violations": list(self.violations), "checks": self.checks, "stopped_step": self.stopped_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.violations = list(state_dict.get("violations", []))
        self.checks = int(state_dict.get("checks", 0))
        self.stopped_step = state_dict.get("stopped_step")
