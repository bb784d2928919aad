"""Reduced-scale checks of benchmarks/repro_002_idealized.py (paper 002, idealized 2-D experiment)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "repro_002_idealized.py"


@pytest.fixture(scope="module")
def repro():
    name = "repro_002_idealized"
    spec = importlib.util.spec_from_file_location(name, _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered while it executes
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(name, None)


def _single(centers, amps, widths):
    f64 = torch.float64
    return {"centers": torch.tensor([centers], dtype=f64), "amps": torch.tensor([amps], dtype=f64),
            "widths": torch.tensor([widths], dtype=f64)}


def _hessian(repro, pop, x):
    return torch.autograd.functional.hessian(lambda z: repro.population_loss(z, pop), x)


def test_candidate_minimum_and_maximum_signs(repro):
    # well at (7,7) plus a far-away maximum at (1,1): (7,7) is a strict local minimum, (1,1) a strict maximum
    pop = _single([(7.0, 7.0), (1.0, 1.0)], [-10.0, 12.0], [1.5, 1.5])
    good = torch.tensor([7.0, 7.0], dtype=torch.float64)
    assert repro.candidate_grads(good, pop).norm() < 1e-5
    assert torch.linalg.eigvalsh(_hessian(repro, pop, good)).min() > 0
    peak = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert torch.linalg.eigvalsh(_hessian(repro, pop, peak)).max() < 0


def test_analytic_gradients_match_autograd(repro):
    cfg = repro.Config()
    pop = repro.make_population(cfg, np.random.default_rng(3))
    x = (torch.rand(7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 8).requires_grad_()
    vals = repro.candidate_values(x, pop)                      # (7, N)
    auto = torch.stack([torch.autograd.grad(vals[:, i].sum(), x, retain_graph=True)[0]
                        for i in range(vals.shape[1])], dim=1)
    torch.testing.assert_close(repro.candidate_grads(x.detach(), pop), auto)


@pytest.mark.parametrize("variant", ["main", "shallow"])
def test_population_loss_has_local_minimum_near_77(repro, variant):
    cfg = repro.Config() if variant == "main" else repro.Config(**repro.SHALLOW_BUMPS)
    pop = repro.make_population(cfg, np.random.default_rng(0))
    assert repro.population_min_near_good(pop)
    x = torch.tensor([7.0, 7.0], dtype=torch.float64)
    for _ in range(3000):  # plain descent on the population loss from (7,7) to the nearby local minimum
        x = x - 0.02 * repro.candidate_grads(x, pop).mean(0)
    assert (x - torch.tensor([7.0, 7.0], dtype=torch.float64)).norm() < 1.0
    assert repro.candidate_grads(x, pop).mean(0).norm() < 1e-4
    assert torch.linalg.eigvalsh(_hessian(repro, pop, x)).min() > 0


def test_tiny_experiment_shapes_and_finiteness(repro):
    cfg = repro.Config(n_train_sets=2, grid=3, iters=5, noise_repeats=2)
    res = repro.run_experiment(cfg, seed=1, record_set=0)
    for algo in ("gd", "sgd", "noisygd"):
        reps = 1 if algo == "gd" else 2
        assert res[algo]["final"].shape == (reps, 2, 9, 2)
        assert res[algo]["test"].shape == (reps, 2, 9)
        assert torch.isfinite(res[algo]["test"]).all() and torch.isfinite(res[algo]["train"]).all()
        assert ((res[algo]["final"] >= 0) & (res[algo]["final"] <= 8)).all()
        assert res[f"traj_{algo}"].shape == (6, 9, 2)
    assert res["sigma"].shape == (2,) and (res["sigma"] > 0).all()
    summ = repro.summarize([res])
    assert all(math.isfinite(summ[a]["mean"]) and summ[a]["se"] >= 0 for a in ("gd", "sgd", "noisygd"))


def test_zero_learning_rate_keeps_inits(repro):
    cfg = repro.Config(n_train_sets=2, grid=3)
    rng = np.random.default_rng(0)
    pop = repro.make_population(cfg, rng)
    members = repro.make_train_sets(cfg, rng)
    x0 = repro.grid_inits(3).expand(2, -1, -1).contiguous()
    sigma = repro.matched_noise_std(x0, pop, members)
    for algo in ("gd", "sgd", "noisygd"):
        xf, _ = repro.run_algorithm(algo, x0, pop, members, iters=10, lr0=0.0, decay=0.99,
                                    gen=torch.Generator().manual_seed(0), noise_std=sigma)
        torch.testing.assert_close(xf, x0, rtol=0, atol=0)
    # and a positive learning rate does move GD
    xf, _ = repro.run_algorithm("gd", x0, pop, members, iters=10, lr0=0.4, decay=0.99,
                                gen=torch.Generator().manual_seed(0))
    assert (xf - x0).abs().max() > 1e-3
