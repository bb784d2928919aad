"""Hessian-weighted gradient dispersion ``Tr(H Σ_B)`` (SPEC §5).

A *local proxy* of the first component of the algorithmic-variability bound (seed 002 Lemma 2),
which uses the Hessian at the final solution and accumulates ``η_t²``-weighted covariances over
the run; here ``H`` is the Hessian at the current weights.

With ``k`` equal chunks of the training batch and their mean gradients ``h_j``:
``Tr(H Σ_B) ≈ 1/(k(k−1)) Σ_j (h_j − h̄)ᵀ H (h_j − h̄)`` — unbiased when ``H`` is taken on a
*different* batch than the chunks (on the same batch the correlation biases it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from genbounds.estimators.batching import batch_size, split_batch, split_sizes
from genbounds.estimators.collective import reduce_computed
from genbounds.estimators.functional import LossFn, Reduce, per_sample_losses, trainable_parameters
from genbounds.estimators.hessian_vector_product import LossHessian, batched_dot


@dataclass
class WeightedDispersionEstimate:
    value: float
    standard_error: float
    """Over the ``k`` chunk terms."""
    num_chunks: int


def hessian_weighted_dispersion(
    module: nn.Module,
    loss_fn: LossFn,
    chunk_batch: Any,
    hessian: LossHessian,
    num_chunks: int = 8,
    reduce: Reduce | None = None,
) -> WeightedDispersionEstimate:
    """``Tr(H Σ_B)`` from ``num_chunks`` chunks of ``chunk_batch`` and the Hessian operator
    ``hessian`` (built on another batch). One host sync."""
    params = list(trainable_parameters(module).values())
    b = batch_size(chunk_batch)
    k = min(num_chunks, b)
    if k < 2:
        raise ValueError("need at least two chunks")
    sizes = split_sizes(b, k)
    if len(set(sizes)) != 1:
        sizes = [b // k] * k  # equal chunks: drop the remainder
    grads = []
    for chunk in split_batch(chunk_batch, sizes):
        def local(chunk: Any = chunk) -> list[Tensor]:
            loss = per_sample_losses(module, loss_fn, chunk).mean()
            g = torch.autograd.grad(loss, params, allow_unused=True)
            return [torch.zeros_like(p) if x is None else x.detach() for x, p in zip(g, params)]

        # (a failure in one DDP process raises in every process: estimators/collective.py)
        grads.append(reduce_computed(local, reduce, params[0].device))
    stacked = [torch.stack([g[i] for g in grads]) for i in range(len(params))]  # [k, *shape]
    centered = [s - s.mean(0, keepdim=True) for s in stacked]
    q = batched_dot(centered, hessian.hvp_batched(centered))  # [k]
    value = float(q.sum()) / (k * (k - 1))
    se = float(q.std(unbiased=True)) / math.sqrt(k) / (k - 1)
    return WeightedDispersionEstimate(value, se, k)


__all__ = ["WeightedDispersionEstimate", "hessian_weighted_dispersion"]
