"""The Embedding rule: a ghost form masked by index equality, or the per-sample rows summed
by sorted keys when ``2T ≥ d`` (package docstring: *Embedding*)."""

from __future__ import annotations

import torch
from torch import Tensor

from genbounds.estimators.ghost_norms.base import (
    _FRESH,
    GHOST,
    GOODFELLOW,
    MATERIALIZE,
    _as,
    _cat_pairs,
    _compute_dtype,
    _Kind,
    _prod,
    _vecdot,
)


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
