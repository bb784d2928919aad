"""Per-sample losses recovered from the user's own (reduced) loss calls, without a second forward.

A LightningModule's ``training_step`` typically returns ``F.cross_entropy(logits, y)``: a scalar.
The estimators need the per-sample losses ``ℓ_1 … ℓ_b`` with ``(1/b) Σ_i ℓ_i = L``. While
:class:`LossCapture` is active, every call to a supported loss of :mod:`torch.nn.functional`
(directly or through the ``nn.*Loss`` modules, which call them) is

1. executed exactly as the user wrote it — the user gets the very tensor the call returns without
   the mode (bit-identical value and gradients), and
2. recomputed once more on the very same input tensors with ``reduction="none"`` (the autograd
   graph back to the model is kept; no model forward is repeated), giving the per-element losses
   ``e`` of a :class:`CapturedLoss` record.

Reduction semantics (``D`` = the denominator, ``e`` = the ``reduction="none"`` output)::

    'sum'        L = Σ_e e
    'mean'       L = Σ_e s_e e / D
    'batchmean'  L = Σ_e e / input.size(0)                       (kl_div only)

with ``s_e = 1`` except for ``ctc_loss`` (``s_n = 1 / max(target_length_n, 1)``) and

* ``cross_entropy`` / ``nll_loss`` with class-index targets: ``D = Σ_{e: y_e ≠ ignore_index}
  w[y_e]`` (``w ≡ 1`` without ``weight``: the number of non-ignored targets); ignored elements are
  0 in ``e``. ``label_smoothing`` keeps this denominator (with and without ``weight``: torch
  normalizes the smoothing term by the same ``Σ w[y_e]``);
* ``cross_entropy`` with probability ("soft") targets: ``D = numel(input) / C`` = ``numel(e)``,
  whatever ``weight`` and ``label_smoothing`` (the weights only enter ``e``);
* ``mse_loss`` / ``l1_loss`` with ``weight``: ``D = Σ weight`` (``e`` already holds ``w·err``);
* everything else (including ``huber_loss`` with ``weight``, ``binary_cross_entropy*`` with
  ``weight``/``pos_weight``, ``kl_div(reduction='mean')``, ``gaussian_nll_loss``): ``D = numel(e)``.

Per-sample losses. With ``S_i = Σ_{e ∈ sample i} s_e e`` (the elements of sample ``i``)::

    'mean', 'batchmean':  ℓ_i = b · S_i / D     so that  (1/b) Σ_i ℓ_i = L
    'sum':                ℓ_i = S_i             so that       Σ_i ℓ_i = L

e.g. token-level cross-entropy with ``ignore_index``: ``ℓ_i = b · Σ_{valid tokens t of i} ℓ_it /
N_valid``. Elements map to samples by the leading axis of ``e``: length ``b`` → row ``i`` is
sample ``i``; length ``k·b`` (a ``[b, T, V]`` or ``[T, b, V]`` tensor flattened with
``.view(-1, V)``) → the layout is read from the view base of the inputs (``_base.shape[0] == b``:
sample-major, row ``r`` belongs to sample ``r // k``; ``_base.shape[1] == b`` (also a slice
along ``T`` of such a base): time-major, row ``r`` belongs to sample ``r mod b``), else
sample-major is assumed and flagged (``layout_assumed``; also when the base is ``[b, b, …]``).
Any other leading length is not mappable (a 0-d loss maps to a batch of one).

A training loss that combines several captured losses (``0.7·ce + 0.3·mse``, or ``ce + λ‖w‖²``)
is handled by :func:`loss_coefficients` (``c_k = ∂L/∂L_k``) and :func:`combined_per_sample`.

``torch.func``: the mode works *inside* a transformed function (``vmap(grad(f))`` with the mode
entered in ``f``; ``batch_size`` is then the batch that ``f`` sees, typically 1). There a
'mean' is normalized by the *sample's own* denominator (its own ``w[y_i]`` or number of valid
tokens), not the batch's — as the user's loss on that one sample would be. A loss called under a
transform that was entered *after* the mode (the mode outside ``vmap``) is refused with a clear
``RuntimeError`` (or skipped, ``on_transform='skip'``): its tensors would be per-sample slices
escaping the transform, and the shapes the mode sees are not the batch's.
"""

