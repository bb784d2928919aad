"""``GaussianModelPerturbation`` — an intervention: Wang & Mao's Algorithm 2 (SPEC §7)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from genbounds.callbacks.checks import check_callable, check_float, check_int
from genbounds.callbacks.distributed import mean_over_ranks
from genbounds.callbacks.intervention import GradientIntervention
from genbounds.callbacks.isolation import as_training_batch, isolated_pass
from genbounds.callbacks.loss_contract import LossContract
from genbounds.callbacks.probe import default_width
from genbounds.callbacks.state_key import state_key_once
from genbounds.estimators.functional import LossFn, trainable_parameters
from genbounds.estimators.perturbation import PerturbedLoss, standard_normal


class GaussianModelPerturbation(GradientIntervention):
    r"""**Changes training.** Gaussian model perturbation (GMP), seed 001 Algorithm 2.

    Each step draws ``Δ_1..Δ_k ~ N(0, σ²I)`` (once per step, shared by the whole batch) and
    replaces the batch gradient by

        ∇ℓ(w) + ρ/k · Σ_j (∇ℓ(w + Δ_j) − ∇ℓ(w))  =  (1 − ρ)·∇ℓ(w) + ρ · mean_j ∇ℓ(w + Δ_j),

    the gradient of ``(1 − ρ)ℓ(w) + ρ/k Σ_j ℓ(w + Δ_j)`` (SGD on a Gaussian-smoothed loss, which
    favours flat minima). ``∇ℓ(w)`` is the training step's own gradient; the ``k`` perturbed
    gradients are extra passes on the same batch through the loss contract, at perturbed copies
    of the parameters (``torch.func.functional_call``: the real weights are never written), in the
    module's train mode with RNG forked and buffers restored. Cost: ``k`` extra forward/backward
    passes per step. One optimizer, applied before the optimizer step (see
    :mod:`genbounds.callbacks.intervention`).

    Args:
        rho: ``ρ`` (paper: 0.5).
        sigma: ``σ`` (paper: 0.03).
        k: number of perturbations per step (paper: 3 or 10).
        draws_per_pass: perturbations vectorized per pass (default 1 on CPU; on a GPU up to ``k``, as
            many as fit the probes' memory budget, :func:`~genbounds.callbacks.probe.vectorization_width`).
        loss_fn: the loss contract (default: the module's ``per_sample_loss``).
        seed: seed of the callback's own generator for ``Δ``.
    """

    owner = "GaussianModelPerturbation"

    def __init__(
        self,
        rho: float = 0.5,
        sigma: float = 0.03,
        k: int = 3,
        draws_per_pass: int | None = None,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        o = "GaussianModelPerturbation"
        self.rho = check_float(o, "rho", rho, low=0.0, high=1.0)
        self.sigma = check_float(o, "sigma", sigma, low=0.0)
        self.k = check_int(o, "k", k)
        self.draws_per_pass = check_int(o, "draws_per_pass", draws_per_pass, optional=True)
        self.loss_fn = check_callable(o, "loss_fn", loss_fn)
        self.seed = check_int(o, "seed", seed, minimum=None)
        self._loss_fn: LossFn | None = None
        self._batch: Any = None
        self._batch_idx = 0
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None

    @property
    def state_key(self) -> str:
        return state_key_once(self, rho=self.rho, sigma=self.sigma, k=self.k)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                "GaussianModelPerturbation needs accumulate_grad_batches=1: its perturbed gradients are "
                "taken on the step's batch."
            )
        self._loss_fn = LossContract.shared(pl_module).register(
            self.owner, self.loss_fn, per_sample=False, what="per-sample gradients for its penalty")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
        return self._generator

    def _width(self, pl_module: LightningModule) -> int:
        """The probes' rule (:func:`~genbounds.callbacks.probe.default_width`), at most ``k``."""
        return default_width(pl_module, self.k, LossContract.shared(pl_module).tier)

    def perturbed_gradient(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, Tensor]:
        """``mean_j ∇ℓ(w + Δ_j)`` on ``batch`` (averaged over DDP ranks)."""
        assert self._loss_fn is not None
        with isolated_pass(pl_module, mode="keep"):
            # (every step: the plain reduction, no flags read on the host; estimators/collective.py)
            fn = PerturbedLoss(pl_module, self._loss_fn, reduce=mean_over_ranks(trainer), fail_together=False)
            eps = standard_normal(fn.base, self.k, self._rng(pl_module.device))
            width = self.draws_per_pass or self._width(pl_module)
            total: dict[str, Tensor] | None = None
            for start in range(0, self.k, width):
                part = {name: e[start : start + width] for name, e in eps.items()}
                grads = fn.gradients_at(fn.shifted(part, self.sigma), batch)
                summed = {name: g.sum(0) for name, g in grads.items()}
                total = summed if total is None else {n: total[n] + summed[n] for n in total}
        assert total is not None
        return {name: g / self.k for name, g in total.items()}

    def modify_gradients(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self._batch is None or self.rho == 0:
            return
        with as_training_batch(self._batch_idx):  # (the step's own loss on its own batch)
            perturbed = self.perturbed_gradient(trainer, pl_module, self._batch)
        for name, p in trainable_parameters(pl_module).items():
            if p.grad is None:
                continue
            p.grad.mul_(1.0 - self.rho).add_(perturbed[name].to(p.grad.dtype), alpha=self.rho)
        self._batch = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self._generator is None else {"generator_state": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator_state = state_dict.get("generator_state")
        self._generator = None
