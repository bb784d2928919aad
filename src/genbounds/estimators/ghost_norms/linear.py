"""The Linear rule (Goodfellow's factorization for ``[b, d]`` inputs; ghost or materialized
for sequences), and ``nn.MultiheadAttention``'s projections, which follow it (package
docstring: *Linear*, *nn.MultiheadAttention*)."""

from __future__ import annotations

import torch
from torch import Tensor

from genbounds.estimators import ghost_attention
from genbounds.estimators.ghost_norms.base import (
    _FRESH,
    GHOST,
    GOODFELLOW,
    MATERIALIZE,
    _as,
    _cat_pairs,
    _compute_dtype,
    _ghost_or_materialize,
    _Kind,
    _prod,
    _rowsq,
    _seq_weight_sq,
    _vecdot,
)


class _LinearKind(_Kind):
    defers_rows = True

    def check(self, module, x):
        if not isinstance(x, Tensor) or x.dim() < 2:
            return "unbatched input (the batch must be dimension 0)"
        return None

    def single(self, module, x, g, wt, bt, forced, scratch=_FRESH, out=None):
        if g.dim() == 2 and forced != MATERIALIZE:  # [b, d]: Goodfellow
            cd = _compute_dtype(g.dtype, x.dtype if x is not None else g.dtype)
            d2 = _rowsq(_as(g, cd))
            if not wt:
                return d2, GOODFELLOW
            a2 = _rowsq(_as(x, cd))
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


def goodfellow_row_norms(x: Tensor | None, g: Tensor, g_out: Tensor, a_out: Tensor) -> None:
    """A 2-D call's row norms ``‖δ_i‖`` (of the output gradient ``g``) and ``‖a_i‖`` (of the input
    ``x``; zeros for a frozen weight, ``x`` ``None``) written into ``g_out`` and ``a_out``: the
    Goodfellow factors, squared and combined for all layers at once by :func:`goodfellow_rows`
    (two ops a layer in the backward where squaring and combining there took five)."""
    torch.linalg.vector_norm(g, dim=1, out=g_out)
    if x is not None:
        torch.linalg.vector_norm(x, dim=1, out=a_out)
    else:
        a_out.zero_()


LOADED_KERNELS_ONLY = {"cpu"}
"""Devices where :func:`goodfellow_rows` runs only kernels a training step has loaded (its
first call of another maps library code into the process: memory, not time)."""


def goodfellow_rows(g_norms: Tensor, a_norms: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """``‖∇_W ℓ_i‖² + ‖∇_c ℓ_i‖² = ‖δ_i‖² (‖a_i‖² + 1)`` per layer row from the row norms of
    :func:`goodfellow_row_norms` (``[layers, b]`` each); ``bias`` (``[layers, 1]``) is 1 where the
    layer's bias is trainable, else 0. Three ops for every layer together; four on the CPU, whose
    products and sums run kernels that training has loaded (an ``addcmul`` mapped another 0.3 MiB
    of library code there: docs/results/overhead.md), rounding the sum once more (a row may
    differ from the fused one in its last bit)."""
    if g_norms.device.type in LOADED_KERNELS_ONLY:
        return torch.mul(a_norms, a_norms, out=out).add_(bias).mul_(g_norms).mul_(g_norms)
    return torch.addcmul(bias, a_norms, a_norms, out=out).mul_(g_norms).mul_(g_norms)


def _linear_route(forced: str | None, T: int, d_in: int, d_out: int) -> str:
    """The route a Linear on ``T`` positions takes (and reports)."""
    m = _ghost_or_materialize(forced, T, d_in, d_out)
    return GOODFELLOW if (m == GHOST and T == 1) else m


class _AttentionKind(_LinearKind):
    """``nn.MultiheadAttention`` (packed ``in_proj_weight``, either ``batch_first``): its in-projection is a
    Linear on sequences whose input rows and output gradient are taken from the product's node in
    the autograd graph (:mod:`genbounds.estimators.ghost_attention`; recorded by
    ``GhostNormHooks._record_attention``, not by the Linear's ``check``); its
    ``out_proj``, when hooked, is a site of its own that the same forward hook records."""

    defers_rows = False

    def method_for(self, module, input_shape, forced):
        return _linear_route(forced, ghost_attention.batch_and_length(module, input_shape)[1], module.embed_dim,
                             3 * module.embed_dim)

    def sequence_dims(self, module):
        return None  # (its own layout: batch_first; ghost_attention.batch_and_length)
