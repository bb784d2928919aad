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
    """Per data set, the ``[len(sigmas), num_draws]`` antithetic increments of the loss (device)."""
    base_train: float = math.nan
    """The unperturbed training-probe loss."""
    error_term: list[float] | None = None
    """``γ(S) − γ(S')`` of the second output (the 0-1 error) when the loss function has two rows."""
    error_term_se: list[float] | None = None


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
    shapes: Sequence[dict[str, float] | None] | None = None,
    rows: bool = False,
) -> FlatnessEstimate:
    """Antithetic Gaussian flatness on a training probe batch (and a held-out one) — see the
    module docstring. ``draws_per_pass`` perturbations are evaluated in one vectorized pass
    (1 = sequential). ``shapes[i]`` (per parameter name, a factor) makes the ``i``-th noise
    block-shaped: ``σ_i · shape[name]`` per parameter. ``rows=True``: ``loss_fn`` returns
    ``[2, b]`` (the loss and a second per-sample quantity, e.g. the 0-1 error), both measured at the
    same perturbed points. One host sync at the end."""
    if num_draws < 2:
        raise ValueError("num_draws must be >= 2 for a standard error")
    fn = PerturbedLoss(module, loss_fn, dtype, reduce, rows=rows)
    sets = {"train": fn.prepare(train_batch)}
    if heldout_batch is not None:
        sets["heldout"] = fn.prepare(heldout_batch)
    sig = [float(s) for s in sigmas]
    shp = list(shapes) if shapes is not None else [None] * len(sig)
    base_loss = {name: fn.loss(fn.base, batch).double() for name, batch in sets.items()}
    inc: dict[str, list[Tensor]] = {name: [] for name in sets}
    for _, count in chunks(num_draws, max(1, draws_per_pass)):
        eps = standard_normal(fn.base, count, generator)
        per_set: dict[str, list[Tensor]] = {name: [] for name in sets}
        # one set of points, w + σε then w − σε in place (every data set at w + σε first: a probe
        # in train mode with dropout draws its masks in that order)
        point: dict[str, Tensor] | None = None
        for s, shape in zip(sig, shp):
            point = fn.shifted(eps, s, shape=shape, out=point)
            lp = {name: fn.losses_at(point, batch).double() for name, batch in sets.items()}
            point = fn.shifted(eps, -s, shape=shape, out=point)
            for name, batch in sets.items():
                lm = fn.losses_at(point, batch).double()
                per_set[name].append(0.5 * (lp[name] + lm) - base_loss[name])  # [count] or [count, 2]
        del point
        for name in sets:
            inc[name].append(torch.stack(per_set[name]))  # [S, count(, 2)]
    both = {name: torch.cat(parts, dim=1) for name, parts in inc.items()}
    increments = {name: (x[..., 0] if rows else x) for name, x in both.items()}
    stats = {name: _mean_se(x) for name, x in increments.items()}
    if "heldout" in increments:
        stats["term"] = _mean_se(increments["train"] - increments["heldout"])
        if rows:
            stats["error_term"] = _mean_se(both["train"][..., 1] - both["heldout"][..., 1])
    host = {k: (m.cpu().tolist(), se.cpu().tolist()) for k, (m, se) in stats.items()}
    base_train = base_loss["train"][0] if rows else base_loss["train"]
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
        base_train=float(base_train),
        error_term=host.get("error_term", (None, None))[0],
        error_term_se=host.get("error_term", (None, None))[1],
    )


def _mean_se(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise mean and standard error over the last dimension."""
    n = x.shape[-1]
    return x.mean(-1), x.std(-1, unbiased=True) / math.sqrt(n)
