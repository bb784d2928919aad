"""Gaussian-perturbation flatness ``γ(w, s; σ) = E_Δ[L_s(w + Δ) − L_s(w)]``, ``Δ ~ N(0, σ²I)``
(SPEC §4; Neu's value sensitivity is ``Δ_σ = −γ``).

Estimator, per draw ``ε ~ N(0, I)`` and scale ``σ``: the antithetic pair
``½[L_s(w + σε) + L_s(w − σε)] − L_s(w)`` — unbiased (``Δ`` is symmetric) with every odd-order
term cancelled, so the first-order noise ``σ ∇L·ε`` that swamps a one-sided difference at small
``σ`` is gone. The **same** draws ``ε`` serve every ``σ`` of the grid and both data sets (common
random numbers): ``flat/term = γ(S) − γ(S')`` gets its standard error from the per-draw paired
differences, and the grid minimum of a bound is smooth in ``σ``. Differences are taken in float64
(``dtype=torch.float64`` also evaluates the losses in float64 when ``σ`` is so small that the
increments fall below float32 resolution of the loss).

Closed form for a quadratic loss: ``γ = ½σ² Tr H``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from genbounds.estimators.functional import LossFn, Reduce
from genbounds.estimators.perturbation import PerturbedLoss, chunks, standard_normal


@dataclass
class FlatnessEstimate:
    """Per grid ``σ`` (arrays of length ``len(sigmas)``, float64, host)."""

    sigmas: list[float]
    train: list[float]
    train_se: list[float]
    heldout: list[float] | None
    heldout_se: list[float] | None
    term: list[float] | None
    """``γ(S) − γ(S')``."""
    term_se: list[float] | None
    num_draws: int
    increments: dict[str, Tensor]
    """Per data set, the ``[len(sigmas), num_draws]`` antithetic increments (device)."""


def gaussian_flatness(
    module: nn.Module,
    loss_fn: LossFn,
    train_batch: Any,
    sigmas: Sequence[float],
    num_draws: int,
    generator: torch.Generator,
    *,
    heldout_batch: Any | None = None,
    draws_per_pass: int = 8,
    dtype: torch.dtype | None = None,
    reduce: Reduce | None = None,
) -> FlatnessEstimate:
    """Antithetic Gaussian flatness on a training probe batch (and a held-out one) — see the
    module docstring. ``draws_per_pass`` perturbations are evaluated in one vectorized pass
    (1 = sequential). One host sync at the end."""
    if num_draws < 2:
        raise ValueError("num_draws must be >= 2 for a standard error")
    fn = PerturbedLoss(module, loss_fn, dtype, reduce)
    sets = {"train": fn.prepare(train_batch)}
    if heldout_batch is not None:
        sets["heldout"] = fn.prepare(heldout_batch)
    sig = [float(s) for s in sigmas]
    base_loss = {name: fn.loss(fn.base, batch).double() for name, batch in sets.items()}
    inc: dict[str, list[Tensor]] = {name: [] for name in sets}
    for _, count in chunks(num_draws, max(1, draws_per_pass)):
        eps = standard_normal(fn.base, count, generator)
        per_set: dict[str, list[Tensor]] = {name: [] for name in sets}
        for s in sig:
            plus, minus = fn.shifted(eps, s), fn.shifted(eps, -s)
            for name, batch in sets.items():
                lp = fn.losses_at(plus, batch).double()
                lm = fn.losses_at(minus, batch).double()
                per_set[name].append(0.5 * (lp + lm) - base_loss[name])
        for name in sets:
            inc[name].append(torch.stack(per_set[name]))  # [S, count]
    increments = {name: torch.cat(parts, dim=1) for name, parts in inc.items()}
    stats = {name: _mean_se(x) for name, x in increments.items()}
    if "heldout" in increments:
        stats["term"] = _mean_se(increments["train"] - increments["heldout"])
    host = {k: (m.cpu().tolist(), se.cpu().tolist()) for k, (m, se) in stats.items()}
    return FlatnessEstimate(
        sigmas=sig,
        train=host["train"][0],
        train_se=host["train"][1],
        heldout=host.get("heldout", (None, None))[0],
        heldout_se=host.get("heldout", (None, None))[1],
        term=host.get("term", (None, None))[0],
        term_se=host.get("term", (None, None))[1],
        num_draws=num_draws,
        increments=increments,
    )


def _mean_se(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise mean and standard error over the last dimension."""
    n = x.shape[-1]
    return x.mean(-1), x.std(-1, unbiased=True) / math.sqrt(n)
