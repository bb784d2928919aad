"""A one-time check of the ghost-norm hooks against an exact per-sample loop, before step 0.

The hooks infer each layer's per-sample terms from its input and output gradient, taking the
batch dimension to be the one that holds the samples.  A layer whose output is shared by the
whole batch — a learned positional embedding of ``arange(T)`` broadcast over it, a layer called on
a tensor with no batch dimension — has no per-sample output gradient: its rows are positions,
not samples.  When its leading size differs from the batch size the step is reported; when it
equals the batch size (``T = B``) no shape can tell.  Values can: on the first training batch,
the hooks' per-sample squared norms of every layer are compared, for a few samples, with
``autograd.grad(ℓ_i)`` on the same graph (same dropout masks).  Train-mode
BatchNorm couples the samples (the hooks give a decomposition there, documented as an
approximation), so it runs on its running statistics for the check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from genbounds.estimators.batching import batch_size
from genbounds.estimators.ghost_norms import GhostNormHooks, declared_batch_dims

RTOL = 1e-3
"""Tolerance on a layer's largest per-sample squared norm (float32 arithmetic; the defects this
check exists for are off by O(1))."""

SAMPLES = 3
"""Samples whose exact per-sample gradients are taken (one backward of the batch's graph each)."""


class HookProblem(RuntimeError):
    """The hooks reported the batch (``GhostNormHooks.read``)."""


def hook_norm_errors(module: nn.Module, modules: dict[str, nn.Module], loss_fn: Any, batch: Any,
                     samples: int = SAMPLES) -> dict[str, float]:
    """Each hooked module whose per-sample squared norms on ``batch`` differ from the exact
    per-sample gradients of its first ``samples`` samples by more than :data:`RTOL`, with the
    relative error (empty: the hooks are exact here).

    The whole batch is used, as in training (per-sample losses captured from ``training_step``
    may depend on the batch they are computed on — a token mean over the batch's valid tokens).
    Run it inside an isolated pass (weights, buffers, modes and the RNG are the caller's to
    restore); ``loss_fn(module, batch)`` gives the ``[b]`` per-sample losses with their graph.

    Raises:
        HookProblem: the hooks reported the batch (a layer whose leading size is not the batch
            size, a sequence length equal to it in a sequence-first model, …).
    """
    b = batch_size(batch)
    k = min(b, samples)
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    own = {name: [p for p in m.parameters(recurse=False) if p.requires_grad] for name, m in modules.items()}
    flat = [p for ps in own.values() for p in ps]
    hooks = GhostNormHooks(modules, batch_dims=declared_batch_dims(module))
    try:
        hooks.arm(b)
        losses = loss_fn(module, batch)
        torch.autograd.grad(losses.mean(), flat, retain_graph=True, allow_unused=True)
        try:
            norms = hooks.read(scale=b)
        except RuntimeError as err:
            raise HookProblem(str(err)) from err
    finally:
        hooks.detach()
    if norms is None:
        raise HookProblem("a hooked layer received no gradient")
    exact = {name: torch.zeros(k, dtype=torch.float64) for name in own}
    for i in range(k):
        grads = torch.autograd.grad(losses[i], flat, retain_graph=i < k - 1, allow_unused=True)
        it = iter(grads)
        for name, ps in own.items():
            exact[name][i] = sum((_sq(next(it)) for _ in ps), torch.zeros((), dtype=torch.float64))
    errors: dict[str, float] = {}
    for name, want in exact.items():
        got = norms.per_group.get(name)
        got = torch.zeros(k, dtype=torch.float64) if got is None else got[:k].detach().double().cpu()
        scale = float(want.abs().max())
        err = float((got - want).abs().max())
        if err > RTOL * scale + 1e-30:
            errors[name] = err / scale if scale > 0 else float("inf")
    return errors


def _sq(g: Tensor | None) -> Tensor:
    return torch.zeros((), dtype=torch.float64) if g is None else g.detach().double().pow(2).sum().cpu()


__all__ = ["RTOL", "SAMPLES", "HookProblem", "hook_norm_errors"]
