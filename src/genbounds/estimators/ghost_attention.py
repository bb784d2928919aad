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
``[T·B, E] → [T·B, 3E]``, and the output projection maps ``[T·B, E] → [T·B, E]``; in both the rows
are position-major (row ``t·B + i`` belongs to sample ``i``; the function works sequence-first and
folds ``(T, B)`` into rows for either ``batch_first``).  Viewing the rows as ``[T, B, d]`` and
swapping the first two axes gives each sample's ``A_i ∈ R^{T×d_in}`` and ``G_i ∈ R^{T×d_out}``: the
Linear-on-sequences case of :mod:`genbounds.estimators.ghost_norms` (ghost ``⟨A Aᵀ, G Gᵀ⟩`` or
materialize, by ``2T² < d_in·d_out``).  A bias enters the product's output additively (inside the
``addmm``, or one ``add`` after the ``mm``), so its per-sample gradient is ``Σ_t G_{i,t}``.  The
in-projection and the output projection are disjoint parameters: the module's per-sample squared
norm is the sum of the two.  Attention itself mixes positions of one sample only, so every term is
the per-sample gradient of ``ℓ_i`` (dropout masks included).

What is matched, and reported otherwise (the caller then falls back to an extra-pass backend):
the node whose inputs include ``t(weight)`` with ``weight`` the parameter itself (an
``AccumulateGrad`` of exactly that tensor, possibly behind autocast's ``ToCopyBackward0``), of type
``MmBackward0``/``AddmmBackward0``, with saved input rows of shape ``[T·B, d_in]``; a bias reached
from that node (its own input, or through views and one ``AddBackward0``) or no bias.
Cross-attention (query ≠ key) projects slices of ``in_proj_weight``, reached through
``SplitWithSizesBackward0``/``SplitBackward0``, and is not matched.  Refused before any step
(:func:`unsupported_reason`): ``add_bias_kv``, separate q/k/v weights, ``batch_first=False`` (the
layers around a sequence-first attention see ``[T, B, E]``, whose batch is not dimension 0 — with
``T = B`` that could not even be detected), the cross-attention of ``nn.TransformerDecoderLayer``
and a frozen weight with a trainable bias.  Under saved-tensor hooks (activation checkpointing,
``save_on_cpu``) reading a saved input would run the unpack hook inside the forward — recomputing
or copying — so the call is reported instead.  The walk is breadth-first over the module's part of
the graph and stops once both products are found (30–40 nodes, about 80 µs per call).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor, nn

_MATMUL_NODES = {"MmBackward0": "_saved_self", "AddmmBackward0": "_saved_mat1"}
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
    if not module.batch_first:
        return ("MultiheadAttention(batch_first=False): the layers around a sequence-first attention "
                "see [T, B, E], whose batch is not dimension 0")
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
    """One matched product: its node and its saved input rows ``[T·B, d_in]`` (position-major)."""

    __slots__ = ("node", "rows")

    def __init__(self, node: Any, rows: Tensor) -> None:
        self.node, self.rows = node, rows


def _leaf(fn: Any) -> Tensor | None:
    """The leaf tensor of an ``AccumulateGrad``, through autocast's casts (``ToCopyBackward0``)."""
    while fn is not None and type(fn).__name__ == "ToCopyBackward0":
        nxt = fn.next_functions
        fn = nxt[0][0] if len(nxt) == 1 else None
    return getattr(fn, "variable", None) if fn is not None else None


def _weight_of(fn: Any) -> Tensor | None:
    """The parameter behind ``t(parameter)`` (``TBackward0`` → [casts →] ``AccumulateGrad``)."""
    if fn is None or type(fn).__name__ != "TBackward0":
        return None
    nxt = fn.next_functions
    return _leaf(nxt[0][0]) if len(nxt) == 1 else None


def _is_leaf_of(fn: Any, t: Tensor) -> bool:
    return fn is not None and _leaf(fn) is t


def _bias_reaches(node: Any, parent: dict, bias: Tensor | None) -> bool:
    """Whether ``bias`` is added to ``node``'s output: an input of ``node`` itself (``addmm``), or
    of the first ``AddBackward0`` above it through views only."""
    if bias is None or not bias.requires_grad:
        return True
    if any(_is_leaf_of(f, bias) for f, _ in node.next_functions):
        return True
    up = parent.get(node)
    while up is not None and type(up).__name__ in _PASS_THROUGH:
        up = parent.get(up)
    return (up is not None and type(up).__name__ == "AddBackward0"
            and any(_is_leaf_of(f, bias) for f, _ in up.next_functions))


def find_projections(module: nn.MultiheadAttention, output: Tensor, rows: int
                     ) -> tuple[list[Projection | None], str | None]:
    """The in- and output projections' nodes in the graph of ``output`` (the module's attention
    output), each ``None`` when neither its weight nor its bias requires grad.

    Returns:
        ``(projections, problem)``; ``problem`` says what did not match (then nothing is usable).
    """
    if saved_tensor_hooks_active():
        return [None, None], ("saved-tensor hooks are active (activation checkpointing, save_on_cpu): "
                              "reading the projections' saved inputs would run them inside the forward")
    wanted = projection_parameters(module)
    widths = [3 * module.embed_dim, module.embed_dim]
    found: list[Projection | None] = [None, None]
    todo = [i for i, (w, c) in enumerate(wanted)
            if w.requires_grad or (c is not None and c.requires_grad)]
    if not todo:
        return found, None
    parent: dict = {}
    start = output.grad_fn
    queue, seen = deque([start]), {start}
    while queue and len(seen) <= _MAX_NODES and any(found[i] is None for i in todo):
        node = queue.popleft()
        for fn, _ in node.next_functions:
            if fn is None or fn in seen:
                continue
            w = _weight_of(fn)
            if w is not None:
                for i in todo:
                    if found[i] is None and w is wanted[i][0]:
                        match = _match(node, parent, wanted[i], widths[i], rows, ("in_proj", "out_proj")[i])
                        if isinstance(match, str):
                            return [None, None], match
                        found[i] = match
            seen.add(fn)
            parent[fn] = node
            queue.append(fn)
    missing = [("in_proj", "out_proj")[i] for i in todo if found[i] is None]
    if missing:
        return [None, None], (f"{' and '.join(missing)} not found in the attention's graph "
                              "(cross-attention — query and key different tensors — or another "
                              "torch version's layout)")
    return found, None


def _match(node: Any, parent: dict, params: tuple[Tensor, Tensor | None], d_out: int, rows: int,
           name: str) -> Projection | str:
    """The product ``node`` as a :class:`Projection`, or why it does not fit."""
    attr = _MATMUL_NODES.get(type(node).__name__)
    if attr is None:
        return f"{name}: its weight feeds a {type(node).__name__}, not a matrix product"
    saved = getattr(node, attr)
    weight, bias = params
    if saved.dim() != 2 or saved.shape[0] != rows or saved.shape[1] != weight.shape[1] or weight.shape[0] != d_out:
        return f"{name}: input rows {tuple(saved.shape)} where [{rows}, {weight.shape[1]}] was expected"
    if not _bias_reaches(node, parent, bias):
        return f"{name}: its bias is not added to the product's output"
    return Projection(node, saved)


__all__ = ["Projection", "batch_and_length", "find_projections", "frozen_weight_reason", "projection_parameters",
           "unsupported_reason"]
