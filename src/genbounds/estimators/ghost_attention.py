"""Where ``nn.MultiheadAttention``'s projections meet the training backward (for ghost norms).

``nn.MultiheadAttention`` never calls its projections as modules: ``F.multi_head_attention_forward``
multiplies the (sequence-first) input by ``in_proj_weight`` and the attention output by
``out_proj.weight`` inside one function, so no module hook sees either product's input or output
gradient.  Both products are nevertheless ordinary matrix products in the autograd graph of the
module's output, and the graph exposes exactly what the Linear ghost norm needs:

* the product's node (``MmBackward0`` or ``AddmmBackward0``) keeps its input rows as a saved tensor
  (``_saved_self`` / ``_saved_mat1``: ``[T·B, d_in]``), and
* a pre-hook on that node receives the gradient of the loss with respect to the product's output
  (``[T·B, d_out]``), after autograd has summed every path into it.

Self-attention (query, key and value the same tensor, the packed ``in_proj_weight``) projects once,
``[T·B, E] → [T·B, 3E]``; cross-attention projects the query with the first ``E`` rows of the
weight and the key and value with the other rows — one product with ``w[E:]`` when key is value,
two with ``w[E:2E]`` and ``w[2E:]`` otherwise — over the query's ``L`` or the memory's ``S``
positions.  The output projection maps ``[L·B, E] → [L·B, E]``.  In every product the rows are
position-major (row ``t·B + i`` belongs to sample ``i``; the function works sequence-first and
folds ``(T, B)`` into rows).  Viewing the rows as ``[T, B, d]`` and
swapping the first two axes gives each sample's ``A_i ∈ R^{T×d_in}`` and ``G_i ∈ R^{T×d_out}``: the
Linear-on-sequences case of :mod:`genbounds.estimators.ghost_norms` (ghost ``⟨A Aᵀ, G Gᵀ⟩`` or
materialize, by ``2T² < d_in·d_out``).  A bias enters the product's output additively (inside the
``addmm``, or one ``add`` after the ``mm``), so its per-sample gradient is ``Σ_t G_{i,t}``.  The
slices of the in-projection and the output projection are disjoint parameters: the module's
per-sample squared norm is the sum over the products.  Attention itself mixes positions of one sample only, so every term is
the per-sample gradient of ``ℓ_i`` (dropout masks included).

What is matched, and reported otherwise (the caller then falls back to an extra-pass backend):
the node whose inputs include ``t(weight)`` with ``weight`` the parameter itself (an
``AccumulateGrad`` of exactly that tensor, possibly behind autocast's ``ToCopyBackward0``), of type
``MmBackward0``/``AddmmBackward0``, with saved input rows of shape ``[T·B, d_in]``; a bias reached
from that node (its own input, or through views and one ``AddBackward0``) or no bias.
A slice of ``in_proj_weight`` is reached through one ``SplitWithSizesBackward0``/``SplitBackward0``
whose output index says which rows (and which bias slice belongs to it); the in-projection is
complete when the products' widths add up to ``3E``.  Refused before any step
(:func:`unsupported_reason`): ``add_bias_kv``, separate q/k/v weights and a frozen weight with a
trainable bias.  Either ``batch_first``: the module works on ``[T, B, E]`` internally, so the
products' rows are position-major in both (the layers around a sequence-first attention see
``[T, B, E]`` too: ``GhostNormHooks`` reads their batch dimension from
``ghost_norms.declared_batch_dims`` and the batch size).  The
products must form one of the three layouts (:data:`LAYOUTS`), and a module called in one step
with two layouts (self- and cross-attention) is reported, since its blocks would have cross terms.  Under saved-tensor hooks (activation checkpointing,
``save_on_cpu``) reading a saved input would run the unpack hook inside the forward — recomputing
or copying — so the call is reported instead.  The walk is breadth-first over the module's part of
the graph and stops once every product is found (30–50 nodes, 80–400 µs per call; it gives up
after 512 nodes, reported).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor, nn

_MATMUL_NODES = {"MmBackward0": "_saved_self", "AddmmBackward0": "_saved_mat1"}
_SPLITS = {"SplitBackward0", "SplitWithSizesBackward0", "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0"}
OUT = 3
"""The slot of the output projection; the in-projection's products are slots 0 (the query's rows
of the weight, or the whole packed weight), 1 and 2 (the key's and value's rows, or both in 1)."""
_PASS_THROUGH = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"}
_MAX_NODES = 512


def unsupported_reason(module: nn.MultiheadAttention) -> str | None:
    """``None`` when the module's projections can be matched in its graph, else why not (the
    structural part; :func:`frozen_weight_reason` the trainability part)."""
    if type(module).forward is not nn.MultiheadAttention.forward:
        return f"{type(module).__name__} overrides MultiheadAttention.forward"
    if not module._qkv_same_embed_dim:
        return "MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v weights)"
    if module.bias_k is not None or module.bias_v is not None:
        return "MultiheadAttention(add_bias_kv=True)"
    if type(module.out_proj).forward is not nn.Linear.forward:
        return "MultiheadAttention.out_proj overrides Linear.forward"
    return None


def frozen_weight_reason(module: nn.MultiheadAttention) -> str | None:
    """Why a trainable bias cannot be measured: its projection's weight is frozen, so the product
    has no ``t(weight)`` input to be found by."""
    for name, (w, c) in zip(("in_proj", "out_proj"), projection_parameters(module)):
        if c is not None and c.requires_grad and not w.requires_grad:
            return f"MultiheadAttention {name}: a trainable bias with a frozen weight"
    return None


def projection_parameters(module: nn.MultiheadAttention) -> list[tuple[Tensor, Tensor | None]]:
    """``[(in_proj_weight, in_proj_bias), (out_proj.weight, out_proj.bias)]``."""
    return [(module.in_proj_weight, module.in_proj_bias), (module.out_proj.weight, module.out_proj.bias)]


def batch_and_length(module: nn.MultiheadAttention, shape: torch.Size) -> tuple[int, int]:
    """``(B, T)`` of a batched query or output of ``module``."""
    return (shape[0], shape[1]) if module.batch_first else (shape[1], shape[0])


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in effect (reading a saved input would run their unpack)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # pragma: no cover - other torch versions: assume they may be
        return True
    return top(False) is not None


class Projection:
    """One matched product: its slot, its node, its saved input rows ``[T·B, d_in]``
    (position-major), ``T`` and how many rows of the weight it uses."""

    __slots__ = ("slot", "node", "rows", "T", "width")

    def __init__(self, slot: int, node: Any, rows: Tensor, T: int, width: int) -> None:
        self.slot, self.node, self.rows, self.T, self.width = slot, node, rows, T, width


def _skip_casts(edge: tuple[Any, int]) -> tuple[Any, int]:
    """The edge past autocast's casts (``ToCopyBackward0``), keeping the output index of what
    lies behind them."""
    fn, nr = edge
    while fn is not None and type(fn).__name__ == "ToCopyBackward0":
        nxt = fn.next_functions
        fn, nr = nxt[0] if len(nxt) == 1 else (None, 0)
    return fn, nr


def _param_of(edge: tuple[Any, int]) -> tuple[Tensor | None, int]:
    """The leaf tensor behind a graph edge, through casts and at most one split, and the split's
    output index (0 without a split)."""
    fn, nr = _skip_casts(edge)
    part = 0
    if fn is not None and type(fn).__name__ in _SPLITS:
        part = nr
        nxt = fn.next_functions
        fn, _ = _skip_casts(nxt[0]) if len(nxt) == 1 else (None, 0)
    return (getattr(fn, "variable", None) if fn is not None else None), part


def _weight_of(fn: Any) -> tuple[Tensor | None, int]:
    """The parameter (and slice) behind ``t(parameter)``: ``TBackward0`` → … → ``AccumulateGrad``."""
    if fn is None or type(fn).__name__ != "TBackward0" or len(fn.next_functions) != 1:
        return None, 0
    return _param_of(fn.next_functions[0])


def _bias_reaches(node: Any, parent: dict, bias: Tensor | None, part: int) -> bool:
    """Whether slice ``part`` of ``bias`` is added to ``node``'s output: an input of ``node``
    itself (``addmm``), or of the first ``AddBackward0`` above it through views only."""
    if bias is None or not bias.requires_grad:
        return True
    if any(_param_of(e) == (bias, part) for e in node.next_functions):
        return True
    up = parent.get(node)
    while up is not None and type(up).__name__ in _PASS_THROUGH:
        up = parent.get(up)
    return (up is not None and type(up).__name__ == "AddBackward0"
            and any(_param_of(e) == (bias, part) for e in up.next_functions))


def find_projections(module: nn.MultiheadAttention, output: Tensor, batch: int, length: int
                     ) -> tuple[list[Projection], str | None]:
    """The products of the in- and output projections in the graph of ``output`` (the module's
    attention output, ``batch`` samples of ``length`` query positions); a projection whose weight
    and bias are both frozen is not looked for.

    Returns:
        ``(projections, problem)``; ``problem`` says what did not match (then nothing is usable).
    """
    if saved_tensor_hooks_active():
        return [], ("saved-tensor hooks are active (activation checkpointing, save_on_cpu): "
                    "reading the projections' saved inputs would run them inside the forward")
    (w_in, c_in), (w_out, c_out) = projection_parameters(module)
    want_in = w_in.requires_grad or (c_in is not None and c_in.requires_grad)
    want_out = w_out.requires_grad or (c_out is not None and c_out.requires_grad)
    E = module.embed_dim
    found: list[Projection] = []
    width_in, have_out = 0, False  # the in-projection is complete when its products span 3E rows

    def pending() -> bool:
        return (want_in and width_in < 3 * E) or (want_out and not have_out)

    parent: dict = {}
    start = output.grad_fn
    queue, seen = deque([start]), {start}
    while queue and len(seen) <= _MAX_NODES and pending():
        node = queue.popleft()
        edges = node.next_functions
        for fn, _ in edges:  # is this node a product with t(weight)?
            w, part = _weight_of(fn)
            if w is not None and ((w is w_in and want_in) or (w is w_out and want_out)):
                slot = part if w is w_in else OUT
                if any(p.slot == slot for p in found):
                    return [], f"{_NAMES[slot]}: two products use the same rows of the weight"
                match = _match(node, parent, slot, (c_in if w is w_in else c_out), part, batch, length, E)
                if isinstance(match, str):
                    return [], match
                found.append(match)
                if slot == OUT:
                    have_out = True
                else:
                    width_in += match.width
                break
        else:
            slot = None
        if slot is not None and slot != OUT:
            # below an in-projection lie the attention's inputs (and, for a module called twice in
            # a chain, its earlier call): the walk stays inside this call
            continue
        for fn, _ in edges:
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            parent[fn] = node
            queue.append(fn)
    layout = tuple(sorted((p.slot, p.width // E) for p in found if p.slot != OUT))
    if want_in and not pending() and (layout not in LAYOUTS or any(p.width % E for p in found)):
        return [], f"in_proj: products over rows {layout} (in units of E) are not one of the known layouts"
    if pending():
        missing = [n for n, gone in (("in_proj", want_in and width_in < 3 * E), ("out_proj", want_out and not have_out))
                   if gone]
        return [], (f"{' and '.join(missing)} not found (whole) in the attention's graph "
                    "(another torch version's layout?)")
    return found, None


_NAMES = {0: "in_proj (query rows)", 1: "in_proj (key or key-and-value rows)", 2: "in_proj (value rows)",
          OUT: "out_proj"}
LAYOUTS = {((0, 3),), ((0, 1), (1, 2)), ((0, 1), (1, 1), (2, 1))}
"""The in-projection's products as ``(slot, width in units of E)``: self-attention (the whole
packed weight), cross-attention with key = value (``split([E, 2E])``), key ≠ value (``chunk(3)``)."""


def _match(node: Any, parent: dict, slot: int, bias: Tensor | None, part: int, batch: int, length: int,
           E: int) -> Projection | str:
    """The product ``node`` as a :class:`Projection`, or why it does not fit."""
    name = _NAMES[slot]
    attr = _MATMUL_NODES.get(type(node).__name__)
    if attr is None:
        return f"{name}: its weight feeds a {type(node).__name__}, not a matrix product"
    saved = getattr(node, attr)
    rows_ok = saved.shape[0] == length * batch if slot in (0, OUT) else saved.shape[0] % batch == 0
    if saved.dim() != 2 or saved.shape[1] != E or not rows_ok:
        return f"{name}: input rows {tuple(saved.shape)} do not fold into [T·{batch}, {E}]"
    if not _bias_reaches(node, parent, bias, part):
        return f"{name}: its bias is not added to the product's output"
    width = int(node._saved_mat2_sym_sizes[1])  # t(w) is [E, rows of the weight this product uses]
    return Projection(slot, node, saved, saved.shape[0] // batch, width)


__all__ = ["OUT", "Projection", "batch_and_length", "find_projections", "frozen_weight_reason", "projection_parameters",
           "unsupported_reason"]
