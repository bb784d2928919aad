"""Exact per-sample squared gradient norms from the training backward ("ghost norms").

Every supported layer computes its parameter gradient from two things the training step has
anyway: the layer's input (stored by a forward hook) and the gradient of the loss with respect
to the layer's output (received by a hook on the output tensor during the backward).  Both carry
the batch dimension, so the *per-sample* gradients — or directly their squared norms — follow
without a second pass and without ``torch.func``.  Notation: sample ``i``, its input rows
``A_i ∈ R^{T×d_in}`` and output-gradient rows ``G_i ∈ R^{T×d_out}`` (``T`` positions: 1 for a
plain ``[b, d_in]`` input, the product of the middle dimensions for ``[b, *, d_in]``, the number
of output positions of a convolution).

Linear (``y = x Wᵀ + c``)
    The per-sample weight gradient is ``G_iᵀ A_i`` (``d_out × d_in``) and the bias gradient is
    ``Σ_t G_{i,t}``.  With ``T = 1`` the weight gradient is the outer product ``δ_i a_iᵀ``, whose
    squared Frobenius norm factorizes: ``‖δ_i a_iᵀ‖² = ‖a_i‖² ‖δ_i‖²`` (Goodfellow, 2015) — a cost
    of ``O(d_in + d_out)`` per sample.  With ``T > 1`` there are two exact routes:

    * *materialize*: form ``G_iᵀ A_i`` (``O(T·d_in·d_out)`` work, ``b·d_in·d_out`` memory) and
      sum its squares;
    * *ghost*: ``‖G_iᵀ A_i‖²_F = tr(A_iᵀ G_i G_iᵀ A_i) = ⟨A_i A_iᵀ, G_i G_iᵀ⟩_F``, two ``T×T``
      Gram matrices and their elementwise inner product (``O(T²(d_in + d_out))`` work, ``T²``
      memory per sample).

    The route is chosen per layer by the memory rule of Li et al. (2021) and Bu et al. (2022):
    ghost when ``2T² < d_in·d_out``, materialize otherwise.  ``T = 1`` ghost is reported as
    ``"goodfellow"``.

Convolution (``Conv1d/2d/3d``; any stride, dilation, groups, integer or ``'same'``/``'valid'``
padding, every ``padding_mode``)
    Unfolding the (padded) input into patches turns the convolution into a per-sample matrix
    product over the ``T`` output positions: with ``g`` groups, group ``j`` has patches
    ``A_i^{(j)} ∈ R^{T×(C_in/g·Πk)}`` and output gradients ``G_i^{(j)} ∈ R^{T×C_out/g}``, and
    the weight gradient of the group's block is ``G_i^{(j)ᵀ} A_i^{(j)}``.  Each block is a Linear
    case (same ghost-vs-materialize rule with ``d_in = C_in/g·Πk``, ``d_out = C_out/g``); the
    blocks are disjoint parameters, so the per-sample squared norm is the sum over groups.  Bias:
    ``‖Σ_positions δ_i‖²`` summed over output channels.  Norms are invariant to the order of the
    patch columns, so any unfold ordering is exact.

    The ghost route needs only the patch Gram ``A Aᵀ``, and for a convolution it can be had
    without unfolding: entry ``(t, t')`` is ``Σ_offsets Σ_c x[c, t·s + k·d] x[c, t'·s + k·d]``,
    i.e. the channel Gram ``X = Σ_c x[c, ·] x[c, ·]ᵀ`` of the input positions (``P × P``, zero
    padding contributing zero rows) summed along ``k`` strided diagonals per spatial axis.  That
    costs ``O(P²·C_in/g + P²·k)`` instead of ``O(T²·C_in/g·Πk)`` and is used when cheaper (a
    stride-1 3×3 convolution: ~9× less work); both give the same ``A Aᵀ`` up to rounding.

Embedding (``padding_idx`` honoured)
    The weight gradient of sample ``i`` scatters its output-gradient rows ``δ_{i,t} ∈ R^d`` into
    the vocabulary rows ``idx_{i,t}``, so ``‖·‖² = Σ_{t,t'} [idx_t = idx_t'] ⟨δ_t, δ_t'⟩`` with the
    positions holding ``padding_idx`` left out (they receive no gradient): a ghost form with a
    ``T×T`` Gram matrix masked by index equality.  When ``2T ≥ d`` (the embedding analogue of the
    memory rule: the gradient has at most ``T·d`` non-zeros) it is cheaper to materialize the
    per-sample rows instead: sort the keys ``(i, idx)``, sum the rows of equal keys, square.

LayerNorm, RMSNorm, GroupNorm, InstanceNorm, eval-mode BatchNorm (affine parameters)
    ``y = γ ⊙ x̂ + β`` with ``x̂`` depending only on sample ``i``'s own input, so per sample
    ``∂/∂γ = Σ_positions δ ⊙ x̂`` and ``∂/∂β = Σ_positions δ``.  ``x̂`` is recomputed in the
    backward from the stored input with the same functional the layer calls
    (``F.layer_norm``, ``F.group_norm``, …) and the layer's running statistics where it uses them.

``nn.MultiheadAttention`` (packed ``in_proj_weight``, without ``add_bias_kv``, either ``batch_first``)
    The module multiplies by its weights inside one function, so no module hook sees the
    products; their nodes in the output's autograd graph do
    (:mod:`~genbounds.estimators.ghost_attention`): the in-projection ``[T·B, E] → [T·B, 3E]``
    (under cross-attention two or three products with row blocks of the weight) and the
    out-projection ``[T·B, E] → [T·B, E]`` are each a Linear on sequences with input rows saved on
    the node and the output gradient received by a pre-hook on it.  The in-projection is the
    attention module's own site (with two extra rows for cross-attention's key/value blocks,
    which add), ``out_proj`` a site of its own (recorded by the attention's forward hook);
    attention mixes positions within a sample only, so all are exact per-sample norms.

Train-mode BatchNorm — a *decomposition*, not per-sample gradients
    Batch statistics couple the samples: sample ``j``'s loss depends on sample ``i``'s input, so
    "the gradient of sample i" is not defined for anything upstream of the BatchNorm.  What stays
    exact is a split of the *batch* gradient into one term per sample: every layer's gradient is
    ``Σ_i G_iᵀ A_i`` with ``G`` the output gradient autograd computed (coupling included), and
    BatchNorm's own ``γ`` gradient is ``Σ_i Σ_positions δ_i ⊙ x̂_i`` with ``x̂`` normalized by the
    batch statistics.  These terms are computed as above; their sum over ``i`` equals ``.grad``
    exactly.  :attr:`PerSampleNorms.exactness` marks each module ``"decomposition"`` when its
    value is such a term — the train-mode BatchNorm itself and every module whose forward ran
    before the last train-mode BatchNorm of the step (it may be upstream of it) — and ``"exact"``
    otherwise (the per-sample gradient of ``ℓ_i`` at the batch's forward).  Other operations that
    couple samples are not detected.

Weight sharing (a module called several times in one forward)
    The per-sample gradient is the sum of the calls' terms, ``Σ_c G_{i,c}ᵀ A_{i,c}``, and its
    norm is not the sum of the calls' norms.  The calls are concatenated along the position axis
    instead — ``Σ_c G_cᵀ A_c = [G_1; G_2; …]ᵀ [A_1; A_2; …]`` — so a shared Linear/Conv/Embedding
    is one Linear/Conv/Embedding case with ``T = Σ_c T_c`` (a shared 2-D Linear thus uses the
    ghost form with ``T`` = number of calls); a shared normalization layer sums the calls'
    per-sample vectors before squaring.  The calls' ``(A, G)`` (for a convolution: the unfolded
    patches) are kept until the last call's output gradient arrives, or until
    :meth:`GhostNormHooks.read` for calls whose output received no gradient (they add zero).  A
    single-call module computes its norms inside its output-gradient hook and frees the stored
    input at once.

Scaling
    Callers back-propagate ``L = S/(m·A) Σ_i ℓ_i`` (mean over ``m`` samples, gradient
    accumulation over ``A`` micro-batches, optional AMP loss scale ``S``).  The hooks see
    gradients of ``L``, so the gradient of ``ℓ_i`` is ``(m·A/S)×`` what they see:
    :meth:`GhostNormHooks.read` multiplies squared norms by ``scale²`` with ``scale = m·A/S``.

Cost: the forward hook of an unarmed hooked module is one attribute check; an armed one stores
a reference to the input (no copy) and registers one tensor hook.  The work in the backward is
the route chosen per layer (above); on CPU its large temporaries live in work buffers
that are kept between steps while armed (fresh ``mmap``'d memory costs a page fault per 4 KiB),
and are released by :meth:`GhostNormHooks.disarm`.

Numerics: activations and gradients are promoted to at least float32 (autocast's fp16/bf16 are
upcast; float64 stays float64), reduced to one value per sample, and accumulated per group in
float64 on the tensors' device.  Nothing synchronizes with the host.

Limitations: the batch must be dimension 0 of every layer input — in a model with a
sequence-first transformer module, dimension 0 or 1 (:func:`declared_batch_dims`, :meth:`GhostNormHooks.arm`)
— and the input the layer's first positional argument; regions compiled by ``torch.compile`` and sharded (tensor-parallel, FSDP)
parameters are not supported; parameters used outside their module's ``forward``
(a weight tied to another module) are refused by :func:`plan`, or detected at
:meth:`GhostNormHooks.read` when their module never received an
output gradient (a weight used both through its module and functionally elsewhere is *not*
detected).
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.module import register_module_forward_hook
from torch.utils.hooks import RemovableHandle

from genbounds.estimators import ghost_attention

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
    def check(self, module: nn.Module, x: Any) -> str | None:
        """Why this call cannot be handled (``None``: it can)."""
        raise NotImplementedError

    def needs_input(self, wt: bool, bt: bool) -> bool:
        return wt

    def precompute(self, x: Tensor, wt: bool, forced: str | None) -> Tensor | None:
        """Something to compute in the forward hook, while ``x`` (the call's input, detached) is hot
        in cache (``None``)."""
        return None

    def factor(self, module: nn.Module, x: Tensor | None, g: Tensor, wt: bool, bt: bool,
               scratch: _Scratch = _FRESH) -> tuple:
        raise NotImplementedError

    def concat(self, factors: list[tuple]) -> tuple:
        raise NotImplementedError

    def norms(self, module: nn.Module, f: tuple, wt: bool, bt: bool, forced: str | None,
              scratch: _Scratch = _FRESH) -> tuple[Tensor, str]:
        raise NotImplementedError

    def single(self, module: nn.Module, x: Tensor | None, g: Tensor, wt: bool, bt: bool,
               forced: str | None, scratch: _Scratch = _FRESH, pre: Tensor | None = None,
               out: Tensor | None = None) -> tuple[Tensor, str]:
        """Norms of a module called once; ``pre`` is :meth:`precompute`'s result and ``out`` the
        module's row (the step's compute dtype or wider), which the result may be written to
        directly."""
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


class _LinearKind(_Kind):
    def check(self, module, x):
        if not isinstance(x, Tensor) or x.dim() < 2:
            return "unbatched input (the batch must be dimension 0)"
        return None

    def precompute(self, x, wt, forced):
        if wt and x.dim() == 2 and forced != MATERIALIZE:  # ‖a_i‖² for Goodfellow (x detached)
            return _rowsq(_as(x, _compute_dtype(x.dtype)))
        return None

    def single(self, module, x, g, wt, bt, forced, scratch=_FRESH, pre=None, out=None):
        if g.dim() == 2 and forced != MATERIALIZE:  # [b, d]: Goodfellow
            cd = _compute_dtype(g.dtype, x.dtype if x is not None else g.dtype)
            d2 = _rowsq(_as(g, cd))
            if not wt:
                return d2, GOODFELLOW
            a2 = pre if pre is not None else _rowsq(_as(x, cd))
            # ‖δ‖²‖a‖² (+ ‖δ‖² for the bias) in one op, written straight into the row
            if bt:
                return torch.addcmul(d2, d2, a2, out=out), GOODFELLOW
            return torch.mul(d2, a2, out=out), GOODFELLOW
        return self.norms(module, self.factor(module, x, g, wt, bt, scratch), wt, bt, forced, scratch, out)

    def factor(self, module, x, g, wt, bt, scratch=_FRESH):
        b = g.shape[0]
        cd = _compute_dtype(g.dtype, x.dtype if x is not None else g.dtype)
        G = _as(g.reshape(b, -1, g.shape[-1]), cd)
        A = _as(x.reshape(b, -1, x.shape[-1]), cd) if wt else None
        return A, G

    def concat(self, factors):
        return _cat_pairs(factors, 1)

    def norms(self, module, f, wt, bt, forced, scratch=_FRESH, out: Tensor | None = None):
        A, G = f
        T = G.shape[1]
        w = None
        method = GOODFELLOW if T == 1 else MATERIALIZE
        if wt:
            method = _ghost_or_materialize(forced, T, A.shape[2], G.shape[2])
            folded = bt and method == GHOST and T > 1  # the bias inside the ghost product
            w = _seq_weight_sq(A, G, method, scratch, None if bt and not folded else out, folded)
            if method == GHOST and T == 1:
                method = GOODFELLOW
            if folded:
                return w, method
        if bt:
            s = G.sum(1) if T > 1 else G[:, 0]
            w = _vecdot(s, s) if w is None else torch.add(w, _vecdot(s, s), out=out)
        return w, method

    def method_for(self, module, input_shape, forced):
        return _linear_route(forced, _prod(input_shape[1:-1]), module.in_features, module.out_features)

    def sequence_dims(self, module):
        return 3


def _linear_route(forced: str | None, T: int, d_in: int, d_out: int) -> str:
    """The route a Linear on ``T`` positions takes (and reports)."""
    m = _ghost_or_materialize(forced, T, d_in, d_out)
    return GOODFELLOW if (m == GHOST and T == 1) else m


def _padding_pairs(module: _ConvNd) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial axis, as the layer applies it (``'same'`` may be
    asymmetric; ``Conv*d`` keeps it, last axis first, in ``_reversed_padding_repeated_twice``)."""
    r = module._reversed_padding_repeated_twice
    nd = len(module.kernel_size)
    return [(r[2 * (nd - 1 - j)], r[2 * (nd - 1 - j) + 1]) for j in range(nd)]


