"""Whether a batch's per-sample losses depend on each other: the loss contract's check, once,
before step 0.

Per-sample gradients, and the dispersion made of them, presume ``ℓ_i`` depends on sample ``i``
alone. A contrastive loss with in-batch negatives (SimCLR's NT-Xent), a listwise ranking loss or
a normalization across the batch inside the model makes ``ℓ_i`` a function of the other samples
too; the training backward's rows are then not per-sample gradients (the norm hooks' sum of
squares was below ``b‖ḡ‖²``: a negative variance logged), and a pass over single samples
evaluates another loss.

The check differentiates ``ℓ_0`` and ``ℓ_1`` with respect to the output of the first layer (a
module with trainable parameters of its own) and compares where each gradient is non-zero:
independent samples read disjoint entries of every layer's output (``[b, …]`` rows, the ``[T, b,
…]`` columns of a sequence-first model, the ``2b`` rows of two views of each sample), so the two
supports do not overlap; a loss with in-batch negatives reads other samples' entries, and they
do. At a layer's output, not at the batch's input: what the training step does to its inputs
before the model (mixup, standardizing the batch) leaves each row of the model per-sample and the
hooks exact; token ids have no gradient, an embedding's output has. One forward and two backward
passes, once. Non-finite entries (``0·inf``) do not count. Train-mode BatchNorm couples samples
too; it has estimators of its own and is not tested here. Not seen: coupling before that first
layer (inside a parameter-free module that mixes the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook


def losses_couple(per_sample_losses: Callable[[], Tensor], b: int) -> bool:
    """Whether ``per_sample_losses()`` (a ``[b]`` tensor, computed with gradient) has its first two
    entries read common entries of the first parameterized layer's output; ``False`` when that
    cannot be told (one sample, no such layer, no graph)."""
    if b < 2:
        return False
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if seen or not isinstance(output, Tensor) or not output.requires_grad or not output.is_floating_point():
            return
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            seen.append(output)

    handle = register_module_forward_hook(hook)
    try:
        losses = per_sample_losses()
    finally:
        handle.remove()
    if not seen or not isinstance(losses, Tensor) or not losses.requires_grad or losses.numel() != b:
        return False
    flat = losses.reshape(-1)
    supports = []
    for i in (0, 1):
        (grad,) = torch.autograd.grad(flat[i], seen[0], allow_unused=True, retain_graph=i == 0)
        if grad is None:
            return False
        supports.append((grad != 0) & grad.isfinite())
    return bool((supports[0] & supports[1]).any())
