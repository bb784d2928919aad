"""What every layer rule of the ghost norms shares: the routes' names, the result type
(:class:`PerSampleNorms`), the per-sample reductions and work buffers, the Linear-on-sequences
product both Linear and convolution reduce to, and the interface of a layer rule (``_Kind``)."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

GHOST = "ghost"
MATERIALIZE = "materialize"
GOODFELLOW = "goodfellow"
DECOMPOSITION_BN = "decomposition(batchnorm-train)"
EXACT = "exact"
DECOMPOSITION = "decomposition"

_vecdot = torch.linalg.vecdot


@dataclass
class PerSampleNorms:
    """Per-sample squared gradient norms of one backward, already multiplied by ``scale²``."""

    total: Tensor
    """``[b]`` float64: ``Σ_layers ‖g_i^{(layer)}‖²`` over every module that recorded a call."""
    per_group: dict[str, Tensor] = field(default_factory=dict)
    """group → ``[b]`` float64 (a group is a module's qualified name unless ``group_of`` maps it
    elsewhere; a group whose modules did not run this step holds zeros)."""
    methods: dict[str, str] = field(default_factory=dict)
    """module name → ``"goodfellow" | "ghost" | "materialize" | "decomposition(batchnorm-train)"``
    (the route used this step; only modules that ran)."""
    exactness: dict[str, str] = field(default_factory=dict)
    """module name → ``"exact"`` (per-sample gradient of ``ℓ_i``) or ``"decomposition"`` (a term
    of the split of the batch gradient; see the module docstring, train-mode BatchNorm)."""

    @property
    def batch_size(self) -> int:
        return int(self.total.shape[0])

    @property
    def exact(self) -> bool:
        """Whether every value is a true per-sample gradient norm."""
        return all(v == EXACT for v in self.exactness.values())


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # (cached: ``torch.promote_types`` is dispatched as an op, several per hooked module and step)
    out = torch.float32
    for dt in dtypes:
        if dt.is_floating_point:
            out = torch.promote_types(out, dt)
    return out


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _autocast_off(t: Tensor):
    dev = t.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # pragma: no cover - older torch
        enabled = torch.is_autocast_enabled()
    return torch.autocast(dev, enabled=False) if enabled else nullcontext()


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


class _Scratch:
    """Work buffers reused from step to step, one flat buffer per named slot (CPU only).

    The large temporaries (Gram matrices, unfolded patches) are tens of MB; freshly allocated
    on every step they come from ``mmap`` and cost a page fault per 4 KiB on first touch, which
    on CPU is a large part of their price.  On other devices the caching allocator already
    reuses memory, so :meth:`get` just allocates.  A slot's tensor is valid until the next
    :meth:`get` of the same slot; computations run one at a time (inside backward hooks).
    """

    __slots__ = ("_store", "_views")

    def __init__(self) -> None:
        self._store: dict[str, Tensor] = {}
        self._views: dict[tuple, Tensor] = {}  # (slot, shape, dtype) → a view of the slot's buffer

    def get(self, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        key = (slot, shape, like.dtype)
        view = self._views.get(key)
        if view is not None:  # (a slice and a view saved: two ops per buffer and call)
            return view
        n = _prod(shape)
        buf = self._store.get(slot)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = torch.empty(n, dtype=like.dtype)
            self._store[slot] = buf
            self._views = {k: v for k, v in self._views.items() if k[0] != slot}  # views of the old buffer
        if len(self._views) >= 64:  # shapes that change from step to step (sequence lengths)
            self._views.clear()
        view = self._views[key] = buf[:n].view(shape)
        return view

    def clear(self) -> None:
        self._store.clear()
        self._views.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())


class _Fresh(_Scratch):
    """Allocates every time (for results that must outlive the next call)."""

    def get(self, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.empty(shape, dtype=like.dtype, device=like.device)


_FRESH = _Fresh()


def _sq(t: Tensor) -> Tensor:
    """``[b, …] → [b]``: per-sample sum of squares."""
    flat = t.reshape(t.shape[0], -1)
    return _vecdot(flat, flat)


def _rowsq(t: Tensor) -> Tensor:
    """``[n, d] → [n]`` squared row norms: one op for narrow rows; for wide ones a reduction
    kernel without a temporary, then a square (measured faster inside a training step)."""
    if t.shape[-1] < 64:
        return _vecdot(t, t)
    return torch.linalg.vector_norm(t, dim=-1).square_()


def _sum_into(t: Tensor, out: Tensor | None) -> Tensor:
    """``t.sum(1)``, written into ``out`` (a row of :class:`GhostNormHooks`: one kernel instead of
    a sum and a copy) when ``t`` has ``out``'s dtype.  An fp32 reduction into a float64
    ``out`` first casts the whole of ``t`` to float64 (on every device; on the CPU it took 1.6 ms
    against 0.15 ms for the sum and the copy, 64 × 50,625 values): then the sum and a copy of
    ``b`` values."""
    if out is not None and out.dtype == t.dtype:
        return torch.sum(t, 1, out=out)
    return t.sum(1)


def _sum_sq_(t: Tensor, out: Tensor | None = None) -> Tensor:
    """Per-sample sum of squares of a work buffer, squaring it in place (no temporary); into
    ``out`` when :func:`_sum_into` may."""
    return _sum_into(t.view(t.shape[0], -1).square_(), out)


def _dot_(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """Per-sample ``⟨a, b⟩_F`` of two work buffers, overwriting ``a`` (no temporary); into
    ``out`` when :func:`_sum_into` may."""
    return _sum_into(a.view(a.shape[0], -1).mul_(b.view(b.shape[0], -1)), out)


def _with_bias_(aa: Tensor) -> Tensor:
    """The bias folded into a ghost product, in place: ``⟨A Aᵀ + 1, G Gᵀ⟩_F = ‖Gᵀ A‖²_F +
    ‖Σ_t G_t‖²`` (``Σ_{t,t'} (G Gᵀ)[t, t'] = ‖Σ_t G_t‖²``: the bias is a weight on a constant input
    of 1 at every position) — one kernel where the bias's own norm took four."""
    return aa.add_(1.0)


