"""``DynamicGradientClipping`` — an intervention: Wang & Mao's Algorithm 1 (SPEC §7)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from genbounds.callbacks.checks import check_choice, check_float, check_int
from genbounds.callbacks.intervention import GradientIntervention
from genbounds.callbacks.state_key import state_key_once
from genbounds.callbacks.step_log import FlushesStepLog, StepLog, epoch_end_step, logger_step
from genbounds.estimators.functional import sq_norm, trainable_parameters


class DynamicGradientClipping(FlushesStepLog, GradientIntervention):
    r"""**Changes training.** Dynamic gradient clipping, seed 001 Algorithm 1.

    ``G`` starts at ``initial_norm`` (``+∞``). At every optimizer step ``t`` from the start step
    ``T_c`` on: if ``‖g_B‖ > G`` the gradient is rescaled to ``α·G·g_B/‖g_B‖`` (norm ``α·G``);
    otherwise ``G ← ‖g_B‖`` — ``G`` is the running minimum of the unclipped norms. The norm is over
    all trainable parameters, on the complete unscaled gradient, before the optimizer step (and
    before Lightning's own ``gradient_clip_val`` clipping). This is Algorithm 1, not the
    "compare with K steps earlier" variant that seed 001 §5's text describes.

    The start step:

    * ``start_step=T_c`` — explicit;
    * ``auto_start="grad_norm"`` (seed 001 E.5) — clipping begins once an epoch's mean gradient
      norm exceeds the previous epoch's: the end of that epoch is when it is known, so clipping
      starts with the next epoch's first step;
    * ``auto_start="dispersion"`` — when a :class:`DispersionPhaseDetector` in the same trainer
      reports the valley of the gradient dispersion (the start of memorization).

    Logs ``clip/grad_norm`` (the unclipped norm, every step), ``clip/level`` (``G``), ``clip/active``
    (1 when the step was rescaled) and ``clip/start_step`` — all on device until Lightning's
    logging steps.

    Args:
        alpha: the clipping factor ``α`` (paper: 0.1).
        start_step: ``T_c``; ``None`` for an automatic start.
        auto_start: ``"grad_norm"`` or ``"dispersion"`` (used when ``start_step`` is ``None``).
        initial_norm: the initial ``G`` (paper: an input of Algorithm 1; default ``+∞``).
    """

    owner = "DynamicGradientClipping"

    def __init__(
        self,
        alpha: float = 0.1,
        start_step: int | None = None,
        auto_start: Literal["grad_norm", "dispersion"] = "grad_norm",
        initial_norm: float = math.inf,
    ) -> None:
        super().__init__()
        o = "DynamicGradientClipping"
        self.alpha = check_float(o, "alpha", alpha, low=0.0, low_open=True)
        self.start_step = check_int(o, "start_step", start_step, minimum=0, optional=True)
        self.auto_start = check_choice(o, "auto_start", auto_start, ("grad_norm", "dispersion"))
        self.initial_norm = check_float(o, "initial_norm", initial_norm, low=0.0, low_open=True, allow_inf=True)
        self.step_log = StepLog(self.owner)
        self.level: Tensor | None = None
        self.epoch_norms: list[float] = []
        self._epoch_sum: Tensor | None = None
        self._epoch_count = 0

    @property
    def state_key(self) -> str:
        return state_key_once(self, alpha=self.alpha, auto_start=self.auto_start)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.start_step is not None or self.auto_start != "dispersion":
            return
        from genbounds.callbacks.dispersion_phase import DispersionPhaseDetector

        detectors = [cb for cb in trainer.callbacks if isinstance(cb, DispersionPhaseDetector)]
        if not detectors:
            raise MisconfigurationException(
                "DynamicGradientClipping(auto_start='dispersion') needs a DispersionPhaseDetector (and the "
                "GradientDispersion it reads) in the same Trainer."
            )
        detectors[0].channel.subscribe(self._on_phase)

    def _on_phase(self, records: list) -> None:
        if self.start_step is None and self._trainer_step is not None:
            self._begin(self._trainer_step, f"the dispersion valley at epoch {records[-1].valley_epoch}")

    @property
    def _trainer_step(self) -> int | None:
        return None if self._wrapped is None else int(self._wrapped[0].trainer.global_step)

    def _begin(self, step: int, why: str) -> None:
        self.start_step = step
        rank_zero_info(f"DynamicGradientClipping: clipping starts at step {step} ({why}).")

    def modify_gradients(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        grads = [p.grad for p in trainable_parameters(pl_module).values() if p.grad is not None]
        if not grads:
            return
        norm = sq_norm(grads).sqrt()
        step = logger_step(trainer)
        values = {"clip/grad_norm": norm}
        if self.start_step is None or trainer.global_step < self.start_step:
            self._epoch_sum = norm if self._epoch_sum is None else self._epoch_sum + norm
            self._epoch_count += 1
        else:
            if self.level is None:
                self.level = torch.tensor(self.initial_norm, dtype=torch.float64, device=norm.device)
            level = self.level.to(norm.device)
            clip = norm > level
            scale = torch.where(clip, self.alpha * level / norm, torch.ones_like(norm))
            for g in grads:
                g.mul_(scale.to(g.dtype))
            self.level = torch.where(clip, level, norm)
            values.update({"clip/level": self.level, "clip/active": clip.double()})
        self.step_log.record(step, values)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._epoch_count:
            assert self._epoch_sum is not None
            self.epoch_norms.append(float(self._epoch_sum) / self._epoch_count)
        self._epoch_sum, self._epoch_count = None, 0
        if (self.start_step is None and self.auto_start == "grad_norm" and len(self.epoch_norms) >= 2
                and self.epoch_norms[-1] > self.epoch_norms[-2]):
            self._begin(int(trainer.global_step), f"epoch {trainer.current_epoch}'s mean gradient norm "
                        f"{self.epoch_norms[-1]:.4g} exceeds the previous epoch's {self.epoch_norms[-2]:.4g}")
        if self.start_step is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"clip/start_step": float(self.start_step)}, step=epoch_end_step(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "level": None if self.level is None else float(self.level),
                "epoch_norms": list(self.epoch_norms)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_step = state_dict.get("start_step", self.start_step)
        level = state_dict.get("level")
        self.level = None if level is None else torch.tensor(level, dtype=torch.float64)
        self.epoch_norms = list(state_dict.get("epoch_norms", []))

