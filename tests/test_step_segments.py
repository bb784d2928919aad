"""``benchmarks/step_segments.py`` splits a step at the callback hooks: blocks (every callback's
hook) and segments (what runs between two hooks), from the two markers' timestamps."""

from __future__ import annotations

import pytest

from helpers import benchmark_module


def _module():
    return benchmark_module("step_segments")


def test_split_blocks_and_segments():
    seg = _module()
    log = [("fit_start", "first", 0.0)]
    t = 1.0
    charged = 0.0
    for _ in range(120):  # 120 steps: block i lasts (i+1) ms, the segment after it 10 ms
        for i, hook in enumerate(seg.HOOKS):
            log.append((hook, "first", t))
            if hook == "on_train_batch_start":
                log.append(("charged_now", "first", charged))
            t += (i + 1) * 1e-3
            log.append((hook, "last", t))
            if hook == "on_train_batch_end":
                charged += 1e-3  # 1 ms charged inside every step
                log.append(("charged_now", "last", charged))
            t += 10e-3
    log += [("fit_end", "last", t), ("charged", "last", 0.25)]
    parts = seg.split(log)
    for i, hook in enumerate(seg.HOOKS):
        assert parts["B:" + hook[3:]] == pytest.approx((i + 1) * 1e-3)
    assert parts["S:train_batch_start->before_zero_grad"] == pytest.approx(10e-3)
    assert parts["S:train_batch_end->train_batch_start"] == pytest.approx(10e-3)  # across steps
    assert parts["fit"] == pytest.approx(t) and parts["charged"] == 0.25
    # a step from the first batch start to the last batch end: 21 ms of blocks, 50 ms of segments
    assert parts["steps"] == pytest.approx(120 * 71e-3) and parts["charged_steps"] == pytest.approx(0.12)
    assert parts["outside"] == pytest.approx(t - 120 * 71e-3)
    table = seg.table([(parts, {**parts, "fit": 2 * t, "charged": t})])
    assert "**all blocks (the hooks, charged)** | | | **+0.0**" in table
    assert "suite / plain 2.000×" in table and "(suite − charged to the budget) / plain 1.000×" in table
