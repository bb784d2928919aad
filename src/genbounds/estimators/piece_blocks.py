"""Several steps' gradient piece norms, laid out in whole blocks and summed per parameter group.

The row ring (``callbacks/dispersion/row_ring.py``) keeps each measured step's fp32 norms of the
gradient's pieces (:func:`~genbounds.estimators.functional.squared_pieces`: 1,024 elements each,
every piece one tensor's) and turns them into ``‖ḡ_k‖²`` per parameter group when it drains. A
float64 matrix product with a piece→group map did that in one op; but a process's first float64
matrix product maps about 0.5–0.7 MiB of MKL's code (``benchmarks/memory_breakdown.py``: the
largest single part of the dispersion's code pages on the MLP, whose peak growth is ~30 MiB),
and training itself never runs one. Here each split tensor's pieces start on a block of ``c``
pieces (the ring's zeros in between), so one float64 sum over contiguous blocks of ``c`` — the
same reduction the drain already runs for the hooks' rows — leaves per-block sums that each
belong to one tensor. The few blocks of each group, and the small tensors' pieces (which share
one region of the row, first), are summed on the host in float64: ``k × (blocks + small pieces)`` values,
``c`` chosen so that the blocks number about 16 plus one per tensor.
"""

from __future__ import annotations

import functools

from torch import Tensor

from genbounds.estimators.functional import Layout, groups_key, rest_parts

TARGET_BLOCKS = 16
"""About this many blocks for the split tensors' pieces, plus one a tensor (``c`` at most
:data:`MAX_BLOCK`): each is a value read to the host at a drain."""
MAX_BLOCK = 128
"""The most pieces in a block: a tensor's last block leaves at most ``c − 1`` pieces of a row zero
(4 bytes each)."""


def owner_spans(owners: list[int | None], groups: tuple[tuple[int, ...], ...]) -> list[list[tuple[int, int]]]:
    """Per group, the runs ``(start, end)`` of positions whose owner (a tensor index; ``None``:
    none) is one of its members, adjacent ones merged: a group's sum is then a few sums over
    slices of a list (:func:`span_sums`)."""
    of_tensor = {i: g for g, members in enumerate(groups) for i in members}
    spans: list[list[tuple[int, int]]] = [[] for _ in groups]
    for p, owner in enumerate(owners):
        g = of_tensor.get(owner) if owner is not None else None
        if g is None:
            continue
        runs = spans[g]
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return spans


def span_sums(values: list[float], spans: list[list[tuple[int, int]]]) -> list[float]:
    """Each group's sum of ``values`` over its runs (:func:`owner_spans`), in float64."""
    out = []
    for runs in spans:
        total = 0.0
        for a, z in runs:
            total += sum(values[a:z])
        out.append(total)
    return out


class PieceBlocks:
    """Where a kept row puts one step's piece norms (module docstring): the small tensors'
    ``len(rest)`` pieces first, then each split tensor's pieces from a multiple of :attr:`block`;
    :attr:`width` fp32 values a row, the gaps zero."""

    def __init__(self, layout: Layout) -> None:
        full, rest = layout
        split = sum(full)
        self.layout = layout
        self.block = c = max(1, min(MAX_BLOCK, split // TARGET_BLOCKS))
        self.rest = len(rest)
        start = -(-self.rest // c) * c
        offsets: list[int] = []
        owners: list[int | None] = [None] * (start // c)  # (the small pieces' blocks: summed piece by piece)
        for i, k in enumerate(full):
            if k:
                offsets.append(start)
                blocks = -(-k // c)
                owners += [i] * blocks
                start += blocks * c
        self.offsets = tuple(offsets)
        self.block_owners = tuple(owners)
        """The tensor of each block of a row (``None``: the small tensors' region)."""
        self.width = start

    def views_of(self, row: Tensor) -> tuple[tuple[Tensor, ...], Tensor, tuple[Tensor, ...]]:
        """A kept row (fp32 ``[width]``, zeroed once) as ``_PiecePlan.norms_into`` writes it: a
        view per split tensor, the small tensors' pieces, and those split per small tensor (made
        once here, not by a split a step)."""
        full = [k for k in self.layout[0] if k]
        rest = row[:self.rest]
        return tuple(row[o:o + k] for o, k in zip(self.offsets, full)), rest, rest_parts(rest, self.layout)

    def group_sums(self, norms: Tensor, groups: list[list[int]]) -> list[list[float]]:
        """``Σ`` of each group's pieces' squared norms (float64), a list per row of ``norms``
        (``[k, width]`` fp32 rows laid out by :meth:`views_of`); a tensor in no group counts nowhere."""
        k = norms.shape[0]
        spans = self._spans(groups_key(groups))
        squares = norms.double().square_()  # (each fp32 norm squared exactly)
        c = self.block
        blocks = squares.view(k, -1, c).sum(2).tolist() if c > 1 and self.width else squares.tolist()
        small = squares[:, :self.rest].tolist() if self.rest else [[]] * k
        return [span_sums(row + pieces, spans) for row, pieces in zip(blocks, small)]

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a few group lists per layout, for the ring's life
    def _spans(self, groups: tuple[tuple[int, ...], ...]) -> list[list[tuple[int, int]]]:
        """:func:`owner_spans` of a row's blocks followed by its small pieces (as ``group_sums``
        lists them)."""
        return owner_spans([*self.block_owners, *self.layout[1]], groups)


__all__ = ["PieceBlocks", "owner_spans", "span_sums"]
