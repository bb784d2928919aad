"""Which rule handles which module (``_kind_of``), which trainable parameters the hooks can
cover (:func:`plan`), the batch dimension a transformer container declares
(:func:`declared_batch_dims`) and the route each layer will take (:func:`predict_methods`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from genbounds.estimators import ghost_attention
from genbounds.estimators.ghost_norms.base import _Kind
from genbounds.estimators.ghost_norms.conv import _ConvKind
from genbounds.estimators.ghost_norms.embedding import _EmbeddingKind
from genbounds.estimators.ghost_norms.linear import _AttentionKind, _linear_route, _LinearKind
from genbounds.estimators.ghost_norms.normalization import (
    _BatchNormKind,
    _GroupNormKind,
    _InstanceNormKind,
    _LayerNormKind,
    _RMSNormKind,
)

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
        if reason is None and not attention and any(n not in ("weight", "bias") for n, _ in own):
            # (a reparametrized layer — torch.nn.utils.prune's weight_orig, the old weight_norm's
            # weight_g and weight_v — computes its weight before the forward: the layer rule's
            # per-sample gradient is that of the computed weight, not of these parameters)
            reason = (f"{', '.join(n for n, _ in own if n not in ('weight', 'bias'))}: not the layer's weight or bias "
                      "(a reparametrization: torch.nn.utils.prune, weight_norm)")
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
