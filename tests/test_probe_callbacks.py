"""Probe callbacks (SPEC §2–§5): observer effect, schedules, held-out handling, values."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from genbounds.callbacks import (
    Flatness,
    GradientSensitivity,
    HeldoutGradient,
    HessianContractivity,
    HessianTrace,
    ProbeSchedule,
)
from genbounds.data import DigitsDataModule
from genbounds.models import MLP, Classifier
from helpers import DropoutBatchNormNet, TensorData, csv_metric, linear_regressor, trainer, unit_sphere_regression


def all_probes(every: int = 3) -> list:
    return [
        HeldoutGradient(every_n_steps=every),
        GradientSensitivity(sigmas=[0.01, 0.1], num_draws=4, every_n_steps=every),
        Flatness(sigmas=[0.01, 0.1], num_draws=4, every_n_steps=every, scaling="sqrt_steps"),
        HessianTrace(max_probes=20, min_probes=4, top_eigenvalue=True, eig_max_iter=5, weighted_dispersion=True,
                     num_chunks=4, every_n_steps=every),
        HessianContractivity(num_points=4, every_n_steps=every),
    ]


def _run(tmp_path, callbacks, seed=0):
    pl.seed_everything(seed, verbose=False)
    module = Classifier(DropoutBatchNormNet(), lr=0.05)
    logger = CSVLogger(str(tmp_path), name="log")
    t = trainer(tmp_path, callbacks, max_epochs=2, logger=logger, limit_train_batches=6, limit_val_batches=2)
    t.fit(module, DigitsDataModule(batch_size=32, seed=seed))
    rng_after = torch.get_rng_state()
    return module, logger, rng_after


def test_every_probe_leaves_training_bit_identical(tmp_path):
    plain, plain_log, plain_rng = _run(tmp_path / "plain", [])
    probes = all_probes()
    observed, obs_log, obs_rng = _run(tmp_path / "observed", probes)
    for (name, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm running statistics
    assert torch.equal(plain_rng, obs_rng)  # the global RNG stream is where it would have been
    for metric in ("train_loss_step", "val_loss", "val_acc"):
        assert csv_metric(plain_log.log_dir, metric) == csv_metric(obs_log.log_dir, metric), metric
    # and the probes did run (dropout + BatchNorm model, every probe)
    for cb in probes:
        assert cb.num_probes_run >= 3, type(cb).__name__
    logged = set()
    import csv
    import glob
    import os

    (path,) = glob.glob(os.path.join(obs_log.log_dir, "metrics.csv"))
    with open(path) as fh:
        logged = set(next(csv.reader(fh)))
    for tag in ("grad/heldout_dist_sq", "gap/step_realized", "gap/predicted_cumulative",
                "sens/gradient_sensitivity/sigma=0.01", "sens/gradient_sensitivity_growing/sigma=0.1",
                "flat/term/sigma=0.1*sqrtT", "flat/term_se/sigma=0.1*sqrtT", "curv/hessian_trace",
                "curv/hessian_trace_se", "curv/hessian_top_eig", "curv/weighted_dispersion",
                "curv/contractivity_mean", "curv/contractivity_min", "curv/contractivity_exact"):
        assert tag in logged, tag


def test_probe_batches_are_drawn_once_and_cached_on_device(tmp_path):
    cb = HessianTrace(max_probes=10, probe_batch_size=48, num_probe_batches=2, every_n_epochs=1)
    _run(tmp_path, [cb])
    assert cb.train_probe is None  # released at teardown
    cb2 = HessianTrace(max_probes=10, probe_batch_size=48, num_probe_batches=2)
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("probe", cb2.train_probe)
            assert cb2.train_probe is seen["probe"]  # the same cached object every step

    _run(tmp_path / "b", [cb2, Spy()])
    x, _ = seen["probe"]
    assert x.shape[0] == 96 and x.device == torch.device("cpu")


def test_training_probe_is_a_seeded_subset_not_the_first_batch(tmp_path):
    """ĝ_tr must be independent of the training batches it is compared with (SPEC §2)."""
    firsts = {}

    class First(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            firsts.setdefault("batch", batch[0].clone())

    a, b = HessianTrace(max_probes=10), HessianTrace(max_probes=10)  # default seeds: data 0, callback 0
    seen = {}

    class Grab(pl.Callback):
        def __init__(self, key, probe_cb):
            self.key, self.probe_cb = key, probe_cb

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(self.key, self.probe_cb.train_probe[0].clone())

    _run(tmp_path, [First(), a, Grab("a", a)])
    _run(tmp_path / "again", [b, Grab("b", b)])
    assert seen["a"].shape == firsts["batch"].shape  # one loader batch's worth by default
    first = {tuple(r.tolist()) for r in firsts["batch"]}
    shared = sum(tuple(r.tolist()) in first for r in seen["a"])
    assert shared < len(first) // 2  # an independent draw, not B_1 (expected overlap 32²/1258 ≈ 1)
    assert torch.equal(seen["a"], seen["b"])  # seeded: the same subset in every run


def test_missing_validation_disables_only_heldout_quantities(tmp_path):
    x, y = unit_sphere_regression(64, 5)
    module = linear_regressor(5, lr=0.1)
    flat, sens = Flatness(sigmas=[0.1], num_draws=4, every_n_steps=2), GradientSensitivity(num_draws=4, every_n_steps=2)
    with pytest.warns(UserWarning) as caught:
        trainer(tmp_path, [flat, sens], max_steps=4, limit_val_batches=0).fit(module, TensorData(x, y, 16))
    messages = [str(w.message) for w in caught]
    assert sum("Flatness: no validation dataloader" in m for m in messages) == 1
    assert sum("GradientSensitivity: needs held-out data" in m for m in messages) == 1
    assert flat.num_probes_run > 0 and sens.num_probes_run == 0
    assert "flat/train/sigma=0.1" in flat.step_log.latest and "flat/term/sigma=0.1" not in flat.step_log.latest


@pytest.mark.parametrize("schedule", [{}, {"every_n_epochs": 1, "at_train_end": True}])
def test_weighted_dispersion_without_a_step_schedule_is_refused_before_step_0(tmp_path, schedule):
    """``Tr(H Σ_B)`` needs a step-start probe's training batch: with only epoch-end or train-end
    probes it was never logged, and nothing said so (a new user's walk, round 31)."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    t = trainer(tmp_path, [HessianTrace(weighted_dispersion=True, **schedule)], max_steps=2)
    with pytest.raises(MisconfigurationException, match="every_n_steps"):
        t.fit(Classifier(MLP(64, 10, 8)), DigitsDataModule())
    assert t.global_step == 0


def test_hessian_trace_callback_linear_regression_trace_is_one(tmp_path):
    x, y = unit_sphere_regression(64, 10, seed=2)
    module = linear_regressor(10, lr=0.0)
    ours = HessianTrace(rel_tol=0.02, max_probes=2000, block_size=50, every_n_epochs=None, at_train_end=True)
    theirs = HessianTrace(backend="pyhessian", max_probes=1500, every_n_epochs=None, at_train_end=True)
    records = []
    ours.channel.subscribe(records.extend)
    trainer(tmp_path, [ours, theirs], max_steps=2).fit(module, TensorData(x, y, 64, x_val=x, y_val=y))
    (rec,) = records
    assert abs(rec.hessian_trace - 1.0) < 3 * rec.hessian_trace_se
    t_val, t_se = theirs.step_log.latest["curv/hessian_trace"], theirs.step_log.latest["curv/hessian_trace_se"]
    assert abs(t_val - 1.0) < 3 * t_se and theirs.step_log.latest["curv/hessian_trace_probes"] == 1500
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def test_heldout_gradient_matches_hand_computation(tmp_path):
    """lr = 0, one full batch: ḡ_B is the training batch's gradient; the reference is exact."""
    d = 4
    x, y = unit_sphere_regression(40, d, seed=3)
    xv, yv = unit_sphere_regression(30, d, seed=4)
    module = linear_regressor(d, lr=0.0)
    cb = HeldoutGradient(every_n_steps=1, backend="functorch")
    records = []
    cb.channel.subscribe(records.extend)
    trainer(tmp_path, [cb], max_steps=3).fit(module, TensorData(x, y, 40, x_val=xv, y_val=yv))
    w = module.network.linear.weight.detach().double().squeeze(0)

    def grads(xx, yy):
        return (xx.double() @ w - yy.double().squeeze(1))[:, None] * xx.double()

    g_b, g_ref = grads(x, y).mean(0), grads(xv, yv).mean(0)
    per = grads(xv, yv)
    s2_ref = float(((per - g_ref) ** 2).sum() / (per.shape[0] - 1))
    expected = float(((g_b - g_ref) ** 2).sum()) - s2_ref / 30
    assert len(records) == 3
    assert records[0].heldout_dist_sq == pytest.approx(expected, rel=1e-5)
    assert records[0].step_realized == 0.0  # η = 0


def test_heldout_step_realized_matches_hand_computation(tmp_path):
    """lr > 0, one full batch: the training probe is the whole training set, so ĝ_tr = ḡ_B and the
    first record's ``gap/step_realized = η ḡ_B·(ḡ_B − ĝ_ref)`` at the initial weights (the two
    inner products taken one probe set at a time, each in float64)."""
    d, lr = 4, 0.1
    x, y = unit_sphere_regression(40, d, seed=3)
    xv, yv = unit_sphere_regression(30, d, seed=4)
    module = linear_regressor(d, lr=lr)
    w = module.network.linear.weight.detach().double().squeeze(0).clone()
    cb = HeldoutGradient(every_n_steps=1, backend="functorch")
    records = []
    cb.channel.subscribe(records.extend)
    trainer(tmp_path, [cb], max_steps=2).fit(module, TensorData(x, y, 40, x_val=xv, y_val=yv))

    def grads(xx, yy):
        return (xx.double() @ w - yy.double().squeeze(1))[:, None] * xx.double()

    g_b, g_ref = grads(x, y).mean(0), grads(xv, yv).mean(0)
    expected = lr * float(g_b @ (g_b - g_ref))
    assert abs(expected) > 1e-4
    assert records[0].step_realized == pytest.approx(expected, rel=1e-5)


def test_heldout_probe_step_holds_one_probe_sets_gradient_sum_at_a_time(tmp_path, monkeypatch):
    """The held-out set's gradient sum is released before the training probe's pass (the probe
    step's peak memory: one parameter set's sum, not both sums with their means and differences)."""
    import gc
    import weakref

    import genbounds.callbacks.heldout_gradient as hg

    alive_at_second: list[bool] = []
    refs: list[list[weakref.ref]] = []
    moments = hg.HeldoutGradient._moments

    def watched(self, trainer, pl_module, batch):
        if len(refs) % 2 == 1:
            gc.collect()
            alive_at_second.append(any(r() is not None for r in refs[-1]))
        out = moments(self, trainer, pl_module, batch)
        refs.append([weakref.ref(t) for t in out.weighted_sum])
        return out

    monkeypatch.setattr(hg.HeldoutGradient, "_moments", watched)
    x, y = unit_sphere_regression(40, 4, seed=3)
    cb = HeldoutGradient(every_n_steps=1)
    trainer(tmp_path, [cb], max_steps=2).fit(linear_regressor(4, lr=0.1), TensorData(x, y, 20, x_val=x, y_val=y))
    assert alive_at_second == [False, False]


def test_predicted_cumulative_sums_every_step_with_its_own_lr(tmp_path):
    x, y = unit_sphere_regression(64, 4, seed=5)
    module = linear_regressor(4, lr=0.1)
    cb = HeldoutGradient(every_n_steps=4, backend="functorch")
    records = []
    cb.channel.subscribe(records.extend)
    trainer(tmp_path, [cb], max_steps=10).fit(module, TensorData(x, y, 16, x_val=x, y_val=y))
    assert [r.step for r in records] == [0, 4, 8]
    # between measurements each step adds η·s²/n with the last s²: 4 steps per block
    first, second = records[0], records[1]
    assert second.predicted_cumulative == pytest.approx(
        first.predicted_cumulative + 3 * first.step_predicted + second.step_predicted, rel=1e-9)
    assert cb.predicted_cumulative == pytest.approx(records[-1].predicted_cumulative + records[-1].step_predicted)  # step 9


def test_sensitivity_growing_levels_use_sigma_sqrt_steps(tmp_path):
    x, y = unit_sphere_regression(64, 4, seed=6)
    module = linear_regressor(4, lr=0.0)  # fixed weights: Γ at σ√t equals Γ_σ·t for a quadratic
    cb = GradientSensitivity(sigmas=[0.1], num_draws=64, every_n_steps=4)
    records = []
    cb.channel.subscribe(records.extend)
    trainer(tmp_path, [cb], max_steps=9).fit(module, TensorData(x, y, 16, x_val=x, y_val=y))
    assert [r.step for r in records] == [0, 4, 8]
    assert records[0].growing_value == [0.0]  # σ√0 = 0
    # linear regression has a constant Hessian: Γ(σ√t) = t·Γ(σ) exactly, draw by draw
    for rec in records[1:]:
        assert rec.growing_value[0] == pytest.approx(rec.step * rec.value[0], rel=1e-4)


def test_schedules():
    s = ProbeSchedule(log_spaced=3)
    due = [t for t in range(1000) if s.due_at_step(t)]
    assert due[:6] == [0, 2, 4, 9, 21, 46] and len(due) == 10  # 3 per decade
    assert ProbeSchedule(every_n_steps=5).due_at_step(10) and not ProbeSchedule(every_n_steps=5).due_at_step(11)
    e = ProbeSchedule(every_n_epochs=2)
    assert [ep for ep in range(6) if e.due_at_epoch_end(ep)] == [1, 3, 5]


def test_probe_state_round_trip(tmp_path):
    cb = Flatness(sigmas=[0.1], num_draws=4, every_n_steps=2)
    _run(tmp_path, [cb])
    state = cb.state_dict()
    fresh = Flatness(sigmas=[0.1], num_draws=4, every_n_steps=2)
    fresh.load_state_dict(state)
    assert fresh.num_probes_run == cb.num_probes_run and fresh._last_probe_step == cb._last_probe_step
    # a probe's draws depend on (seed, step) only: the restored callback draws what the original would
    cb._probe_step = fresh._probe_step = 7
    g1 = cb.generator(torch.device("cpu"))
    g2 = fresh.generator(torch.device("cpu"))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    cb._probe_step = 8
    assert not torch.equal(torch.rand(3, generator=cb.generator(torch.device("cpu"))),
                           torch.rand(3, generator=fresh.generator(torch.device("cpu"))))


def test_invalid_probe_arguments_fail_in_init():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException):
        Flatness(sigmas=[])
    with pytest.raises(MisconfigurationException):
        Flatness(scaling="quadratic")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException):
        HessianTrace(min_probes=50, max_probes=10)
    with pytest.raises(MisconfigurationException):
        HessianContractivity(num_points=1)
    with pytest.raises(MisconfigurationException):
        GradientSensitivity(every_n_steps=0)


