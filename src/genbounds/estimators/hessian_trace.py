"""Hutchinson estimate of ``Tr H`` with an honest standard error (SPEC §5).

``Tr H = E[vᵀ H v]`` for Rademacher ``v``; the estimate is the mean of ``n`` samples
``vⱼᵀ H vⱼ`` and its standard error ``sd/√n``. Samples are drawn in blocks of ``block_size``
vectors per batched HVP; after each block the rule stops once

* the relative SE is below ``rel_tol`` (``SE < rel_tol · |mean|``), or
* the SE is below the absolute floor ``abs_tol`` (so a trace near 0 does not always run to the
  cap), or
* ``max_probes`` samples have been drawn,

and never before ``min_probes`` samples (a standard deviation from 2 or 3 samples is not an
error bar). Unlike PyHessian 0.1 it stops on the *standard error*, not on the change of the
running mean — PyHessian's rule can stop after two samples when the first one is negative.

Because the stopping time depends on the samples, the SE is slightly optimistic at the
stopping point; ``min_probes`` keeps that small (the coverage test measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from genbounds.estimators.functional import row_dot64
from genbounds.estimators.hessian_vector_product import LossHessian, rademacher_like


@dataclass
class TraceEstimate:
    value: float
    """Mean of the Hutchinson samples."""
    standard_error: float
    """``sd / √n``."""
    num_probes: int
    samples: Tensor
    """The ``vⱼᵀ H vⱼ`` (float64, on the device)."""
    group_samples: Tensor | None = None
    """``[n, K]``: per probe, ``v_{j,k}ᵀ (H v_j)_k`` for each parameter group ``k`` (they sum to the
    sample): the same probes give each diagonal block's trace ``Tr H_k`` with its own SE."""


def hutchinson_trace(
    hessian: LossHessian,
    generator: torch.Generator,
    *,
    rel_tol: float = 0.05,
    abs_tol: float = 0.0,
    min_probes: int = 10,
    max_probes: int = 200,
    block_size: int = 10,
    groups: list[list[int]] | None = None,
) -> TraceEstimate:
    """Hutchinson trace with a standard-error stopping rule (see the module docstring).

    ``groups`` (parameter indices per group) also returns the per-group samples. One host sync
    per block (to test the stopping rule). A non-finite sample stops the estimate (its mean is
    then non-finite: the caller drops the probe).
    """
    if not (0 < min_probes <= max_probes) or block_size < 1:
        raise ValueError("need 0 < min_probes <= max_probes and block_size >= 1")
    samples: list[Tensor] = []
    per_group: list[Tensor] = []
    drawn = 0
    while drawn < max_probes:
        n = min(block_size, max_probes - drawn)
        vs = rademacher_like(hessian.params, n, generator)
        hvs = hessian.hvp_batched(vs)
        per_param = torch.stack([row_dot64(x, y) for x, y in zip(vs, hvs)], dim=1)  # [n, P]
        del vs, hvs  # (released before the next block's draw and products)
        samples.append(per_param.sum(1))
        if groups is not None:
            per_group.append(torch.stack([per_param[:, idx].sum(1) if idx else per_param.new_zeros(n)
                                          for idx in groups], dim=1))
        drawn += n
        if drawn < min_probes:
            continue
        all_samples = torch.cat(samples)
        mean, se = _mean_se(all_samples)
        if not math.isfinite(mean) or se <= rel_tol * abs(mean) or se <= abs_tol:
            break
    all_samples = torch.cat(samples)
    mean, se = _mean_se(all_samples)
    return TraceEstimate(mean, se, int(all_samples.numel()), all_samples,
                         torch.cat(per_group) if per_group else None)


def _mean_se(x: Tensor) -> tuple[float, float]:
    n = x.numel()
    mean = float(x.mean())
    se = float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    return mean, se