def _conv_pad(module: _ConvNd, x: Tensor, scratch: _Scratch = _FRESH) -> Tensor:
    """``x`` padded exactly as the layer pads it (``padding_mode``, ``'same'``, ``'valid'``)."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    pairs = _padding_pairs(module)
    if not any(lo or hi for lo, hi in pairs):
        return x
    shape = list(x.shape)
    inner: list[Any] = [slice(None), slice(None)]
    for j, (lo, hi) in enumerate(pairs):
        shape[2 + j] += lo + hi
        inner.append(slice(lo, lo + x.shape[2 + j]))
    out = scratch.get("pad", tuple(shape), x)
    out.zero_()
    out[tuple(inner)].copy_(x)
    return out


def _conv_unfold(module: _ConvNd, x: Tensor, scratch: _Scratch = _FRESH) -> Tensor:
    """Patches of the input, ``[b, C_in·Πk, T]``, channel-major like ``F.unfold`` (so the group
    blocks are contiguous along dimension 1).  Strided windows of the padded input and one copy:
    for every dimensionality, and 1.1–4× faster than ``F.unfold`` for 2-D on CPU (measured)."""
    nd = x.dim() - 2
    ks, st, dil = module.kernel_size, module.stride, module.dilation
    x = _conv_pad(module, x, scratch)
    b, c = x.shape[:2]
    for i in range(nd):
        x = x.unfold(2 + i, dil[i] * (ks[i] - 1) + 1, st[i])  # windows appended as last dims
    if any(d > 1 for d in dil):
        x = x[(Ellipsis,) + tuple(slice(None, None, d) for d in dil)]
    # [b, C, o_1..o_nd, k_1..k_nd] → [b, C, k_1..k_nd, o_1..o_nd]
    perm = (0, 1) + tuple(range(2 + nd, 2 + 2 * nd)) + tuple(range(2, 2 + nd))
    view = x.permute(perm)
    out = scratch.get("unfold", tuple(view.shape), x)
    out.copy_(view)
    return out.view(b, c * _prod(ks), -1)


def _conv_gram_cheaper(module: _ConvNd, spatial: tuple[int, ...], T: int) -> bool:
    """Whether :func:`_conv_patch_gram` beats unfolding for ``A Aᵀ`` (work; memory ≤ 4 T²).
    ``spatial``: the input's spatial shape."""
    if module.padding_mode == "zeros":
        P = _prod(spatial)  # zero padding is handled without materializing it
    else:
        P = _prod(s + lo + hi for s, (lo, hi) in zip(spatial, _padding_pairs(module)))
    cg = module.in_channels // module.groups
    K = cg * _prod(module.kernel_size)
    return P * P * (cg + 4 * module.kernel_size[-1]) < T * T * K + 8 * K * T and P * P <= 4 * T * T


_SLOTS = ("A", "B")

WORK_BUFFER_BYTES = {"cpu": 4 * 2**20, "default": 256 * 2**20}
"""Largest work buffer a convolution's per-sample norms use, per device type: the batch is
processed in chunks of samples when a buffer would be larger.  On the CPU the buffers are kept
between steps (:class:`_Scratch`), so this bounds what the hooks hold: on the AlexNet-style CNN
of the benchmark (b = 64) 7.5 MiB instead of 32 MiB, and its hooks took 54 instead of 67 ms a
step (smaller buffers stay in cache; docs/results/overhead.md).  On CUDA the caching allocator recycles them; a large budget keeps
the kernels few."""


def _other_slot(*used: str) -> str:
    return next(s for s in _SLOTS if s not in used)


def _conv_patch_gram(module: _ConvNd, x: Tensor, scratch: _Scratch = _FRESH,
                     windowed: bool | None = None) -> tuple[Tensor, str]:
    """``A Aᵀ`` of the patches, ``[b·g, T, T]``, without unfolding (and the slot holding it).

    Two implementations of one sum, exact alike (tested against each other and the unfolded
    Gram): ``windowed`` (default off the CPU) takes four kernels whatever the kernel size, where
    the ``sliced`` one (default on the CPU) takes ``2 + 2·Σ_j k_j`` — ten for a 3×3 kernel — and
    several index ops per kernel, a launch each on a GPU.  On the CPU the windowed sum's strided
    reduction is 2-7× slower than the sliced adds (measured: 2.3 ms against 0.34 ms a step for a
    64-channel 3×3 layer on 8×8 inputs at b = 16; benchmarks/op_counts.py counts the ops)."""
    if windowed is None:
        windowed = x.device.type != "cpu"
    return (_patch_gram_windowed if windowed else _patch_gram_sliced)(module, x, scratch)