def test_flatness_on_mlp_is_positive_and_grows_with_sigma(tmp_path):
    torch.manual_seed(0)
    module = Classifier(MLP(64, 10, 32), lr=0.1)
    cb = Flatness(sigmas=[0.01, 0.1], num_draws=16, every_n_epochs=1)
    trainer(tmp_path, [cb], max_epochs=3, limit_train_batches=10, limit_val_batches=1).fit(
        module, DigitsDataModule(batch_size=64))
    small, big = cb.step_log.latest["flat/train/sigma=0.01"], cb.step_log.latest["flat/train/sigma=0.1"]
    assert big > small and big > 3 * cb.step_log.latest["flat/train_se/sigma=0.1"]
    assert math.isfinite(cb.step_log.latest["flat/term/sigma=0.1"])


@pytest.mark.parametrize("kwargs", [dict(every_n_steps=21), dict(log_spaced=3), dict(log_spaced=25),
                                    dict(every_n_steps=7, log_spaced=2), dict(every_n_epochs=2)])
def test_next_due_step_is_the_first_due_step_after(kwargs):
    """What a probe sleeps until (callbacks/hook_clock.py): against a search over due_at_step."""
    import math

    from genbounds.callbacks.probe_schedule import ProbeSchedule

    schedule = ProbeSchedule(**kwargs)
    for step in range(3000):
        expected = next((t for t in range(step + 1, 12000) if schedule.due_at_step(t)), math.inf)
        assert schedule.next_due_step(step) == expected, (kwargs, step)


def test_hessian_trace_hands_its_warm_start_to_the_power_iteration(tmp_path, monkeypatch):
    """The last probe's eigenvector starts the next power iteration and is not kept beside it
    (one parameter set less at the probe's peak): while the iteration runs the callback holds no
    reference of its own, and afterwards it keeps the new vector."""
    import genbounds.callbacks.hessian_trace as ht

    cb = HessianTrace(max_probes=4, min_probes=4, top_eigenvalue=True, eig_max_iter=3, every_n_steps=2)
    calls = []
    original = ht.top_eigenvalue

    def watching(op, generator, *, init=None, **kwargs):
        calls.append((init is not None, cb._eigvec is None))
        result = original(op, generator, init=init, **kwargs)
        assert result.vector is not None
        return result

    monkeypatch.setattr(ht, "top_eigenvalue", watching)
    _run(tmp_path, [cb])
    assert len(calls) >= 3
    assert calls[0] == (False, True)  # the first probe starts cold
    assert all(call == (True, True) for call in calls[1:])  # then warm, handed over
    assert cb._eigvec is not None
