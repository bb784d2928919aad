"""Exact per-sample gradients by an extra pass, with memory bounded by default.

Two methods give the same ``g_i = ∇ℓ(w, z_i)``:

* ``"vmap"`` — ``torch.func.vmap(grad(...))`` over single samples: ``b`` vectorized forwards and
  backwards. Needs a loss function that can run under ``vmap`` (no train-mode BatchNorm, which
  couples the samples; no in-place updates of captured state).
* ``"jacobian"`` — one forward of the per-sample loss vector ``ℓ ∈ R^b`` and the rows of its
  Jacobian by a batched backward (``torch.autograd.grad(..., is_grads_batched=True)`` with one-hot
  cotangents). Works for any per-sample loss whose backward has batching rules, including one
  computed by the user's own ``training_step``; under train-mode BatchNorm it gives ``∇ℓ_i`` with
  the batch statistics as functions of ``w`` (these still average to the batch gradient).
* ``"hooks"`` — one forward and one backward of ``mean_i ℓ_i`` with ghost-norm hooks
  (:mod:`genbounds.estimators.ghost_norms`): ``Σ_i ‖g_i‖²`` and the per-group sums without
  materializing any per-sample gradient — the cheapest, for models whose every trainable
  parameter the hooks cover (``ghost_norms.plan``); no standard error.

**Memory.** ``c`` per-sample gradients of ``d`` parameters take ``4·c·d`` bytes (fp32). Besides
them the pass holds the running sum ``Σ_i g_i`` (``4·d``) — unless the caller has ``ḡ`` already
(below) — and temporaries of one layer at a time: the chunk's sum is added by a matrix-vector
product, the centred terms are taken ``CENTER_BLOCK`` columns at a time, and a chunk is released
before the next one is computed. Without an explicit ``chunk_size`` the batch is processed in
chunks of ``c = max(1, budget // (2 · 4 · d))`` samples (``c`` gradients and as much again for the
vectorized backward's temporaries), ``budget`` = ``memory_budget`` bytes, default 64 MiB, whatever
the batch size. Above about 4.2 M parameters that is one sample at a time.
The standard error needs ``‖g_i − ḡ‖²``: with one chunk it is computed directly; with several it
needs ``ḡ`` beforehand (``mean_gradient``, e.g. the training step's ``.grad``), else it is omitted.

**Without the running sum.** A caller that has ``ḡ`` (``mean_gradient``) may pass
``gradient_sum=False``: ``Σ_i g_i`` is then not accumulated (``weighted_sum`` is ``None``; ``‖ḡ‖²``
is the caller's to take from ``mean_gradient``). The functorch backend of ``GradientDispersion``
does so whenever the training step's ``.grad`` is the batch mean (automatic optimization, no
accumulation, one process). One sample at a time, the pass then holds one per-sample gradient —
what a plain backward allocates for ``.grad`` — instead of two, and skips an add over the whole
gradient per sample. The centring writes its blocks into one scratch buffer for the whole pass:
a fresh ``c × CENTER_BLOCK`` temporary per block (20 a sample there) grew the heap under glibc's
default allocator by tens of MiB. Measured on the 5.6 M-parameter MLP at ``b = 128``
(``benchmarks/per_sample_pass_memory.py``, fresh processes, 5 rounds): the pass's resident-set
peak 24.0 MiB [23.5–24.2] without the running sum and 45.2 [44.7–67.9] with it, against 28.2 for a
plain backward (1.12 and 2.12 per-sample gradients; with glibc's mmap threshold fixed, so that the
peak follows the tensors alive, 23.3 and 44.5 MiB), and 1.56 s against 1.85 s.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from genbounds.estimators.batching import batch_size, index_batch, map_tensors
from genbounds.estimators.functional import LossFn, detached, functional_loss, row_sq_norms, trainable_parameters
from genbounds.estimators.gradient_dispersion import GradientMoments, centered_sums

Method = Literal["vmap", "jacobian", "hooks"]

DEFAULT_MEMORY_BUDGET = 64 * 2**20
"""Bytes of per-sample gradients (and as much again for temporaries) held at once by default."""


def budget_chunk_size(num_params: int, batch: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Samples per chunk so that ``c`` fp32 per-sample gradients and as much again (the
    vectorized backward's own temporaries) fit in ``memory_budget`` bytes; at least one."""
    per_sample = 2 * 4 * max(1, num_params)
    return max(1, min(batch, int(memory_budget // per_sample)))


def per_sample_gradient_moments(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    method: Method = "vmap",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    groups: list[list[int]] | None = None,
    mean_gradient: list[Tensor] | None = None,
    gradient_sum: bool = True,
    randomness: str = "different",
    center_at_mean: bool = False,
) -> GradientMoments:
    """Sufficient statistics of the per-sample gradients ``g_i`` of ``batch`` (units = samples).

    Args:
        module: the model; its real parameters are never written.
        loss_fn: the loss contract, ``loss_fn(module, batch) -> per-sample losses``.
        batch: the batch.
        method: ``"vmap"`` or ``"jacobian"`` (see the module docstring).
        chunk_size: samples per chunk; ``None`` sizes chunks from ``memory_budget``.
        memory_budget: bytes (see the module docstring).
        groups: parameter indices per group (layer) for ``group_sq``.
        mean_gradient: ``ḡ`` per parameter, for the standard error when chunked.
        gradient_sum: accumulate ``Σ_i g_i`` (``weighted_sum``); ``False`` needs ``mean_gradient``,
            which then also centres a single chunk's terms (see the module docstring).
        randomness: ``vmap`` randomness for dropout-like layers (``"vmap"`` method).
        center_at_mean: a single chunk's terms centred at ``mean_gradient`` even with a running
            sum (under DDP the processes' mean, which this batch's own is not); else at the batch's
            own mean (``.grad`` may hold more than this batch: manual optimization that
            accumulates).

    Returns:
        :class:`GradientMoments` with ``Σ_i ‖g_i‖²``, ``Σ_i g_i`` (unless ``gradient_sum=False``),
        per-group ``Σ_i ‖g_{i,k}‖²``, the centred terms when available, and the per-sample losses.
    """
    if not gradient_sum and mean_gradient is None:
        raise ValueError("gradient_sum=False needs mean_gradient (ḡ is then the caller's)")
    params = trainable_parameters(module)
    names = list(params)
    b = batch_size(batch)
    if method == "hooks":
        return _hook_moments(module, loss_fn, batch, params, groups)
    d = sum(p.numel() for p in params.values())
    step = chunk_size if chunk_size is not None else budget_chunk_size(d, b, memory_budget)
    step = max(1, min(step, b))
    chunks = _jacobian_chunks(module, loss_fn, batch, params, step) if method == "jacobian" else \
        _vmap_chunks(module, loss_fn, batch, params, step, randomness)
    single = step >= b
    sq_sum = torch.zeros((), dtype=torch.float64)
    per_param_sq: Tensor | None = None
    grad_sum: list[Tensor] | None = None
    losses: list[Tensor] = []
    centered: list[Tensor] = []
    kept: list[Tensor] | None = None
    scratch: Tensor | None = None  # the centring's blocks, one buffer for the whole pass
    for flat, loss in chunks:
        rows = torch.stack([row_sq_norms(g) for g in flat])  # [P, c]
        per_param_sq = rows.sum(1) if per_param_sq is None else per_param_sq + rows.sum(1)
        sq_sum = sq_sum.to(rows.device) + rows.sum()
        if gradient_sum and grad_sum is None:
            grad_sum = [g.sum(0) for g in flat]
        elif gradient_sum:
            _add_row_sums_(grad_sum, flat)
        losses.append(loss.detach().reshape(-1))
        if single:
            kept = flat
        elif mean_gradient is not None:
            if scratch is None:  # (the first chunk has the most rows)
                scratch = _centring_scratch(flat)
            centered.append(torch.stack([centered_row_sq_norms(g, m, scratch)
                                         for g, m in zip(flat, mean_gradient)]).sum(0))
        del flat  # (before the next chunk is computed: two chunks never coexist)
    assert per_param_sq is not None and (grad_sum is not None or not gradient_sum)
    terms = None
    if kept is not None:
        if center_at_mean and mean_gradient is not None:
            mean = mean_gradient
        else:
            mean = [s / b for s in grad_sum] if grad_sum is not None else mean_gradient
        assert mean is not None
        scratch = _centring_scratch(kept)
        terms = torch.stack([centered_row_sq_norms(g, m.reshape(-1), scratch) for g, m in zip(kept, mean)]).sum(0)
    elif centered:
        terms = torch.cat(centered)
    shaped_sum = None if grad_sum is None else [s.reshape(params[n].shape) for s, n in zip(grad_sum, names)]
    group_sq = None
    if groups is not None:
        group_sq = torch.stack([per_param_sq[idx].sum() if idx else per_param_sq.new_zeros(()) for idx in groups])
    return GradientMoments(
        weighted_sq_norm_sum=sq_sum,
        num_samples=b,
        num_units=b,
        weighted_sum=shaped_sum,
        centered_sums=None if terms is None else centered_sums(terms),
        losses=torch.cat(losses),
        group_sq=group_sq,
    )


CENTER_BLOCK = 1 << 18
"""Columns of per-sample gradients centred at once by :func:`centered_row_sq_norms` (a multiple of
the 1,024-value pieces of :func:`~genbounds.estimators.functional.row_sq_norms`, so the pieces are
the same as without blocks, except a last block under 32 k columns, which that function takes in
one float64 norm)."""


def centered_row_sq_norms(rows: Tensor, center: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``[c]`` float64 ``‖rows_i − center‖²`` of a ``[c, n]`` tensor and an ``n``-vector, centred
    ``CENTER_BLOCK`` columns at a time: the temporary is ``c × CENTER_BLOCK`` values, not a copy of
    ``rows`` (on the 5.6 M-parameter MLP a 16 MB copy of its 2000×2000 layer per sample). The
    blocks are written into ``scratch`` instead of a new temporary each where it fits them: the
    same dtype and device as ``rows`` and at least ``[c, min(n, CENTER_BLOCK)]`` (a parameter of
    another dtype is centred as without it, never cast into it)."""
    center = center.reshape(1, -1)
    c, n = rows.shape
    if center.shape[1] != n:
        raise ValueError(f"centring {n} columns at a {center.shape[1]}-vector")
    fits = (scratch is not None and scratch.dtype == rows.dtype and scratch.device == rows.device
            and scratch.shape[0] >= c and scratch.shape[1] >= min(n, CENTER_BLOCK))
    total: Tensor | int = 0
    for s in range(0, max(n, 1), CENTER_BLOCK):
        w = min(CENTER_BLOCK, n - s)
        if fits and w > 0:
            block = torch.sub(rows[:, s:s + w], center[:, s:s + w], out=scratch[:c, :w])
        else:
            block = rows[:, s:s + CENTER_BLOCK] - center[:, s:s + CENTER_BLOCK]
        total = total + row_sq_norms(block)
    return total  # type: ignore[return-value]


def _centring_scratch(chunk: list[Tensor]) -> Tensor:
    """The one buffer a pass centres its blocks in: the chunk's rows by its widest block, in the
    first parameter's dtype (:func:`centered_row_sq_norms` takes others' blocks as temporaries)."""
    widest = max(g.shape[1] for g in chunk)
    return chunk[0].new_empty(chunk[0].shape[0], min(widest, CENTER_BLOCK))


def _add_row_sums_(acc: list[Tensor], chunk: list[Tensor]) -> None:
    """``acc[k] += Σ_i chunk[k]_i`` per parameter, without a temporary of ``acc[k]``'s size (a
    matrix-vector product)."""
    for a, rows in zip(acc, chunk):
        if rows.shape[0] == 1:
            a.add_(rows[0])
        else:
            a.addmv_(rows.t(), rows.new_ones(rows.shape[0]))


class HooksUnavailable(RuntimeError):
    """``method="hooks"`` cannot measure this batch (the hooks reported it: a layer applied to part
    of the batch, an input modified in place, …, or no hooked output received gradient); the
    callers take another method."""


def hooks_cover(module: nn.Module) -> bool:
    """Whether the ghost-norm hooks reach every trainable parameter of ``module``."""
    from genbounds.estimators.ghost_norms import plan

    return not plan(module)[1]


def _hook_moments(module: nn.Module, loss_fn: LossFn, batch: Any, params: dict[str, Tensor],
                  groups: list[list[int]] | None) -> GradientMoments:
    from genbounds.estimators.ghost_norms import GhostNormHooks, declared_batch_dims, plan

    covered, uncovered = plan(module)
    if uncovered:
        raise ValueError(f"the norm hooks do not reach {sorted(uncovered)[:4]}")
    names = list(params)
    hooks = GhostNormHooks(covered, batch_dims=declared_batch_dims(module))
    b = batch_size(batch)
    hooks.arm(b)
    try:
        losses = loss_fn(module, batch)
        if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != b:
            raise ValueError("per-sample norms need one loss per sample")
        grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
        try:
            norms = hooks.read(scale=b)
        except RuntimeError as err:
            raise HooksUnavailable(str(err)) from err
    finally:
        hooks.detach()
    if norms is None:
        raise HooksUnavailable("the norm hooks recorded no gradient")
    mean = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params.values())]
    group_sq = None
    if groups is not None:
        owner = {n: n.rsplit(".", 1)[0] if "." in n else "" for n in names}
        per_group = {name: sq.sum() for name, sq in norms.per_group.items()}
        group_sq = torch.stack([
            sum((per_group.get(m, torch.zeros((), dtype=torch.float64)) for m in
                 dict.fromkeys(owner[names[i]] for i in idx)), torch.zeros((), dtype=torch.float64))
            if idx else torch.zeros((), dtype=torch.float64) for idx in groups])
    return GradientMoments(
        weighted_sq_norm_sum=norms.total.sum(), num_samples=b, num_units=b,
        weighted_sum=[g * b for g in mean], losses=losses.detach(), group_sq=group_sq)


def _vmap_chunks(module: nn.Module, loss_fn: LossFn, batch: Any, params: dict[str, Tensor], step: int,
                 randomness: str):
    names = list(params)
    base = detached(params)
    f = functional_loss(module, loss_fn)

    def loss_of_one(p: dict[str, Tensor], sample: Any) -> Tensor:
        return f(p, map_tensors(sample, lambda t: t.unsqueeze(0))).sum()

    per_sample = vmap(grad_and_value(loss_of_one), in_dims=(None, 0), randomness=randomness)
    b = batch_size(batch)
    for start in range(0, b, step):
        # (in the calling thread, unlike the probes' transforms: transform_thread.py says why)
        grads, loss = per_sample(base, index_batch(batch, slice(start, start + step)))
        # (popped: the generator keeps no reference to a chunk while the next one is computed)
        yield [g.reshape(g.shape[0], -1) for g in (grads.pop(n) for n in names)], loss


def _jacobian_chunks(module: nn.Module, loss_fn: LossFn, batch: Any, params: dict[str, Tensor], step: int):
    tensors = list(params.values())
    losses = loss_fn(module, batch)
    b = batch_size(batch)
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != b:
        raise ValueError(
            "per-sample gradients need one loss per sample (a 1-d tensor of length "
            f"{b}); got {tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}"
        )
    for start in range(0, b, step):
        count = min(step, b - start)
        cot = torch.zeros(count, b, dtype=losses.dtype, device=losses.device)
        cot[torch.arange(count), start + torch.arange(count)] = 1.0
        grads = list(torch.autograd.grad(losses, tensors, grad_outputs=cot, is_grads_batched=True,
                                         retain_graph=start + count < b, allow_unused=True))
        # (popped: the generator keeps no reference to a chunk while the next one is computed)
        yield [torch.zeros(count, p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(count, -1)
               for g, p in ((grads.pop(0), p) for p in tensors)], losses[start:start + count]
