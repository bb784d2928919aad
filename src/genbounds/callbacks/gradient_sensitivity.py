"""``GradientSensitivity``: Neu et al.'s local gradient sensitivity ``Γ_σ`` (SPEC §3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from genbounds.callbacks.channel import Channel, SensitivityRecord
from genbounds.callbacks.checks import check_bool, check_choice, check_int, check_sigmas
from genbounds.callbacks.probe import ProbeCallback, ProbeMode, sigma_tag
from genbounds.callbacks.state_key import state_key_once
from genbounds.callbacks.trainable_set import TrainableSet
from genbounds.estimators.batching import batch_size
from genbounds.estimators.gradient_sensitivity import gradient_sensitivity

Precision = Literal["auto", "float32", "float64"]
PRECISIONS = ("auto", "float32", "float64")

AUTO_FLOAT64_BELOW = 1e-3
"""``precision="auto"`` evaluates in float64 when the smallest perturbation scale is below this:
gradient or loss differences of relative size ~σ then fall towards float32's resolution (1e−7)."""


def probe_dtype(precision: str, smallest_sigma: float) -> torch.dtype | None:
    """``None`` (the model's float32) or ``torch.float64`` for a probe whose smallest perturbation
    standard deviation is ``smallest_sigma``."""
    if precision == "float64" or (precision == "auto" and smallest_sigma < AUTO_FLOAT64_BELOW):
        return torch.float64
    return None


