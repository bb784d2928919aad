"""``benchmarks/overhead_dispersion.py``'s per-process calibration: it must leave the model, its
buffers, its gradients and the RNG as they were (the run that follows trains the same), and the
speed-adjusted ratio divides each run by its own calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import benchmark_module


def _module():
    return benchmark_module("overhead_dispersion")


def test_calibration_changes_nothing():
    od = _module()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    rng = torch.get_rng_state()
    ms = od._calibrate(net, batch, 3)
    assert ms > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in net.parameters())


def test_speed_adjusted_ratios():
    od = _module()
    runs = [{"ms_per_step": 12.0, "calib_ms": 6.0}, {"ms_per_step": 15.0, "calib_ms": 10.0}, {"ms_per_step": 9.0}]
    base = [{"ms_per_step": 10.0, "calib_ms": 5.0}, {"ms_per_step": 10.0, "calib_ms": 8.0}, {"ms_per_step": 8.0}]
    assert od.speed_adjusted_ratios(runs, base) == pytest.approx([1.0, 1.2])
