"""StepRows: where a measured step's per-module values land (estimators/ghost_norms/step_rows.py)."""

from __future__ import annotations

import torch

from genbounds.estimators.ghost_norms.linear import goodfellow_row_norms
from genbounds.estimators.ghost_norms.step_rows import StepRows, step_buffers_for

CPU = torch.device("cpu")


def test_own_rows_are_reused_by_the_next_step_of_the_same_shape_only():
    rows = StepRows(3)
    rows.take(4, torch.float32, CPU)
    first = rows.rows
    rows.reset()
    rows.take(4, torch.float32, CPU)
    assert rows.rows is first  # the spare
    rows.reset()
    rows.take(5, torch.float32, CPU)
    assert rows.rows is not first and rows.rows.shape == (3, 5)
    rows.reset()
    rows.take(5, torch.float64, CPU)
    assert rows.rows.dtype == torch.float64


def test_rows_widen_and_never_narrow_and_a_widened_lent_row_is_no_longer_lent():
    lent = step_buffers_for(2, 3, torch.float32, CPU)
    rows = StepRows(2)
    rows.lender = lambda b, dtype, device: lent
    rows.take(3, torch.float32, CPU)
    assert rows.lent and rows.rows is lent[0]
    value = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) + 1e-12  # not representable in fp32
    rows.store(1, value)
    assert rows.rows.dtype == torch.float64 and not rows.lent
    assert torch.equal(rows.views[1], value)
    rows.store(0, torch.ones(3, dtype=torch.float32))  # narrower: written into the wide rows
    assert rows.rows.dtype == torch.float64
    assert rows.written == {0, 1}


def test_unwritten_rows_are_zeroed_when_read_and_written_ones_kept():
    rows = StepRows(3)
    rows.take(2, torch.float32, CPU)
    rows.rows.fill_(7.0)  # what a previous step left (rows are not zeroed when taken)
    rows.store(1, torch.tensor([1.0, 2.0]))
    rows.zero_unwritten()
    assert rows.rows.tolist() == [[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]


def test_deferred_linear_rows_equal_the_per_sample_closed_form():
    """‖∇_W ℓ_i‖² + ‖∇_c ℓ_i‖² = ‖δ_i‖² (‖a_i‖² + [bias]) for the deferred sites; the others'
    rows untouched; sums_of gives the same row sums for a stack of steps."""
    torch.manual_seed(0)
    b = 5
    rows = StepRows(3)
    rows.take(b, torch.float64, CPU)
    x0, g0 = torch.randn(b, 4, dtype=torch.float64), torch.randn(b, 6, dtype=torch.float64)
    g2 = torch.randn(b, 2, dtype=torch.float64)
    other = torch.randn(b, dtype=torch.float64)
    assert rows.write_pair(0, x0, g0, bt=True)
    rows.store(1, other)  # another kind of layer: its own row
    assert rows.write_pair(2, None, g2, bt=True)  # frozen weight, trainable bias
    assert not rows.write_pair(1, x0.float(), g0.float(), bt=True)  # another dtype: the general route
    pairs = rows.pairs.clone()
    rows.finish_linear()
    # brute force: per-sample gradients of a Linear are δ_i a_iᵀ (weight) and δ_i (bias)
    want0 = torch.stack([torch.outer(g0[i], x0[i]).square().sum() + g0[i].square().sum() for i in range(b)])
    want2 = g2.square().sum(1)
    torch.testing.assert_close(rows.rows[0], want0, rtol=1e-12, atol=0)
    assert torch.equal(rows.rows[1], other)
    torch.testing.assert_close(rows.rows[2], want2, rtol=1e-12, atol=0)
    stacked_rows = torch.stack([torch.zeros(3, b, dtype=torch.float64)] * 2)
    stacked_rows[:, 1] = other
    sums = rows.sums_of(stacked_rows, torch.stack([pairs, pairs]), ((0, True), (2, True)))
    torch.testing.assert_close(sums, rows.rows.sum(1).expand(2, 3), rtol=1e-12, atol=0)


def test_pair_norms_are_what_goodfellow_row_norms_writes():
    rows = StepRows(1)
    rows.take(3, torch.float32, CPU)
    x, g = torch.randn(3, 4), torch.randn(3, 2)
    rows.write_pair(0, x, g, bt=False)
    want_g, want_a = torch.empty(3), torch.empty(3)
    goodfellow_row_norms(x, g, want_g, want_a)
    assert torch.equal(rows.pair_views[0][0], want_g) and torch.equal(rows.pair_views[0][1], want_a)
    assert rows.deferred == [(0, False)]
