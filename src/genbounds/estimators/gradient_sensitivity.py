"""Local gradient sensitivity ``Γ_σ(w) = E_ξ ‖g(w) − g(w + ξ)‖²``, ``ξ ~ N(0, σ² I)``, with ``g``
the population gradient (Neu et al., §3; SPEC §3).

The naive plug-in ``‖ĝ(w) − ĝ(w + ξ)‖²`` on one batch is biased upward by
``σ² E‖H_z − H‖²_F / m`` (per-sample Hessians are far from their mean; four times too large in a
small simulation). The estimator here splits one held-out batch into two independent halves and,
per draw ``ξ``, multiplies the two halves' gradient differences:
``Γ̂ = mean_draws (ĝ¹(w) − ĝ¹(w+ξ)) · (ĝ²(w) − ĝ²(w+ξ))`` — unbiased because the halves'
errors are independent. Its standard error is over the draws (given the batch).

The same standard-normal draws serve every ``σ`` (scaled), so Neu's growing levels
``σ√(t−1)`` for several grid values cost no extra randomness. Closed form for a quadratic loss:
``Γ_σ = σ² tr(H²)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from genbounds.estimators.batching import batch_size, index_batch
from genbounds.estimators.functional import LossFn, Reduce, writable_in_place
from genbounds.estimators.perturbation import PerturbedLoss, chunks, flat_dot, standard_normal


@dataclass
class SensitivityEstimate:
    sigmas: list[float]
    value: list[float]
    """``Γ̂_σ`` per σ."""
    standard_error: list[float]
    num_draws: int
    samples: Tensor
    """``[len(sigmas), num_draws]`` per-draw products (float64, device)."""


def gradient_sensitivity(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    sigmas: Sequence[float],
    num_draws: int,
    generator: torch.Generator,
    *,
    draws_per_pass: int = 4,
    dtype: torch.dtype | None = None,
    reduce: Reduce | None = None,
    shapes: Sequence[dict[str, float] | None] | None = None,
    norm_weights: Sequence[dict[str, float] | None] | None = None,
) -> SensitivityEstimate:
    """Half-split estimate of ``Γ_σ`` on ``batch`` (held-out data) for every ``σ`` in ``sigmas``.
    ``σ = 0`` gives exactly 0. One host sync at the end.

    Block-diagonal noise (Neu et al. Theorem 7): ``shapes[i]`` (per parameter name) makes the
    ``i``-th perturbation ``σ_i · shape[name] · ε``, and ``norm_weights[i]`` measures the gradient
    difference in the weighted norm ``Σ_p w_p ‖δ_p‖²`` (``w_p = 1/σ_p²``: the ``Σ⁻¹`` norm)."""
    if num_draws < 2:
        raise ValueError("num_draws must be >= 2 for a standard error")
    b = batch_size(batch)
    if b < 2:
        raise ValueError("the gradient sensitivity needs a batch of at least 2 samples")
    fn = PerturbedLoss(module, loss_fn, dtype, reduce)
    data = fn.prepare(batch)
    halves = [index_batch(data, slice(0, b // 2)), index_batch(data, slice(b // 2, b))]
    g0 = [fn.gradient(fn.base, h) for h in halves]
    sig = [float(s) for s in sigmas]
    shp = list(shapes) if shapes is not None else [None] * len(sig)
    wts = list(norm_weights) if norm_weights is not None else [None] * len(sig)
    rows: list[list[Tensor]] = [[] for _ in sig]
    for _, count in chunks(num_draws, max(1, draws_per_pass)):
        eps = standard_normal(fn.base, count, generator)
        for i, s in enumerate(sig):
            if s == 0.0:
                rows[i].append(torch.zeros(count, dtype=torch.float64, device=eps[fn.names[0]].device))
                continue
            points = fn.shifted(eps, s, shape=shp[i])
            diffs = []
            for h, g in zip(halves, g0):
                diffs.append(_minus_into(g, fn.gradients_at(points, h), fn.names))
            del points
            rows[i].append(flat_dot(diffs[0], diffs[1], wts[i]))
            del diffs
    samples = torch.stack([torch.cat(r) for r in rows])  # [S, K]
    mean = samples.mean(1)
    se = samples.std(1, unbiased=True) / math.sqrt(num_draws)
    return SensitivityEstimate(sig, mean.cpu().tolist(), se.cpu().tolist(), num_draws, samples)


def _minus_into(g: dict[str, Tensor], gp: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """``g − gp`` per parameter, written into ``gp``'s own storage (fresh gradients: no third
    parameter set alive per half) as ``−gp + g``, the same bits as ``g − gp``. A gradient that
    may not be written (``functional.writable_in_place``: a storage another parameter's gradient
    shares, an expanded view) is subtracted out of place, and is never written."""
    writable = writable_in_place([gp[k] for k in names])
    return {k: gp[k].neg_().add_(g[k].unsqueeze(0)) if ok else (g[k].unsqueeze(0) - gp[k])
            for k, ok in zip(names, writable)}
