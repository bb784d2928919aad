"""``Flatness``: Gaussian-perturbation flatness on training and held-out probes (SPEC §4)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from genbounds.callbacks.channel import Channel, FlatnessRecord
from genbounds.callbacks.checks import check_choice, check_int, check_sigmas
from genbounds.callbacks.gradient_sensitivity import PRECISIONS, Precision, probe_dtype
from genbounds.callbacks.probe import ProbeCallback, ProbeMode, sigma_tag
from genbounds.callbacks.state_key import state_key_once
from genbounds.estimators.flatness import gaussian_flatness


class Flatness(ProbeCallback):
    r"""Log ``γ(w, s; σ) = E[L_s(w + Δ) − L_s(w)]``, ``Δ ~ N(0, σ²I)`` (Neu's ``Δ_σ = −γ``).

    Antithetic pairs with common random numbers across the ``σ`` grid and the two data sets
    (SPEC §4). Tags, per grid ``σ``: ``flat/train/sigma=…`` (``s`` = the training probe set),
    ``flat/heldout/sigma=…`` (a held-out set), ``flat/term/sigma=…`` ``= γ(S) − γ(S')`` (the
    bounds' flatness term), each with a ``…_se/`` standard error (the term's from per-draw paired
    differences). For classifiers the same perturbed models also give the flatness of the 0-1
    error, ``flat/error_term/sigma=…`` (the test-error bounds' flatness term). Second-order check:
    ``γ ≈ ½σ² Tr H``.

    ``scaling="sqrt_steps"`` perturbs with standard deviation ``σ√T`` (``T`` = optimizer steps so
    far) — the accumulated noise ``Δ_T ~ N(0, Tσ²I)`` of the Wang–Mao and Neu bounds; the tags then
    read ``sigma=…*sqrtT``. ``GeneralizationBound`` needs one ``Flatness`` in that mode, and asks it
    for block-shaped perturbations (``σ_k = σ·s_k`` per layer) for the layer-wise bounds.

    Args:
        sigmas: the grid of standard deviations ``σ``.
        scaling: ``"fixed"`` (std ``σ``) or ``"sqrt_steps"`` (std ``σ√T``).
        num_draws: Gaussian draws per probe (≥ 2); with an ``overhead_budget`` a probe uses fewer
            (never below ``min_draws``) when the full count would not fit in what is left of it.
        min_draws: the fewest draws a budgeted probe uses.
        draws_per_pass: draws evaluated in one vectorized pass (default 1 on CPU, where looping is
            faster; on a GPU up to 8, as many as fit the probes' memory budget,
            :func:`~genbounds.callbacks.probe.vectorization_width`).
        precision: ``"float32"``, ``"float64"``, or ``"auto"`` (float64 when the smallest perturbation
            std is below 1e−3, where the loss increments ``½σ² Tr H`` approach float32's resolution).
        error: also measure the 0-1 error's flatness (``"auto"``: for classifiers).
        every_n_steps: probe every this many optimizer steps.
        every_n_epochs: probe at the end of every this many epochs.
        log_spaced: probe at this many log-spaced steps per decade.
        at_train_end: probe the final weights.
        probe_batch_size: samples in each probe set, in all (under DDP divided among the processes).
        num_probe_batches: loader batches concatenated into each probe set.
        probe_mode: ``"eval"`` (default) or ``"train"``.
        loss_fn: the loss contract (default: ``per_sample_loss``, else captured from ``training_step``).
        seed: seed of the callback's own generator.
        overhead_budget: fraction of training time the suite's probes may take (see README).
    """

    owner = "Flatness"
    takes_gradients = False  # (loss values only)
    needs_train_probe = True
    needs_heldout_probe = True

    def __init__(
        self,
        sigmas: list[float] | None = None,
        scaling: Literal["fixed", "sqrt_steps"] = "fixed",
        num_draws: int = 32,
        min_draws: int = 8,
        draws_per_pass: int | None = None,
        precision: Precision = "auto",
        error: Literal["auto", "on", "off"] = "auto",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        log_spaced: int | None = None,
        at_train_end: bool = True,
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
        self.sigmas = check_sigmas(o, sigmas if sigmas is not None else [1e-3, 1e-2, 1e-1])
        self.scaling = check_choice(o, "scaling", scaling, ("fixed", "sqrt_steps"))
        self.num_draws = check_int(o, "num_draws", num_draws, minimum=2)
        self.min_draws = min(check_int(o, "min_draws", min_draws, minimum=2), self.num_draws)
        self.draws_per_pass = check_int(o, "draws_per_pass", draws_per_pass, optional=True)
        self.precision = check_choice(o, "precision", precision, PRECISIONS)
        self.error = check_choice(o, "error", error, ("auto", "on", "off"))
        self.channel: Channel[FlatnessRecord] = Channel()
        self._scale = 1.0
        self._step = 0
        self.shapes: list[list[float]] = []
        """Block shapes (per layer group) to measure besides the isotropic grid (set by the bound)."""
        self.group_of_param: dict[str, int] = {}
        self._last: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return state_key_once(self, scaling=self.scaling)

    def _tag(self, sigma: float) -> str:
        return sigma_tag(sigma) + ("*sqrtT" if self.scaling == "sqrt_steps" else "")

    @property
    def measures_error(self) -> bool:
        if self.error == "off" or self.contract is None:
            return False
        return self.contract.errors_available and self.contract.per_sample

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, float]:
        assert self._loss_fn is not None and self.contract is not None
        self._step = int(trainer.global_step)
        self._scale = math.sqrt(self._step) if self.scaling == "sqrt_steps" else 1.0
        if self._scale == 0.0:
            return {}  # no step taken yet: Δ_0 = 0
        levels = [s * self._scale for s in self.sigmas]
        shapes: list[dict[str, float] | None] = [None] * len(levels)
        for shape in self.shapes:
            per_param = {name: shape[g] for name, g in self.group_of_param.items()}
            levels += [s * self._scale for s in self.sigmas]
            shapes += [per_param] * len(self.sigmas)
        rows = self.measures_error
        loss_fn = self.contract.losses_and_errors if rows else self._loss_fn
        draws = self.draws_within_budget(self.num_draws, self.min_draws, self._units_per_draw(len(levels)))
        est = gaussian_flatness(
            pl_module, loss_fn, self.train_probe, levels, draws,
            self.generator(pl_module.device), heldout_batch=self.heldout_probe if self.heldout_available else None,
            draws_per_pass=self.per_pass(self.draws_per_pass, pl_module),
            dtype=probe_dtype(self.precision, min(levels) * min([1.0] + [min(s) for s in self.shapes])),
            reduce=self.reducer(trainer), shapes=shapes, rows=rows,
        )
        k = len(self.sigmas)
        self._last = {"estimate": est, "shapes": [list(s) for s in self.shapes]}
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
            if est.error_term is not None:
                out[f"flat/error_term/{tag}"] = est.error_term[i]
                out[f"flat/error_term_se/{tag}"] = est.error_term_se[i]  # type: ignore[index]
        assert len(est.train) == k * (1 + len(self.shapes))
        return out

    def forward_equivalents(self, num_shapes: int | None = None) -> float:
        """Loss evaluations of a probe at ``min_draws`` (antithetic pairs, both probe sets, every
        level): the least a budgeted probe costs."""
        shapes = len(self.shapes) if num_shapes is None else num_shapes
        return self._units_per_draw(len(self.sigmas) * (1 + shapes)) * self.min_draws

    def _units_per_draw(self, num_levels: int) -> float:
        """Loss evaluations of one draw: an antithetic pair on each probe set, at every level."""
        return 2.0 * (2 if self.heldout_available else 1) * num_levels

    def publish(self, step: int, values: dict[str, float]) -> None:
        est = self._last["estimate"]
        k = len(self.sigmas)
        held = est.term is not None
        records = []
        for j, shape in enumerate([None] + self._last["shapes"]):
            sl = slice(j * k, (j + 1) * k)
            records.append(FlatnessRecord(
                step=self._step, sigmas=list(self.sigmas), scale=self._scale,
                train=est.train[sl], train_se=est.train_se[sl],
                heldout=est.heldout[sl] if held else None, heldout_se=est.heldout_se[sl] if held else None,
                term=est.term[sl] if held else None, term_se=est.term_se[sl] if held else None,
                shape=shape,
                error_term=est.error_term[sl] if est.error_term is not None else None,
                error_term_se=est.error_term_se[sl] if est.error_term_se is not None else None,
                train_loss=est.base_train,
            ))
        self.channel.publish(records)

    def measure_shapes(self, trainer: Trainer, pl_module: LightningModule, shapes: Sequence[Sequence[float]],
                       group_of_param: dict[str, int], *, log: bool) -> None:
        """Measure now (the bound's request) with these block shapes besides the grid."""
        self.shapes = [list(map(float, s)) for s in shapes]
        self.group_of_param = dict(group_of_param)
        self.probe_now(trainer, pl_module, log=log, epoch_end=True)

