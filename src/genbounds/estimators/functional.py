"""The loss contract as a pure function of the parameters.

Every estimator in :mod:`genbounds.estimators` receives

* ``module`` — an ``nn.Module`` (typically the LightningModule itself),
* ``loss_fn(module, batch) -> Tensor[b]`` — the **per-sample** losses of ``batch``
  (no reduction), computed through ``module``'s forward,
* ``batch`` — one batch as the dataloader yields it.

:func:`functional_loss` turns that triple into ``f(params, batch)`` so that ``torch.func`` can
differentiate, ``vmap`` and perturb it **without writing the module's real parameters**: the
parameters are swapped in only for the duration of the call by
:func:`torch.func.functional_call`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(module, batch)`` returns the per-sample losses of ``batch`` as a 1-d tensor."""

Reduce = Callable[[Tensor], Tensor]
"""Averages a tensor over data-parallel ranks (``None``: single process). Estimators apply it to
every rank-local *batch mean* (loss, gradient, Hessian-vector product), so that with equal
per-rank batches each rank computes exactly the statistic of the union of the ranks' batches,
with the same random draws (every rank seeds its generator alike)."""

ParamDict = dict[str, Tensor]


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that training updates (``requires_grad=True``), by qualified name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def num_trainable(module: nn.Module) -> int:
    """``d``: the number of trainable scalars."""
    return sum(p.numel() for p in trainable_parameters(module).values())


def tied_names(module: nn.Module) -> dict[str, list[str]]:
    """Each parameter's first name (as :func:`trainable_parameters` names it) → all its names
    (several when a parameter is shared between modules, e.g. tied embedding and output weights)."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        names.setdefault(key, []).append(name)
    return names


def detached(params: dict[str, Tensor]) -> ParamDict:
    """Detached views of ``params`` (no copy): the base point for ``torch.func`` transforms."""
    return {k: v.detach() for k, v in params.items()}


class _LossOfModule(nn.Module):
    """Holds ``module`` as a child so that ``functional_call`` on this wrapper re-parametrizes it
    while the user's ``loss_fn`` runs (``functional_call`` alone would only call ``forward``)."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.inner, batch)


def functional_loss(module: nn.Module, loss_fn: LossFn, rows: bool = False) -> Callable[[ParamDict, Any], Tensor]:
    """``f(params, batch) -> per-sample losses`` evaluated with ``params`` in place of the
    module's trainable parameters (names as in :func:`trainable_parameters`); every other
    parameter and buffer is the module's own. ``rows=True`` accepts a ``[k, b]`` output (several
    per-sample quantities, e.g. the loss and the 0-1 error, from one forward)."""
    wrapper = _LossOfModule(module, loss_fn)
    # every name of a tied parameter gets the new value: what functional_call's tie_weights=True
    # finds by walking every module and tensor at each call (about 90 µs of a 0.3–0.6 ms evaluation
    # of the main job's probes under cProfile); the module's structure is fixed while a probe runs
    aliases = tied_names(module)

    def f(params: ParamDict, batch: Any) -> Tensor:
        renamed = {"inner." + alias: v for k, v in params.items() for alias in aliases.get(k, (k,))}
        losses = functional_call(wrapper, renamed, (batch,), strict=False, tie_weights=False)
        if rows and isinstance(losses, Tensor) and losses.dim() == 2:
            return losses
        return _as_per_sample(losses)

    return f


def _as_per_sample(losses: Tensor) -> Tensor:
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            "the loss function must return the per-sample losses as a 1-d tensor "
            f"(reduction='none'); got {shape}"
        )
    return losses


def per_sample_losses(module: nn.Module, loss_fn: LossFn, batch: Any) -> Tensor:
    """``loss_fn(module, batch)`` checked to be a 1-d tensor of per-sample losses."""
    return _as_per_sample(loss_fn(module, batch))


