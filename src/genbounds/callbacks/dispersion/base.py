"""The interface every dispersion backend implements, and the per-step context it receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from genbounds.callbacks.distributed import reduce_moments
from genbounds.estimators.functional import nograd
from genbounds.estimators.gradient_dispersion import (
    DispersionEstimate,
    GradientMoments,
    batch_values,
    group_mean_sq_norms,
)


@dataclass
class StepContext:
    """What a backend may use at one measured micro-batch or optimizer step."""

    trainer: Trainer
    module: LightningModule
    params: list[Tensor]
    groups: list[list[int]]
    """Parameter indices per group (layer), in the callback's group order."""
    batch: Any = None
    micro_size: int = 0
    """``m``: samples in this micro-batch."""
    accumulate: int = 1
    """``A``: Lightning's ``accumulate_grad_batches`` (the training loss is divided by it)."""
    loss_scale: Tensor | float = 1.0
    """``S``: the AMP loss scale of this backward (1 without a gradient scaler)."""
    extras: dict[str, Any] = field(default_factory=dict)
    groups_partition: bool = False
    """Whether ``groups`` partition ``params`` (every parameter in exactly one group)."""
    step: int = -1
    """The logger step the callback records this step's values at."""
    batch_idx: int = 0
    """Lightning's ``batch_idx`` of this micro-batch (an extra pass re-runs ``training_step`` with it)."""


class LazyGrads(dict):
    """A :class:`StepContext`'s ``extras`` whose ``"grads"`` — the batch gradient as ``.grad``
    holds it, detached, zeros where ``.grad`` is ``None`` — are built when first read (the norm
    hooks read them once per step, not at both of its hooks)."""

    def __init__(self, params: list[Tensor], **items: Any) -> None:
        super().__init__(**items)
        self._params = params

    def __missing__(self, key: str) -> Any:
        if key != "grads":
            raise KeyError(key)
        grads = [torch.zeros_like(p) if p.grad is None else nograd(p.grad) for p in self._params]
        self["grads"] = grads
        return grads

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __contains__(self, key: object) -> bool:
        return key == "grads" or super().__contains__(key)


@dataclass
class WindowResult:
    """The statistics of one optimizer step's batch."""

    moments: GradientMoments | None
    mean_sq: Tensor | None = None
    """``‖ḡ‖²`` when read from ``.grad`` (``None``: from ``moments.weighted_sum``)."""
    group_mean_sq: Tensor | None = None
    """``‖ḡ_k‖²`` per group."""
    row: Tensor | None = None
    """The logged ``[3 + K]`` row (:func:`~genbounds.estimators.gradient_dispersion.dispersion_row`'s
    order), when the backend computed it in one pass (then ``moments`` may be ``None``)."""
    kept: bool = False
    """The row waits in a row ring, which hands it to the step log (nothing to record now)."""
    failed: Tensor | None = None
    """Under DDP, after :meth:`values`: how many processes' parts of this step failed (summed on
    the device in the moments' own reduction; read by the callback at its next flush)."""

    def values(self, trainer: Trainer, groups: list[list[int]], groups_partition: bool
               ) -> Tensor | DispersionEstimate | None:
        """The values to log: :attr:`row` when the backend computed it, else from the moments
        (reduced over ranks); ``None`` for a one-sample batch on one process (no spread to measure,
        e.g. a last batch of size 1)."""
        if self.row is not None:
            return self.row
        moments, group_mean_sq = self.moments, self.group_mean_sq
        assert moments is not None
        if trainer.world_size > 1:
            moments = reduce_moments(trainer, moments)
            self.failed = moments.failed  # type: ignore[assignment]
        elif isinstance(moments.num_units, int) and moments.num_units < 2:
            return None
        if moments.weighted_sum is not None and group_mean_sq is None:
            # (from the processes' summed gradient under DDP: this process's own mean was used)
            group_mean_sq = group_mean_sq_norms(moments, groups)
        return batch_values(moments, self.mean_sq, group_mean_sq, groups_partition)


class DispersionBackend:
    """Hooks called by ``GradientDispersion`` at the training step's moments. Only measured
    steps reach ``after_backward``/``end_window``."""

    name = "base"
    reads_training_backward = False
    """Whether the backend uses the training step's own backward (then the training loss must be
    the mean of the per-sample losses: the loss contract's trial checks it)."""
    reads_late = False
    """Whether :meth:`after_backward` may instead run at the optimizer step, just before
    :meth:`end_window`, on a step of one backward (it reads nothing that changes in between, and
    returns ``None`` without failing when no backward ran since :meth:`before_forward`)."""
    description = ""

    def attach(self, module: LightningModule) -> None:
        """Once, before the first training step."""

    def start_window(self, measuring: bool) -> None:
        """At the first micro-batch of every optimizer step."""

    def use_row_ring(self, step_log: Any, names: tuple[str, ...]) -> None:
        """Once, when every measured step is read at the optimizer step on the raw path: the
        backend may keep those steps' raw values and hand their rows to ``step_log`` under
        ``names`` later (``dispersion/row_ring.py``); by default each step's row is returned."""

    def before_forward(self, ctx: StepContext) -> None:
        """At a measured micro-batch, before its forward."""

    def before_backward(self, ctx: StepContext) -> None:
        """At a measured micro-batch, just before its backward."""

    def after_backward(self, ctx: StepContext) -> Any:
        """At a measured micro-batch, after its backward: this micro-batch's moments (or the
        backend's own raw form of them, which only its :meth:`end_window` reads: the callback
        merges micro-batches only under accumulation or manual optimization)."""
        return None

    def end_window(self, ctx: StepContext, window: Any) -> WindowResult | None:
        """At ``on_before_optimizer_step`` of a measured step (``.grad`` is complete, unscaled)."""
        if window is None:
            return None
        return WindowResult(window)

    def end_batch(self) -> None:
        """At the end of every training batch (``on_train_batch_end``)."""

    def end_epoch(self) -> None:
        """At an epoch's end and before validation (after :meth:`end_batch`)."""

    def hook_seconds(self) -> float:
        """Seconds spent in hooks inside forward/backward since the last call (reset)."""
        return 0.0

    def detach(self) -> None:
        """At teardown or on an exception."""
