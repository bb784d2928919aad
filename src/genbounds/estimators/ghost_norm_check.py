"""A one-time check of the ghost-norm hooks against exact gradients, before step 0.

The hooks infer each layer's per-sample terms from its input and output gradient, taking the
batch dimension to be the one that holds the samples.  A layer whose output is shared by the
whole batch — a learned positional embedding of ``arange(T)`` broadcast over it, a layer called on
a tensor with no batch dimension — has no per-sample output gradient: its rows are positions,
not samples.  When its leading size differs from the batch size the step is reported; when it
equals the batch size (``T = B``) no shape seen in training can tell.  A batch of **one** sample
can: there every per-sample layer's leading size is 1 and a shared one keeps its own (``T``), and
the one sample's gradient is the batch gradient, so one backward gives both the hooks' per-sample
squared norms and the exact ones (``‖∂ℓ_1/∂θ_layer‖²`` from ``autograd.grad``).  Memory: one
sample's activations and one gradient of the parameters, before training allocates ``.grad``
(a check on the whole batch with a per-sample loop raised ResNet-18's peak growth from 1.0× to
1.35× of plain training).  Train-mode BatchNorm runs on its running statistics for the check (one
sample has no batch statistics). The RNN/LSTM layers the hooks leave to BackPACK's ``BatchL2Grad``
are checked in the same backward: BackPACK reads a layer's output gradient, so an LSTM read
through its final state alone (``h_n``: the output unused) gets no values although its weights get
gradient — found here rather than at the first measured step, which it lost.

A sequence-first model (``batch_first=False``) has the opposite blind spot: on one sample every
layout is clear, but in training a layer outside PyTorch's transformer layers finds its batch
dimension by the batch size, which a sequence length can equal.  The hooks report that from the
shapes of a forward (no backward), so :func:`batch_layout_problem` runs one forward of the
whole first batch under them — before step 0, instead of at step 0's read (which then lost
that step). The same forward shows, in any model, a layer called on part of the batch (a mixture
of experts' routing, a mask), which one sample cannot: there an expert sees the sample or nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from genbounds.estimators.backpack_norms import BackpackNormHooks
from genbounds.estimators.batching import batch_size, index_batch
from genbounds.estimators.functional import piece_owners, squared_pieces
from genbounds.estimators.ghost_norms import GhostNormHooks, declared_batch_dims

RTOL = 1e-3
"""Tolerance on a layer's squared norm (float32 arithmetic; the defects this check exists for are
off by O(1) or change a shape)."""


class HookProblem(RuntimeError):
    """The hooks reported the batch (``GhostNormHooks.read``)."""


def hook_norm_errors(module: nn.Module, modules: dict[str, nn.Module], loss_fn: Any, batch: Any,
                     backpack_modules: dict[str, nn.Module] | None = None) -> dict[str, float]:
    """Each hooked module whose squared gradient norm on the first sample of ``batch``, as the
    hooks give it, differs from the exact one by more than :data:`RTOL`, with the relative error
    (empty: the hooks are exact here). ``backpack_modules`` (RNN/LSTM layers the hooks leave to
    BackPACK's ``BatchL2Grad``) are checked in the same backward.

    Run it inside an isolated pass (weights, buffers, modes and the RNG are the caller's to
    restore); ``loss_fn(module, batch)`` gives the ``[b]`` per-sample losses with their graph.

    Raises:
        HookProblem: the hooks reported the sample (a layer whose leading size is not 1: its
            output is shared by the batch, or its rows are not samples), or BackPACK gave no
            values for a layer whose weights received gradient (its output got none: an LSTM read
            through its final state alone).
    """
    if batch_size(batch) < 1:
        return {}
    backpack_modules = backpack_modules or {}
    one = index_batch(batch, slice(0, 1))
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    every = {**modules, **backpack_modules}
    own = {name: [p for p in m.parameters(recurse=False) if p.requires_grad] for name, m in every.items()}
    flat = [p for ps in own.values() for p in ps]
    hooks = GhostNormHooks(modules, batch_dims=declared_batch_dims(module)) if modules else None
    extension = BackpackNormHooks(list(backpack_modules.values())) if backpack_modules else None
    got: dict[str, float] = {}
    try:
        if hooks is not None:
            hooks.arm(1)
        if extension is not None:
            extension.attach()
        losses = loss_fn(module, one)
        if extension is not None:
            extension.enter_backward()
        grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True)
        if extension is not None:
            extension.exit_backward()
            missing = [name for name, m in backpack_modules.items()
                       if any(p.requires_grad and not hasattr(p, "batch_l2") for p in m.parameters(recurse=False))]
            if missing:
                raise HookProblem(f"BackPACK gave no per-sample norms for {', '.join(missing)} although its weights "
                                  "received gradient (its output got none: an RNN/LSTM read through its final state "
                                  "alone?)")
            read = extension.read_modules(1)
            assert read is not None
            got.update({name: float(read[m][0]) for name, m in backpack_modules.items() if m in read})
        if hooks is not None:
            try:
                norms = hooks.read(scale=1)
            except RuntimeError as err:
                raise HookProblem(str(err)) from err
            if norms is None:
                raise HookProblem("no hooked layer's output received gradient")
            got.update({name: float(norms.per_group[name][0]) for name in modules if name in norms.per_group})
    finally:
        if hooks is not None:
            hooks.detach()
        if extension is not None:
            extension.detach()
    present = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, flat)]
    sq = _per_tensor_sq_norms(present)
    del grads, present
    errors: dict[str, float] = {}
    start = 0
    for name, ps in own.items():
        want = sum(sq[start:start + len(ps)], 0.0)
        start += len(ps)
        got_v = got.get(name, 0.0)
        if abs(got_v - want) > RTOL * abs(want) + 1e-30:
            errors[name] = abs(got_v - want) / want if want > 0 else float("inf")
    return errors


def _per_tensor_sq_norms(tensors: list[Tensor]) -> list[float]:
    """Each tensor's squared norm (float64 sums of fp32 pieces on the CPU): by the pieces the
    training steps' read takes, whose kernels a measured fit runs anyway — ``_foreach_norm`` and a
    float64 ``pow`` here mapped 0.4 MiB of library code that nothing else in the fit runs."""
    if not tensors:
        return []
    pieces, layout = squared_pieces(tensors)
    out = [0.0] * len(tensors)
    for owner, value in zip(piece_owners(layout), pieces.tolist()):
        out[owner] += value
    return out


def batch_layout_problem(module: nn.Module, modules: dict[str, nn.Module], loss_fn: Any, batch: Any) -> str | None:
    """What one forward of the whole ``batch`` under the hooks shows from its shapes, or ``None``:
    in a sequence-first model, a sequence length equal to the batch size where layers' batch
    dimension is guessed; in any model, a layer called on fewer or more rows than the batch holds
    (a layer applied to part of the batch — a mixture of experts' routing, a mask — which one sample
    does not show: there each expert sees the sample or nothing). Run it inside an isolated pass;
    the forward's graph is dropped unused (its memory is a training forward's)."""
    hooks = GhostNormHooks(modules, batch_dims=declared_batch_dims(module))
    b = batch_size(batch)
    try:
        hooks.arm(b)
        with torch.enable_grad():
            losses = loss_fn(module, batch)
        del losses
        problems = list(hooks.problems)
        for name, rows in hooks.call_rows().items():
            other = sorted({r for r in rows if r != b})
            if other:
                problems.append(f"{name}: called on {other[0]} rows of a batch of {b} (a layer applied to part of the "
                                "batch — a mixture of experts' routing, a mask — has no rows the hooks can give to "
                                "samples)")
    finally:
        hooks.detach()
    return "; ".join(problems) or None


__all__ = ["RTOL", "HookProblem", "batch_layout_problem", "hook_norm_errors"]
