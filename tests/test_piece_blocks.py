"""``PieceBlocks``: the row ring's layout of several steps' piece norms and their sums per group,
against the pieces summed one by one and against each group's squared norm in float64."""

from __future__ import annotations

import pytest
import torch

from genbounds.estimators.functional import piece_owners, piece_plan, squared_pieces
from genbounds.estimators.piece_blocks import PieceBlocks

SHAPES = {
    # split tensors of 392, 256 and 5 pieces (blocks of 40), small ones of one and of three pieces
    "mlp": [(512, 784), (512,), (512, 512), (512,), (10, 512), (10,), (3000,)],
    # two split tensors only: blocks of one piece
    "few": [(8, 1024), (300,), (4, 1024)],
    # no split tensor at all
    "small": [(300,), (20, 30), (7,)],
}
GROUPS = {
    "mlp": [[0, 1], [2, 3, 6], [4, 5]],
    "few": [[2], [0, 1]],  # (groups out of tensor order)
    "small": [[0, 2], [1]],
}


def _kept(shapes, k, seed=0):
    """``k`` steps' gradients of ``shapes``, their plan, blocks and the rows a ring would keep."""
    gen = torch.Generator().manual_seed(seed)
    steps = [[torch.randn(*s, generator=gen) * (1 + j) for s in shapes] for j in range(k)]
    plan = piece_plan(steps[0])
    assert plan is not None
    blocks = PieceBlocks(plan.layout)
    norms = torch.zeros(k, blocks.width)
    for grads, row in zip(steps, norms.unbind(0)):
        plan.norms_into(grads, *blocks.views_of(row))
    return steps, plan, blocks, norms


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_group_sums_equal_the_pieces_summed_one_by_one(case):
    groups = GROUPS[case]
    steps, plan, blocks, norms = _kept(SHAPES[case], 4)
    got = blocks.group_sums(norms, groups)
    owners = piece_owners(plan.layout)
    for grads, row in zip(steps, got):
        assert squared_pieces(grads)[1] == plan.layout  # (the general path's layout)
        pieces = plan.run(grads)[0].clone()  # (the pieces the ring keeps: the plan's own ops)
        want = [sum(float(pieces[p]) for p, t in enumerate(owners) if t in g) for g in groups]
        assert row == pytest.approx(want, rel=1e-12)
        exact = [sum(float(grads[t].double().square().sum()) for t in g) for g in groups]
        assert row == pytest.approx(exact, rel=1e-6)
    if case == "mlp":
        assert blocks.block == 40 and blocks.width % 40 == 0
    if case == "few":
        assert blocks.block == 1


def test_a_tensor_in_no_group_counts_nowhere_and_the_gaps_stay_zero():
    _, _, blocks, norms = _kept(SHAPES["mlp"], 2, seed=1)
    written = torch.zeros(blocks.width, dtype=torch.bool)
    slots, rest, _ = blocks.views_of(written)
    for s in (*slots, rest):
        s.fill_(True)
    assert not norms[:, ~written].any()  # (the zeros between the blocks)
    partial = blocks.group_sums(norms, [[0, 1], [4, 5]])  # tensors 2, 3 and 6 in no group
    full = blocks.group_sums(norms, GROUPS["mlp"])
    for p, f in zip(partial, full):
        assert p == pytest.approx([f[0], f[2]], rel=1e-12)


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_small_tensors_normed_where_they_lie_equal_the_gathered_pieces(case):
    """The plan's small tensors: each one's pieces normed where it lies (at most eight norms) or
    gathered into one zero-padded buffer first (the general path): the same pieces, equal up to
    the order of an fp32 sum within a piece."""
    grads = [torch.randn(*s, generator=torch.Generator().manual_seed(3)) for s in SHAPES[case]]
    plan = piece_plan(grads)
    assert plan is not None and plan.apart is not None  # (every case here takes at most eight norms)
    apart = plan.run(grads)[0].clone()
    gathered, layout = squared_pieces(grads)
    assert layout == plan.layout
    assert apart.tolist() == pytest.approx(gathered.tolist(), rel=1e-6)


def test_many_small_tensors_are_gathered():
    """Nine norms or more for the small tensors: one gather and one norm instead."""
    shapes = [(2048,)] + [(5,)] * 8 + [(1500,)]  # 1 + 8 + 2 = 11 norms apart
    grads = [torch.randn(*s) for s in shapes]
    plan = piece_plan(grads)
    assert plan is not None and plan.apart is None
    assert plan.run(grads)[0].tolist() == pytest.approx(squared_pieces(grads)[0].tolist(), rel=1e-12)
    fewer = piece_plan(grads[:8])  # 1 + 7 norms
    assert fewer is not None and fewer.apart is not None
