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

from genbounds.estimators.hessian_vector_product import LossHessian, batched_dot, rademacher_like


@dataclass
class TraceEstimate:
    value: float
    """Mean of the Hutchinson samples."""
    standard_error: float
    """``sd / √n``."""
    num_probes: int
    samples: Tensor
    """The ``vⱼᵀ H vⱼ`` (float64, on the device)."""


def hutchinson_trace(
    hessian: LossHessian,
    generator: torch.Generator,
    *,
    rel_tol: float = 0.05,
    abs_tol: float = 0.0,
    min_probes: int = 10,
    max_probes: int = 200,
    block_size: int = 10,
) -> TraceEstimate:
    """Hutchinson trace with a standard-error stopping rule (see the module docstring).

    One host sync per block (to test the stopping rule).
    """
    if not (0 < min_probes <= max_probes) or block_size < 1:
        raise ValueError("need 0 < min_probes <= max_probes and block_size >= 1")
    samples: list[Tensor] = []
    drawn = 0
    while drawn < max_probes:
        n = min(block_size, max_probes - drawn)
        vs = rademacher_like(hessian.params, n, generator)
        samples.append(batched_dot(vs, hessian.hvp_batched(vs)))
        drawn += n
        if drawn < min_probes:
            continue
        all_samples = torch.cat(samples)
        mean, se = _mean_se(all_samples)
        if se <= rel_tol * abs(mean) or se <= abs_tol:
            break
    all_samples = torch.cat(samples)
    mean, se = _mean_se(all_samples)
    return TraceEstimate(mean, se, int(all_samples.numel()), all_samples)


def _mean_se(x: Tensor) -> tuple[float, float]:
    n = x.numel()
    mean = float(x.mean())
    se = float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    return mean, se
