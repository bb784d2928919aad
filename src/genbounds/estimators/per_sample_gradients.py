"""Exact per-sample gradients with ``torch.func`` (``vmap`` over ``grad``).

Works for any model whose operations have batching rules (everything but train-mode BatchNorm,
which couples the samples and has no per-sample gradient). Costs one extra forward and backward
over the batch and materializes ``chunk_size × d`` gradients at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from genbounds.estimators.batching import batch_size, index_batch, map_tensors
from genbounds.estimators.functional import LossFn, detached, functional_loss, trainable_parameters
from genbounds.estimators.gradient_dispersion import GradientMoments, centered_sums


def per_sample_gradient_moments(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    chunk_size: int | None = None,
    randomness: str = "different",
) -> GradientMoments:
    """Sufficient statistics of the per-sample gradients ``g_i`` of ``batch`` (units = samples).

    Args:
        module: the model; its real parameters are never written.
        loss_fn: the loss contract, ``loss_fn(module, batch) -> per-sample losses``.
        batch: the batch.
        chunk_size: vectorize over at most this many samples at once (memory bound); ``None``
            does the whole batch in one ``vmap``. The centred terms for the standard error are
            only available without chunking (they need every ``g_i`` and ``ḡ`` at once).
        randomness: ``vmap`` randomness for dropout-like layers (``"different"``: independent
            masks per sample, ``"same"``, or ``"error"``).

    Returns:
        :class:`GradientMoments` with ``Σ_i ‖g_i‖²``, ``Σ_i g_i`` and, without chunking,
        ``‖g_i − ḡ‖²`` for the standard error; also the per-sample losses.
    """
    params = trainable_parameters(module)
    names = list(params)
    base = detached(params)
    f = functional_loss(module, loss_fn)

    def loss_of_one(p: dict[str, Tensor], sample: Any) -> Tensor:
        return f(p, map_tensors(sample, lambda t: t.unsqueeze(0))).sum()

    per_sample = vmap(grad_and_value(loss_of_one), in_dims=(None, 0), randomness=randomness)

    b = batch_size(batch)
    step = b if chunk_size is None else max(1, min(chunk_size, b))
    sq_sum = None
    grad_sum: list[Tensor] | None = None
    losses = []
    kept: list[Tensor] | None = None
    for start in range(0, b, step):
        grads, loss = per_sample(base, index_batch(batch, slice(start, start + step)))
        flat = [grads[n].reshape(grads[n].shape[0], -1) for n in names]
        sq = torch.stack([(g.double() ** 2).sum(1) for g in flat]).sum(0)  # [chunk]
        sums = [g.sum(0) for g in flat]
        sq_sum = sq.sum() if sq_sum is None else sq_sum + sq.sum()
        grad_sum = sums if grad_sum is None else [a + s for a, s in zip(grad_sum, sums)]
        losses.append(loss.detach())
        if step == b:
            kept = flat
    assert sq_sum is not None and grad_sum is not None
    centered = None
    if kept is not None:
        mean = [s.double() / b for s in grad_sum]
        # ‖g_i − ḡ‖², one row per sample, accumulated per parameter in float64
        centered = torch.stack(
            [((g.double() - m) ** 2).sum(1) for g, m in zip(kept, mean)]
        ).sum(0)
    shaped_sum = [s.reshape(params[n].shape) for s, n in zip(grad_sum, names)]
    return GradientMoments(
        weighted_sq_norm_sum=sq_sum,
        num_samples=b,
        num_units=b,
        weighted_sum=shaped_sum,
        centered_sums=None if centered is None else centered_sums(centered),
        losses=torch.cat(losses),
    )
