"""Whether a batch's per-sample losses depend on each other: the loss contract's check, once,
before step 0.

Per-sample gradients, and the dispersion made of them, presume ``ℓ_i`` depends on sample ``i``
alone. A contrastive loss with in-batch negatives (SimCLR's NT-Xent), a listwise ranking loss or
a normalization across the batch inside the model makes ``ℓ_i`` a function of the other samples
too; the training backward's rows are then not per-sample gradients (the norm hooks' sum of
squares was below ``b‖ḡ‖²``: a negative variance logged), and a pass over single samples
evaluates another loss.

The check differentiates ``ℓ_0``, and the sum of the other losses, with respect to the batched
outputs of every layer (a module with trainable parameters of its own; the first
:data:`MAX_LAYERS`) and compares where each gradient is non-zero — then ``ℓ_1`` against the
others likewise:
independent samples read disjoint entries of every layer's output (``[b, …]`` rows, the ``[T, b,
…]`` columns of a sequence-first model, the ``2b`` rows of two views of each sample), so the
supports do not overlap; a loss with in-batch negatives reads other samples' entries, and they
do; so does mixup between hidden states (``h·λ + h[perm]·(1−λ)``), missed only where ``perm``
fixes both samples (1 in ``k(k−1)`` for a random permutation of ``k``: 1 in 56). It runs on a
run of :data:`SAMPLES` of the batch's samples (``part``; the loss contract takes four, each as
another ``batch_idx`` and drawing again): its memory is the gradient of every layer's output of
those — on the whole batch of the AlexNet-style CNN at b = 64 the fit's peak resident-set growth
was 384–399 MiB against 311–333 on eight samples (two runs each; plain training 265–295; found
in round 30). At a layer's output, not at the batch's input: what the training step does to its inputs
before the model (mixup, standardizing the batch) leaves each row of the model per-sample and the
hooks exact; token ids have no gradient, an embedding's output has. Every layer, not the first
only: a retrieval loss whose queries and passages go through two towers couples the samples in
the passage tower alone. A layer output whose shape does not change when the model runs on one
sample is shared by the batch (a positional table of ``arange(T)``, even with ``T = b``) and left
out. Two forwards (the first samples, one sample) and four backward passes, once. Non-finite entries
(``0·inf``) do not count. Train-mode BatchNorm couples samples too; it has estimators of its own
and is not tested here. Not seen: coupling before the first layer (inside a parameter-free module
that mixes the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_hook

MAX_LAYERS = 256
"""Layer outputs the check keeps (the first ones called)."""
SAMPLES = 8
"""The check runs on the batch's first samples, at most this many."""


def has_train_batchnorm(module: nn.Module) -> bool:
    """Whether a BatchNorm layer normalizes with batch statistics (couples the samples): in train
    mode, or in eval mode without running statistics (``track_running_stats=False``)."""
    return any(isinstance(m, _BatchNorm) and (m.training or m.running_mean is None) for m in module.modules())


def losses_couple(loss_of: Callable[[Any], Tensor], batch: Any, b: int, part: int = 0) -> bool:
    """Whether the first or the second entry of ``loss_of(batch)`` (``[b]`` per-sample losses,
    computed with gradient; on the batch's ``part``-th run of :data:`SAMPLES` samples) reads an
    entry of some parameterized layer's batched output that another entry reads; ``False`` when
    that cannot be told (one sample, no such layer, no graph, no such part). Batched: the output's
    shape changes when the same model runs on one sample of the batch (a table shared by the batch,
    whose shape does not, is left out even when its length equals the batch size)."""
    from genbounds.estimators.batching import index_batch

    start = SAMPLES * part
    size = min(SAMPLES, b - start)
    if size < 2:
        return False
    return _couple(loss_of, index_batch(batch, slice(start, start + size)) if size < b else batch, size)


def _couple(loss_of: Callable[[Any], Tensor], batch: Any, b: int) -> bool:
    """:func:`losses_couple` on ``batch`` of ``b`` samples, all of them."""
    from genbounds.estimators.batching import index_batch

    def record(into: list, keep: bool) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if len(into) >= MAX_LAYERS or not isinstance(output, Tensor) or not output.is_floating_point() \
                    or output.dim() == 0 or not any(p.requires_grad for p in module.parameters(recurse=False)):
                return
            into.append((id(module), tuple(output.shape), output if keep else None))
        return hook

    seen: list = []
    handle = register_module_forward_hook(record(seen, keep=True))
    try:
        losses = loss_of(batch)
    finally:
        handle.remove()
    one: list = []
    handle = register_module_forward_hook(record(one, keep=False))
    try:
        # (with gradient: a loss whose weights are read from the step's returned loss takes a
        # backward through its arithmetic, and under no_grad recorded no layer — no check at all)
        with torch.enable_grad():
            loss_of(index_batch(batch, slice(0, 1)))
    finally:
        handle.remove()
    if [m for m, _, _ in seen] != [m for m, _, _ in one]:
        return False  # (another sequence of calls on one sample: cannot be told)
    outputs = [out for (_, shape, out), (_, shape1, _) in zip(seen, one) if shape != shape1 and out.requires_grad]
    if not outputs or not isinstance(losses, Tensor) or not losses.requires_grad or losses.numel() != b:
        return False
    # the first two losses, each against all the others at once: coupled when it reads an entry
    # another reads (the first against the second alone missed a coupling through a permutation of
    # the batch — mixup between hidden states, h·λ + h[perm]·(1−λ) — unless it paired those two)
    flat = losses.reshape(-1)
    total = flat.sum()
    for i in (0, 1):
        supports = []
        for j, part in enumerate((flat[i], total - flat[i])):
            grads = torch.autograd.grad(part, outputs, allow_unused=True, retain_graph=i == 0 or j == 0)
            supports.append([None if g is None else (g != 0) & g.isfinite() for g in grads])
            del grads
        if any(a is not None and c is not None and bool((a & c).any()) for a, c in zip(*supports)):
            return True
    return False
