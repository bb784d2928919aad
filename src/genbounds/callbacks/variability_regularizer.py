"""``VariabilityRegularizer`` — an intervention: the algorithmic-variability regularizers of seed
002 (Eqs. 11–12; SPEC §7)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import vmap
from torch.optim import Optimizer

from genbounds.callbacks.checks import check_callable, check_choice, check_float, check_int
from genbounds.callbacks.distributed import mean_over_ranks
from genbounds.callbacks.intervention import GradientIntervention
from genbounds.callbacks.isolation import as_training_batch, isolated_pass
from genbounds.callbacks.loss_contract import LossContract
from genbounds.callbacks.probe_data import draw_probe_batch, training_loader
from genbounds.callbacks.state_key import state_key_once
from genbounds.callbacks.step_log import FlushesStepLog, StepLog, logger_step
from genbounds.estimators.batching import batch_size, map_tensors
from genbounds.estimators.functional import LossFn, detached, functional_loss, reduce_all, trainable_parameters
from genbounds.estimators.hessian_vector_product import LossHessian


class VariabilityRegularizer(FlushesStepLog, GradientIntervention):
    r"""**Changes training.** Adds the gradient of seed 002's variability penalties to the step:

    * Reg1 ``= λ1 · mean_{i∈S} ‖∇ℓ(z_i) − ∇L(S)‖²`` (Eq. 11) — the mean over the whole training
      set is **estimated on the current batch** (a uniform subsample of ``S``), and its gradient
      ``(2λ1/b) Σ_i H_i (g_i − ∇L(S))`` is computed exactly with per-sample double backward
      (``torch.func``: ``vmap`` over the samples of ``grad`` of ``‖∇ℓ_i − ref‖²``);
    * Reg2 ``= λ2 · ‖∇L(B_t) − ∇L(S)‖²`` (Eq. 12) — its gradient ``2λ2 H_B (∇L(B_t) − ∇L(S))`` by
      one Hessian-vector product (double backward).

    ``∇L(S)`` is a detached reference, the mean gradient over ``reference_batches`` batches of the
    training loader (all of them when ``None``), refreshed every ``refresh_every_n_steps`` steps;
    ``reference="none"`` drops it, as seed 002 A.3 does for cost. The penalties are evaluated at the
    step's weights ``W_{t−1}`` on its batch (in the module's train mode, RNG forked, buffers
    restored) and their gradient is added to the training gradient before the optimizer step (see
    :mod:`genbounds.callbacks.intervention`). Logs ``reg/reg1``, ``reg/reg2`` (the penalty values)
    on Lightning's logging steps.

    Args:
        lambda1: strength of Reg1.
        lambda2: strength of Reg2.
        reference: ``"dataset"`` (``∇L(S)`` estimated on training batches) or ``"none"``.
        reference_batches: training-loader batches averaged into ``∇L(S)`` (``None``: all).
        refresh_every_n_steps: recompute ``∇L(S)`` every this many steps.
        loss_fn: the loss contract (default: the module's ``per_sample_loss``).
    """

    owner = "VariabilityRegularizer"

    def __init__(
        self,
        lambda1: float = 0.0,
        lambda2: float = 0.0,
        reference: Literal["dataset", "none"] = "dataset",
        reference_batches: int | None = None,
        refresh_every_n_steps: int = 1,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
    ) -> None:
        super().__init__()
        o = "VariabilityRegularizer"
        self.lambda1 = check_float(o, "lambda1", lambda1, low=0.0)
        self.lambda2 = check_float(o, "lambda2", lambda2, low=0.0)
        if self.lambda1 == 0 and self.lambda2 == 0:
            raise MisconfigurationException("VariabilityRegularizer(lambda1=0, lambda2=0): at least one must be > 0")
        self.reference = check_choice(o, "reference", reference, ("dataset", "none"))
        self.reference_batches = check_int(o, "reference_batches", reference_batches, optional=True)
        self.refresh_every_n_steps = check_int(o, "refresh_every_n_steps", refresh_every_n_steps)
        self.loss_fn = check_callable(o, "loss_fn", loss_fn)
        self.step_log = StepLog(self.owner)
        self._loss_fn: LossFn | None = None
        self._batch: Any = None
        self._batch_idx = 0
        self._reference_data: list[Any] = []
        self._ref: dict[str, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return state_key_once(self, lambda1=self.lambda1, lambda2=self.lambda2, reference=self.reference)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException("VariabilityRegularizer needs accumulate_grad_batches=1")
        self._loss_fn = LossContract.shared(pl_module).register(
            self.owner, self.loss_fn, per_sample=True, what="per-sample gradients for its penalty")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.reference == "none":
            return
        loader = training_loader(trainer)
        if self.reference_batches is None:  # every sample of the (rank's share of the) training set
            batch = draw_probe_batch(trainer, loader, len(loader.dataset), 1, stage="train")
        else:
            batch = draw_probe_batch(trainer, loader, None, self.reference_batches, stage="train")
        self._reference_data = [batch] if batch is not None else []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        if self.reference == "dataset" and trainer.global_step % self.refresh_every_n_steps == 0:
            self._ref = self.dataset_gradient(trainer, pl_module)

    def dataset_gradient(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """``∇L(S)`` on the reference batches (detached)."""
        assert self._loss_fn is not None
        params = trainable_parameters(pl_module)
        with isolated_pass(pl_module, mode="keep"):
            total = {n: torch.zeros_like(p) for n, p in params.items()}
            count = 0
            for data in self._reference_data:
                b = batch_size(data)
                loss = self._loss_fn(pl_module, data).mean()
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, p), g in zip(params.items(), grads):
                    if g is not None:
                        total[n] += g.detach() * b
                count += b
        names = list(total)
        reduced = reduce_all([total[n] / max(count, 1) for n in names], mean_over_ranks(trainer))
        return dict(zip(names, reduced))

    def penalty_gradient(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                         reference: dict[str, Tensor] | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Gradient of ``Reg1 + Reg2`` at the current weights on ``batch`` and the penalty values."""
        assert self._loss_fn is not None
        named = trainable_parameters(pl_module)
        names = list(named)
        ref = reference if reference is not None else {n: torch.zeros_like(p) for n, p in named.items()}
        out = {n: torch.zeros_like(p) for n, p in named.items()}
        values: dict[str, Tensor] = {}
        reduce = mean_over_ranks(trainer)
        with isolated_pass(pl_module, mode="keep"):
            if self.lambda2 > 0:
                # (every step: the plain reduction, no flags read on the host — a failure in one DDP
                # process leaves the others waiting until the timeout; estimators/collective.py)
                op = LossHessian(pl_module, self._loss_fn, batch, method="reverse", reduce=reduce, fail_together=False)
                diff = [g - ref[n] for g, n in zip(op.gradient(), names)]
                hv = op.hvp(diff)
                op.release()
                for n, h in zip(names, hv):
                    out[n] += 2.0 * self.lambda2 * h
                values["reg/reg2"] = self.lambda2 * torch.stack([(d.double() ** 2).sum() for d in diff]).sum()
            if self.lambda1 > 0:
                f = functional_loss(pl_module, self._loss_fn)
                base = detached(named)

                def penalty_i(p: dict[str, Tensor], sample: Any) -> Tensor:
                    one = map_tensors(sample, lambda t: t.unsqueeze(0))
                    g = func_grad(lambda q: f(q, one).sum())(p)
                    return sum(((g[n] - ref[n]) ** 2).sum() for n in names)

                grads, pens = vmap(lambda s: (func_grad(penalty_i)(base, s), penalty_i(base, s)),
                                   randomness="different")(batch)
                mean_grads = reduce_all([grads[n].mean(0) for n in names], reduce)
                for n, g in zip(names, mean_grads):
                    out[n] += self.lambda1 * g
                values["reg/reg1"] = self.lambda1 * reduce_all([pens.mean().double()], reduce)[0]
        return out, values

    def modify_gradients(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self._batch is None:
            return
        with as_training_batch(self._batch_idx):  # (the step's own loss on its own batch)
            grads, values = self.penalty_gradient(trainer, pl_module, self._batch, self._ref)
        for name, p in trainable_parameters(pl_module).items():
            if p.grad is not None:
                p.grad.add_(grads[name].to(p.grad.dtype))
        self.step_log.record(logger_step(trainer), values)
        self._batch = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._reference_data = []
        self._batch = None
