"""One optimizer step of :class:`~genbounds.callbacks.GradientDispersion`'s measurement, from its
first micro-batch's start to its optimizer step.

The callback keeps the schedule (which steps are measured), the logging and the resumable state;
:class:`~.slot.BackendSlot` keeps which backend measures; this keeps what lies between them: the
trained parameters and their groups (the logged row's layout), each micro-batch's
:class:`~.base.StepContext`, the parts the backend returns at each backward merged into the step's
window, and the step's values at the optimizer step.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from genbounds.callbacks.dispersion.base import LazyGrads, StepContext
from genbounds.callbacks.dispersion.slot import BackendSlot
from genbounds.callbacks.dispersion.unmeasured import UnmeasuredNotes
from genbounds.callbacks.loss_contract import LossContract
from genbounds.estimators.batching import batch_size
from genbounds.estimators.functional import group_positions, trainable_parameters
from genbounds.estimators.gradient_dispersion import DispersionEstimate

KEPT = True
""":meth:`MeasuredStep.end`'s answer for a step the backend's row ring keeps (``dispersion/row_ring.py``):
counted as measured, nothing to record now."""


class MeasuredStep:
    """The current step's measurement (one object per callback; its fits share it)."""

    def __init__(self, slot: BackendSlot) -> None:
        self.slot = slot
        self.contract: LossContract | None = None
        self.loss_fn: Any = None
        self.unmeasured = UnmeasuredNotes()
        self.group_names: list[str] = []
        self.row_names: tuple[str, ...] = ()
        self.params: list[Tensor] = []
        self.groups: list[list[int]] = []
        self.groups_partition = False
        self.accumulate = 1
        self.scaler: Any = None
        self.measuring = False
        self.step = 0
        self.batch: Any = None
        self.batch_idx = 0
        self.micro_size = 0  # (the batch's size as StepSizes read it at the batch start; 0: unknown)
        self.window: Any = None  # GradientMoments, or the backend's raw form (HookSums)
        self.manual_grads: list[Tensor] | None = None
        self.failed: Tensor | None = None  # (DDP: failed parts since the last flush, fail_together)
        self.late_ok = self.late = False  # (norms read at the optimizer step: gradient_dispersion._READ_LATE)

    # ------------------------------------------------------------------ per fit
    def take_parameters(self, pl_module: LightningModule, layer_groups: dict[str, str] | None) -> None:
        """The trained parameters, their groups and the logged row's names (at ``on_train_start``,
        after Lightning's ``BaseFinetuning`` froze a backbone, and again when they change)."""
        self.group_names, self.groups = group_positions(pl_module, layer_groups)
        self.params = list(trainable_parameters(pl_module).values())
        self.row_names = ("grad/norm_sq", "grad/trace_cov", "grad/dispersion",
                          *(f"grad/dispersion/layer/{g}" for g in self.group_names))
        # the one-vector form sums the groups for the totals: only when they partition
        self.groups_partition = sorted(i for g in self.groups for i in g) == list(range(len(self.params)))

    def take_scaler(self, trainer: Trainer) -> None:
        """The precision plugin's enabled gradient scaler, if any (its scale divides ``.grad``)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scaler = scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None

    def plan_late(self, trainer: Trainer, pl_module: LightningModule, step_log: Any, can_set_aside: bool) -> None:
        """Whether a measured step's backward may be read at its optimizer step (``reads_late``):
        one backward a step whose gradient is the batch mean, read by the norms' raw path (one
        Lightning hook fewer a step; not where the after-backward hook cannot be set aside — a
        subclass's own, an older Lightning: ``can_set_aside``). Then the backend keeps its rows in
        a row ring that hands them to ``step_log``."""
        self.late_ok = (self.accumulate == 1 and pl_module.automatic_optimization and trainer.world_size == 1
                        and self.groups_partition and can_set_aside)
        if self.late_ok and self.slot.impl is not None:
            self.slot.impl.use_row_ring(step_log, self.row_names)

    def fail_together(self, trainer: Trainer) -> None:
        """Under DDP: the backend failed in some process at a step since the last flush — every
        process falls back here, together (``BackendSlot.fall_back_together``). The count was
        summed on the device in the steps' own reductions; it is read at a flush, where the step
        log reads its values, not at every step."""
        failed, self.failed = self.failed, None
        if failed is not None and float(failed) != 0.0:
            assert self.contract is not None
            self.slot.fall_back_together(trainer, self.contract, self.loss_fn)

    # ------------------------------------------------------------------ per step
    def context(self, trainer: Trainer, pl_module: LightningModule, grads: list[Tensor] | None = None) -> StepContext:
        scale: Tensor | float = 1.0
        if self.scaler is not None and getattr(self.scaler, "_scale", None) is not None:
            scale = self.scaler._scale.reshape(())
        extras = LazyGrads(self.params, scaler=self.scaler is not None)
        if grads is not None:
            extras["grads"] = grads
        m = (self.micro_size or batch_size(self.batch)) if self.batch is not None else 0
        return StepContext(trainer, pl_module, self.params, self.groups, self.batch, m, self.accumulate, scale,
                           extras, self.groups_partition, self.step, self.batch_idx)

    def start_window(self, step: int, measuring: bool) -> None:
        """At the first micro-batch of optimizer step ``step`` (``step_log.weights_step``): whether
        it is measured (the schedule's answer) and whether its backward is read late."""
        impl = self.slot.impl
        assert impl is not None
        self.window = None
        self.step = step
        self.measuring = measuring
        impl.start_window(measuring)
        self.late = measuring and self.late_ok and impl.reads_late

    def before_forward(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                       micro_size: int = 0) -> None:
        self.batch, self.batch_idx, self.micro_size = batch, batch_idx, micro_size
        assert self.slot.impl is not None
        self.slot.impl.before_forward(StepContext(trainer, pl_module, self.params, self.groups, batch))

    def before_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.measuring and self.slot.impl is not None:
            self.slot.impl.before_backward(StepContext(trainer, pl_module, self.params, self.groups, self.batch))

    def after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.measuring or self.batch is None or self.slot.impl is None:
            if self.measuring and self.window is not None and not pl_module.automatic_optimization:
                assert self.contract is not None  # (a second manual_backward: the window holds part of the step's)
                if self.slot.second_backward(trainer, pl_module, self.contract, self.loss_fn):
                    self.window, self.measuring = None, False
            return
        self.take_backward(trainer, pl_module, self.context(trainer, pl_module))

    def take_backward(self, trainer: Trainer, pl_module: LightningModule, ctx: StepContext) -> None:
        """The backend's part of the backward just taken (after it, or at the optimizer step)."""
        impl = self.slot.impl
        assert impl is not None
        if not pl_module.automatic_optimization:
            # the batch gradient as the backward left it: under manual optimization the user's
            # step may clip .grad (self.clip_gradients) before on_before_optimizer_step reads it
            scale = ctx.loss_scale
            self.manual_grads = [g.clone() if isinstance(scale, float) and scale == 1.0 else g / scale
                                 for g in ctx.extras["grads"]]
        part = impl.after_backward(ctx)  # (GradientMoments, or the backend's raw form)
        self.batch = None
        if part is None:
            if getattr(impl, "failed", None) is not None:
                assert self.contract is not None
                self.slot.fallback(trainer, pl_module, self.contract, self.loss_fn)
                self.measuring = False  # this window is incomplete: skip it
            elif ctx.accumulate == 1 and not self.no_backward():
                self.unmeasured.one_sample(ctx.micro_size, self.step)
            return
        self.window = part if self.window is None else self.window.merged(part)

    def end(self, trainer: Trainer, pl_module: LightningModule) -> Tensor | DispersionEstimate | bool | None:
        """At the optimizer step of a measured step: the values to record (a row, or an estimate),
        :data:`KEPT` when the backend's row ring keeps them, ``None`` when the step is left
        unmeasured."""
        impl = self.slot.impl
        assert impl is not None
        ctx = self.context(trainer, pl_module) if self.late and self.batch is not None else None
        if ctx is not None:  # (its on_after_backward was set aside: gradient_dispersion._READ_LATE)
            self.take_backward(trainer, pl_module, ctx)
            if not self.measuring:
                return None
        impl.end_batch()  # (a step with no backward left the forward hook: callbacks after this one run free of it)
        window, self.window = self.window, None
        grads, self.manual_grads = self.manual_grads, None
        result = impl.end_window(ctx if ctx is not None else self.context(trainer, pl_module, grads), window)
        if result is None:
            if not (window is None and self.no_backward()):
                self.unmeasured.one_sample(window, self.step)
            return None
        if result.kept:
            return KEPT
        values = result.values(trainer, self.groups, self.groups_partition)
        if result.failed is not None:  # (DDP: read at the next flush, with the step log's values)
            self.failed = result.failed if self.failed is None else self.failed + result.failed
        if values is None:
            self.unmeasured.one_sample(window, self.step)
        return values

    def drop(self) -> None:
        """This step is left unmeasured (the trained parameters changed inside it)."""
        self.window = self.batch = self.manual_grads = None
        self.measuring = False
        assert self.slot.impl is not None
        self.slot.impl.end_batch()

    def no_backward(self) -> bool:
        return self.unmeasured.no_backward(self.params, self.step)

    def clear(self) -> None:
        """At a fit's end or exception: nothing of this fit's steps is kept for the next."""
        self.window = self.batch = self.manual_grads = None
        self.failed = None  # (a fit's own: not read by the next fit's first flush)
