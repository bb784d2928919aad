"""Base of the *intervention* callbacks: opt-in callbacks that change training on purpose.

An intervention edits the gradient of the step right before the optimizer uses it. It does so
in Lightning's ``configure_gradient_clipping`` slot of the LightningModule (wrapped at ``setup``,
restored at ``teardown``), which Lightning calls after **every** callback's
``on_before_optimizer_step`` — so measurement callbacks (``GradientDispersion``,
``HeldoutGradient``) read the raw gradient ``ḡ_B`` whatever the order of ``trainer.callbacks`` —
and before its own gradient clipping (``Trainer(gradient_clip_val=…)``, still applied after the
intervention) and the optimizer step. No second optimizer is involved. At that point the gradient
is complete: accumulated over micro-batches, averaged over DDP ranks, unscaled under AMP.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch.optim import Optimizer

from genbounds.callbacks.checks import check_automatic_optimization, check_precision, check_strategy
from genbounds.callbacks.step_log import mark_run_complete


class GradientIntervention(Callback):
    """Subclasses implement :meth:`modify_gradients` (edit ``p.grad`` in place)."""

    owner = "GradientIntervention"

    def __init__(self) -> None:
        super().__init__()
        self._wrapped: tuple[LightningModule, Any, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(self.owner, trainer)
        check_automatic_optimization(self.owner, pl_module)
        check_precision(self.owner, trainer)
        self._install(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from genbounds.callbacks.loss_contract import LossContract
        from genbounds.callbacks.probe_data import training_trial_batch

        LossContract.shared(pl_module).resolve(trainer, pl_module, training_trial_batch(trainer))

    def _install(self, pl_module: LightningModule) -> None:
        if self._wrapped is not None:
            return
        original = pl_module.configure_gradient_clipping

        def configure_gradient_clipping(optimizer: Optimizer, gradient_clip_val: Any = None,
                                        gradient_clip_algorithm: Any = None) -> None:
            self.modify_gradients(pl_module.trainer, pl_module, optimizer)
            return original(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

        pl_module.configure_gradient_clipping = configure_gradient_clipping  # type: ignore[method-assign]
        self._wrapped = (pl_module, original, configure_gradient_clipping)

    def _uninstall(self) -> None:
        if self._wrapped is None:
            return
        pl_module, original, wrapper = self._wrapped
        if pl_module.__dict__.get("configure_gradient_clipping") is wrapper:
            if getattr(original, "__func__", None) is getattr(type(pl_module), "configure_gradient_clipping", None):
                del pl_module.configure_gradient_clipping  # back to the class's own method
            else:
                pl_module.configure_gradient_clipping = original  # type: ignore[method-assign]
        self._wrapped = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._uninstall()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        mark_run_complete(trainer)  # (a run with interventions only is complete too: genbounds gate|report)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def modify_gradients(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        raise NotImplementedError