def loss_values(module: nn.Module, loss_fn: LossFn, batch: Any) -> Tensor:
    """``loss_fn(module, batch)`` as a 1-d tensor whose mean is the batch's mean loss: the
    per-sample losses, or a single element (a loss contract that only knows the batch mean).
    For estimators that only ever use means."""
    return _as_per_sample(loss_fn(module, batch))


def parameter_groups(module: nn.Module, layer_groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Trainable parameter names by group (layer), in module order.

    Default: the qualified name of the module that owns the parameter (``"net.0"`` for
    ``"net.0.weight"``; parameters of the root module form the group ``"(root)"``).
    ``layer_groups`` maps a parameter-name prefix to a group name; the longest matching prefix
    wins, unmatched parameters keep their default group."""
    prefixes = sorted((layer_groups or {}).items(), key=lambda kv: -len(kv[0]))
    groups: dict[str, list[str]] = {}
    for name in trainable_parameters(module):
        group = next((g for prefix, g in prefixes if name == prefix or name.startswith(prefix)), None)
        if group is None:
            group = name.rsplit(".", 1)[0] if "." in name else "(root)"
        groups.setdefault(group, []).append(name)
    return groups


_ROW = 1024  # elements per fp32 partial norm on the CPU path (relative error ≲ 1e-7 per row)


def _foreach_sq_norms64(tensors: list[Tensor]) -> Tensor:
    try:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    except (TypeError, RuntimeError):  # older torch without the dtype argument
        norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]
    return torch.stack(list(norms)).square()


def per_tensor_sq_norms(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """``[len(tensors)]`` squared Euclidean norms, accumulated in float64.

    On CUDA (and for non-fp32 tensors) one fused multi-tensor norm with float64 accumulation. On
    the CPU that fused kernel first copies every fp32 tensor to float64 — 0.56 ms of a 7 ms step
    of the MLP benchmark (docs/results/overhead.md) — so large fp32 tensors are split into rows of
    1,024 elements whose norms are taken in fp32 and summed in float64: relative error ≲ 1e-7
    (a single fp32 norm of a 400k-element tensor is off by up to 5e-6), a third of the time.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    tensors = list(tensors)
    # below 32 rows the float64 copy costs less than the extra kernels of the row split
    if tensors[0].device.type != "cpu" or not any(
            t.dtype == torch.float32 and t.numel() >= 32 * _ROW for t in tensors):
        return _foreach_sq_norms64(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    small = [i for i, t in enumerate(tensors) if t.dtype != torch.float32 or t.numel() < 32 * _ROW]
    if small:
        for i, sq in zip(small, _foreach_sq_norms64([tensors[i] for i in small]).unbind()):
            out[i] = sq
    for i, t in enumerate(tensors):
        if out[i] is None:
            out[i] = row_sq_norms(t.detach().reshape(1, -1))[0]
    return torch.stack(out)  # type: ignore[arg-type]


Layout = tuple[tuple[int, ...], tuple[int, ...]]
"""Where :func:`squared_pieces` put each tensor's pieces: ``(full, rest)``, ``full[i]`` pieces of
tensor ``i`` in tensor order, then one piece per entry of ``rest`` (a tensor index, repeated for
a tensor of several pieces)."""


def squared_pieces(tensors: list[Tensor] | tuple[Tensor, ...], reuse: bool = False) -> tuple[Tensor, Layout]:
    """``(float64 squared norms of pieces of the tensors, their layout)``: summed per tensor
    (:func:`piece_owner`) they are each tensor's squared norm.

    On the CPU with fp32 tensors: fp32 norms of pieces of 1,024 elements (no float64 copy;
    relative error ≲ 1e-7, as the piece split of :func:`row_sq_norms`), then one float64 square.
    A tensor of at least ``32 × 1,024`` elements is one view and one norm (its remainder, if
    any, a small tensor of its own). The smaller tensors' pieces are normed where they lie when
    that takes at most :data:`_APART_OPS` norms, else copied, zero-padded to whole pieces, into
    one buffer (one concatenation) whose pieces' norms are one op (:class:`_PiecePlan` says why).
    Otherwise one piece per tensor (:func:`per_tensor_sq_norms`). The pieces and their values do
    not depend on ``reuse`` or on the path taken.

    ``reuse``: the result is a work buffer kept for the layout, valid until the next call with
    ``reuse`` — one op fewer, for callers that consume it at once (the per-step path)."""
    tensors = list(tensors)
    plan = piece_plan(tensors)
    if plan is not None:  # (the common case: shapes seen before, every large tensor whole pieces)
        squares, layout = plan.run(tensors)
        return (squares if reuse else squares.clone()), layout
    if not tensors or tensors[0].device.type != "cpu" or any(t.dtype != torch.float32 for t in tensors):
        return per_tensor_sq_norms(tensors), ((0,) * len(tensors), tuple(range(len(tensors))))
    views, small, layout = _split_pieces(tensors)
    if reuse:
        norms, slots, rest_norms, squares = _piece_buffers(layout)
    else:  # (new buffers: the result is the caller's)
        norms = torch.empty(sum(layout[0]) + len(layout[1]), dtype=torch.float32)
        slots, rest_norms = _piece_views(norms, layout)
        squares = torch.empty(len(norms), dtype=torch.float64)
    for v, slot in zip(views, slots):
        torch.linalg.vector_norm(v, dim=1, out=slot)
    if small:
        apart = _apart_ops([t.numel() for t in small])
        if apart is not None:
            _apart_into(small, apart, rest_parts(rest_norms, layout))
        else:
            torch.linalg.vector_norm(_gather(small, len(layout[1])), dim=1, out=rest_norms)
    # each fp32 norm squared exactly in float64
    return squares.copy_(norms).square_(), layout


def _split_pieces(tensors: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Layout]:
    """``(each large tensor's whole pieces as a [k, 1024] view, the small tensors and large
    tensors' remainders flat, in the order of the layout's rest, the layout)`` (fp32 on the CPU)."""
    views: list[Tensor] = []
    full: list[int] = []
    small: list[Tensor] = []
    rest: list[int] = []
    for i, t in enumerate(tensors):
        t = nograd(t)
        size = t.numel()
        if size < _GATHER:
            full.append(0)
            if size:
                small.append(t.reshape(-1))
                rest.extend([i] * -(-size // _ROW))
            continue
        k = size // _ROW
        full.append(k)
        flat = t.view(k, _ROW) if size == k * _ROW and t.is_contiguous() else t.reshape(-1)
        if flat.dim() == 2:
            views.append(flat)
        else:
            views.append(flat[: k * _ROW].view(k, _ROW))
            if size > k * _ROW:
                small.append(flat[k * _ROW:])
                rest.append(i)
    return views, small, (tuple(full), tuple(rest))


_GATHER = 32 * _ROW
"""Tensors of fewer elements are gathered into one zero-padded buffer of whole pieces
(:func:`squared_pieces`)."""


def _plannable(tensors: list[Tensor]) -> bool:
    """Whether a :class:`_PiecePlan` can serve these tensors: fp32 on the CPU, contiguous, each
    large one a whole number of pieces."""
    return bool(tensors) and all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()
                                 and (t.numel() % _ROW == 0 or t.numel() < _GATHER) for t in tensors)


def _gather_parts(sizes: list[int], pieces: int) -> tuple[Tensor, list[Tensor | None]]:
    """A ``[pieces, 1024]`` fp32 buffer and, after each of the tensors of ``sizes`` elements, the
    zeros that pad it to whole pieces (``None``: none needed): ``torch.cat`` of the tensors and
    their pads, written into the buffer, starts each tensor at a piece and keeps the padding zero."""
    pads: list[Tensor | None] = []
    for size in sizes:
        pad = -size % _ROW
        pads.append(torch.zeros(pad, dtype=torch.float32) if pad else None)
    return torch.empty(pieces, _ROW, dtype=torch.float32), pads


def _gather_into(buffer: Tensor, pads: list[Tensor | None], flats: list[Tensor]) -> None:
    """``flats`` copied, each zero-padded to whole pieces, into ``buffer`` (flat) by one ``torch.cat``
    (the data loader's collation runs its kernel already: a multi-tensor copy into slots of a
    zeroed buffer mapped another 0.4 MiB of library code; docs/results/overhead.md)."""
    parts: list[Tensor] = []
    for t, pad in zip(flats, pads):
        parts.append(t if t.dim() == 1 else t.reshape(-1))  # (a view is an op: none for a bias)
        if pad is not None:
            parts.append(pad)
    torch.cat(parts, out=buffer)


def nograd(t: Tensor) -> Tensor:
    """``t`` detached where it requires gradient, else ``t`` itself (a detach is an op: in a
    training step's hot path only where needed)."""
    return t.detach() if t.requires_grad else t


def _gather(flats: list[Tensor], pieces: int) -> Tensor:
    """The flat tensors copied, zero-padded to whole pieces, into a new ``[pieces, 1024]`` buffer."""
    buffer, pads = _gather_parts([t.numel() for t in flats], pieces)
    _gather_into(buffer.view(-1), pads, flats)
    return buffer


class _PiecePlan:
    """:func:`squared_pieces` with ``reuse`` for one list of shapes (fp32, CPU, contiguous; each
    large tensor a whole number of pieces): which tensors are split into how many pieces, their
    slots in the kept buffers, how the small ones' pieces are taken. Checking that a step's
    tensors fit and running it takes a few µs of Python, where rebuilding the views, the layout
    and the buffers' cache key took about 30 (measured in the MLP benchmark's step); the layout
    and the pieces are those of the general path.

    The small tensors' pieces: where they take at most :data:`_APART_OPS` norms of their own
    (:attr:`apart`), each tensor's pieces are normed where it lies — no copy; otherwise they are
    gathered into the kept zero-padded buffer (one ``torch.cat``) and normed at once, as the
    general path does. Hot, the gather is the cheaper (5.3 against 10.3 µs on the MLP's last layer
    and three biases); inside a training step, where the backward has just evicted the ``cat``
    kernel's code and data, the four norms of their own cost about 25 µs less than the gather
    (the MLP's step +171 [161, 177] against +196 [184, 208] µs over plain training, medians of
    1,800 per-round differences with their 95 % intervals, ``benchmarks/piece_norms_in_situ.py``;
    docs/results/overhead.md, "Round 24")."""

    __slots__ = ("shapes", "layout", "split", "slots", "gathered", "gather_buffer", "gather_pads", "gather_flat",
                 "rest", "norms", "squares", "apart", "rest_split")

    def __init__(self, tensors: list[Tensor], layout: Layout) -> None:
        self.shapes = tuple(t.shape for t in tensors)
        self.layout = layout
        norms, slots, self.rest, self.squares = _piece_buffers(layout)
        self.norms = norms
        full, rest = layout
        self.split = tuple((i, k) for i, k in enumerate(full) if k)  # (tensor, pieces), their slots in order
        self.slots = tuple(slots)
        self.gathered = tuple(dict.fromkeys(rest))  # (each small tensor once, in order)
        sizes = [tensors[i].numel() for i in self.gathered]
        self.apart = _apart_ops(sizes)
        self.rest_split = rest_parts(self.rest, layout)  # (each small tensor's pieces in rest, in order)
        if self.apart is None:
            self.gather_buffer, self.gather_pads = _gather_parts(sizes, len(rest))
        else:
            self.gather_buffer, self.gather_pads = torch.empty(0, _ROW), []
        self.gather_flat = self.gather_buffer.view(-1)

    def fits(self, tensors: list[Tensor]) -> bool:
        if len(tensors) != len(self.shapes):
            return False
        for t, shape in zip(tensors, self.shapes):
            if t.shape != shape or t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
                return False
        return True

    def run(self, tensors: list[Tensor]) -> tuple[Tensor, Layout]:
        self.norms_into(tensors, self.slots, self.rest, self.rest_split)
        # each fp32 norm squared exactly in float64 (as the drain does: no kernel of its own)
        return self.squares.copy_(self.norms).square_(), self.layout

    def norms_into(self, tensors: list[Tensor], slots: tuple[Tensor, ...], rest: Tensor,
                   parts: tuple[Tensor, ...]) -> None:
        """The pieces' fp32 norms written into ``slots`` (one per split tensor) and ``rest`` —
        this plan's own buffers, or a row of a caller's (``PieceBlocks.views_of``) that keeps several
        steps' norms and squares them at once; ``parts``: ``rest`` split per small tensor
        (:func:`rest_parts`, made once with the views)."""
        for (i, k), slot in zip(self.split, slots):
            torch.linalg.vector_norm(nograd(tensors[i]).view(k, _ROW), dim=1, out=slot)
        if not self.gathered:
            return
        if self.apart is not None:  # (each small tensor's pieces where it lies: class docstring)
            _apart_into([nograd(tensors[i]) for i in self.gathered], self.apart, parts)
            return
        # (detached: a copy of a tensor that requires gradient would record into the buffer)
        _gather_into(self.gather_flat, self.gather_pads, [nograd(tensors[i]) for i in self.gathered])
        torch.linalg.vector_norm(self.gather_buffer, dim=1, out=rest)


def rest_parts(rest: Tensor, layout: Layout) -> tuple[Tensor, ...]:
    """``rest`` (the pieces of the small tensors, :data:`Layout`) split per small tensor."""
    counts: list[int] = []
    last = None
    for i in layout[1]:
        if i == last:
            counts[-1] += 1
        else:
            counts.append(1)
            last = i
    return tuple(rest.split(counts)) if counts else ()


_APART_OPS = 8
"""At most this many norms for the small tensors' pieces, each where it lies; more are gathered
into one buffer first (:class:`_PiecePlan`): in a training step one norm of its own costs a few
µs, the gather's copy (its first kernel after the backward) tens."""


def _apart_ops(sizes: list[int]) -> tuple[tuple[int, int], ...] | None:
    """``(whole pieces, elements left over)`` of each small tensor (of ``sizes`` elements), when
    taking their pieces' norms where they lie needs at most :data:`_APART_OPS` ops (one for a
    tensor of whole pieces or of one short piece, two for whole pieces and a short one); else
    ``None``: they are gathered."""
    apart = tuple((size // _ROW, size % _ROW) for size in sizes)
    ops = sum(1 if (k == 0 or r == 0) else 2 for k, r in apart)
    return apart if ops <= _APART_OPS else None


def _apart_into(small: list[Tensor], apart: tuple[tuple[int, int], ...], outs: tuple[Tensor, ...]) -> None:
    """Each small tensor's pieces' fp32 norms (``apart``: :func:`_apart_ops`) written into its
    ``outs`` (contiguous, non-empty tensors), taken where it lies: the pieces a gather into a
    zero-padded buffer would make, without the copy."""
    for t, (k, r), out in zip(small, apart, outs):
        if not r:  # whole pieces
            torch.linalg.vector_norm(t.view(k, _ROW), dim=1, out=out)
        elif not k:  # one piece, shorter than a row
            torch.linalg.vector_norm(t if t.dim() == 1 else t.view(-1), dim=0, keepdim=True, out=out)
        else:  # whole pieces and a shorter last one
            flat = t.view(-1)
            torch.linalg.vector_norm(flat[:k * _ROW].view(k, _ROW), dim=1, out=out[:k])
            torch.linalg.vector_norm(flat[k * _ROW:], dim=0, keepdim=True, out=out[k:])


_PIECE_PLAN: list[_PiecePlan | None] = [None]
"""The last plan of :func:`squared_pieces` with ``reuse`` (its buffers: one layout's)."""


def piece_plan(tensors: list[Tensor]) -> _PiecePlan | None:
    """The kept plan of :func:`squared_pieces` for these tensors' shapes (made if they allow one:
    fp32 on the CPU, contiguous, each large tensor whole pieces), else ``None``."""
    plan = _PIECE_PLAN[0]
    if plan is not None and plan.fits(tensors):
        return plan
    if not _plannable(tensors):
        return None
    _PIECE_PLAN[0] = plan = _PiecePlan(tensors, _split_pieces(tensors)[2])
    return plan


@functools.lru_cache(maxsize=8)
def _piece_buffers(layout: Layout) -> tuple[Tensor, tuple[Tensor, ...], Tensor, Tensor]:
    """``(fp32 norms [pieces], a view of it per tensor split into pieces, the view of the rest,
    float64 squares)`` for :func:`squared_pieces` with ``reuse`` (CPU; kept for the
    last few layouts, as the cached matrices below)."""
    full, rest = layout
    n = sum(full) + len(rest)
    norms = torch.empty(n, dtype=torch.float32)
    slots, rest_view = _piece_views(norms, layout)
    return norms, slots, rest_view, torch.empty(n, dtype=torch.float64)


def _piece_views(norms: Tensor, layout: Layout) -> tuple[tuple[Tensor, ...], Tensor]:
    """``norms``' view of each split tensor's pieces, and of the rest (:data:`Layout`)."""
    slots, start = [], 0
    for k in layout[0]:
        if k:
            slots.append(norms[start:start + k])
            start += k
    return tuple(slots), norms[start:]


def grouped_sq_norms(tensors: list[Tensor] | tuple[Tensor, ...], groups: list[list[int]]) -> Tensor:
    """``[K + 1]`` float64: the squared norm of each group's tensors (``groups`` lists tensor
    indices; a tensor in no group counts only in the total), then the squared norm of all
    ``tensors``.

    ``‖ḡ_k‖²`` per layer and ``‖ḡ‖²`` from ``.grad``: :func:`squared_pieces`, one ``index_add``
    of the pieces into their tensors and one product with a cached ``[K + 1, n]`` tensor→group
    matrix — about ten ops where :func:`per_tensor_sq_norms` +
    :func:`~genbounds.estimators.gradient_dispersion.group_sums` took 25-30 (each op costs several
    µs inside a training step; docs/results/overhead.md)."""
    tensors = list(tensors)
    n = len(tensors)
    if not tensors:
        return torch.zeros(len(groups) + 1, dtype=torch.float64)
    matrix = group_matrix(n, groups_key(groups), tensors[0].device)
    partial, layout = squared_pieces(tensors)
    if not any(layout[0]) and layout[1] == tuple(range(n)):
        return matrix @ partial
    per_tensor = torch.zeros(n, dtype=torch.float64).index_add_(0, piece_owner(layout), partial)
    return matrix @ per_tensor


def groups_key(groups: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    """``groups`` as a hashable key (for the cached matrices below)."""
    return tuple(tuple(g) for g in groups)


# The small constant matrices below are built as Python lists and made tensors in one call: built
# with tensor ops (index_put_, eye, repeat_interleave, a float64 mm) their first calls mapped about
# 1.5 MiB of library code that training never runs, for matrices of a few thousand entries made
# once a fit (benchmarks/memory_breakdown.py --code-pages; docs/results/overhead.md).


def piece_owners(layout: Layout) -> list[int]:
    """The tensor index of every piece of a :func:`squared_pieces` layout (a list)."""
    full, rest = layout
    return [i for i, k in enumerate(full) for _ in range(k)] + list(rest)


@functools.lru_cache(maxsize=64)
def piece_owner(layout: Layout) -> Tensor:
    """The tensor index of every piece of a :func:`squared_pieces` layout."""
    return torch.tensor(piece_owners(layout), dtype=torch.long)


@functools.lru_cache(maxsize=64)
def group_matrix(n: int, groups: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor:
    """``[K + 1, n]`` 0/1 float64: row ``k`` selects group ``k``'s tensors, the last row all ``n``."""
    rows = [[0.0] * n for _ in groups] + [[1.0] * n]
    for row, members in zip(rows, groups):
        for j in members:
            row[j] = 1.0
    return torch.tensor(rows, dtype=torch.float64, device=device)


def row_sq_norms(rows: Tensor) -> Tensor:
    """``[c]`` float64 squared norms of the rows of a ``[c, P]`` tensor, without a float64 copy
    or a ``rows²`` temporary: fp32 norms of 1,024-element pieces, squared and summed in float64
    (relative error ≲ 1e-7; other dtypes are upcast)."""
    c, width = rows.shape
    if rows.dtype != torch.float32 or width < 32 * _ROW:
        return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).square()
    k = width // _ROW
    sq = torch.linalg.vector_norm(rows[:, : k * _ROW].reshape(c, k, _ROW), dim=2).double().square().sum(1)
    if width > k * _ROW:
        sq = sq + torch.linalg.vector_norm(rows[:, k * _ROW:], dim=1).double().square()
    return sq


def sq_norm(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Squared Euclidean norm of a list of tensors, accumulated in float64 (a 0-d tensor).

    Uses the fused multi-tensor norm (one kernel launch for all tensors on CUDA, as
    ``clip_grad_norm_`` does) with float64 accumulation."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return per_tensor_sq_norms(tensors).sum()


_DOT_CHUNK = 1 << 20  # elements per float64 copy in dot64 (8 MiB)


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """``⟨a, b⟩`` of two tensors of one shape, a 0-d float64 tensor: the products and their sum in
    float64 (exact products of fp32 values), over chunks of 2²⁰ elements, so that the float64
    copies stay at 8 MiB each where copies of whole tensors took 16 bytes a parameter (384 MiB for
    the 16 M-parameter layer of the AlexNet-style CNN)."""
    x, y = a.detach().reshape(-1), b.detach().reshape(-1)
    n = x.numel()
    if n <= _DOT_CHUNK:
        return torch.dot(x.double(), y.double())
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, n, _DOT_CHUNK):
        total += torch.dot(x[start:start + _DOT_CHUNK].double(), y[start:start + _DOT_CHUNK].double())
    return total


def row_dot64(a: Tensor, b: Tensor) -> Tensor:
    """``[m]`` float64 ``⟨a_j, b_j⟩`` of two ``[m, …]`` stacks (points, probe vectors): float64
    products and sums, as one op over the whole stack up to 2²⁰ values, above that :func:`dot64`
    row by row — the float64 copies of a large stack (three of it: 24 bytes a value, 384 MiB for
    one draw of the CNN's 16 M-parameter layer) were a large part of a probe's peak."""
    m = a.shape[0]
    x, y = a.detach().reshape(m, -1), b.detach().reshape(m, -1)
    if x.numel() <= _DOT_CHUNK:
        return (x.double() * y.double()).sum(1)
    return torch.stack([dot64(x[j], y[j]) for j in range(m)])


def writable_in_place(tensors: list[Tensor] | tuple[Tensor, ...]) -> list[bool]:
    """Per tensor of a fresh result list (gradients, Hessian-vector products), whether an in-place
    op may write it: no other entry reaches its memory — autograd hands two parameters one
    gradient tensor when the loss reads their sum; disjoint views of one buffer (``reduce_all``'s
    output under DDP) are each writable — and no element is reached twice (an expanded view,
    stride 0: the gradient of a parameter the loss reads through ``.sum()``)."""
    spans = []  # (storage, first byte, byte past the last) of each tensor's elements
    for i, t in enumerate(tensors):
        size = t.element_size()
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else -1
        first = t.storage_offset()
        spans.append((t.untyped_storage().data_ptr(), first * size, (first + last + 1) * size, i))
    ok = [all(st != 0 or n == 1 for st, n in zip(t.stride(), t.shape)) for t in tensors]
    spans.sort()
    reach: tuple[int, int, int] | None = None  # (storage, furthest end so far, its tensor)
    for ptr, start, end, i in spans:
        if reach is not None and reach[0] == ptr and start < reach[1]:
            ok[i] = ok[reach[2]] = False  # overlaps an entry that starts earlier (or at the same byte)
        if reach is None or reach[0] != ptr or end > reach[1]:
            reach = (ptr, end, i)
    return ok


def dot(a: list[Tensor] | tuple[Tensor, ...], b: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Inner product of two lists of tensors, accumulated in float64 (:func:`dot64` per pair)."""
    return torch.stack([dot64(x, y) for x, y in zip(a, b)]).sum()


def against_mean(grads: list[Tensor], total: list[Tensor], count: int) -> tuple[Tensor, Tensor, Tensor]:
    """A gradient against a probe set's mean gradient ``r = total / count``, one tensor and one
    chunk of 2²⁰ elements at a time (float64 copies of a chunk alive at once, not of the list):
    per tensor ``‖g_i − r_i‖²`` and ``‖r_i‖²`` (``[n]`` float64), and ``Σ_i ⟨g_i, total_i⟩ / count``
    (0-d float64). Everything in float64: the mean, the difference (of nearly equal vectors when
    the batch gradient is close to the probe set's), the squares and the sums."""
    diff, mean_sq, cross = [], [], []
    for g, s in zip(grads, total):
        x, y = g.detach().reshape(-1), s.detach().reshape(-1)
        d2 = torch.zeros((), dtype=torch.float64, device=x.device)
        r2 = torch.zeros((), dtype=torch.float64, device=x.device)
        c = torch.zeros((), dtype=torch.float64, device=x.device)
        for start in range(0, x.numel(), _DOT_CHUNK):
            # copies (a float64 input's .double() is itself; the chunks are overwritten below)
            xc = x[start:start + _DOT_CHUNK].to(torch.float64, copy=True)
            yc = y[start:start + _DOT_CHUNK].to(torch.float64, copy=True)
            c += torch.dot(xc, yc)
            rc = yc.div_(count)
            r2 += torch.dot(rc, rc)
            dc = xc.sub_(rc)
            d2 += torch.dot(dc, dc)
        diff.append(d2)
        mean_sq.append(r2)
        cross.append(c)
    if not diff:
        zero = torch.zeros(0, dtype=torch.float64)
        return zero, zero, torch.zeros((), dtype=torch.float64)
    return torch.stack(diff), torch.stack(mean_sq), torch.stack(cross).sum() / count


def reduce_all(tensors: list[Tensor], reduce: Reduce | None) -> list[Tensor]:
    """Apply ``reduce`` to a list of tensors with one collective (flattened and split back)."""
    if reduce is None or not tensors:
        return tensors
    flat = reduce(torch.cat([t.reshape(-1) for t in tensors]))
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def group_positions(module: nn.Module, layer_groups: dict[str, str] | None = None
                    ) -> tuple[list[str], list[list[int]]]:
    """The group names of :func:`parameter_groups` and, per group, its parameters' positions in
    :func:`trainable_parameters` (the trained parameters as they are now)."""
    groups = parameter_groups(module, layer_groups)
    position = {n: i for i, n in enumerate(trainable_parameters(module))}
    return list(groups), [[position[n] for n in members] for members in groups.values()]


def group_index(groups: dict[str, list[str]], names: list[str]) -> dict[str, int]:
    """Each of ``names`` → the position of its group in ``groups`` (``parameter_groups``' output)."""
    index = {n: gi for gi, members in enumerate(groups.values()) for n in members}
    return {n: index[n] for n in names}


def graph_nodes(tensor: Tensor, limit: int = 100_000) -> Iterator[Any]:
    """The nodes of ``tensor``'s autograd graph, each once (at most ``limit``), depth first."""
    seen: set[int] = set()
    stack = [tensor.grad_fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(n for n, _ in node.next_functions)
