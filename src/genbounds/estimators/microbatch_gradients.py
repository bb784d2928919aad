"""Micro-batch estimator of the gradient dispersion (SPEC §1): ``k`` chunk gradients.

Any model, any layer: each chunk is an ordinary forward and backward
(``torch.autograd.grad``, never ``.backward()`` into ``.grad``). Under train-mode BatchNorm each
chunk is normalized with its own statistics, so the chunk gradients belong to a slightly
different loss than the training step's — an approximation, documented as such.

With a random assignment of the batch's samples to equal chunks the estimator is unbiased
*conditionally on the batch*: ``E[Σ_j m‖h_j − ḡ‖²] = (k − 1) s²``, hence
``E[dispersion] = s²/b``. Its relative variance is about ``2/(k − 1)`` against ``2/(b − 1)``
for the exact per-sample path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from genbounds.estimators.batching import batch_device, batch_size, split_batch, split_sizes
from genbounds.estimators.functional import (
    LossFn,
    loss_values,
    per_tensor_sq_norms,
    sq_norm,
    trainable_parameters,
)
from genbounds.estimators.gradient_dispersion import GradientMoments, centered_sums, group_sums


def microbatch_gradient_moments(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    num_chunks: int,
    *,
    generator: torch.Generator | None = None,
    groups: list[list[int]] | None = None,
) -> GradientMoments:
    """Chunk-gradient moments of ``batch`` split into ``num_chunks`` (at most ``b``) chunks.

    Args:
        module: the model (run in whatever train/eval mode it is in).
        loss_fn: the loss contract.
        batch: the batch.
        num_chunks: ``k ≥ 2``.
        generator: source of the random sample-to-chunk assignment; ``None`` keeps the batch
            order (contiguous chunks).
        groups: parameter indices per group (layer) for ``group_sq``.

    ``loss_fn`` may return a 1-element tensor (the chunk's mean loss) instead of per-sample losses:
    only chunk means are used here.
    """
    if num_chunks < 2:
        raise ValueError(f"the micro-batch estimator needs num_chunks >= 2, got {num_chunks}")
    params = list(trainable_parameters(module).values())
    b = batch_size(batch)
    k = min(num_chunks, b)
    sizes = split_sizes(b, k)
    order = None
    if generator is not None:
        order = torch.randperm(b, generator=generator, device=generator.device)
        order = order.to(batch_device(batch))
    chunk_grads: list[list[Tensor]] = []
    losses = []
    for chunk in split_batch(batch, sizes, order):
        chunk_losses = loss_values(module, loss_fn, chunk)
        grads = torch.autograd.grad(chunk_losses.mean(), params, allow_unused=True)
        chunk_grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
        losses.append(chunk_losses.detach())
    weighted_sum = [
        sum(m * grads[i] for m, grads in zip(sizes, chunk_grads)) for i in range(len(params))
    ]
    mean = [s / b for s in weighted_sum]
    per_param = torch.stack([m * per_tensor_sq_norms(g) for m, g in zip(sizes, chunk_grads)])  # [k, P]
    sq = per_param.sum(1)
    centered = torch.stack(
        [m * sq_norm([h - g for h, g in zip(grads, mean)]) for m, grads in zip(sizes, chunk_grads)]
    )
    return GradientMoments(
        weighted_sq_norm_sum=sq.sum(),
        num_samples=b,
        num_units=k,
        weighted_sum=[s.detach() for s in weighted_sum],
        centered_sums=centered_sums(centered),
        losses=torch.cat(losses),
        group_sq=None if groups is None else group_sums(per_param.sum(0), groups),
    )
