"""The convolution rule (``Conv1d/2d/3d``): patches as a Linear on ``T`` output positions per
group, the patch Gram without unfolding where cheaper, work buffers in chunks of samples
(package docstring: *Convolution*)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.conv import _ConvNd

from genbounds.estimators.ghost_norms.base import (
    _FRESH,
    GHOST,
    MATERIALIZE,
    _as,
    _cat_pairs,
    _compute_dtype,
    _dot_,
    _ghost_or_materialize,
    _Kind,
    _prod,
    _Scratch,
    _sum_into,
    _sum_sq_,
    _vecdot,
    _with_bias_,
)


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

    def single(self, module, x, g, wt, bt, forced, scratch=_FRESH, out=None):
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
