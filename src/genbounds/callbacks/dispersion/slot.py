"""The backend one :class:`~genbounds.callbacks.GradientDispersion` measures with, over a fit.

Chosen before step 0 (:func:`.select.choose_backend`), the norm hooks checked once against exact
gradients on one sample (:meth:`.norm_hooks.NormHooksBackend.verify`), replaced by the next exact
option when it fails (:func:`.select.fallback_backend`), and detached at the end. The callback
keeps the schedule and the values; this keeps which backend produces them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from genbounds.callbacks.dispersion.accumulation import AccumulationBackend
from genbounds.callbacks.dispersion.base import DispersionBackend
from genbounds.callbacks.dispersion.microbatch import MicrobatchBackend
from genbounds.callbacks.dispersion.norm_hooks import NormHooksBackend
from genbounds.callbacks.dispersion.select import choose_backend, fallback_backend
from genbounds.callbacks.distributed import reason_anywhere
from genbounds.callbacks.loss_contract import LossContract
from genbounds.estimators.coupling import has_train_batchnorm
from genbounds.estimators.functional import parameter_groups
from genbounds.estimators.per_sample_gradients import DEFAULT_MEMORY_BUDGET

RESUMED = {"hooks": "hooks", "functorch": "functorch", "microbatch": "microbatch", "accumulation": "microbatch"}
"""The backend a resumed run asks for, by the one its checkpoint was measured with (the
accumulation windows are micro-batch chunks: ``choose_backend`` gives them again when they apply)."""


@dataclass(frozen=True)
class BackendOptions:
    """The backend settings of a ``GradientDispersion`` (see its docstring)."""

    backend: str = "auto"
    num_chunks: int = 4
    use_accumulation_steps: bool = True
    chunk_size: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    """Bytes of per-sample gradients the functorch backend holds at once."""
    layer_groups: dict[str, str] | None = None
    seed: int = 0
    accumulate: int = 1
    """``accumulate_grad_batches`` as the callback's windows take it (at the fit's start, and again
    at an epoch start where an accumulation schedule changes it)."""


class BackendSlot:
    """The active backend (:attr:`impl`), its name as logged (:attr:`name`), and what a resumed
    run restores: the backend measured with and the micro-batch generator's state."""

    def __init__(self) -> None:
        self.options = BackendOptions()
        """The callback's settings as :meth:`start` received them."""
        self.impl: DispersionBackend | None = None
        self.name: str | None = None
        self.restored: str | None = None
        self.generator_state: Tensor | None = None
        self.batchnorm_said: set[str] = set()

    def start(self, options: BackendOptions, trainer: Trainer, pl_module: LightningModule, contract: LossContract,
              loss_fn: Any, trial_batch: Any, instead_of: str | None = None) -> None:
        """Choose, attach and (hooks) check the backend before step 0 with the callback's settings as
        they are when the fit starts; one line says which. ``instead_of``: why the backend asked for
        cannot measure the set trained now (a change during the fit): said with the one chosen."""
        self.options = o = options
        backend, note = choose_backend(
            self.restored or o.backend, trainer, pl_module, contract, parameter_groups(pl_module, o.layer_groups),
            loss_fn=loss_fn, num_chunks=o.num_chunks, chunk_size=o.chunk_size, memory_budget=o.memory_budget,
            use_accumulation_steps=o.use_accumulation_steps, seed=o.seed, accumulate=o.accumulate)
        if isinstance(backend, MicrobatchBackend):
            backend.generator_state = self.generator_state
        self.use(backend, pl_module)
        if isinstance(backend, NormHooksBackend):
            # the hooks against exact gradients on one sample, once a fit: a layer whose output the
            # whole batch shares passes every shape check in training when its length equals b
            why = backend.verify(pl_module, loss_fn, trial_batch, fit=id(trainer))
            if trainer.world_size > 1:
                # each process checked its own first batch (a layer its data sends part of the batch
                # through shows in one process only): refused in one, refused in every one — a
                # process alone on an extra pass reduces other moments (a review: SIGABRT in gloo)
                why = reason_anywhere(trainer, why)
            if why is not None:
                when = "before step 0" if trainer.global_step == 0 else f"at step {trainer.global_step}"
                rank_zero_warn(f"GradientDispersion(backend='hooks'): {when}, {why}; switching to an "
                               "extra-pass backend.")
                self.fallback(trainer, pl_module, contract, loss_fn)
        if instead_of is not None:
            rank_zero_warn(f"{instead_of} From step {trainer.global_step} on it uses {backend.name!r}, as "
                           "backend='auto' chooses.")
        elif note:
            rank_zero_warn(f"GradientDispersion(backend='auto'): {note}. Using {backend.name!r}.")
        assert self.impl is not None  # (the backend that measures: after a failed check, not the one chosen)
        rank_zero_info(f"GradientDispersion: backend={self.impl.name!r} — {self.impl.description}.")

    def restart(self, trainer: Trainer, pl_module: LightningModule, contract: LossContract, loss_fn: Any,
                batch: Any) -> None:
        """The trained parameters changed during the fit: the backend is chosen and attached again
        for the new set (hooks on the layers now trained), checked on ``batch``. A backend asked for
        by name that cannot measure the new set (``backend='hooks'`` and a layer now pruned) gives
        way to ``auto``'s choice, said once: the fit is under way, an error would end it."""
        self.detach()
        # (chosen as the uninterrupted fit chooses at this change: from the settings, not from the
        # backend a resumed fit restored for the set it started with)
        self.restored = None
        try:
            self.start(self.options, trainer, pl_module, contract, loss_fn, batch)
        except MisconfigurationException as err:  # (the backend asked for by name)
            self.options = replace(self.options, backend="auto")
            self.start(self.options, trainer, pl_module, contract, loss_fn, batch,
                       instead_of=f"{err} (The parameters trained changed during the fit.)")

    def note_batchnorm_mode(self, pl_module: LightningModule, epoch: int) -> None:
        """At an epoch's first batch: where the backend was chosen while BatchNorm normalized with
        batch statistics (said as the decomposition, an approximation) and the module has since set
        every BatchNorm to eval (a fine-tuning pattern, in ``on_train_epoch_start``), say that the
        values are exact per-sample ones; and, should it go back, that they are the decomposition
        again (each said once a fit)."""
        if not getattr(self.impl, "approximate_batchnorm", False):
            return
        coupled = has_train_batchnorm(pl_module)
        if not coupled and "exact" not in self.batchnorm_said:
            self.batchnorm_said.add("exact")
            rank_zero_info(f"GradientDispersion: no BatchNorm layer normalizes with batch statistics from epoch "
                           f"{epoch} on (set to eval by the module?): the per-sample values are exact ones, not the "
                           "train-mode decomposition said before step 0.")
        elif coupled and "exact" in self.batchnorm_said and "again" not in self.batchnorm_said:
            self.batchnorm_said.add("again")
            rank_zero_info(f"GradientDispersion: BatchNorm normalizes with batch statistics again from epoch {epoch}: "
                           "the per-sample values are the train-mode decomposition again.")

    def check_reentrant(self, pl_module: LightningModule, contract: LossContract) -> None:
        """Before step 0: a ``training_step`` that checkpoints with ``use_reentrant=True`` can be
        read through by the training backward's own backends only (``torch.autograd.grad`` cannot
        take its backward): an error for any other."""
        if contract.reentrant_checkpoint and self.name not in ("hooks", "accumulation"):
            raise MisconfigurationException(
                f"GradientDispersion(backend={self.options.backend!r}): {type(pl_module).__name__}.training_step "
                "runs torch.utils.checkpoint with use_reentrant=True, whose backward torch.autograd.grad cannot take; "
                "only the training backward's own (backend 'hooks') can be read through it, and here the backend is "
                f"{self.name!r}. Pass use_reentrant=False, which PyTorch recommends.")

    def fall_back_together(self, trainer: Trainer, contract: LossContract, loss_fn: Any) -> None:
        """Under DDP, at a flush: the backend failed in some process at a step since the last one
        (its data took a branch the hooks cannot measure: ``NormHooksBackend._failed_step``).
        Every process falls back to the next backend here, together — the failing process alone
        did, and the others waited in the next step's reduction until the process group's timeout.
        Said once, with the failing process's reason."""
        assert self.impl is not None
        why = reason_anywhere(trainer, getattr(self.impl, "failure_here", None))
        rank_zero_warn(f"GradientDispersion(backend={self.impl.name!r}): {why}; the steps it failed at are left "
                       "unmeasured in every process (non-finite, skipped), and an extra-pass backend measures in "
                       f"every process from step {int(trainer.global_step)} on.")
        self.fallback(trainer, trainer.lightning_module, contract, loss_fn)

    def use(self, backend: DispersionBackend, pl_module: LightningModule) -> None:
        if self.impl is not None:
            self.impl.detach()
        self.impl = backend
        self.name = "accumulation" if isinstance(backend, AccumulationBackend) else backend.name
        backend.attach(pl_module)

    def fallback(self, trainer: Trainer, pl_module: LightningModule, contract: LossContract, loss_fn: Any) -> None:
        """After the backend failed on this model: the next exact option, else micro-batches."""
        assert self.impl is not None
        o = self.options
        self.use(fallback_backend(
            self.impl.name, pl_module, contract, loss_fn, chunk_size=o.chunk_size, memory_budget=o.memory_budget,
            accumulate=o.accumulate, world_size=trainer.world_size,
            use_accumulation_steps=o.use_accumulation_steps, num_chunks=o.num_chunks, seed=o.seed), pl_module)

    def second_backward(self, trainer: Trainer, pl_module: LightningModule, contract: LossContract,
                        loss_fn: Any) -> bool:
        """A second ``manual_backward`` on one batch (the loss contract's trial saw one): whether
        the step's window must be dropped. A window read from the training backward, or centred
        on ``.grad``, after the first holds part of the step's gradient only; a backend reading
        the training backward then gives way to an extra pass (said once). An extra pass with its
        own mean read the whole per-sample losses already."""
        impl = self.impl
        assert impl is not None
        reads = impl.reads_training_backward
        if not (reads or getattr(impl, "grad_is_mean", False)):
            return False
        contract.reads_training_backward = False  # (the next backend centres on its own mean)
        rank_zero_warn(f"GradientDispersion(backend={impl.name!r}): training_step called manual_backward more "
                       "than once on one batch: " + ("the per-sample rows of separate backward passes cannot be added "
                                                     "up per sample" if reads else "the gradient read after the first "
                                                     "is not the step's") + "; this step is not measured, and "
                       + ("an extra-pass backend" if reads else "the extra pass, centred on its own mean,")
                       + " measures the next ones.")
        if reads:
            self.fallback(trainer, pl_module, contract, loss_fn)
        else:
            impl.grad_is_mean = False  # type: ignore[attr-defined]
        return True

    def detach(self) -> None:
        if self.impl is not None:
            self.impl.detach()

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"active_backend": self.name}
        if isinstance(self.impl, MicrobatchBackend):
            state.update(self.impl.state())
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.restored = RESUMED.get(state.get("active_backend") or "")
        self.generator_state = state.get("generator_state")
