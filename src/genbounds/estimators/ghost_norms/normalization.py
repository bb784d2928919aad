"""The rules of the normalization layers' affine parameters: LayerNorm, RMSNorm, GroupNorm,
InstanceNorm, BatchNorm (eval mode exact; train mode a decomposition) (package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genbounds.estimators.ghost_norms.base import (
    _FRESH,
    DECOMPOSITION_BN,
    MATERIALIZE,
    _as,
    _compute_dtype,
    _Kind,
    _prod,
    _sum_sq_,
    _vecdot,
)


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

    def single(self, module, x, g, wt, bt, forced, scratch=_FRESH, out=None):
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