from __future__ import annotations

import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import _reduction as _legacy_reduction
from torch.overrides import TorchFunctionMode

__all__ = [
    "CapturedLoss",
    "LossCapture",
    "SUPPORTED_LOSSES",
    "combined_per_sample",
    "loss_coefficients",
]

_HALF = (torch.float16, torch.bfloat16)
_RTOL = 1e-5
_RTOL_HALF = 1e-2
_EMPTY: dict[str, Any] = {}

_DYNAMIC_LAYER = torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode


def _transform_level() -> int | None:
    """The innermost ``torch.func`` transform's level (``None`` outside any), read without
    creating functorch's thread-local state: ``maybe_current_level()`` creates it on first use,
    and once it exists every backward of the thread copies it (the autograd engine's
    thread-local state: about 56 small allocations a step on the MLP benchmark, where plain
    training makes none, ``benchmarks/memory_breakdown.py``). A transform puts its dispatch key
    in the thread's included set while it runs, so outside one the state is never touched."""
    if not torch._C._dispatch_tls_is_dispatch_key_included(_DYNAMIC_LAYER):
        return None
    return torch._C._functorch.maybe_current_level()


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CapturedLoss:
    """One captured call of a loss function.

    ``value`` is what the user's call returned (same tensor object, with its graph); ``elements``
    the ``reduction="none"`` output on the same inputs (also with graph; ``elements is value``
    when the user asked for ``reduction="none"``). ``value = Σ s·elements / denominator`` for
    ``combine`` ``'mean'``/``'batchmean'`` and ``Σ elements`` for ``'sum'`` (``s`` =
    ``element_scale``, only for ``ctc_loss``). ``consistent`` is a 0-d boolean tensor on the
    loss's device, the record-time check that this reconstruction reproduces ``value`` (relative
    tolerance ``1e-5``, ``1e-2`` for float16/bfloat16 inputs); reading it (:attr:`verified`)
    synchronizes, so do it outside the hot path.
    """

    name: str
    value: Tensor
    reduction: str
    """The reduction the user's call applied: ``'mean'``, ``'sum'``, ``'none'`` or
    ``'batchmean'`` (legacy ``size_average``/``reduce`` already converted)."""
    elements: Tensor
    combine: str
    """How :meth:`per_sample` relates to ``value``: ``'mean'``/``'batchmean'``:
    ``per_sample(b).mean() == value``; ``'sum'``: ``per_sample(b).sum() == value``; ``'none'``:
    ``value`` is the element tensor itself and ``per_sample`` returns per-sample sums."""
    denominator: Tensor | float
    batch_size: int
    mappable: bool
    layout: str | None
    """``'sample'`` (sample-major rows), ``'time'`` (time-major rows) or ``None`` (not mappable),
    for ``batch_size``."""
    layout_assumed: bool
    consistent: Tensor
    detached: bool
    """The call's output carries no autograd graph (a loss computed for logging)."""
    element_scale: Tensor | None = None
    base_shapes: tuple[tuple[int, ...] | None, ...] = field(default=(), repr=False)
    """Shapes of the view bases (``t._base``) of the call's first tensor arguments."""
    _value_version: int = field(default=0, repr=False)
    _elements_version: int = field(default=0, repr=False)
    _edge: GradientEdge | None = field(default=None, repr=False)
    _groups: int = field(default=1, repr=False)
    _leaf: bool = field(default=False, repr=False)
    """Whether the value reached the step as a leaf made by ``LossCapture(leaves=True)`` (it had
    no graph of its own: a loss computed for logging on detached tensors, too)."""
    arguments: dict[str, Any] = field(default_factory=dict, repr=False)
    """The call's arguments by name as the user passed them (``input``, ``target``,
    ``ignore_index``, …), e.g. to score the predictions behind a classification loss."""

    def map_to_samples(self, values: Tensor, batch_size: int | None = None) -> Tensor:
        """Per-sample sums ``Σ_{e ∈ sample i} values_e`` of a tensor shaped like ``elements``
        (same element-to-sample map as the losses)."""
        b = self.batch_size if batch_size is None else int(batch_size)
        layout = self._layout_for(b)
        if layout is None:
            raise ValueError(f"cannot map the elements of {self.name} to a batch of {b} samples")
        e = values.reshape(self.elements.shape)
        if e.dim() == 0:
            return e.reshape(1)
        if layout == "time":
            return e.reshape(self._decide(b)[2], b, -1).sum(dim=(0, 2))
        return e.reshape(b, -1).sum(dim=1)

    @property
    def verified(self) -> bool:
        """``bool(consistent)`` — a host synchronization."""
        return bool(self.consistent)

    def reduced(self) -> Tensor:
        """The user's reduction recomputed from ``elements`` (with graph): ``≈ value``."""
        e = _promote(self.elements)
        if self.element_scale is not None:
            e = e * self.element_scale
        if self.combine == "none":
            return e
        total = e.sum()
        return total if self.combine == "sum" else _divide(total, self.denominator)

    def per_sample(self, batch_size: int | None = None) -> Tensor:
        """``ℓ ∈ R^b``: the per-sample losses of this record (with graph).

        ``'mean'``/``'batchmean'``: ``ℓ_i = b · S_i / D`` (``mean_i ℓ_i = value``); ``'sum'``:
        ``ℓ_i = S_i`` (``Σ_i ℓ_i = value``); ``'none'``: ``ℓ_i = S_i``; where ``S_i`` sums
        sample ``i``'s (scaled) elements. Half-precision losses are returned in float32.

        Raises:
            ValueError: the elements cannot be mapped to ``batch_size`` samples, or the loss
                tensor was modified in place after the call.
        """
        b = self.batch_size if batch_size is None else int(batch_size)
        return self._sample_sums(None, b) if self.combine in ("sum", "none") else self._scaled(b)

    def _scaled(self, b: int) -> Tensor:
        return _divide(self._sample_sums(None, b) * b, self.denominator)

    def _sample_sums(self, weights: Tensor | None, b: int) -> Tensor:
        """``S_i = Σ_{e ∈ sample i} s_e w_e e`` (``w`` an optional tensor of ``elements``' shape)."""
        if self.elements._version != self._elements_version:
            raise ValueError(
                f"the output of {self.name} was modified in place after the call; "
                "its per-element losses are no longer available"
            )
        layout = self._layout_for(b)
        if layout is None:
            raise ValueError(
                f"cannot map the per-element losses of {self.name} (shape "
                f"{tuple(self.elements.shape)}) to a batch of {b} samples: the leading axis is "
                f"neither {b} nor a multiple of it (a 0-d loss maps only to a batch of 1)"
            )
        e = _promote(self.elements)
        if self.element_scale is not None:
            e = e * self.element_scale
        if weights is not None:
            e = e * weights.reshape(e.shape)
        if e.dim() == 0:
            return e.reshape(1)
        if layout == "time":
            return e.reshape(self._decide(b)[2], b, -1).sum(dim=(0, 2))
        return e.reshape(b, -1).sum(dim=1)

    def _layout_for(self, b: int) -> str | None:
        return self._decide(b)[0]

    def _decide(self, b: int) -> tuple[str | None, bool, int]:
        if b == self.batch_size:
            return self.layout, self.layout_assumed, self._groups
        return _layout(tuple(self.elements.shape), b, self.base_shapes)


