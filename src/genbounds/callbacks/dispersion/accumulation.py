"""``backend="accumulation"`` (``microbatch`` under ``accumulate_grad_batches ≥ 2``): the
accumulation micro-steps *are* the chunks of SPEC §1's estimator, read from ``.grad``
differences — nothing extra is computed. Exact for the procedure that trains (each micro-batch
is its own forward, BatchNorm statistics included). Single process only (under DDP the
micro-steps' gradients are rank-local)."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch import Tensor

from genbounds.callbacks.dispersion.base import DispersionBackend, StepContext, WindowResult
from genbounds.estimators.functional import dot, per_tensor_sq_norms, sq_norm
from genbounds.estimators.gradient_dispersion import GradientMoments, group_sums


class GradientDeltas:
    """What each accumulation micro-step's backward added to ``.grad`` (``S·h_j/A``)."""

    def __init__(self) -> None:
        self.previous: list[Tensor] | None = None

    def reset(self) -> None:
        self.previous = None

    def delta(self, grads: list[Tensor]) -> list[Tensor]:
        if self.previous is None:
            out = [g.clone() for g in grads]
            self.previous = [g.clone() for g in grads]
            return out
        out = [g - p for g, p in zip(grads, self.previous)]
        for p, g in zip(self.previous, grads):
            p.copy_(g)
        return out


class AccumulationBackend(DispersionBackend):
    name = "accumulation"
    reads_training_backward = True

    def __init__(self, accumulate: int) -> None:
        self.description = f"the {accumulate} gradient-accumulation micro-steps as chunks (no extra pass)"
        self.deltas = GradientDeltas()

    def start_window(self, measuring: bool) -> None:
        self.deltas.reset()

    def after_backward(self, ctx: StepContext) -> GradientMoments | None:
        delta = self.deltas.delta(ctx.extras["grads"])
        m = ctx.micro_size
        per_param = per_tensor_sq_norms(delta)
        return GradientMoments(m * per_param.sum(), m, 1, weighted_sum=[m * d for d in delta],
                               group_sq=m * group_sums(per_param, ctx.groups))

    def end_window(self, ctx: StepContext, window: GradientMoments | None) -> WindowResult | None:
        """Convert chunk moments in ``.grad`` units (``S·h_j/A``) to gradients ``h_j``; ``S`` is
        recovered on the device as ``⟨scaled, unscaled⟩/‖unscaled‖²`` from the last scaled
        cumulative gradient (``.grad`` is unscaled by now)."""
        if window is None or (isinstance(window.num_units, int) and window.num_units < 2):
            return None
        grads = ctx.extras["grads"]
        factor: Tensor | float = float(ctx.accumulate)
        if ctx.extras.get("scaler") and self.deltas.previous is not None:
            scale = dot(self.deltas.previous, grads) / sq_norm(grads)
            factor = ctx.accumulate / scale
        assert window.weighted_sum is not None
        moments = GradientMoments(
            weighted_sq_norm_sum=window.weighted_sq_norm_sum * factor**2,
            num_samples=window.num_samples,
            num_units=window.num_units,
            weighted_sum=[w * factor for w in window.weighted_sum],
            group_sq=None if window.group_sq is None else window.group_sq * factor**2,
        )
        return WindowResult(moments)


def scheduled_accumulation(trainer: Trainer) -> int:
    """``accumulate_grad_batches`` for the current epoch: a ``GradientAccumulationScheduler`` sets
    it only at each epoch start, after ``on_train_start``, so its schedule is read here."""
    for cb in trainer.callbacks:
        if isinstance(cb, GradientAccumulationScheduler):
            return int(cb.get_accumulate_grad_batches(trainer.current_epoch))
    return int(trainer.accumulate_grad_batches)