def _ghost_or_materialize(forced: str | None, T: int, d_in: int, d_out: int) -> str:
    if forced is not None:
        return forced
    return GHOST if 2 * T * T < d_in * d_out else MATERIALIZE


def _seq_weight_sq(A: Tensor, G: Tensor, method: str, scratch: _Scratch, out: Tensor | None = None,
                   with_bias: bool = False) -> Tensor:
    """``‖G_iᵀ A_i‖²_F`` per batch row, ``A: [n, T, d_in]``, ``G: [n, T, d_out]`` (into ``out``
    where :func:`_sum_into` may); ``with_bias`` (ghost route only): plus ``‖Σ_t G_{i,t}‖²``."""
    n, T, d_in = A.shape
    if method == MATERIALIZE:
        return _sum_sq_(torch.bmm(G.transpose(1, 2), A, out=scratch.get("A", (n, G.shape[2], d_in), G)), out)
    if T == 1:
        return _vecdot(A[:, 0], A[:, 0]) * _vecdot(G[:, 0], G[:, 0])
    aa = torch.bmm(A, A.transpose(1, 2), out=scratch.get("A", (n, T, T), A))
    gg = torch.bmm(G, G.transpose(1, 2), out=scratch.get("B", (n, T, T), G))
    if with_bias:
        _with_bias_(aa)
    return _dot_(aa, gg, out)


# ----------------------------------------------------------------------------- layer kinds
#
# A kind turns one call's (stored input, output gradient) into a *factor*, concatenates the
# factors of several calls of the same module (weight sharing), and turns a factor into
# per-sample squared norms ``[b]`` (in the compute dtype) plus the name of the route taken.
# ``single`` handles the common one-call case and may take shortcuts.


class _Kind:
    defers_rows = False
    """Whether a single 2-D call's rows may be made by ``StepRows.finish_linear`` (Linear; step_rows.py)."""

    def check(self, module: nn.Module, x: Any) -> str | None:
        """Why this call cannot be handled (``None``: it can)."""
        raise NotImplementedError

    def needs_input(self, wt: bool, bt: bool) -> bool:
        return wt

    def factor(self, module: nn.Module, x: Tensor | None, g: Tensor, wt: bool, bt: bool,
               scratch: _Scratch = _FRESH) -> tuple:
        raise NotImplementedError

    def concat(self, factors: list[tuple]) -> tuple:
        raise NotImplementedError

    def norms(self, module: nn.Module, f: tuple, wt: bool, bt: bool, forced: str | None,
              scratch: _Scratch = _FRESH) -> tuple[Tensor, str]:
        raise NotImplementedError

    def single(self, module: nn.Module, x: Tensor | None, g: Tensor, wt: bool, bt: bool,
               forced: str | None, scratch: _Scratch = _FRESH,
               out: Tensor | None = None) -> tuple[Tensor, str]:
        """Norms of a module called once; ``out`` is the module's row (the step's compute dtype or
        wider), which the result may be written to directly."""
        return self.norms(module, self.factor(module, x, g, wt, bt, scratch), wt, bt, forced, scratch)

    def method_for(self, module: nn.Module, input_shape: torch.Size, forced: str | None) -> str:
        raise NotImplementedError

    def sequence_dims(self, module: nn.Module) -> int | None:
        """The fewest input dimensions at which the batch may be dimension 1 (a sequence-first
        ``[T, B, …]`` input); ``None``: the batch is always dimension 0 (convolutions, channel
        normalizations)."""
        return None


def _cat_pairs(factors: list[tuple], dim: int) -> tuple:
    first = [f[0] for f in factors]
    a = None if first[0] is None else torch.cat(first, dim)
    return a, torch.cat([f[1] for f in factors], dim)