class GradientSensitivity(ProbeCallback):
    r"""Log ``Γ_σ(w) = E_ξ‖g(w) − g(w+ξ)‖²``, ``ξ ~ N(0, σ²I)``, on held-out data.

    Estimated with the half-split product of SPEC §3 (unbiased, unlike the one-batch plug-in)
    from ``num_draws`` Gaussian draws, shared by every ``σ``; tags
    ``sens/gradient_sensitivity/sigma=…`` and ``sens/gradient_sensitivity_se/sigma=…``.

    With ``growing=True`` it also estimates, at the weights ``W_{t−1}`` of step ``t``, Γ at the
    growing level ``σ√(t−1)`` for each grid ``σ`` — what Neu et al.'s Theorem 1 sums over the
    trajectory (``sens/gradient_sensitivity_growing/sigma=…``). Each probe stands for the steps
    until the next one.

    Args:
        sigmas: the grid of noise standard deviations.
        growing: also estimate at ``σ√(t−1)``.
        num_draws: Gaussian draws per probe (≥ 2); with an ``overhead_budget`` a probe uses fewer
            (never below ``min_draws``) when the full count would not fit in what is left of it.
        min_draws: the fewest draws a budgeted probe uses.
        draws_per_pass: draws evaluated in one vectorized pass, memory ∝ this × d (default 1 on CPU;
            on a GPU up to 8, as many as fit the probes' memory budget,
            :func:`~genbounds.callbacks.probe.vectorization_width`).
        precision: ``"float32"``, ``"float64"``, or ``"auto"`` (float64 when the smallest σ is below
            1e−3, where gradient differences approach float32's resolution).
        every_n_steps: probe every this many optimizer steps.
        every_n_epochs: probe at the end of every this many epochs.
        log_spaced: probe at this many log-spaced steps per decade.
        at_train_end: probe the final weights.
        probe_batch_size: samples in the held-out probe batch (split into halves), in all (under
            DDP divided among the processes).
        num_probe_batches: loader batches concatenated into the probe batch.
        probe_mode: ``"eval"`` (default) or ``"train"``.
        loss_fn: the loss contract (default: ``per_sample_loss``).
        seed: seed of the callback's own generator.
    """

    owner = "GradientSensitivity"
    needs_train_probe = False
    needs_heldout_probe = True
    heldout_required = True

    def __init__(
        self,
        sigmas: list[float] | None = None,
        growing: bool = True,
        num_draws: int = 16,
        min_draws: int = 4,
        draws_per_pass: int | None = None,
        precision: Precision = "auto",
        every_n_steps: int | None = 50,
        every_n_epochs: int | None = None,
        log_spaced: int | None = None,
        at_train_end: bool = False,
        probe_batch_size: int | None = None,
        num_probe_batches: int = 1,
        probe_mode: ProbeMode = "eval",
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
        overhead_budget: float | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs, log_spaced, at_train_end, probe_batch_size,
                         num_probe_batches, probe_mode, loss_fn, seed, overhead_budget)
        o = self.owner
        self.sigmas = check_sigmas(o, sigmas if sigmas is not None else [1e-3, 1e-2, 1e-1], allow_zero=True)
        self.growing = check_bool(o, "growing", growing)
        self.num_draws = check_int(o, "num_draws", num_draws, minimum=2)
        self.min_draws = min(check_int(o, "min_draws", min_draws, minimum=2), self.num_draws)
        self.draws_per_pass = check_int(o, "draws_per_pass", draws_per_pass, optional=True)
        self.precision = check_choice(o, "precision", precision, PRECISIONS)
        self.channel: Channel[SensitivityRecord] = Channel()
        self._step = 0
        self.shape: list[float] | None = None
        """Block noise shape per layer group (set by the bound for Neu's block-diagonal Theorem 7)."""
        self.group_of_param: dict[str, int] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.heldout_probe is not None and batch_size(self.heldout_probe) < 2:
            raise MisconfigurationException(
                f"GradientSensitivity needs a held-out probe batch of at least 2 samples (it splits it into two "
                f"halves); the validation data gives {batch_size(self.heldout_probe)}. Raise the validation batch "
                "size or probe_batch_size.")

    @property
    def state_key(self) -> str:
        return state_key_once(self, sigmas=self.sigmas)

    def set_shape(self, shape: list[float], group_of_param: dict[str, int]) -> None:
        """Also measure Γ at block-shaped growing levels ``σ√step·s_k`` in the ``Σ⁻¹`` norm (the
        bound's layer-wise Neu Theorem 7; the shape is fixed for the run)."""
        self.shape = list(shape)
        self.group_of_param = dict(group_of_param)

    def take_parameters(self, pl_module: LightningModule) -> None:
        if TrainableSet.shared(pl_module).changes and self.shape is not None:
            # the shape's blocks are the parameters the fit started with: for the layer-wise bound,
            # which is NaN after such a change (trainable_set.py)
            self.shape = None

    def _levels(self) -> int:
        return len(self.sigmas) * (1 + int(self.growing) + int(self.growing and self.shape is not None))

    def forward_equivalents(self) -> float:
        # one gradient (forward + backward) per draw and level on the held-out probe set, at the
        # fewest draws a budgeted probe uses
        return 3.0 * self._levels() * self.min_draws

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, float]:
        assert self._loss_fn is not None
        self._step = int(trainer.global_step)  # t − 1 steps taken
        levels = list(self.sigmas)
        shapes: list[dict[str, float] | None] = [None] * len(levels)
        weights: list[dict[str, float] | None] = [None] * len(levels)
        if self.growing:
            levels += [s * math.sqrt(self._step) for s in self.sigmas]
            shapes += [None] * len(self.sigmas)
            weights += [None] * len(self.sigmas)
        shaped = self.growing and self.shape is not None and self._step > 0
        if shaped:
            assert self.shape is not None
            per_param = {n: self.shape[g] for n, g in self.group_of_param.items()}
            for s in self.sigmas:
                level = s * math.sqrt(self._step)
                levels.append(level)
                shapes.append(per_param)
                # Σ_t = diag((σ s_k)²): the Σ_t⁻¹ norm weighs block k by 1/(σ s_k)²
                weights.append({n: 1.0 / (s * f) ** 2 for n, f in per_param.items()})
        est = gradient_sensitivity(
            pl_module, self._loss_fn, self.heldout_probe, levels,
            self.draws_within_budget(self.num_draws, self.min_draws, 3.0 * len(levels)),
            self.generator(pl_module.device), draws_per_pass=self.per_pass(self.draws_per_pass, pl_module),
            dtype=probe_dtype(self.precision, min(s for s in levels if s > 0) if any(levels) else 1.0),
            reduce=self.reducer(trainer), shapes=shapes, norm_weights=weights,
        )
        out: dict[str, float] = {}
        k = len(self.sigmas)
        for i, s in enumerate(self.sigmas):
            out[f"sens/gradient_sensitivity/{sigma_tag(s)}"] = est.value[i]
            out[f"sens/gradient_sensitivity_se/{sigma_tag(s)}"] = est.standard_error[i]
            if self.growing:
                out[f"sens/gradient_sensitivity_growing/{sigma_tag(s)}"] = est.value[k + i]
                out[f"sens/gradient_sensitivity_growing_se/{sigma_tag(s)}"] = est.standard_error[k + i]
            if shaped:
                out[f"sens/gradient_sensitivity_shaped/{sigma_tag(s)}"] = est.value[2 * k + i]
                out[f"sens/gradient_sensitivity_shaped_se/{sigma_tag(s)}"] = est.standard_error[2 * k + i]
            elif self.growing and self.shape is not None:  # step 0: Γ at level 0 is 0 exactly
                out[f"sens/gradient_sensitivity_shaped/{sigma_tag(s)}"] = 0.0
                out[f"sens/gradient_sensitivity_shaped_se/{sigma_tag(s)}"] = 0.0
        return out

    def publish(self, step: int, values: dict[str, float]) -> None:
        tags = [sigma_tag(s) for s in self.sigmas]
        self.channel.publish([SensitivityRecord(
            step=self._step,
            sigmas=list(self.sigmas),
            value=[values[f"sens/gradient_sensitivity/{t}"] for t in tags],
            standard_error=[values[f"sens/gradient_sensitivity_se/{t}"] for t in tags],
            growing_value=[values[f"sens/gradient_sensitivity_growing/{t}"] for t in tags] if self.growing else [],
            growing_standard_error=(
                [values[f"sens/gradient_sensitivity_growing_se/{t}"] for t in tags] if self.growing else []
            ),
            shaped_value=[values[f"sens/gradient_sensitivity_shaped/{t}"] for t in tags]
            if f"sens/gradient_sensitivity_shaped/{tags[0]}" in values else [],
            shaped_standard_error=[values[f"sens/gradient_sensitivity_shaped_se/{t}"] for t in tags]
            if f"sens/gradient_sensitivity_shaped/{tags[0]}" in values else [],
        )])
