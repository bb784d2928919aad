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
one gathered region), are summed on the host in float64: ``k × (blocks + small pieces)`` values,
``c`` chosen so that the blocks number about 16 plus one per tensor.
"""

from __future__ import annotations

import functools

from torch import Tensor

from genbounds.estimators.functional import Layout

TARGET_BLOCKS = 16
"""About this many blocks for the split tensors' pieces, plus one a tensor (``c`` at most
:data:`MAX_BLOCK`): each is a value read to the host at a drain."""
MAX_BLOCK = 128
"""The most pieces in a block: a tensor's last block leaves at most ``c − 1`` pieces of a row zero
(4 bytes each)."""


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
        tensor_blocks: list[tuple[int, int, int]] = []  # (tensor, first block, end block)
        for i, k in enumerate(full):
            if k:
                offsets.append(start)
                tensor_blocks.append((i, start // c, -(-(start + k) // c)))
                start += -(-k // c) * c
        self.offsets = tuple(offsets)
        self.tensor_blocks = tuple(tensor_blocks)
        self.width = start

    def views_of(self, row: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """A kept row (fp32 ``[width]``, zeroed once) as ``_PiecePlan.norms_into`` writes it: a
        view per split tensor and the small tensors' pieces."""
        full = [k for k in self.layout[0] if k]
        return tuple(row[o:o + k] for o, k in zip(self.offsets, full)), row[:self.rest]

    def group_sums(self, norms: Tensor, groups: list[list[int]]) -> list[list[float]]:
        """``Σ`` of each group's pieces' squared norms (float64), a list per row of ``norms``
        (``[k, width]`` fp32 rows laid out by :meth:`views_of`); a tensor in no group counts nowhere."""
        k = norms.shape[0]
        ranges, rest_groups = self._group_ranges(tuple(tuple(g) for g in groups))
        squares = norms.double().square_()  # (each fp32 norm squared exactly)
        c = self.block
        blocks = squares.view(k, -1, c).sum(2).tolist() if c > 1 and self.width else squares.tolist()
        small = squares[:, :self.rest].tolist() if self.rest else [[]] * k
        out = []
        for row, pieces in zip(blocks, small):
            sums = [sum(row[a:b], 0.0) if single else sum((sum(row[a:b]) for a, b in spans), 0.0)
                    for spans, (a, b), single in ranges]
            for g, value in zip(rest_groups, pieces):
                if g is not None:
                    sums[g] += value
            out.append(sums)
        return out

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a few group lists per layout, for the ring's life
    def _group_ranges(self, groups: tuple[tuple[int, ...], ...]) -> tuple[list, list[int | None]]:
        """Per group ``(its split tensors' block ranges, adjacent ones merged; the first range or
        an empty one; whether it is the only one)``; per small piece, its group (``None``: none)."""
        owner = {i: g for g, members in enumerate(groups) for i in members}
        ranges: list[list[tuple[int, int]]] = [[] for _ in groups]
        for i, a, b in self.tensor_blocks:
            g = owner.get(i)
            if g is None:
                continue
            spans = ranges[g]
            if spans and spans[-1][1] == a:
                spans[-1] = (spans[-1][0], b)
            else:
                spans.append((a, b))
        return ([(spans, spans[0] if spans else (0, 0), len(spans) <= 1) for spans in ranges],
                [owner.get(i) for i in self.layout[1]])


__all__ = ["PieceBlocks"]
