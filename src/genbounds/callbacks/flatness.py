"""``Flatness``: Gaussian-perturbation flatness on training and held-out probes (SPEC §4)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from genbounds.callbacks.channel import Channel, FlatnessRecord
from genbounds.callbacks.gradient_sensitivity import Precision, check_precision_option, probe_dtype
from genbounds.callbacks.probe import ProbeCallback, ProbeMode, per_pass, sigma_tag
from genbounds.estimators.flatness import gaussian_flatness


class Flatness(ProbeCallback):
    r"""Log ``γ(w, s; σ) = E[L_s(w + Δ) − L_s(w)]``, ``Δ ~ N(0, σ²I)`` (Neu's ``Δ_σ = −γ``).

    Antithetic pairs with common random numbers across the ``σ`` grid and the two data sets
    (SPEC §4). Tags, per grid ``σ``: ``flat/train/sigma=…`` (``s`` = the training probe set),
    ``flat/heldout/sigma=…`` (a held-out set of the same size), ``flat/term/sigma=…``
    ``= γ(S) − γ(S')`` (the bounds' flatness term), each with a ``…_se/`` standard error (the
    term's from per-draw paired differences). A second-order check: ``γ ≈ ½σ² Tr H``.

    ``scaling="sqrt_steps"`` perturbs with standard deviation ``σ√T`` (``T`` = optimizer steps so
    far) — the accumulated noise ``Δ_T ~ N(0, Tσ²I)`` of the Wang–Mao and Neu bounds; the tags then
    read ``sigma=…*sqrtT``. ``GeneralizationBound`` needs one ``Flatness`` in that mode.

    Args:
        sigmas: the grid of standard deviations ``σ``.
        scaling: ``"fixed"`` (std ``σ``) or ``"sqrt_steps"`` (std ``σ√T``).
        num_draws: Gaussian draws per probe (≥ 2).
        draws_per_pass: draws evaluated in one vectorized pass (default 1 on CPU, where looping is
            faster, 8 on a GPU).
        precision: ``"float32"``, ``"float64"``, or ``"auto"`` (float64 when the smallest perturbation
            std is below 1e−3, where the loss increments ``½σ² Tr H`` approach float32's resolution).
        every_n_steps: probe every this many optimizer steps.
        every_n_epochs: probe at the end of every this many epochs.
        log_spaced: probe at this many log-spaced steps per decade.
        at_train_end: probe the final weights.
        probe_batch_size: samples in each probe set.
        num_probe_batches: loader batches concatenated into each probe set.
        probe_mode: ``"eval"`` (default) or ``"train"``.
        loss_fn: the loss contract (default: ``per_sample_loss``).
        seed: seed of the callback's own generator.
    """

    owner = "Flatness"
    needs_train_probe = True
    needs_heldout_probe = True

    def __init__(
        self,
        sigmas: list[float] | None = None,
        scaling: Literal["fixed", "sqrt_steps"] = "fixed",
        num_draws: int = 32,
        draws_per_pass: int | None = None,
        precision: Precision = "auto",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        log_spaced: int | None = None,
        at_train_end: bool = True,
        probe_batch_size: int | None = None,
        num_probe_batches: int = 1,
        probe_mode: ProbeMode = "eval",
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs, log_spaced, at_train_end, probe_batch_size,
                         num_probe_batches, probe_mode, loss_fn, seed)
        self.sigmas = [float(s) for s in (sigmas if sigmas is not None else [1e-3, 1e-2, 1e-1])]
        if not self.sigmas or any(s <= 0 for s in self.sigmas):
            raise MisconfigurationException("Flatness(sigmas=...) must be a non-empty list of σ > 0")
        if scaling not in ("fixed", "sqrt_steps"):
            raise MisconfigurationException(f"Flatness(scaling={scaling!r}) must be 'fixed' or 'sqrt_steps'")
        if num_draws < 2:
            raise MisconfigurationException("Flatness(num_draws=...) must be >= 2")
        self.scaling = scaling
        self.num_draws = num_draws
        self.draws_per_pass = draws_per_pass
        self.precision = check_precision_option(self.owner, precision)
        self.channel: Channel[FlatnessRecord] = Channel()
        self._scale = 1.0
        self._step = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sigmas=self.sigmas, scaling=self.scaling)

    def _tag(self, sigma: float) -> str:
        return sigma_tag(sigma) + ("*sqrtT" if self.scaling == "sqrt_steps" else "")

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, float]:
        assert self._loss_fn is not None
        self._step = int(trainer.global_step)
        self._scale = math.sqrt(self._step) if self.scaling == "sqrt_steps" else 1.0
        if self._scale == 0.0:
            return {}  # no step taken yet: Δ_0 = 0
        est = gaussian_flatness(
            pl_module, self._loss_fn, self.train_probe, [s * self._scale for s in self.sigmas], self.num_draws,
            self.generator(pl_module.device), heldout_batch=self.heldout_probe if self.heldout_available else None,
            draws_per_pass=per_pass(self.draws_per_pass, pl_module.device),
            dtype=probe_dtype(self.precision, min(self.sigmas) * self._scale),
            reduce=self.reducer(trainer),
        )
        out: dict[str, float] = {}
        for i, s in enumerate(self.sigmas):
            tag = self._tag(s)
            out[f"flat/train/{tag}"] = est.train[i]
            out[f"flat/train_se/{tag}"] = est.train_se[i]
            if est.heldout is not None and est.term is not None:
                out[f"flat/heldout/{tag}"] = est.heldout[i]
                out[f"flat/heldout_se/{tag}"] = est.heldout_se[i]  # type: ignore[index]
                out[f"flat/term/{tag}"] = est.term[i]
                out[f"flat/term_se/{tag}"] = est.term_se[i]  # type: ignore[index]
        return out

    def publish(self, step: int, values: dict[str, float]) -> None:
        tags = [self._tag(s) for s in self.sigmas]
        held = f"flat/heldout/{tags[0]}" in values

        def col(name: str) -> list[float]:
            return [values[f"flat/{name}/{t}"] for t in tags]

        self.channel.publish([FlatnessRecord(
            step=self._step, sigmas=list(self.sigmas), scale=self._scale,
            train=col("train"), train_se=col("train_se"),
            heldout=col("heldout") if held else None, heldout_se=col("heldout_se") if held else None,
            term=col("term") if held else None, term_se=col("term_se") if held else None,
        )])
