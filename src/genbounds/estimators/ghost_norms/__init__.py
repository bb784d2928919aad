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
a reference to the input (no copy) and registers one pre-hook on the output's autograd node.
That pre-hook receives the output's gradient after any hook the user registered on the output
tensor (PyTorch runs a tensor's hooks before its node's pre-hooks), so the norms are those of
the gradient the layer's ``.grad`` is built from; a ``Tensor.register_hook`` of ours, registered
first, would see the gradient before the user's rescaling.  The work in the backward is
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

Modules: one per layer rule behind the small interface of ``base._Kind`` (:mod:`.linear` —
attention's projections included —, :mod:`.conv`, :mod:`.embedding`, :mod:`.normalization`), what
they share (:mod:`.base`), which rule a module gets and what the hooks cover (:mod:`.planning`),
and the hooks that run the rules in the training backward (:mod:`.hooks`).  A new layer type is
a new ``_Kind`` in a module of its own, registered in ``planning._KINDS``.
"""

from genbounds.estimators.ghost_norms.base import (
    DECOMPOSITION,
    DECOMPOSITION_BN,
    EXACT,
    GHOST,
    GOODFELLOW,
    MATERIALIZE,
    PerSampleNorms,
)
from genbounds.estimators.ghost_norms.conv import WORK_BUFFER_BYTES
from genbounds.estimators.ghost_norms.hooks import GhostNormHooks, suspended_ghost_hooks, times_scale_sq_
from genbounds.estimators.ghost_norms.planning import declared_batch_dims, plan, predict_methods

__all__ = [
    "DECOMPOSITION",
    "DECOMPOSITION_BN",
    "EXACT",
    "GHOST",
    "GOODFELLOW",
    "GhostNormHooks",
    "MATERIALIZE",
    "PerSampleNorms",
    "WORK_BUFFER_BYTES",
    "declared_batch_dims",
    "plan",
    "predict_methods",
    "suspended_ghost_hooks",
    "times_scale_sq_",
]