def _layout(
    shape: tuple[int, ...], b: int, base_shapes: Sequence[tuple[int, ...] | None]
) -> tuple[str | None, bool, int]:
    """``(layout, assumed, groups)`` of per-element losses of ``shape`` for ``b`` samples.

    ``groups``: for the time-major layout, the rows form ``groups`` consecutive blocks of ``b``
    (×``inner``) rows — row ``r`` belongs to sample ``(r // inner) mod b``."""
    if len(shape) == 0:
        return ("sample", False, 1) if b == 1 else (None, False, 0)
    n = shape[0]
    if n == b:
        return "sample", False, 1
    if b <= 0 or n % b:
        return None, False, 0
    for bs in base_shapes:
        if bs is None or len(bs) < 2:
            continue
        if bs[0] == b:
            return "sample", bs[1] == b, 1  # [b, b, …]: sample- or time-major, cannot tell
        if bs[1] == b:
            # rows flattened from [T, b, X…]: the whole base (T groups of b·X rows), or a
            # slice along T of a [T, b, V] base (n / b groups of b rows)
            groups = bs[0] if n % (bs[0] * b) == 0 else n // b
            return "time", False, groups
    return "sample", True, 1


def _promote(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _HALF else t


def _divide(t: Tensor, d: Tensor | float) -> Tensor:
    if isinstance(d, Tensor):
        return t / d
    return t / d if d != 0 else t * float("nan")


# ---------------------------------------------------------------------------------------------
# Per-function specifications
# ---------------------------------------------------------------------------------------------


def _class_index_denominator(a: dict[str, Any], elements: Tensor) -> Tensor | float:
    """``Σ_{y_e ≠ ignore} w[y_e]`` (``cross_entropy``/``nll_loss`` with class-index targets)."""
    target: Tensor = a["target"]
    if target.is_floating_point():  # probability targets: mean over positions
        return float(elements.numel())
    valid = target != a["ignore_index"]
    weight: Tensor | None = a["weight"]
    dtype = _promote(elements).dtype
    if weight is None:
        return valid.sum().to(dtype)
    safe = target.masked_fill(~valid, 0)
    return (weight[safe] * valid).sum().to(dtype)


def _weighted_denominator(a: dict[str, Any], elements: Tensor) -> Tensor | float:
    """``Σ weight`` for ``mse_loss``/``l1_loss`` with ``weight`` (torch divides by it)."""
    weight: Tensor | None = a.get("weight")
    if weight is None:
        return float(elements.numel())
    return weight.sum().to(_promote(elements).dtype)


def _numel_denominator(a: dict[str, Any], elements: Tensor) -> Tensor | float:
    return float(elements.numel())


def _ctc_scale(a: dict[str, Any], elements: Tensor) -> Tensor:
    lengths = torch.as_tensor(a["target_lengths"], device=elements.device)
    return 1.0 / lengths.clamp(min=1).to(_promote(elements).dtype).reshape(elements.shape)


@dataclass(frozen=True)
class _Spec:
    name: str
    signature: inspect.Signature
    denominator: Callable[[dict[str, Any], Tensor], Tensor | float] = _numel_denominator
    scale: Callable[[dict[str, Any], Tensor], Tensor] | None = None


def _spec(func: Callable[..., Any], **kw: Any) -> tuple[Callable[..., Any], _Spec]:
    return func, _Spec(func.__name__, inspect.signature(func), **kw)


_SPECS: dict[Callable[..., Any], _Spec] = dict(
    [
        _spec(F.cross_entropy, denominator=_class_index_denominator),
        _spec(F.nll_loss, denominator=_class_index_denominator),
        _spec(F.mse_loss, denominator=_weighted_denominator),
        _spec(F.l1_loss, denominator=_weighted_denominator),
        _spec(F.smooth_l1_loss),
        _spec(F.huber_loss),
        _spec(F.binary_cross_entropy),
        _spec(F.binary_cross_entropy_with_logits),
        _spec(F.kl_div),
        _spec(F.poisson_nll_loss),
        _spec(F.gaussian_nll_loss),
        _spec(F.soft_margin_loss),
        _spec(F.multilabel_soft_margin_loss),
        _spec(F.multi_margin_loss),
        _spec(F.multilabel_margin_loss),
        _spec(F.hinge_embedding_loss),
        _spec(F.margin_ranking_loss),
        _spec(F.cosine_embedding_loss),
        _spec(F.triplet_margin_loss),
        _spec(F.triplet_margin_with_distance_loss),
        _spec(F.ctc_loss, scale=_ctc_scale),
    ]
)

SUPPORTED_LOSSES: frozenset[str] = frozenset(s.name for s in _SPECS.values())
"""Names of the :mod:`torch.nn.functional` losses that :class:`LossCapture` records."""


class _Unsupported(Exception):
    """A call that is deliberately not recorded."""


_state = threading.local()


def _recomputing() -> bool:
    return getattr(_state, "recomputing", False)


def _l1_weight(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Work around ``F.l1_loss`` dropping ``weight`` when it dispatches to a torch-function mode.

    ``F.l1_loss`` lists ``weight`` among its relevant arguments but does not forward it to
    ``handle_torch_function``; without this the user's weighted L1 loss would silently become
    unweighted under the mode. The value is read from the ``F.l1_loss`` frame that dispatched.
    """
    if "weight" in kwargs:
        return kwargs
    code = F.l1_loss.__code__
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            break
        if frame.f_code is code:
            weight = frame.f_locals.get("weight")
            return kwargs if weight is None else {**kwargs, "weight": weight}
        frame = frame.f_back
    return kwargs


def _consistent(
    value: Tensor, elements: Tensor, scale: Tensor | None, denominator: Tensor | float,
    combine: str, rtol: float,
) -> Tensor:
    """0-d boolean tensor: does the reconstruction from ``elements`` reproduce ``value``?

    ``|L̂ − L| ≤ rtol · Σ|s e| / D + tiny`` (``Σ|s e|/D ≥ |L̂|``: a relative tolerance that also
    holds for sums with cancellations), or ``L̂ = L`` exactly (±inf, NaN = NaN). No host sync."""
    with torch.no_grad():
        if combine == "none":
            return torch.ones((), dtype=torch.bool, device=value.device)
        v = _promote(value)
        e = _promote(elements)
        if scale is not None:
            e = e * scale
        total, magnitude = e.sum(), e.abs().sum()
        if combine != "sum":
            total, magnitude = _divide(total, denominator), _divide(magnitude, denominator)
        close = (total - v).abs() <= rtol * magnitude + torch.finfo(v.dtype).tiny
        return close | (total == v) | (total.isnan() & v.isnan())


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


class LossCapture(TorchFunctionMode):
    """Torch-function mode that records every supported loss call (see the module docstring).

    Usage::

        with LossCapture(batch_size=b) as cap:
            loss = module.training_step(batch, i)      # unchanged user code
        per_sample, remainder = cap.per_sample(loss)   # ℓ ∈ R^b with mean_i ℓ_i = loss − remainder

    Every other torch function passes through with one dict lookup. The user's call is executed
    unchanged, so its value and gradients are bit-identical to a run without the mode; the
    ``reduction="none"`` recomputation adds one evaluation of the loss function (not of the
    model) and its activations.

    Args:
        batch_size: ``b``, the number of samples the losses are mapped to (inside a
            ``torch.func`` transformed per-sample function: the batch that function sees).
        strict: re-raise errors of the recording itself (default: warn, keep the user's value
            and list the error in :attr:`errors`).
        on_transform: what to do with a loss called under a ``torch.func`` transform entered
            after the mode (e.g. the mode around ``vmap``): ``'raise'`` a ``RuntimeError``, or
            ``'skip'`` recording it.
        leaves: with gradient recording on, give the step a loss value that has no autograd
            graph (parameters that do not require gradient: a perturbed point, a probe's
            detached weights) as a leaf that requires one — the same numbers — so that
            :func:`loss_coefficients` can still read how the returned loss weights it.
    """

    def __init__(self, batch_size: int, *, strict: bool = False, on_transform: str = "raise",
                 leaves: bool = False) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_transform not in ("raise", "skip"):
            raise ValueError(f"on_transform must be 'raise' or 'skip', got {on_transform!r}")
        self.batch_size = int(batch_size)
        self.strict = strict
        self.on_transform = on_transform
        self.leaves = leaves
        self.records: list[CapturedLoss] = []
        self.errors: list[str] = []
        self._level: int | None = None

    def __enter__(self) -> LossCapture:
        self._level = _transform_level()
        super().__enter__()
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        spec = _SPECS.get(func)
        if spec is None:
            return func(*args, **(kwargs or _EMPTY))
        return self._capture(spec, func, args, _EMPTY if kwargs is None else kwargs)

    # -- the loss path ------------------------------------------------------------------------

    def _capture(self, spec: _Spec, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if _recomputing():  # another LossCapture's reduction="none" recomputation
            return func(*args, **kwargs)
        if spec.name == "l1_loss":
            kwargs = _l1_weight(kwargs)
        if _transform_level() != self._level:
            if self.on_transform == "raise":
                raise RuntimeError(
                    f"LossCapture: {spec.name} was called inside a torch.func transform (vmap/grad/"
                    "jvp) that was entered after the LossCapture mode; its tensors are per-sample "
                    "slices that escape the transform, so no per-sample loss can be recorded. "
                    "Enter LossCapture inside the transformed function (batch_size = the batch "
                    "that function sees), or pass on_transform='skip'."
                )
            return func(*args, **kwargs)
        value = func(*args, **kwargs)  # exactly the user's call
        leaf = self.leaves and isinstance(value, Tensor) and not value.requires_grad and value.is_floating_point() \
            and torch.is_grad_enabled()
        if leaf:  # (a clone of the leaf: the step may change it in place, as it may its own loss)
            value = value.detach().requires_grad_(True).clone()
        try:
            record = self._record(spec, func, args, kwargs, value)
        except _Unsupported as err:
            self.errors.append(f"{spec.name}: {err}")
            return value
        except Exception as err:  # noqa: BLE001 - a measurement must not break training
            if self.strict:
                raise
            self.errors.append(f"{spec.name}: {type(err).__name__}: {err}")
            warnings.warn(f"LossCapture could not record a call of {spec.name}: {err}", stacklevel=3)
            return value
        if record is not None:
            record._leaf = leaf
            self.records.append(record)
        return value

    def _record(
        self, spec: _Spec, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any], value: Any
    ) -> CapturedLoss | None:
        if not isinstance(value, Tensor):
            raise _Unsupported(f"returned {type(value).__name__}, not a tensor")
        bound = spec.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        original = dict(a)
        tensors = [v for v in a.values() if isinstance(v, Tensor)]
        if not any(t.requires_grad or t.is_floating_point() for t in tensors):
            return None
        reduction = a["reduction"]
        legacy = a.get("size_average") is not None or a.get("reduce") is not None
        if legacy:
            if reduction == "batchmean":
                raise _Unsupported("legacy size_average/reduce together with reduction='batchmean'")
            reduction = _legacy_reduction.legacy_get_string(a["size_average"], a["reduce"], emit_warning=False)
        if reduction not in ("mean", "sum", "none", "batchmean"):
            raise _Unsupported(f"unknown reduction {reduction!r}")
        if reduction == "batchmean" and spec.name != "kl_div":
            raise _Unsupported("reduction='batchmean' is only defined for kl_div")

        if reduction == "none":
            elements = value
        else:
            a = dict(a)
            a["reduction"] = "none"
            if "size_average" in a:
                a["size_average"] = a["reduce"] = None
            _state.recomputing = True
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the user's call already warned
                    elements = func(**a)
            finally:
                _state.recomputing = False

        scale: Tensor | None = None
        if reduction == "none":
            combine, denominator = "none", 1.0
        elif reduction == "sum":
            combine, denominator = "sum", 1.0
        elif reduction == "batchmean":
            inp: Tensor = a["input"]
            combine, denominator = "batchmean", float(inp.shape[0]) if inp.dim() else 1.0
        else:
            combine, denominator = "mean", spec.denominator(a, elements)
            if spec.scale is not None:
                scale = spec.scale(a, elements)

        half = any(t.dtype in _HALF for t in tensors) or value.dtype in _HALF
        consistent = _consistent(value, elements, scale, denominator, combine, _RTOL_HALF if half else _RTOL)
        base_shapes = tuple(
            tuple(t._base.shape) if t._base is not None else None for t in tensors[:3]
        )
        layout, assumed, groups = _layout(tuple(elements.shape), self.batch_size, base_shapes)
        has_graph = value.grad_fn is not None
        return CapturedLoss(
            name=spec.name,
            value=value,
            reduction=reduction,
            elements=elements,
            combine=combine,
            denominator=denominator,
            batch_size=self.batch_size,
            mappable=layout is not None,
            layout=layout,
            layout_assumed=assumed,
            consistent=consistent,
            detached=not has_graph,
            element_scale=scale,
            base_shapes=base_shapes,
            _value_version=value._version,
            _elements_version=elements._version,
            _edge=get_gradient_edge(value) if has_graph else None,
            _groups=groups,
            arguments=original,
        )

    # -- conveniences -------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget the records and errors (reuse the mode for the next batch)."""
        self.records = []
        self.errors = []

    def per_sample(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        """``(ℓ, r)``: per-sample losses of the training ``loss`` and the remainder (see
        :func:`loss_coefficients` and :func:`combined_per_sample`); ``mean_i ℓ_i = loss − r``."""
        coefficients, remainder = loss_coefficients(loss, self.records)
        return combined_per_sample(self.records, coefficients, self.batch_size), remainder


# ---------------------------------------------------------------------------------------------
# Combining captured losses into the training loss
# ---------------------------------------------------------------------------------------------


def loss_coefficients(loss: Tensor, records: Sequence[CapturedLoss], create_graph: bool = False
                      ) -> tuple[Tensor, Tensor]:
    """``(c, r)``: how the training ``loss`` depends on the captured loss values.

    ``c_k = ∂loss/∂value_k`` by one ``torch.autograd.grad`` to the values' graph edges
    (``retain_graph=True``; only the arithmetic between the values and ``loss`` is traversed,
    not the model). Records without graph (``detached``) or not used by ``loss`` get ``c_k = 0``.
    A record whose value is a tensor (``reduction='none'``) contributes one coefficient per
    element; ``c`` is the concatenation, in record order (for scalar losses: ``c ∈ R^K``).

    ``r = loss − Σ_k c_k · value_k`` (coefficients detached, so ``∇r`` is the gradient of what
    the captured losses do not explain). Exact decomposition (``r = 0`` up to rounding) when
    ``loss`` is a linear combination of the captured values; ``r`` is the uncaptured part when
    ``loss = Σ_k c_k value_k + R(θ)`` (e.g. ``R = λ‖w‖²``: ``r = R``, a per-batch constant with
    no per-sample split). For a nonlinear combination (``value_1 · value_2``, ``log value``) ``c``
    is the local linearization at this batch and ``r`` is the Taylor remainder: the per-sample
    losses of :func:`combined_per_sample` then have the right *gradient* (``Σ_k c_k ∇value_k``
    = ``∇loss`` − ``∇r``) but not the right mean.

    A value modified in place after the call (``loss = F.mse_loss(…); loss += reg``) is handled:
    the derivative is taken at the call's output edge, and ``value_k`` is reconstructed from the
    per-element losses (``CapturedLoss.reduced``).

    ``create_graph=True``: ``c`` keeps its own graph where it depends on tensors that require
    gradient (``c.requires_grad``: weights that depend on the model, e.g. a focal-style
    ``(1 − p)^γ``, whose gradient per-sample losses with a constant ``c`` would miss); the caller
    detaches it.
    """
    if not loss.requires_grad:
        raise ValueError("loss_coefficients needs a loss with an autograd graph")
    dtype = torch.promote_types(loss.dtype, torch.float32)
    live = [k for k, r in enumerate(records) if r._edge is not None]
    grads: dict[int, Tensor | None] = {}
    if live:
        got = torch.autograd.grad(
            loss, [records[k]._edge for k in live], retain_graph=True, allow_unused=True, create_graph=create_graph
        )
        grads = dict(zip(live, got))
    coefficients: list[Tensor] = []
    explained = torch.zeros((), dtype=dtype, device=loss.device)
    for k, r in enumerate(records):
        g = grads.get(k)
        if g is None:
            coefficients.append(torch.zeros(r.value.numel(), dtype=dtype, device=loss.device))
            continue
        g = g.to(dtype) if create_graph else g.detach().to(dtype)
        coefficients.append(g.reshape(-1))
        value = r.value if r.value._version == r._value_version else r.reduced()
        explained = explained + (g * value.to(dtype)).sum()
    c = torch.cat(coefficients) if coefficients else torch.zeros(0, dtype=dtype, device=loss.device)
    return c, loss.to(dtype) - explained


def combined_per_sample(
    records: Sequence[CapturedLoss], coefficients: Tensor, batch_size: int
) -> Tensor:
    """``ℓ ∈ R^b`` with ``(1/b) Σ_i ℓ_i = Σ_k c_k · value_k`` (with graph).

    Convention: every record is put on the *mean* scale before weighting —

    * ``'mean'``/``'batchmean'`` records: ``c_k · per_sample_k`` (already ``mean_i = value_k``);
    * ``'sum'`` records: ``c_k · b · per_sample_k`` (``per_sample_k`` sums to ``value_k``);
    * ``'none'`` records (``c_k`` one coefficient per element): ``b · Σ_{e ∈ i} c_{k,e} e``.

    So with ``(c, r) = loss_coefficients(loss, records)``, ``mean_i ℓ_i = loss − r`` and
    ``∇ mean_i ℓ_i = ∇loss − ∇r``. Records with all-zero coefficients are skipped when they
    cannot be mapped (checking that costs a synchronization; mappable records never sync).

    A record without autograd graph (``detached``) counts with its coefficient like any other:
    coefficients from :func:`loss_coefficients` are 0 for it (a loss computed for logging), but
    coefficients settled on an earlier batch apply to a call recorded under ``torch.no_grad``
    (an evaluation of the same ``training_step``), where every record is detached. A detached
    record with zero coefficients adds exactly 0 (even when its values are not finite).
    """
    b = int(batch_size)
    sizes = [r.value.numel() for r in records]
    if coefficients.numel() != sum(sizes):
        raise ValueError(
            f"{coefficients.numel()} coefficients for records holding {sum(sizes)} values"
        )
    total: Tensor | None = None
    for r, c in zip(records, torch.split(coefficients, sizes)):
        if r._layout_for(b) is None:
            if bool((c != 0).any()):
                r.per_sample(b)  # raises the mapping error
            continue
        if r.combine == "none":
            term = r._sample_sums(c.reshape(r.elements.shape), b) * b
        elif r.combine == "sum":
            term = r.per_sample(b) * (c[0] * b)
        else:
            term = r.per_sample(b) * c[0]
        if r._edge is None or r._leaf:  # no graph of its own: 0 (not 0·NaN) unless its coefficient says it is used
            term = torch.where((c != 0).any(), term, torch.zeros_like(term))
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(b, dtype=coefficients.dtype, device=coefficients.device)
    return total
