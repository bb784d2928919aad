"""Gradient dispersion of one training batch (SPEC §1).

All three backends (BackPACK per-sample norms, ``torch.func`` per-sample gradients, micro-batch
chunk gradients) reduce to the same sufficient statistics of a batch of ``b`` samples split into
``k`` *units* ``j`` of ``m_j`` samples with mean gradient ``h_j`` (a unit is one sample for the
exact backends, ``m_j = 1``, ``k = b``; a chunk for the micro-batch estimator):

* ``S2 = Σ_j m_j ‖h_j‖²`` (float64),
* ``ḡ = Σ_j m_j h_j / b`` — the batch mean gradient, or only ``‖ḡ‖²`` when the caller reads it
  from ``p.grad``,
* optionally the centred per-unit terms ``v_j = m_j ‖h_j − ḡ‖²`` for a standard error.

From those, with ``Σ_j m_j ‖h_j − ḡ‖² = S2 − b ‖ḡ‖²``:

* ``dispersion = Tr Σ_B = (S2 − b‖ḡ‖²) / ((k − 1) b)`` — unbiased for ``tr Σ / b``;
* ``trace_cov = s² = b · dispersion`` — for ``k = b`` exactly
  ``1/(b−1) Σ_i ‖g_i − ḡ‖²``;
* ``norm_sq = ‖ḡ‖²``.

``S2`` and ``b‖ḡ‖²`` are nearly equal early in training, so both are float64 and the difference
is never clamped here (clamping happens only when a value is displayed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from genbounds.estimators.functional import (
    Layout,
    groups_key,
    per_tensor_sq_norms,
    piece_owner,
    piece_owners,
    sq_norm,
    squared_pieces,
)
from genbounds.estimators.piece_blocks import owner_spans, span_sums


@dataclass
class GradientMoments:
    """Sufficient statistics of the gradients of one batch, split into ``num_units`` units."""

    weighted_sq_norm_sum: Tensor
    """``Σ_j m_j ‖h_j‖²`` as a float64 scalar."""
    num_samples: int | Tensor
    """``b = Σ_j m_j`` (a tensor once summed over DDP ranks on the device)."""
    num_units: int | Tensor
    """``k``: number of units (``b`` for per-sample backends)."""
    weighted_sum: list[Tensor] | None = None
    """``Σ_j m_j h_j`` per parameter; ``None`` when the mean gradient comes from ``p.grad``."""
    centered_sums: tuple[Tensor, Tensor, int] | None = None
    """``(Σ_j v_j, Σ_j v_j², count)`` of the centred terms ``v_j = m_j ‖h_j − ḡ‖²`` (float64)
    when the backend can afford them; they give the standard error. Sums rather than the
    vector so that accumulation micro-steps and DDP ranks combine by addition."""
    losses: Tensor | None = field(default=None, repr=False)
    """The per-sample losses seen while computing the moments."""
    group_sq: Tensor | None = None
    """``Σ_j m_j ‖h_{j,k}‖²`` per parameter group ``k`` (float64 ``[K]``), when the backend splits
    its squared norms by group (layer); ``Σ_k group_sq[k] == weighted_sq_norm_sum``."""
    failed: float | Tensor = 0.0
    """How many of the parts summed here stand for a failed computation (NaN values of the same
    layout): under DDP a process whose per-sample norms failed still enters the step's reduction
    with such a part, and the summed count tells every process (read at a flush, not per step)."""

    def merged(self, other: GradientMoments) -> GradientMoments:
        """Moments of the union of two disjoint batches taken at the same weights
        (accumulation micro-steps, or ranks). Centred terms, when present in both, were centred
        at each part's own mean, so after merging they only feed an approximate SE."""
        if (self.weighted_sum is None) != (other.weighted_sum is None):
            raise ValueError("cannot merge moments with and without a gradient sum")
        summed = (
            None
            if self.weighted_sum is None
            else [a + b for a, b in zip(self.weighted_sum, other.weighted_sum)]  # type: ignore[arg-type]
        )
        centered = None
        if self.centered_sums is not None and other.centered_sums is not None:
            centered = (
                self.centered_sums[0] + other.centered_sums[0],
                self.centered_sums[1] + other.centered_sums[1],
                self.centered_sums[2] + other.centered_sums[2],
            )
        losses = (
            torch.cat([self.losses, other.losses])
            if self.losses is not None and other.losses is not None
            else (self.losses if other.losses is None else other.losses)
        )
        group_sq = (
            self.group_sq + other.group_sq if self.group_sq is not None and other.group_sq is not None else None
        )
        return GradientMoments(
            weighted_sq_norm_sum=self.weighted_sq_norm_sum + other.weighted_sq_norm_sum,
            num_samples=self.num_samples + other.num_samples,
            num_units=self.num_units + other.num_units,
            weighted_sum=summed,
            centered_sums=centered,
            losses=losses,
            group_sq=group_sq,
            failed=self.failed + other.failed,
        )


