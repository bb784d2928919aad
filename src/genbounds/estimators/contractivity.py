"""Hessian contractivity along the gradient (seed 004 Eq. 4; SPEC §5).

A point ``w`` is Hessian-contractive along the gradient when ``∇fᵀH∇f / ‖∇f‖² > 0``. Seed 004
estimates it at ``K`` random points ``w̃ = w + r·u`` (``u`` uniform on the unit sphere) by a finite
difference of gradients on **one** probe minibatch shared by all points:

    c(w̃) = [∇f(w̃) − ∇f(w̃ − η∇f(w̃))]ᵀ ∇f(w̃) / (η ‖∇f(w̃)‖²)

and reports the mean and the minimum over the ``K`` points (paper: ``r = 1``, ``η = 1e−3``,
``K = 100``, batch 128). :func:`contractivity_exact` is the exact quantity ``∇fᵀH∇f/‖∇f‖²`` at
``w`` itself, by one Hessian-vector product. For a quadratic ``f`` both are exact:
``c = ∇fᵀA∇f/‖∇f‖²``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from genbounds.estimators.functional import LossFn, Reduce, dot, sq_norm
from genbounds.estimators.hessian_vector_product import LossHessian
from genbounds.estimators.perturbation import PerturbedLoss, chunks, flat_dot, flat_sq_norm, standard_normal


@dataclass
class ContractivityEstimate:
    mean: float
    standard_error: float
    """Of the mean over the ``K`` random points."""
    minimum: float
    values: Tensor
    """``c(w̃ₖ)`` for each point (float64, device)."""


def contractivity(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    generator: torch.Generator,
    *,
    radius: float = 1.0,
    eta: float = 1e-3,
    num_points: int = 100,
    points_per_pass: int = 8,
    dtype: torch.dtype | None = None,
    reduce: Reduce | None = None,
) -> ContractivityEstimate:
    """Finite-difference contractivity at ``num_points`` points on the sphere of ``radius``
    around the current weights (see the module docstring). One host sync at the end."""
    if num_points < 2:
        raise ValueError("num_points must be >= 2 for a standard error")
    fn = PerturbedLoss(module, loss_fn, dtype, reduce)
    data = fn.prepare(batch)
    values = []
    for _, count in chunks(num_points, max(1, points_per_pass)):
        u = standard_normal(fn.base, count, generator)
        norms = flat_sq_norm(u).sqrt()  # [count]
        u = {k: v / _expand(norms, v) for k, v in u.items()}
        points = fn.shifted(u, radius)
        g1 = fn.gradients_at(points, data)
        stepped = {k: points[k] - eta * g1[k] for k in fn.names}
        g2 = fn.gradients_at(stepped, data)
        diff = {k: g1[k] - g2[k] for k in fn.names}
        values.append(flat_dot(diff, g1) / (eta * flat_sq_norm(g1)))
    c = torch.cat(values)
    return ContractivityEstimate(
        mean=float(c.mean()),
        standard_error=float(c.std(unbiased=True)) / math.sqrt(c.numel()),
        minimum=float(c.min()),
        values=c,
    )


def contractivity_exact(hessian: LossHessian) -> float:
    """``∇fᵀH∇f / ‖∇f‖²`` at the current weights, by one HVP (one host sync)."""
    g = hessian.gradient()
    hg = hessian.hvp(g)
    return float(dot(g, hg) / sq_norm(g))


def _expand(row: Tensor, like: Tensor) -> Tensor:
    return row.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