def _gram_input(module: _ConvNd, x: Tensor) -> tuple[list[tuple[int, int]], int, tuple[int, ...], Tensor]:
    """The input as the patch Gram reads it: ``(zero padding per axis, n = b·groups, spatial
    shape, [n, C_in/g, P] view)``; other padding modes pad the input here (no padding is left)."""
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        pads = [(0, 0)] * (x.dim() - 2)
    else:
        pads = _padding_pairs(module)
    b, c = x.shape[:2]
    n = b * module.groups
    H = tuple(x.shape[2:])
    return pads, n, H, x.reshape(n, c // module.groups, _prod(H))


def _patch_gram_sliced(module: _ConvNd, x: Tensor, scratch: _Scratch = _FRESH) -> tuple[Tensor, str]:
    """:func:`_conv_patch_gram` on the CPU.

    Per axis, output position ``o`` reads padded input position ``o·s + k·d``.  With the channel
    Gram ``X(u, u') = Σ_c x[c, u] x[c, u']`` of the *unpadded* input (zero padding contributes
    nothing, so the padded Gram is ``X`` surrounded by zeros),
    ``(A Aᵀ)[o, o'] = Σ_k X(o·s + k·d − pad, o'·s + k·d − pad)`` over the offsets ``k`` whose
    positions fall inside the input: one Gram over the ``C_in/g`` channels, then per spatial
    axis a sum of ``k`` strided (clipped) diagonal slices.  Work ``O(P²·C_in/g + P²·k)`` for
    ``P`` input positions, instead of ``O(T²·C_in/g·Πk)``.  Other padding modes pad first.
    """
    nd = x.dim() - 2
    ks, st, dil = module.kernel_size, module.stride, module.dilation
    pads, n, H, xf = _gram_input(module, x)
    slot = "A"
    gx = torch.bmm(xf.transpose(1, 2), xf, out=scratch.get(slot, (n, _prod(H), _prod(H)), x)).view(n, *H, *H)
    # interleave the axes, [n, H_1, H_1', H_2, H_2', …], so each axis' pair is adjacent
    gx = gx.permute([0] + [v for j in range(nd) for v in (1 + j, 1 + nd + j)])
    outs = [0] * nd
    for j in reversed(range(nd)):  # innermost axis first
        k, s, d = ks[j], st[j], dil[j]
        lo, hi = pads[j]
        o = (H[j] + lo + hi - d * (k - 1) - 1) // s + 1
        outs[j] = o
        a1, a2 = 1 + 2 * j, 2 + 2 * j
        if k == 1 and lo == 0 and s == 1 and o == H[j]:
            continue  # identity on this axis
        shape = list(gx.shape)
        shape[a1] = shape[a2] = o
        slot = _other_slot(slot)  # ping-pong between two buffers
        acc = scratch.get(slot, tuple(shape), x)
        acc.zero_()
        for kk in range(k):
            # o·s + kk·d − lo must lie in [0, H_j)
            o_min = max(0, -((kk * d - lo) // s))
            o_max = min(o - 1, (H[j] - 1 + lo - kk * d) // s)
            if o_min > o_max:
                continue
            u0 = o_min * s + kk * d - lo
            src = slice(u0, u0 + s * (o_max - o_min) + 1, s)
            dst = slice(o_min, o_max + 1)
            si: list[Any] = [slice(None)] * gx.dim()
            di: list[Any] = [slice(None)] * gx.dim()
            si[a1] = si[a2] = src
            di[a1] = di[a2] = dst
            acc[tuple(di)].add_(gx[tuple(si)])
        gx = acc
    T = _prod(outs)
    back = [0] + [1 + 2 * j for j in range(nd)] + [2 + 2 * j for j in range(nd)]
    view = gx.permute(back)
    slot = _other_slot(slot)
    aa = scratch.get(slot, tuple(view.shape), x)
    aa.copy_(view)
    return aa.view(n, T, T), slot


def _patch_gram_windowed(module: _ConvNd, x: Tensor, scratch: _Scratch = _FRESH) -> tuple[Tensor, str]:
    """:func:`_conv_patch_gram` on other devices (CUDA): few kernels.

    Per axis, output position ``o`` reads padded input position ``o·s + k·d``.  With the channel
    Gram ``X(u, u') = Σ_c x[c, u] x[c, u']`` of the *unpadded* input, surrounded by zeros for
    the padding (zero padding contributes nothing) — ``X̃`` —
    ``(A Aᵀ)[o, o'] = Σ_k X̃(o·s + k·d, o'·s + k·d)`` over the kernel offsets ``k`` (a tuple over
    the axes): one sum over a strided window view of ``X̃``, whose offset axis ``k_j`` steps
    ``d_j`` positions along both copies of spatial axis ``j`` at once.  Four ops (the channel
    Gram, zeroing and filling ``X̃`` — two fewer without padding — and the window sum), whatever
    the kernel size; work ``O(P²·C_in/g + T²·Πk)`` for ``P`` input positions, instead of
    ``O(T²·C_in/g·Πk)``.  Other padding modes pad the input first.
    """
    nd = x.dim() - 2
    ks, st, dil = module.kernel_size, module.stride, module.dilation
    pads, n, H, xf = _gram_input(module, x)
    Hp = tuple(h + lo + hi for h, (lo, hi) in zip(H, pads))
    outs = tuple((Hp[j] - dil[j] * (ks[j] - 1) - 1) // st[j] + 1 for j in range(nd))
    padded = any(lo or hi for lo, hi in pads)
    gx = torch.bmm(xf.transpose(1, 2), xf, out=scratch.get("B" if padded else "A", (n, _prod(H), _prod(H)), x))
    grid = gx.view(n, *H, *H)
    if padded:
        grid = scratch.get("A", (n, *Hp, *Hp), x)
        grid.zero_()
        inner = tuple(slice(lo, lo + h) for h, (lo, _) in zip(H, pads))
        grid[(slice(None),) + inner + inner].copy_(gx.view(n, *H, *H))
    # windows [n, o_1..o_nd, o'_1..o'_nd, k_1..k_nd] of the contiguous [n, Hp…, Hp'…] Gram
    sn, *sa = grid.stride()
    sizes = (n, *outs, *outs, *ks)
    strides = (sn, *(sa[j] * st[j] for j in range(nd)), *(sa[nd + j] * st[j] for j in range(nd)),
               *(dil[j] * (sa[j] + sa[nd + j]) for j in range(nd)))
    windows = grid.as_strided(sizes, strides, grid.storage_offset())
    T = _prod(outs)
    aa = torch.sum(windows, dim=tuple(range(1 + 2 * nd, 1 + 3 * nd)), out=scratch.get("B", (n, *outs, *outs), x))
    return aa.view(n, T, T), "B"


class _ConvKind(_Kind):
    def check(self, module, x):
        nd = len(module.kernel_size)
        if not isinstance(x, Tensor) or x.dim() != nd + 2:
            return f"unbatched input (Conv{nd}d expects [b, C, {nd} spatial dims])"
        return None

    def _grad(self, module, g: Tensor, cd: torch.dtype) -> Tensor:
        grp = module.groups
        return _as(g.reshape(g.shape[0] * grp, module.out_channels // grp, -1), cd)  # [b·g, C_out/g, T]

    def factor(self, module, x, g, wt, bt, scratch=_FRESH):
        cd = _compute_dtype(g.dtype, x.dtype if x is not None else g.dtype)
        G = self._grad(module, g, cd)
        A = None
        if wt:
            A = _conv_unfold(module, _as(x, cd), scratch)  # [b, g·K, T]
            A = A.view(G.shape[0], -1, A.shape[-1])  # [b·g, K, T]
        return A, G

    def single(self, module, x, g, wt, bt, forced, scratch=_FRESH, pre=None, out=None):
        if not wt:
            return super().single(module, x, g, wt, bt, forced, scratch)
        T = _prod(g.shape[2:])
        K = module.in_channels // module.groups * _prod(module.kernel_size)
        co = module.out_channels // module.groups
        route = _ghost_or_materialize(forced, T, K, co)
        gram = route == GHOST and _conv_gram_cheaper(module, tuple(x.shape[2:]), T)
        # samples per chunk so that each work buffer of the route stays within WORK_BUFFER_BYTES:
        # the input's channel Gram and the patch Gram (ghost without unfolding), the unfolded
        # patches and the patch Gram (ghost), or the unfolded patches and the per-sample gradients
        if gram:
            entries = max(_prod(self._padded_shape(module, x.shape)) ** 2, T * T)
        else:
            entries = max(K * T, T * T if route == GHOST else co * K)
        per_sample = module.groups * entries * max(4, g.element_size())
        b = g.shape[0]
        step = max(1, WORK_BUFFER_BYTES.get(g.device.type, WORK_BUFFER_BYTES["default"]) // per_sample)
        if step >= b:
            return self._single(module, x, g, bt, forced, scratch, gram, out)
        parts, method = [], route
        for s in range(0, b, step):  # the samples are independent: their buffers need not coexist
            sq, method = self._single(module, x[s:s + step], g[s:s + step], bt, forced, scratch, gram)
            parts.append(sq)
        return torch.cat(parts), method

    def _single(self, module, x, g, bt, forced, scratch, gram: bool, out: Tensor | None = None):
        """Norms of a chunk of samples, on the route :meth:`single` chose (``gram``: the ghost
        form from the input's channel Gram, without unfolding); into ``out`` when given."""
        if not gram:
            return self.norms(module, self.factor(module, x, g, True, bt, scratch), True, bt, forced, scratch, out)
        cd = _compute_dtype(g.dtype, x.dtype)
        G = self._grad(module, g, cd)
        aa, slot = _conv_patch_gram(module, _as(x, cd), scratch)
        return self._ghost(module, aa, G, bt, scratch.get(_other_slot(slot), tuple(aa.shape), G), out), GHOST

    def _ghost(self, module, aa: Tensor, G: Tensor, bt: bool, gg_buffer: Tensor, out: Tensor | None) -> Tensor:
        """``⟨A Aᵀ, G Gᵀ⟩_F`` per sample (the bias folded in), into ``out``; ``aa`` is overwritten."""
        gg = torch.bmm(G.transpose(1, 2), G, out=gg_buffer)
        if bt:
            _with_bias_(aa)
        return self._weight_and_bias(module, _dot_(aa, gg, self._direct(module, False, out)), G, False, out)

    @staticmethod
    def _direct(module, bt: bool, out: Tensor | None) -> Tensor | None:
        """``out`` where the weight's per-sample sums are the result (one group, no bias)."""
        return out if module.groups == 1 and not bt else None

    def _weight_and_bias(self, module, w: Tensor, G: Tensor, bt: bool, out: Tensor | None) -> Tensor:
        """The weight's per-sample sums ``w`` (per sample and group) plus the bias's, into ``out``."""
        if module.groups > 1:
            w = _sum_into(w.view(-1, module.groups), None if bt else out)
        if bt:
            return torch.add(w, self._bias_sq(module, G), out=out)
        return w

    @staticmethod
    def _padded_shape(module, shape: torch.Size) -> tuple[int, ...]:
        return tuple(int(n) + lo + hi for n, (lo, hi) in zip(shape[2:], _padding_pairs(module)))

    @staticmethod
    def _bias_sq(module, G: Tensor) -> Tensor:
        s = G.sum(2).reshape(G.shape[0] // module.groups, -1)
        return _vecdot(s, s)

    def concat(self, factors):
        return _cat_pairs(factors, 2)

    def norms(self, module, f, wt, bt, forced, scratch=_FRESH, out: Tensor | None = None):
        A, G = f
        n, co, T = G.shape
        if not wt:
            return self._bias_sq(module, G), MATERIALIZE
        K = A.shape[1]
        method = _ghost_or_materialize(forced, T, K, co)
        if method == MATERIALIZE:
            w = _sum_sq_(torch.bmm(G, A.transpose(1, 2), out=scratch.get("A", (n, co, K), G)),
                         self._direct(module, bt, out))
            return self._weight_and_bias(module, w, G, bt, out), method
        aa = torch.bmm(A.transpose(1, 2), A, out=scratch.get("A", (n, T, T), A))
        return self._ghost(module, aa, G, bt, scratch.get("B", (n, T, T), G), out), method

    def method_for(self, module, input_shape, forced):
        padded = self._padded_shape(module, input_shape)
        T = 1
        for i, p in enumerate(padded):
            span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
            T *= (p - span) // module.stride[i] + 1
        K = module.in_channels // module.groups * _prod(module.kernel_size)
        return _ghost_or_materialize(forced, T, K, module.out_channels // module.groups)


class _EmbeddingKind(_Kind):
    def check(self, module, x):
        if not isinstance(x, Tensor) or x.dim() < 1:
            return "unbatched input (the batch must be dimension 0)"
        return None

    def factor(self, module, x, g, wt, bt, scratch=_FRESH):
        b = g.shape[0]
        cd = _compute_dtype(g.dtype)
        idx = x.reshape(b, -1)
        G = _as(g.reshape(b, idx.shape[1], -1), cd)
        if module.padding_idx is not None:
            G = G * (idx != module.padding_idx).unsqueeze(-1).to(cd)
        return idx, G

    def concat(self, factors):
        return _cat_pairs(factors, 1)

    def norms(self, module, f, wt, bt, forced, scratch=_FRESH):
        idx, G = f
        b, T, d = G.shape
        method = forced if forced is not None else (GHOST if 2 * T < d else MATERIALIZE)
        if method == GHOST:
            if T == 1:
                return _vecdot(G[:, 0], G[:, 0]), GOODFELLOW
            gg = torch.bmm(G, G.transpose(1, 2))
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(gg.dtype)
            return _vecdot(gg.flatten(1), same.flatten(1)), GHOST
        # materialize the non-zero rows: sort the keys (sample, index) and sum equal keys
        n = b * T
        keys = (torch.arange(b, device=idx.device).unsqueeze(1) * module.num_embeddings + idx).reshape(n)
        order = torch.argsort(keys)
        skeys = keys[order]
        new = torch.ones(n, dtype=torch.long, device=idx.device)
        new[1:] = (skeys[1:] != skeys[:-1]).long()
        seg = torch.cumsum(new, 0) - 1
        rows = torch.zeros(n, d, dtype=G.dtype, device=G.device)
        rows.index_add_(0, seg, G.reshape(n, d)[order])
        sample = torch.zeros(n, dtype=torch.long, device=idx.device)
        sample.scatter_(0, seg, torch.div(skeys, module.num_embeddings, rounding_mode="floor"))
        out = torch.zeros(b, dtype=G.dtype, device=G.device)
        out.index_add_(0, sample, _vecdot(rows, rows))
        return out, MATERIALIZE

    def method_for(self, module, input_shape, forced):
        T = _prod(input_shape[1:])
        m = forced if forced is not None else (GHOST if 2 * T < module.embedding_dim else MATERIALIZE)
        return GOODFELLOW if (m == GHOST and T == 1) else m

    def sequence_dims(self, module):
        return 2


class _NormKind(_Kind):
    """Affine normalization layers: per-sample ``(Σ δ⊙x̂, Σ δ)`` vectors, summed over calls."""

    def check(self, module, x):
        if not isinstance(x, Tensor):
            return "input is not a tensor"
        if x.dim() < self._min_dim(module):
            return "unbatched input (the batch must be dimension 0)"
        return None

    def _min_dim(self, module) -> int:
        return 2

    def batch_stats(self, module) -> bool:
        return False

    def normalized(self, module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def channel_view(self, module, t: Tensor) -> tuple[Tensor, int]:
        """``t`` as ``[b, C, P]`` (or ``[b, P, C]``) and the dim to reduce over."""
        b, c = t.shape[:2]
        return t.reshape(b, c, -1), 2

    def factor(self, module, x, g, wt, bt, scratch=_FRESH):
        cd = _compute_dtype(g.dtype, x.dtype if x is not None else g.dtype)
        gv, dim = self.channel_view(module, _as(g, cd))
        gw = gb = None
        if wt:
            xh, _ = self.channel_view(module, self.normalized(module, _as(x, cd)))
            gw = _vecdot(gv, xh, dim=dim)
        if bt:
            gb = gv.sum(dim)
        return gw, gb

    def single(self, module, x, g, wt, bt, forced, scratch=_FRESH, pre=None, out=None):
        if not (wt and bt):
            return super().single(module, x, g, wt, bt, forced, scratch)
        # weight and bias: both per-sample vectors in one [b, 2, C] buffer, one sum of squares
        # into ``out`` (six kernels where factor + norms + the row's copy take ten)
        cd = _compute_dtype(g.dtype, x.dtype)
        gv, dim = self.channel_view(module, _as(g, cd))
        xh, _ = self.channel_view(module, self.normalized(module, _as(x, cd)))
        b = gv.shape[0]
        both = torch.empty((b, 2, gv.shape[3 - dim]), dtype=cd, device=gv.device)
        _vecdot(gv, xh, dim=dim, out=both[:, 0])
        torch.sum(gv, dim, out=both[:, 1])
        return _sum_sq_(both, out), self._route(module)

    def concat(self, factors):
        gw = gb = None
        for w, c in factors:
            gw = w if gw is None else gw + w
            gb = c if gb is None else gb + c
        return gw, gb

    def norms(self, module, f, wt, bt, forced, scratch=_FRESH):
        gw, gb = f
        out = None
        if gw is not None:
            out = _vecdot(gw, gw)
        if gb is not None:
            out = _vecdot(gb, gb) if out is None else out + _vecdot(gb, gb)
        return out, self._route(module)

    def _route(self, module) -> str:
        return DECOMPOSITION_BN if self.batch_stats(module) else MATERIALIZE

    def method_for(self, module, input_shape, forced):
        return self._route(module)


class _LayerNormKind(_NormKind):
    def _min_dim(self, module):
        return len(module.normalized_shape) + 1

    def normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def channel_view(self, module, t):
        k = _prod(module.normalized_shape)
        return t.reshape(t.shape[0], -1, k), 1

    def sequence_dims(self, module):
        return len(module.normalized_shape) + 2


class _RMSNormKind(_LayerNormKind):
    def normalized(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class _GroupNormKind(_NormKind):
    def normalized(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class _BatchNormKind(_NormKind):
    def batch_stats(self, module):
        return module.training or module.running_mean is None

    def normalized(self, module, x):
        if self.batch_stats(module):
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.batch_norm(x, _as(module.running_mean, x.dtype), _as(module.running_var, x.dtype),
                            None, None, False, 0.0, module.eps)


class _InstanceNormKind(_NormKind):
    def _min_dim(self, module):
        return module._get_no_batch_dim() + 1

    def normalized(self, module, x):
        if module.training or not module.track_running_stats:
            return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.instance_norm(x, _as(module.running_mean, x.dtype), _as(module.running_var, x.dtype),
                               None, None, False, 0.0, module.eps)


class _AttentionKind(_LinearKind):
    """``nn.MultiheadAttention`` (packed ``in_proj_weight``, either ``batch_first``): its in-projection is a
    Linear on sequences whose input rows and output gradient are taken from the product's node in
    the autograd graph (:mod:`genbounds.estimators.ghost_attention`; recorded by
    ``GhostNormHooks._record_attention``, not by the Linear's ``check``/``precompute``); its
    ``out_proj``, when hooked, is a site of its own that the same forward hook records."""

    def method_for(self, module, input_shape, forced):
        return _linear_route(forced, ghost_attention.batch_and_length(module, input_shape)[1], module.embed_dim,
                             3 * module.embed_dim)

    def sequence_dims(self, module):
        return None  # (its own layout: batch_first; ghost_attention.batch_and_length)


_LINEAR, _CONV, _EMBEDDING = _LinearKind(), _ConvKind(), _EmbeddingKind()
_ATTENTION = _AttentionKind()
_LAYERNORM, _RMSNORM, _GROUPNORM = _LayerNormKind(), _RMSNormKind(), _GroupNormKind()
_BATCHNORM, _INSTANCENORM = _BatchNormKind(), _InstanceNormKind()

_KINDS: list[tuple[type, _Kind]] = [
    (nn.Linear, _LINEAR),
    (nn.Conv1d, _CONV), (nn.Conv2d, _CONV), (nn.Conv3d, _CONV),
    (nn.Embedding, _EMBEDDING),
    (nn.LayerNorm, _LAYERNORM),
    (nn.GroupNorm, _GROUPNORM),
    (nn.BatchNorm1d, _BATCHNORM), (nn.BatchNorm2d, _BATCHNORM), (nn.BatchNorm3d, _BATCHNORM),
    (nn.InstanceNorm1d, _INSTANCENORM), (nn.InstanceNorm2d, _INSTANCENORM), (nn.InstanceNorm3d, _INSTANCENORM),
]
if hasattr(nn, "RMSNorm"):
    _KINDS.append((nn.RMSNorm, _RMSNORM))


def _kind_of(module: nn.Module) -> tuple[_Kind | None, str | None]:
    """The kind handling ``module`` and ``None``, or ``None`` and the reason it is refused."""
    if isinstance(module, nn.SyncBatchNorm):
        return None, "SyncBatchNorm normalizes with statistics shared across processes"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return None, "lazy module with uninitialized parameters"
    for base, kind in _KINDS:
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                return None, f"{type(module).__name__} overrides {base.__name__}.forward"
            if isinstance(module, _ConvNd) and module.transposed:  # pragma: no cover - defensive
                return None, "transposed convolution"
            if isinstance(module, nn.Embedding):
                if module.max_norm is not None:
                    return None, "Embedding(max_norm=…) renormalizes weight rows in the forward"
                if module.sparse:
                    return None, "Embedding(sparse=True) produces sparse gradients"
                if module.scale_grad_by_freq:
                    return None, ("Embedding(scale_grad_by_freq=True) divides by index counts over "
                                  "the whole batch (couples the samples)")
            return kind, None
    if isinstance(module, nn.MultiheadAttention):
        reason = ghost_attention.unsupported_reason(module)
        return (_ATTENTION, None) if reason is None else (None, reason)
    if isinstance(module, _ConvNd):
        return None, f"{type(module).__name__}: transposed convolutions are not implemented"
    return None, f"no ghost-norm rule for {type(module).__name__}"


# ----------------------------------------------------------------------------- planning


def plan(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Which trainable parameters :class:`GhostNormHooks` can cover.

    Returns:
        ``(covered, uncovered)``: ``covered`` maps the qualified name of every module that owns
        trainable parameters and is supported to the module (pass it to
        :class:`GhostNormHooks`); ``uncovered`` maps the qualified name of every trainable
        parameter outside those modules to the reason.  A parameter owned by several modules
        (tied weights) is uncovered — its per-sample gradient has cross terms between the
        modules.  A supported ``nn.MultiheadAttention`` is covered with its ``out_proj`` (whose
        forward it bypasses: the attention's hook records it); a refused one leaves its
        ``out_proj`` uncovered too.  Callers should refuse to mix covered and
        uncovered parameters.
    """
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    refused = _refused_attention(model)  # MultiheadAttention → why; its children inherit the reason
    functional_children = {id(m): why for att, why in refused.items() for m in att.modules() if m is not att}
    covered: dict[str, nn.Module] = {}
    uncovered: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        attention = isinstance(module, nn.MultiheadAttention)
        if not own and not (attention and module not in refused
                            and any(p.requires_grad for p in module.out_proj.parameters())):
            continue  # (a MultiheadAttention with a trainable out_proj records it: kept)
        prefix = f"{mod_name}." if mod_name else ""
        reason = refused.get(module) if attention else _kind_of(module)[1]
        if reason is None and id(module) in functional_children:
            reason = ("inside a MultiheadAttention that uses the weights without calling this module: "
                      + functional_children[id(module)])
        if reason is None:
            for n, p in own:
                others = [o for o in owners[id(p)] if o != prefix + n]
                if others:
                    reason = f"{n} is shared with {', '.join(others)} (tied weights: cross terms)"
                    break
        if reason is None:
            covered[mod_name] = module
        else:
            for n, _ in own:
                uncovered[prefix + n] = reason
    return covered, uncovered


def declared_batch_dims(model: nn.Module) -> dict[str, int]:
    """Module name → the input dimension that holds the batch, where PyTorch's transformer modules
    declare it: every module inside a ``TransformerEncoderLayer``/``TransformerDecoderLayer`` and
    the final ``norm`` of a ``TransformerEncoder``/``TransformerDecoder`` see ``[B, T, E]`` (0)
    with ``batch_first=True`` and ``[T, B, E]`` (1) without; a ``MultiheadAttention`` says its own.
    Modules elsewhere are not declared: their layout is read off each call's shape."""
    out: dict[str, int] = {}

    def declare(prefix: str, module: nn.Module, dim: int) -> None:
        for name, _ in module.named_modules(prefix=prefix):
            out.setdefault(name, dim)

    for name, module in model.named_modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            declare(name, module, 0 if module.self_attn.batch_first else 1)
        elif isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and module.norm is not None:
            attention = getattr(module.layers[0], "self_attn", None) if len(module.layers) else None
            if isinstance(attention, nn.MultiheadAttention):
                declare(f"{name}.norm" if name else "norm", module.norm, 0 if attention.batch_first else 1)
        elif isinstance(module, nn.MultiheadAttention):
            out.setdefault(name, 0 if module.batch_first else 1)
    return out


def _refused_attention(model: nn.Module) -> dict[nn.Module, str]:
    """Every ``nn.MultiheadAttention`` of ``model`` the graph rule does not cover, with the reason:
    structural (:func:`~genbounds.estimators.ghost_attention.unsupported_reason`) or a trainable
    bias on a frozen weight."""
    refused: dict[nn.Module, str] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            why = _kind_of(module)[1] or ghost_attention.frozen_weight_reason(module)
            if why is not None:
                refused[module] = why
    return refused


def predict_methods(
    modules: Mapping[str, nn.Module],
    forward: Callable[[], Any],
    method: str | Mapping[str, str] | None = None,
    batch_dims: Mapping[str, int] | None = None,
    batch_size: int | None = None,
) -> dict[str, str]:
    """The route each module would take, from the input shapes seen while ``forward()`` runs
    (under ``torch.no_grad``; nothing is recorded).  A module called several times is predicted
    from its first call.  In a sequence-first model pass ``batch_dims``
    (:func:`declared_batch_dims`) and the ``batch_size``, as to :class:`GhostNormHooks`."""
    seen: dict[str, str] = {}
    batch_dims = dict(batch_dims or {})

    def batch_first_shape(name: str, kind: _Kind, module: nn.Module, shape: torch.Size) -> torch.Size:
        least = kind.sequence_dims(module)
        if least is None or len(shape) < least:
            return shape
        dim = batch_dims.get(name)
        if dim is None:
            dim = int(batch_size is not None and shape[1] == batch_size and shape[0] != batch_size)
        return torch.Size((shape[1], shape[0], *shape[2:])) if dim else shape

    handles = []
    for name, module in modules.items():
        kind, reason = _kind_of(module)
        if kind is None:
            raise ValueError(f"{name}: {reason}")
        forced = method.get(name) if isinstance(method, Mapping) else method

        def hook(mod, args, output, name=name, kind=kind, forced=forced):
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = kind.method_for(mod, batch_first_shape(name, kind, mod, args[0].shape), forced)
                out_name = None if kind is not _ATTENTION else next(
                    (n for n, m in modules.items() if m is mod.out_proj), None)
                if out_name is not None:  # recorded by this hook (the attention bypasses its forward)
                    out_forced = method.get(out_name) if isinstance(method, Mapping) else method
                    T = ghost_attention.batch_and_length(mod, args[0].shape)[1]
                    seen[out_name] = _linear_route(out_forced, T, mod.embed_dim, mod.embed_dim)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return seen


# ----------------------------------------------------------------------------- hooks


class _Site:
    """One hooked module and what it recorded during the current step."""

    __slots__ = ("name", "module", "group", "kind", "forced", "calls", "received", "factors",
                 "method", "coupled", "first_ordinal", "param_grad", "stale_grad", "flags", "b", "touched",
                 "index", "partner", "slices", "sub", "layout", "batch_dim")

    def __init__(self, name: str, module: nn.Module, group: str, kind: _Kind, forced: str | None,
                 index: int) -> None:
        self.name, self.module, self.group, self.kind, self.forced = name, module, group, kind, forced
        self.index = index
        self.partner: _Site | None = None  # a MultiheadAttention's out_proj site, recorded by its hook
        self.slices: list[_Site] = []  # a MultiheadAttention's rows for cross-attention's key/value products
        self.sub = False  # one of those rows: no hooks of its own, the attention's name and group
        self.batch_dim: int | None = None  # declared by a transformer container (declared_batch_dims)
        self.reset()

    def reset(self) -> None:
        self.calls: list[_Call] = []
        self.received = 0
        self.factors: list[tuple] = []
        self.method: str | None = None
        self.coupled = False
        self.first_ordinal = 0
        self.param_grad = False
        self.stale_grad = False
        self.touched = False
        self.flags: tuple[bool, bool] = (False, False)
        self.b = -1
        self.layout: tuple = ()  # a MultiheadAttention's products this step: ((slot, rows of the weight), …)


class _Call:
    __slots__ = ("site", "x", "version", "epoch", "got", "pre")

    def __init__(self, site: _Site, x: Tensor | None, version: int, epoch: int, pre: Tensor | None) -> None:
        self.site, self.x, self.version, self.epoch, self.got = site, x, version, epoch, False
        self.pre = pre


def times_scale_sq_(t: Tensor, scale: float | Tensor) -> Tensor:
    """``t *= scale²`` in place (float64 ``t``; a tensor ``scale`` stays on the device)."""
    if isinstance(scale, Tensor):
        return t.mul_(scale.detach().to(device=t.device, dtype=torch.float64).square())
    if scale == 1.0:
        return t  # (an op saved on the per-step path, which applies the scale later)
    return t.mul_(float(scale) ** 2)


_ARMED: "weakref.WeakSet[GhostNormHooks]" = weakref.WeakSet()


@contextmanager
def suspended_ghost_hooks() -> Iterator[None]:
    """Suspend every armed :class:`GhostNormHooks` for the block (for probe passes)."""
    with ExitStack() as stack:
        for hooks in list(_ARMED):
            stack.enter_context(hooks.suspended())
        yield


def _dispatch_forward(ref: "weakref.ref[GhostNormHooks]", module: nn.Module, args: tuple, output: Any) -> None:
    """The global module forward hook: the call of a hooked module goes to its site."""
    owner = ref()
    if owner is not None:
        fn = owner._dispatch.get(id(module))
        if fn is not None:
            fn(module, args, output)


_GLOBAL_HOOKS: list[tuple["weakref.ref[GhostNormHooks]", RemovableHandle]] = []
"""Every registered global hook with its owner (weakly)."""


class GhostNormHooks:
    """Exact per-sample squared gradient norms of ``modules``, from the training backward.

    One global module forward hook is registered by :meth:`attach` (or :meth:`arm`) and removed
    by :meth:`unhook`; registered but disarmed, it costs a lookup and an attribute check per
    hooked module's forward.  While armed (:meth:`arm`), each forward call of a hooked module stores its input
    (detached, no copy) and puts a hook on its output (for ``nn.MultiheadAttention``: finds its
    products' nodes in the output's graph, keeps their saved inputs and puts a pre-hook on each);
    when the output's gradient arrives in the
    backward, the module's per-sample squared norms are computed there, the stored input is
    released, and the result lands in the module's row of a buffer on the device (in the step's
    compute dtype, summed in float64 when read).  Read it after the backward with :meth:`read`
    (which also resets it for the next step)::

        hooks = GhostNormHooks(covered)      # covered, uncovered = plan(model)
        hooks.arm()                          # measured steps: before the forward
        loss = per_sample_losses.mean() / A
        loss.backward()
        norms = hooks.read(scale=m * A)      # ‖∇ℓ_i‖², float64, [m]
        hooks.unhook()                       # no forward hook until the next measured forward

    Args:
        modules: qualified name → module (supported kinds only: see :meth:`supported`).
        group_of: module name → group name (default: the module's own name).
        method: force a route, ``"ghost"`` or ``"materialize"``, for every module or per module
            name (default: the memory rule ``2T² < d_in·d_out``).  Ignored by normalization layers.
        verify_every_step: check on every backward (not only the first after :meth:`arm`) that
            no hooked parameter received gradient while its module's output received none — the
            sign of a weight used outside its module's ``forward``.  The check costs one
            autograd hook call per parameter and backward; the usage it detects is structural,
            so by default it runs on the first measured backward after each :meth:`arm` only.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        group_of: Mapping[str, str] | None = None,
        method: str | Mapping[str, str] | None = None,
        verify_every_step: bool = False,
        batch_dims: Mapping[str, int] | None = None,
    ) -> None:
        group_of = dict(group_of or {})
        batch_dims = dict(batch_dims or {})
        self.verify_every_step = verify_every_step
        self._sites: list[_Site] = []
        seen: dict[int, str] = {}
        for name, module in modules.items():
            kind, reason = _kind_of(module)
            if kind is None:
                raise ValueError(f"module {name!r} is not supported: {reason}")
            if id(module) in seen:
                raise ValueError(f"module {name!r} is the same object as {seen[id(module)]!r}")
            seen[id(module)] = name
            forced = method.get(name) if isinstance(method, Mapping) else method
            if forced not in (None, GHOST, MATERIALIZE):
                raise ValueError(f"method must be 'ghost', 'materialize' or None, got {forced!r}")
            self._sites.append(_Site(name, module, group_of.get(name, name), kind, forced, len(self._sites)))
            self._sites[-1].batch_dim = batch_dims.get(name)
        # a sequence-first model: layers outside the transformer modules may see the batch in
        # dimension 1 too; each call's layout is then read off its shape (arm(batch_size=…))
        self.sequence_first = any(dim == 1 for dim in batch_dims.values()) or any(
            isinstance(m, nn.MultiheadAttention) and not m.batch_first for m in modules.values())
        self._batch: int | None = None
        by_module = {id(site.module): site for site in self._sites}
        for site in list(self._sites):
            if site.kind is _ATTENTION:
                out = by_module.get(id(site.module.out_proj))
                site.partner = out  # (its own forward hook stays: a direct call of out_proj is a call too)
                for _ in range(2):  # cross-attention: the key's and the value's rows of in_proj_weight
                    sub = _Site(site.name, site.module, site.group, _ATTENTION, site.forced, len(self._sites))
                    sub.sub = True
                    site.slices.append(sub)
                    self._sites.append(sub)
        self._modules = sum(not site.sub for site in self._sites)  # the sub-rows come last
        # read_sums folds each sub-row into its attention's row (None: no sub-rows)
        self._fold: Tensor | None = None
        if self._modules < len(self._sites):
            owner = list(range(self._modules)) + [main.index for main in self._sites for _ in main.slices]
            self._fold = torch.tensor(owner)
        self._group_rows: dict[str, list[int]] = {}
        for site in self._sites:
            self._group_rows.setdefault(site.group, []).append(site.index)
        self._armed = False
        self._handle: RemovableHandle | None = None  # the global forward hook, while attached
        self._dispatch: dict[int, Callable] = {  # id(module) → its site's recorder
            id(site.module): self._forward_hook(site) for site in self._sites if not site.sub}
        self._param_handles: list[RemovableHandle] = []
        self._epoch = 0
        self.seconds = 0.0
        """Wall time spent in the forward and gradient hooks (read and reset by the callback that
        charges it to the overhead budget)."""
        self._scratch = _Scratch()
        self._touched: list[_Site] = []
        self._reset_step()

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def supported(module: nn.Module) -> str | None:
        """``None`` when ``module``'s own parameters can be covered, else the reason."""
        return _kind_of(module)[1]

    @property
    def attached(self) -> bool:
        return self._handle is not None

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def module_names(self) -> tuple[str, ...]:
        """The hooked modules' names, in the order of :meth:`read_sums`."""
        return tuple(site.name for site in self._sites if not site.sub)

    @property
    def problems(self) -> tuple[str, ...]:
        """What the hooks reported since the last read (what :meth:`read` would raise with)."""
        return tuple(self._problems)

    @property
    def workspace_bytes(self) -> int:
        """Bytes held in reusable CPU work buffers (released by :meth:`disarm`)."""
        return self._scratch.nbytes

    def attach(self) -> None:
        """Register the forward hook (a no-op while it is registered).

        One *global* module forward hook (``torch.nn.modules.module.register_module_forward_hook``)
        that dispatches by module to the hooked sites, not a hook on each module: global hooks run
        before a module's own, so a user's hook that returns a new output (registered before or
        after ours) cannot put itself between the module's product and the gradient we read; and
        PyTorch's eval-mode fast path of ``TransformerEncoderLayer``, which is refused while the
        layer or a child carries a forward hook, stays available to the user's own ``no_grad``
        forwards — a module hook changed the user's validation values in the last bits."""
        if self._handle is not None:
            return
        # the process-wide hook holds this object weakly; the hook of an object collected without
        # unhook() is removed at the next attach() of any instance (never from a finalizer: the
        # garbage collector may run while torch iterates over the global hooks)
        for ref, handle in list(_GLOBAL_HOOKS):
            if ref() is None:
                handle.remove()
                _GLOBAL_HOOKS.remove((ref, handle))
        self._handle = register_module_forward_hook(functools.partial(_dispatch_forward, weakref.ref(self)))
        _GLOBAL_HOOKS.append((weakref.ref(self), self._handle))

    def unhook(self) -> None:
        """Remove the forward hook only (armed state, gradient hooks, recorded calls and work
        buffers stay): it exists from a measured step's forward to its backward, so every other
        module call of the process takes PyTorch's hook-free fast path."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        handle.remove()
        _GLOBAL_HOOKS[:] = [(ref, h) for ref, h in _GLOBAL_HOOKS if h is not handle]

    def arm(self, batch_size: int | None = None) -> None:
        """Record the following forwards (attaches the forward hook if needed).  Otherwise a
        no-op when armed; when not, drops anything left from an unread step.

        ``batch_size`` (needed only by a sequence-first model, :attr:`sequence_first`): the
        batch's size, by which each call's batch dimension (0 or 1) is found."""
        self.attach()
        self._batch = batch_size
        if self._armed:
            return
        self.clear()
        for site in self._sites:
            if site.sub:
                continue
            for p in site.module.parameters(recurse=False):  # (out_proj, when hooked, is a site of its own)
                if p.requires_grad:
                    self._param_handles.append(
                        p.register_post_accumulate_grad_hook(functools.partial(self._param_hook, site)))
        self._armed = True
        _ARMED.add(self)

    def disarm(self) -> None:
        """Stop recording new forwards (gradients of already recorded calls are still taken) and
        release the work buffers."""
        self._armed = False
        self._remove_param_hooks()
        self._scratch.clear()
        _ARMED.discard(self)

    def _remove_param_hooks(self) -> None:
        for h in self._param_handles:
            h.remove()
        self._param_handles.clear()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Disarm for the block (probe passes run while armed), then restore."""
        was = self._armed
        self._armed = False
        try:
            yield
        finally:
            self._armed = was

    def clear(self) -> None:
        """Drop stored activations, pending calls and results."""
        self._epoch += 1
        for site in self._touched:
            site.reset()
        self._touched.clear()
        self._reset_step()

    def detach(self) -> None:
        """Remove every hook and drop all state."""
        self.disarm()
        self.unhook()
        self.clear()

    def _reset_step(self) -> None:
        # one row per hooked module, allocated at the step's first recorded forward in its
        # compute dtype (widened, never narrowed: _row_for); each module's per-sample values
        # land in its row (unused modules keep zeros)
        self._rows: Tensor | None = None
        self._row_views: tuple[Tensor, ...] = ()
        self._problems: list[str] = []
        self._ordinal = 0
        self._coupled_upto = 0
        self._guessed: list[str] = []  # sequence-first: layers whose batch dimension was guessed
        self._length_is_batch = False  # … and a sequence length equal to the batch size was seen
        self._length_reported = False

    # -- hooks -------------------------------------------------------------------------------

    def _forward_hook(self, site: _Site) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._armed:
                return None
            started = time.perf_counter()
            self._record(site, module, args, output)
            self.seconds += time.perf_counter() - started
            return None

        return hook

    def _record(self, site: _Site, module: nn.Module, args: tuple, output: Any) -> None:
        if site.kind is _ATTENTION:
            self._record_attention(site, module, output)
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return  # no gradient will flow (no_grad, inference, everything frozen)
        params = module._parameters  # faster than Module.__getattr__
        w = params.get("weight")
        c = params.get("bias")
        wt = w is not None and w.requires_grad
        bt = c is not None and c.requires_grad
        if not (wt or bt):
            return
        if not args:
            self._problems.append(f"{site.name}: input passed by keyword")
            return
        x = args[0]
        problem = site.kind.check(module, x)
        if problem is not None:
            self._problems.append(f"{site.name}: {problem}")
            return
        if isinstance(site.kind, _BatchNormKind) and site.kind.batch_stats(module):
            site.coupled = True
            self._coupled_upto = self._ordinal + 1
        dim = self._batch_dim(site, module, x) if self.sequence_first else 0
        if isinstance(dim, str):
            self._problems.append(f"{site.name}: {dim}")
            return
        if dim:  # [T, B, …]: recorded as [B, T, …] (a view), its gradient likewise
            x = x.transpose(0, 1)
        x = x.detach()  # (once: kept, and read by precompute)
        call = self._new_call(site, x if site.kind.needs_input(wt, bt) else None, x.shape[0], x.device, wt, bt,
                              site.kind.precompute(x, wt, site.forced), _compute_dtype(x.dtype, output.dtype))
        if call is not None:
            output.register_hook(functools.partial(self._grad_hook_t if dim else self._grad_hook, call))

    def _batch_dim(self, site: _Site, module: nn.Module, x: Tensor) -> int | str:
        """Which dimension of ``x`` holds the batch, in a sequence-first model (a problem when
        that cannot be told).

        A layer outside PyTorch's transformer layers is *guessed*: by the dimension of size ``B``
        among the first two.  When a sequence length in the step equals ``B`` (seen by a declared
        layer or an attention) no guess is trusted: a layer on ``[T, 1, d]`` or ``[T, d]`` — a
        positional embedding shared by the batch — would pass for a batch-first one.  The step
        is then reported."""
        least = site.kind.sequence_dims(module)
        if least is None:
            return 0
        batched = x.dim() >= least
        if site.batch_dim is not None:
            if batched and self._batch is not None and x.shape[1 - site.batch_dim] == self._batch:
                self._note_lengths(length_is_batch=True)
            return site.batch_dim if batched else 0
        self._note_lengths(guessed=site.name)
        if not batched:
            return 0
        B = self._batch
        if B is None:
            return ("a sequence-first model and no batch size (arm(batch_size=…)): which dimension of "
                    f"{tuple(x.shape)} holds the batch cannot be told")
        first, second = x.shape[0] == B, x.shape[1] == B
        if first and second:
            return (f"input {tuple(x.shape)}: dimensions 0 and 1 both have the batch size {B} (sequence length "
                    "= batch size) in a sequence-first model, so which holds the batch cannot be told")
        return 1 if second else 0  # (neither: reported as mismatched batch sizes)

    def _note_lengths(self, guessed: str | None = None, length_is_batch: bool = False) -> None:
        if guessed is not None and guessed not in self._guessed:
            self._guessed.append(guessed)
        self._length_is_batch = self._length_is_batch or length_is_batch
        if self._guessed and self._length_is_batch and not self._length_reported:
            self._length_reported = True
            self._problems.append(
                f"a sequence length equals the batch size ({self._batch}) in a sequence-first model: whether "
                f"{', '.join(self._guessed)} (outside PyTorch's transformer layers) see the batch or positions shared "
                "by the batch (e.g. a positional embedding) cannot be told")

    def _new_call(self, site: _Site, x: Tensor | None, b: int, device: torch.device, wt: bool, bt: bool,
                  pre: Tensor | None, dtype: torch.dtype) -> _Call | None:
        """Book one forward call of ``site`` (``None`` when it cannot be recorded: reported).
        ``dtype``: the call's compute dtype, the step's rows' dtype when it is the first call."""
        if site.calls and site.received == len(site.calls):
            self._problems.append(
                f"{site.name}: forward recorded again after its backward; call read() or clear() "
                "between steps")
            return None
        if self._rows is None:
            # in the compute dtype (fp32 for an fp32 or autocast model), so that each module's last
            # op writes its [b] values here itself — a reduction into a wider dtype would first
            # cast its whole input; the rows are summed in float64 when read (the same values and
            # order as float64 rows: an fp32 value converts exactly)
            self._rows = torch.zeros((len(self._sites), b), dtype=dtype, device=device)
            self._row_views = self._rows.unbind(0)
        self._ordinal += 1
        if not site.calls:
            if not site.touched:
                site.touched = True
                self._touched.append(site)
            site.first_ordinal = self._ordinal
            site.flags = (wt, bt)
        call = _Call(site, x, x._version if x is not None else 0, self._epoch, pre)
        site.calls.append(call)
        return call

    def _record_attention(self, site: _Site, module: nn.Module, output: Any) -> None:
        """A MultiheadAttention call: its in-projection (this site) and out-projection (the partner
        site) are matched in the output's autograd graph; each gets a hook on its product's node
        that receives the product's output gradient (ghost_attention)."""
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, Tensor) or not out.requires_grad:
            return
        if out.dim() != 3:
            self._problems.append(f"{site.name}: unbatched input (the batch must be a dimension of a 3-D input)")
            return
        B, L = ghost_attention.batch_and_length(module, out.shape)
        found, problem = ghost_attention.find_projections(module, out, B, L)
        if problem is not None:
            self._problems.append(f"{site.name}: {problem}")
            return
        if self.sequence_first and any(p.T == B for p in found if p.slot != ghost_attention.OUT):
            self._note_lengths(length_is_batch=True)  # (query or memory length = batch size)
        layout = tuple(sorted((p.slot, p.width) for p in found if p.slot != ghost_attention.OUT))
        if layout and site.calls and layout != site.layout:
            # a whole-weight product and row-block products of one weight have cross terms
            self._problems.append(f"{site.name}: called as self- and as cross-attention (or with key = value and "
                                  "key != value) in one step; per-sample norms of that weight sharing are not "
                                  "implemented")
            return
        if layout:
            site.layout = layout
        (w_in, c_in), (w_out, c_out) = ghost_attention.projection_parameters(module)
        for proj in found:
            if proj.slot == ghost_attention.OUT:
                target, w, c = site.partner, w_out, c_out
            else:
                target, w, c = (site if proj.slot == 0 else site.slices[proj.slot - 1]), w_in, c_in
            if target is None:
                continue
            wt, bt = w.requires_grad, c is not None and c.requires_grad
            T = proj.T  # rows are position-major: [T·B, d] → [B, T, d] (a view)
            x = proj.rows.detach().view(T, B, -1).transpose(0, 1) if wt else None
            call = self._new_call(target, x, B, out.device, wt, bt, None, _compute_dtype(out.dtype))
            if call is not None:
                proj.node.register_prehook(functools.partial(self._node_hook, call, T, B))

    def _node_hook(self, call: _Call, T: int, B: int, grad_outputs: tuple) -> None:
        grad = grad_outputs[0]
        if grad is not None:
            self._grad_hook(call, grad.view(T, B, -1).transpose(0, 1))

    def _grad_hook_t(self, call: _Call, grad: Tensor) -> None:
        self._grad_hook(call, grad.transpose(0, 1))

    def _grad_hook(self, call: _Call, grad: Tensor) -> None:
        started = time.perf_counter()
        try:
            self._on_grad(call, grad)
        finally:
            self.seconds += time.perf_counter() - started

    def _on_grad(self, call: _Call, grad: Tensor) -> None:
        site = call.site
        if call.epoch != self._epoch:  # recorded before a clear(): ignored
            site.stale_grad = True
            if not site.touched:
                site.touched = True
                self._touched.append(site)
            return
        if call.got:
            self._problems.append(f"{site.name}: two backward passes through one recorded forward")
            return
        call.got = True
        site.received += 1
        x, pre = call.x, call.pre
        call.x = call.pre = None
        single = len(site.calls) == 1
        if x is not None and x._version != call.version and not (single and pre is not None):
            self._problems.append(f"{site.name}: its input was modified in place after the forward")
            return
        try:
            dev = grad.device.type
            if torch.is_autocast_enabled(dev):  # backward called inside autocast: compute as told
                with torch.autocast(dev, enabled=False):
                    self._compute(site, x, grad, single, pre)
            else:
                self._compute(site, x, grad, single, pre)
        except RuntimeError as err:  # shape mismatch between shared calls, …
            self._problems.append(f"{site.name}: {err}")

    def _compute(self, site: _Site, x: Tensor | None, grad: Tensor, single: bool, pre: Tensor | None) -> None:
        wt, bt = site.flags
        if single:
            cd = _compute_dtype(grad.dtype, x.dtype if x is not None else grad.dtype)
            row: Tensor | None = self._row_for(site, cd)
            if len(row) != grad.shape[0]:
                row = None  # mismatched batch sizes: _add reports them
            sq, site.method = site.kind.single(site.module, x, grad, wt, bt, site.forced, self._scratch, pre, row)
            self._add(site, sq)
        else:
            site.factors.append(site.kind.factor(site.module, x, grad, wt, bt))
            if site.received == len(site.calls):
                self._finish(site)

    def _param_hook(self, site: _Site, p: Tensor) -> None:
        if self._armed:
            site.param_grad = True
            if not site.touched:
                site.touched = True
                self._touched.append(site)

    def _finish(self, site: _Site) -> None:
        wt, bt = site.flags
        f = site.factors[0] if len(site.factors) == 1 else site.kind.concat(site.factors)
        site.factors = []
        sq, site.method = site.kind.norms(site.module, f, wt, bt, site.forced, self._scratch)
        self._add(site, sq)

    def _add(self, site: _Site, sq: Tensor) -> None:
        # one [b] vector per module and step (usually written in place by the module's last op);
        # summed per group in float64 by read() with a constant number of ops
        site.b = sq.shape[0]
        if sq is not self._row_views[site.index]:
            self._row_for(site, sq.dtype).copy_(sq)

    def _row_for(self, site: _Site, dtype: torch.dtype) -> Tensor:
        """``site``'s row, the rows first widened when ``dtype`` is wider (a float64 layer in a
        model whose first call was fp32: never narrowed, so no value is rounded)."""
        assert self._rows is not None
        wider = _compute_dtype(dtype, self._rows.dtype)
        if wider != self._rows.dtype:
            self._rows = self._rows.to(wider)
            self._row_views = self._rows.unbind(0)
        return self._row_views[site.index]

    # -- results -----------------------------------------------------------------------------

    def read(self, scale: float | Tensor = 1.0) -> PerSampleNorms | None:
        """Per-sample squared norms of the last backward, times ``scale²``; resets the step.

        Args:
            scale: ``m·A/S`` (see the module docstring); a number or a 0-d tensor (it is never
                moved to the host).

        Returns:
            ``None`` when nothing was recorded, or when some recorded call of a module received
            no gradient at all (read before the backward, or a module whose output did not reach
            the loss).

        Raises:
            RuntimeError: when exact values cannot be produced (unbatched input, an input
                modified in place, a second backward through the same forward, parameters that
                received gradient although their module's recorded calls did not, mismatched
                batch sizes).
        """
        try:
            return self._read(scale)
        finally:
            self.clear()

    def read_sums(self, scale: float | Tensor = 1.0) -> Tensor | None:
        """``[len(modules)]`` float64 ``Σ_i ‖∇ℓ_i‖²`` restricted to each hooked module (in the
        order of ``modules``; zero for a module that did not run), times ``scale²`` — what
        :meth:`read` gives summed over the samples, with the same checks, in one op (two with a
        scale) instead of the per-module vectors. ``GradientDispersion``'s per-step path reads at
        scale 1 and applies the batch's scale where it folds the sums into its row. Resets the step."""
        try:
            if self._validated() is None:
                return None
            sums = self._rows64().sum(1)
            if self._fold is not None:  # cross-attention's key/value rows belong to their attention
                if self._fold.device != sums.device:
                    self._fold = self._fold.to(sums.device)
                sums = torch.zeros(self._modules, dtype=sums.dtype, device=sums.device).index_add_(0, self._fold, sums)
            return times_scale_sq_(sums, scale)
        finally:
            self.clear()

    def _validated(self) -> list[_Site] | None:
        """The modules recorded this step, once every check passed (``None``: nothing to read)."""
        if self._problems:
            raise RuntimeError("ghost norms unavailable: " + "; ".join(self._problems))
        for site in self._touched:
            if site.param_grad and site.received == 0 and not site.stale_grad:
                raise RuntimeError(
                    f"ghost norms unavailable: parameters of {site.name!r} received gradient but no "
                    "recorded forward call of it did (weights used outside the module's forward, or "
                    "armed after the forward)")
        recorded = [s for s in self._touched if s.calls]
        if not recorded or any(s.received == 0 for s in recorded):
            return None
        if self._param_handles and not self.verify_every_step:
            self._remove_param_hooks()  # the structure was verified on this backward
        for site in recorded:
            if site.factors:  # shared module whose other calls got no gradient (they add zero)
                with _autocast_off(site.factors[0][1]):
                    self._finish(site)
        sizes = {s.b for s in recorded}
        if len(sizes) != 1:
            raise RuntimeError(f"ghost norms unavailable: modules saw different batch sizes {sorted(sizes)}")
        return recorded

    def _rows64(self) -> Tensor:
        """The step's rows in float64 (a copy when they are narrower: exact)."""
        rows = self._rows
        assert rows is not None
        return rows if rows.dtype == torch.float64 else rows.double()

    def _read(self, scale: float | Tensor) -> PerSampleNorms | None:
        recorded = self._validated()
        if recorded is None:
            return None
        rows = self._rows64()
        views = rows.unbind(0) if rows is not self._rows else self._row_views
        times_scale_sq_(rows, scale)
        total = rows.sum(0)  # rows of modules that did not run are zero
        per_group: dict[str, Tensor] = {}
        for g, members in self._group_rows.items():
            acc = views[members[0]]
            if len(members) > 1:
                acc = acc + views[members[1]]
                for i in members[2:]:
                    acc.add_(views[i])
            per_group[g] = acc
        recorded.sort(key=lambda s: s.first_ordinal)
        # (an attention's route is its query product's, as predict_methods predicts it)
        methods = {s.name: s.method for s in recorded if s.method is not None and not s.sub}
        exactness = {
            s.name: DECOMPOSITION if (s.coupled or s.first_ordinal < self._coupled_upto) else EXACT
            for s in recorded if not s.sub
        }
        return PerSampleNorms(total=total, per_group=per_group, methods=methods, exactness=exactness)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        group_of: Mapping[str, str] | None = None,
        method: str | Mapping[str, str] | None = None,
    ) -> GhostNormHooks:
        """Hooks on every covered module of ``model``; raises when some trainable parameter is
        not covered (mixing covered and uncovered parameters would be silently wrong)."""
        covered, uncovered = plan(model)
        if uncovered:
            items = [f"{k} ({v})" for k, v in list(uncovered.items())[:6]]
            raise ValueError("ghost norms cannot cover: " + ", ".join(items)
                             + (f" and {len(uncovered) - 6} more" if len(uncovered) > 6 else ""))
        return cls(covered, group_of=group_of, method=method, batch_dims=declared_batch_dims(model))


__all__ = [
    "DECOMPOSITION",
    "DECOMPOSITION_BN",
    "EXACT",
    "GHOST",
    "GOODFELLOW",
    "GhostNormHooks",
    "MATERIALIZE",
    "PerSampleNorms",
    "declared_batch_dims",
    "plan",
    "predict_methods",
    "suspended_ghost_hooks",
]