@dataclass
class DispersionEstimate:
    """SPEC §1 statistics of one batch (0-d float64 tensors, still on the device)."""

    norm_sq: Tensor
    """``grad/norm_sq = ‖ḡ_B‖²``."""
    trace_cov: Tensor
    """``grad/trace_cov = s²``: unbiased for ``tr Σ``."""
    dispersion: Tensor
    """``grad/dispersion = s²/b = Tr Σ_B``."""
    trace_cov_se: Tensor | None
    """Standard error of ``trace_cov`` (``None`` when the backend has no centred terms)."""
    batch_size: int | Tensor
    num_units: int | Tensor
    group_dispersion: Tensor | None = None
    """``Tr Σ_{B,k}`` per parameter group (float64 ``[K]``); sums to ``dispersion`` exactly."""

    def tagged(self, group_names: list[str]) -> dict[str, Tensor]:
        """The logged values: ``grad/norm_sq``, ``grad/trace_cov``, ``grad/dispersion``,
        ``grad/trace_cov_se`` (if any) and ``grad/dispersion/layer/<group>`` per group (if any)."""
        values = {"grad/norm_sq": self.norm_sq, "grad/trace_cov": self.trace_cov, "grad/dispersion": self.dispersion}
        if self.trace_cov_se is not None:
            values["grad/trace_cov_se"] = self.trace_cov_se
        if self.group_dispersion is not None:
            for name, value in zip(group_names, self.group_dispersion.unbind()):
                values[f"grad/dispersion/layer/{name}"] = value
        return values


