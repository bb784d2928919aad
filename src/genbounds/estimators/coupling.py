"""Whether a batch's per-sample losses depend on each other: the loss contract's check, once,
before step 0.

Per-sample gradients, and the dispersion made of them, presume ``ℓ_i`` depends on sample ``i``
alone. A contrastive loss with in-batch negatives (SimCLR's NT-Xent), a listwise ranking loss or
any normalization across the batch makes ``ℓ_i`` a function of the other samples too; the
training backward's rows are then not per-sample gradients (the norm hooks' sum of squares was
below ``b‖ḡ‖²``: a negative variance logged), and a pass over single samples evaluates another
loss. The check: differentiate ``ℓ_0`` with respect to the batch's input (the first
floating-point tensor whose leading dimension is the batch) — zero outside row 0 for
independent samples, whatever the model; one backward, once. Train-mode BatchNorm couples samples
too; it has estimators of its own and is not reported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from genbounds.estimators.batching import map_tensors


def with_input_gradient(batch: Any, b: int) -> tuple[Any, Tensor | None]:
    """``batch`` with its first floating-point tensor of leading size ``b`` replaced by a copy
    that carries gradient (a clone of a leaf: in-place ops on it stay legal), and that leaf;
    ``(batch, None)`` when there is no such tensor (token ids only)."""
    found: list[Tensor] = []

    def swap(t: Tensor) -> Tensor:
        if found or not t.is_floating_point() or t.dim() == 0 or t.shape[0] != b or t.requires_grad:
            return t
        leaf = t.detach().requires_grad_(True)
        found.append(leaf)
        return leaf.clone()

    out = map_tensors(batch, swap)
    return (out, found[0]) if found else (batch, None)


def couples(per_sample: Tensor | None, leaf: Tensor | None) -> bool:
    """Whether ``per_sample[0]`` depends on another sample's input row (``leaf`` from
    :func:`with_input_gradient`); ``False`` when that cannot be told (no graph, one sample)."""
    if per_sample is None or leaf is None or not per_sample.requires_grad or per_sample.numel() < 2:
        return False
    (grad,) = torch.autograd.grad(per_sample.reshape(-1)[0], leaf, retain_graph=True, allow_unused=True)
    return grad is not None and bool((grad[1:] != 0).any())