def centered_sums(values: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(Σ v, Σ v², n)`` of a vector of centred terms, in float64."""
    v = values.detach().double()
    return v.sum(), (v * v).sum(), v.numel()


def group_sums(per_tensor: Tensor, groups: list[list[int]]) -> Tensor:
    """``[K]`` sums of a per-tensor vector over each group's tensor indices.

    One ``index_add`` (the indices cached per grouping and device) instead of a sum per group and
    a stack: 2 µs instead of 14 for two groups, on the per-step path."""
    src, dst = _group_index(tuple(tuple(g) for g in groups), per_tensor.shape[0], per_tensor.device)
    values = per_tensor if src is None else per_tensor.index_select(0, src)
    return per_tensor.new_zeros(len(groups)).index_add_(0, dst, values)


@functools.lru_cache(maxsize=64)
def _group_index(groups: tuple[tuple[int, ...], ...], n: int, device: torch.device) -> tuple[Tensor | None, Tensor]:
    src = [i for g in groups for i in g]
    dst = torch.tensor([k for k, g in enumerate(groups) for _ in g], dtype=torch.long, device=device)
    identity = src == list(range(n))
    return (None if identity else torch.tensor(src, dtype=torch.long, device=device)), dst


def dispersion_row(group_sq: Tensor, group_mean_sq: Tensor, b: int, k: int) -> Tensor:
    """``[3 + K]`` float64 ``(norm_sq, trace_cov, dispersion, per-group dispersion…)`` of one
    batch from the per-group sums ``S_k = Σ_j m_j ‖h_{j,k}‖²`` and ``‖ḡ_k‖²`` — what
    :func:`dispersion_from_moments` gives with the groups, as one vector in two matrix-vector
    products (the per-step path: one op instead of ~15 small ones). Per group
    ``Tr Σ_{B,k} = (S_k − b‖ḡ_k‖²) / ((k−1) b)``; ``dispersion`` is their sum, ``trace_cov``
    ``b`` times it, ``norm_sq = Σ_k ‖ḡ_k‖²`` — the totals of :func:`dispersion_from_moments` when
    the groups partition the parameters (the caller checks).

    Raises:
        ValueError: with fewer than two units."""
    if k < 2:
        raise ValueError(f"the dispersion needs at least two samples or chunks, got {k}")
    on_s, on_n = _row_maps(int(group_sq.shape[0]), int(b), int(k), group_sq.device)
    return torch.addmv(on_n @ group_mean_sq.to(group_sq.device, torch.float64), on_s, group_sq.double())


def _row_map_lists(groups: int, b: int, k: int) -> tuple[list[list[float]], list[list[float]]]:
    """:func:`_row_maps` as lists: ``(on_s, on_n)``, ``[3 + groups, groups]`` each."""
    c = 1.0 / ((k - 1) * b)
    on_s = [[0.0] * groups for _ in range(3 + groups)]
    on_n = [[0.0] * groups for _ in range(3 + groups)]
    on_n[0] = [1.0] * groups                                    # norm_sq = Σ_k ‖ḡ_k‖²
    on_s[1], on_n[1] = [b * c] * groups, [-b * b * c] * groups  # trace_cov = b · dispersion
    on_s[2], on_n[2] = [c] * groups, [-b * c] * groups          # dispersion = Σ_k (S_k − b‖ḡ_k‖²) c
    for j in range(groups):
        on_s[3 + j][j], on_n[3 + j][j] = c, -b * c
    return on_s, on_n


@functools.lru_cache(maxsize=32)
def _row_maps(groups: int, b: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    # (made from lists: functional.group_matrix says why)
    on_s, on_n = _row_map_lists(groups, b, k)
    return (torch.tensor(on_s, dtype=torch.float64, device=device),
            torch.tensor(on_n, dtype=torch.float64, device=device))


def dispersion_from_moments(
    moments: GradientMoments, mean_grad_sq_norm: Tensor | None = None, group_mean_sq: Tensor | None = None
) -> DispersionEstimate:
    """Turn :class:`GradientMoments` into ``norm_sq``, ``trace_cov`` and ``dispersion``.

    Args:
        moments: the batch's sufficient statistics.
        mean_grad_sq_norm: ``‖ḡ‖²`` when the mean gradient is read elsewhere (``p.grad`` of the
            training step); required when ``moments.weighted_sum`` is ``None``.
        group_mean_sq: ``‖ḡ_k‖²`` per group (``[K]``) for the per-group dispersion, when the moments
            carry ``group_sq``; then ``Σ_k group_mean_sq[k]`` should equal ``‖ḡ‖²``.

    Raises:
        ValueError: with fewer than two units (no spread to measure) or no mean gradient.
    """
    b, k = moments.num_samples, moments.num_units
    if isinstance(k, int) and k < 2:
        raise ValueError(f"the dispersion needs at least two samples or chunks, got {k}")
    if mean_grad_sq_norm is None:
        if moments.weighted_sum is None:
            raise ValueError("pass mean_grad_sq_norm when the moments carry no gradient sum")
        mean_grad_sq_norm = sq_norm(moments.weighted_sum) / (b * b)
    s2 = moments.weighted_sq_norm_sum.double()
    n2 = mean_grad_sq_norm.double().to(s2.device)
    spread = s2 - b * n2  # Σ_j m_j ‖h_j − ḡ‖²
    dispersion = spread / ((k - 1) * b)
    trace_cov = dispersion * b
    se = None
    if moments.centered_sums is not None:
        total, total_sq, count = moments.centered_sums
        # trace_cov = k/(k−1) · mean_j v_j  ⇒  SE = k/(k−1) · sd(v)/√k
        var = (total_sq - total * total / count) / (count - 1)
        se = (k / (k - 1)) * torch.sqrt(torch.clamp(var, min=0.0) / k)
    groups = None
    if moments.group_sq is not None and group_mean_sq is not None:
        g2 = group_mean_sq.double().to(s2.device)
        groups = (moments.group_sq.double().to(s2.device) - b * g2) / ((k - 1) * b)
    return DispersionEstimate(
        norm_sq=n2,
        trace_cov=trace_cov,
        dispersion=dispersion,
        trace_cov_se=se,
        batch_size=b,
        num_units=k,
        group_dispersion=groups,
    )


def group_mean_sq_norms(moments: GradientMoments, groups: list[list[int]]) -> Tensor:
    """``‖ḡ_k‖²`` per parameter group from the moments' per-tensor weighted sums (``Σ_i g_i``)."""
    assert moments.weighted_sum is not None
    b = moments.num_samples
    return group_sums(per_tensor_sq_norms([w / b for w in moments.weighted_sum]), groups)


def batch_values(moments: GradientMoments, mean_sq: Tensor | None, group_mean_sq: Tensor | None,
                 groups_partition: bool) -> Tensor | DispersionEstimate:
    """One batch's logged values: the ``[3 + K]`` row of :func:`dispersion_row` when it applies
    (per-group sums, ``‖ḡ_k‖²`` per group, groups that partition the parameters, no centred terms,
    sizes known on the host: the per-step path, two ops), else :func:`dispersion_from_moments`."""
    if (groups_partition and group_mean_sq is not None and moments.group_sq is not None
            and moments.centered_sums is None
            and isinstance(moments.num_samples, int) and isinstance(moments.num_units, int)):
        return dispersion_row(moments.group_sq, group_mean_sq, moments.num_samples, moments.num_units)
    return dispersion_from_moments(moments, mean_sq, group_mean_sq)


def hook_dispersion_row(module_sums: Tensor, module_groups: tuple[tuple[int, ...], ...], scale: Tensor | float,
                        grads: list[Tensor], groups: list[list[int]], b: int) -> Tensor:
    """The ``[3 + K]`` row of :func:`dispersion_row` for one batch of ``b ≥ 2`` samples, from the
    norm hooks' raw output in one pass.

    ``module_sums[j]`` is ``Σ_i ‖g_{i,j}‖² / scale²`` of hooked module ``j`` (``module_groups``
    lists the module indices of each group), ``grads`` the batch gradient (``groups`` its tensor
    indices per group, partitioning them). The same values as ``dispersion_row(scale²·G_mod @
    module_sums, grouped_sq_norms(grads, groups)[:-1], b, b)``, with the group sums, the
    piece-to-tensor sums and the row's linear maps folded into two cached matrices: after the
    gradient's piece norms, two matrix-vector products where that path takes seven ops (each a
    few µs in a training step; docs/results/overhead.md). The maps of the last call are kept for
    the same ``module_groups``, ``groups`` and layout objects (compared by identity: a caller
    passes the same lists every step and never changes them in place). On the CPU with a number
    for ``scale`` the pieces are summed per group and the row made on the host instead, in float64
    (:func:`hook_dispersion_rows`)."""
    if b < 2:
        raise ValueError(f"the dispersion needs at least two samples, got {b}")
    pieces, layout = squared_pieces(grads, reuse=True)  # (consumed below)
    if module_sums.device.type == "cpu" and pieces.device.type == "cpu" and not isinstance(scale, Tensor):
        # on the host, as the row ring's drains (hook_dispersion_rows): a float64 matrix-vector
        # product would map MKL code that training never runs (a step the ring cannot keep: an
        # epoch's short last batch)
        group_sq = span_sums(pieces.tolist(), _group_piece_spans(layout, groups_key(groups)))
        return hook_dispersion_rows(module_sums.unsqueeze(0), module_groups, scale, [group_sq], b)[0]
    last = _LAST_ROW_MAPS[0]
    if (last is not None and last[0] is module_groups and last[1] is groups and last[2] is layout and last[3] == b
            and last[4] == module_sums.device):
        on_modules, on_pieces = last[5]  # (the same objects as the last step's: no cache key to hash)
    else:
        maps = _hook_row_maps(len(module_sums), module_groups, groups_key(groups), layout, int(b), module_sums.device)
        _LAST_ROW_MAPS[0] = (module_groups, groups, layout, b, module_sums.device, maps)
        on_modules, on_pieces = maps
    base = on_pieces @ (pieces if pieces.device == module_sums.device else pieces.to(module_sums.device))
    if isinstance(scale, Tensor):
        return torch.addmv(base, on_modules, module_sums * scale.to(module_sums).square())
    return torch.addmv(base, on_modules, module_sums, alpha=float(scale) ** 2)


@functools.lru_cache(maxsize=32)
def _group_piece_spans(layout: Layout, groups: tuple[tuple[int, ...], ...]) -> list[list[tuple[int, int]]]:
    """Per group, the runs of ``layout``'s pieces that belong to it (:func:`owner_spans`)."""
    return owner_spans(piece_owners(layout), groups)


def hook_dispersion_rows(module_sums: Tensor, module_groups: tuple[tuple[int, ...], ...], scale: float,
                         group_sq: list[list[float]], b: int) -> Tensor:
    """:func:`hook_dispersion_row` for ``k`` steps at once (``[k, 3 + K]`` float64):
    ``module_sums`` ``[k, modules]`` float64 as there, ``group_sq`` each step's ``‖ḡ_k‖²`` per
    group (:meth:`~genbounds.estimators.piece_blocks.PieceBlocks.group_sums`); every step of the
    same batch size ``b ≥ 2`` and loss ``scale``. The row's linear maps are applied on the host in
    float64 (``k × (3 + K)`` values; a float64 matrix product would map MKL's code for it, which
    training never runs: :mod:`~genbounds.estimators.piece_blocks`), with the values of the
    per-step path up to the order of float64 sums."""
    if b < 2:
        raise ValueError(f"the dispersion needs at least two samples, got {b}")
    c = 1.0 / ((b - 1) * b)
    on_s, on_n = c * float(scale) ** 2, b * c
    # the dispersion of group k: c·(scale²·S_k − b·‖ḡ_k‖²), S_k its modules' Σ_i ‖g_i‖² / scale²
    rows = []
    for sums, norms in zip(module_sums.tolist(), group_sq):
        per_group = [on_s * sum([sums[j] for j in members], 0.0) - on_n * n
                     for members, n in zip(module_groups, norms)]
        dispersion = sum(per_group, 0.0)
        rows.append([sum(norms, 0.0), b * dispersion, dispersion, *per_group])
    return torch.tensor(rows, dtype=torch.float64)


_LAST_ROW_MAPS: list[tuple | None] = [None]
"""The last step's maps of :func:`hook_dispersion_row`, with the objects they were made for
(``groups`` a list: compared by identity, as the callback passes the same list every step)."""


def _columns_by_group(on: list[list[float]], groups: tuple[tuple[int, ...], ...], n: int) -> list[list[float]]:
    """``on @ [member j in group k]`` (``[rows, n]``): column ``j`` the sum of ``on``'s columns of
    the groups that hold ``j`` (one product a member, not a dense product of mostly zeros)."""
    out = [[0.0] * n for _ in on]
    for k, members in enumerate(groups):
        for j in members:
            for row, src in zip(out, on):
                row[j] += src[k]
    return out


_LIST_LIMIT = 1 << 16
"""Entries up to which :func:`_hook_row_maps` builds the pieces' map as a list (beyond, one
indexing op: its code pages are nothing beside such a model, and a list would cost seconds)."""


@functools.lru_cache(maxsize=32)
def _hook_row_maps(n_modules: int, module_groups: tuple[tuple[int, ...], ...], groups: tuple[tuple[int, ...], ...],
                   layout: Layout, b: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(on_s · [module j in group k], on_n · [tensor i in group k] · [piece p of tensor i])``
    (made from lists: functional.group_matrix says why)."""
    on_s, on_n = _row_map_lists(len(groups), b, b)
    on_modules = torch.tensor(_columns_by_group(on_s, module_groups, n_modules), dtype=torch.float64)
    on_tensor = _columns_by_group(on_n, groups, len(layout[0]))  # [3 + K, tensors]
    if len(on_tensor) * (sum(layout[0]) + len(layout[1])) <= _LIST_LIMIT:
        owners = piece_owners(layout)  # (a piece's column is its tensor's)
        on_pieces = torch.tensor([[row[i] for i in owners] for row in on_tensor], dtype=torch.float64)
    else:
        on_pieces = torch.tensor(on_tensor, dtype=torch.float64)[:, piece_owner(layout)]
    return on_modules.to(device), on_pieces.to(device)
