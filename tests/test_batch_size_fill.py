"""The dispersion's filling at each step's own batch size (docs/math.md §6.8).

``Tr Σ_B = tr Σ/b``: a loader that keeps its last, smaller batch has one step an epoch whose
dispersion is ``b/b_last`` times the others'. Before, a measurement stood for the unmeasured steps of
its block at its own size, so whether a stride measured the small batch moved the bounds far beyond
their SE (Wang–Mao Eq. 3 19 vs 34 for the same seed in two sweep recordings).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import CrossEntropyModule, trainer
from torch.utils.data import DataLoader, TensorDataset

from genbounds.bounds.series import (
    expand_blocks,
    expand_blocks_scaled,
    fill_standard_error,
    size_scaling,
)
from genbounds.callbacks import GeneralizationBound, GradientDispersion, HessianTrace
from genbounds.callbacks.dispersion.step_sizes import StepSizes


def _epoch_sizes(T: int, full: int = 32, last: int = 2, per_epoch: int = 5) -> np.ndarray:
    """Batch sizes of T steps: ``per_epoch − 1`` full batches then one of ``last`` samples."""
    return np.array([last if (t % per_epoch) == per_epoch - 1 else full for t in range(T)], dtype=np.float64)


def test_scaling_is_none_for_one_batch_size_or_an_unknown_size():
    """One size everywhere: plain block filling, bit for bit; an unknown size (0), a measured step
    outside the sizes, or no sizes: plain block filling too (the filling falls back, never guesses)."""
    T = 20
    steps = [0, 4, 9]
    assert size_scaling(steps, np.full(T, 32.0), T) is None
    b = _epoch_sizes(T)
    assert size_scaling(steps, b, T) is not None
    assert size_scaling(steps, None, T) is None
    unknown = b.copy()
    unknown[7] = 0.0
    assert size_scaling(steps, unknown, T) is None
    assert size_scaling([0, 4, 25], b, T) is None
    assert size_scaling(steps, b[:10], T) is None
    vals = [1.0, 2.0, 3.0]
    assert np.array_equal(expand_blocks_scaled(steps, vals, T, None), expand_blocks(steps, vals, T))


def test_scaled_filling_leaves_measured_values_and_equal_sizes_bit_for_bit():
    """Every step measured, sizes 100 and 7: the filled series is the measured one exactly (the
    size ratio is 1.0 exactly there; a review found ``(V·b)/b`` off in the last bits at 125 of 1,000
    steps); unmeasured steps of a block's own size take its value exactly."""
    rng = np.random.default_rng(0)
    T = 1000
    b = np.where(rng.random(T) < 0.2, 7.0, 100.0)
    v = rng.random(T) * 3.7
    scaling = size_scaling(np.arange(T), b, T)
    assert scaling is not None
    assert np.array_equal(expand_blocks_scaled(np.arange(T), v, T, scaling), v)
    steps = np.arange(0, T, 4)
    filled = expand_blocks_scaled(steps, v[steps], T, size_scaling(steps, b, T))
    same = b == b[steps][np.searchsorted(steps, np.arange(T), side="right") - 1]
    assert np.array_equal(filled[same], expand_blocks(steps, v[steps], T)[same])


def test_scaled_filling_is_exact_for_a_constant_level_whatever_the_stride():
    """``V_t = S/b_t`` with a constant ``S``: the scaled filling recovers every step exactly from any
    measured subset, measured steps keep their values; the plain filling is off by the size ratio
    wherever a block spans the small batch (the stride of the epoch length never measures it)."""
    T = 100
    b = _epoch_sizes(T)
    truth = 64.0 / b
    for steps in (np.arange(0, T, 5), np.arange(0, T, 3), np.array([0, 4, 37, 62, 99]), np.arange(T)):
        scaling = size_scaling(steps, b, T)
        filled = expand_blocks_scaled(steps, truth[steps], T, scaling)
        np.testing.assert_allclose(filled, truth, rtol=1e-12)
        np.testing.assert_array_equal(filled[steps], truth[steps])
    plain = expand_blocks(np.arange(0, T, 5), truth[np.arange(0, T, 5)], T)
    assert float(np.sum(plain)) < 0.3 * float(np.sum(truth))  # (the 2-sample batches carry 80 % of it)


def _simulate(steps: np.ndarray, T: int, runs: int = 400) -> dict[str, tuple[float, float, float]]:
    """``(mean error, spread of the error, mean SE)`` of ``Σ η² V̂`` over simulated runs, scaled and
    plain filling: the size-free level ``x_t`` (``s²``, estimated from ``b_t`` samples) gamma-distributed
    around ``μ_t`` (a trend) with a relative spread of ``0.3·√(32/b_t)`` — 30 % at 32 samples, 120 % at
    2 — and ``V_t = x_t/b_t`` at a 32/32/32/32/2 epoch."""
    eta2 = np.full(T, 0.01)
    b = _epoch_sizes(T)
    rng = np.random.default_rng(0)
    mu = np.linspace(1.0, 3.0, T)
    scaling = size_scaling(steps, b, T)
    assert scaling is not None
    b_s, b_t = scaling
    out: dict[str, list[list[float]]] = {"scaled": [[], []], "plain": [[], []]}
    for _ in range(runs):
        shape = b / (32 * 0.09)  # (relative spread 1/√shape = 0.3·√(32/b))
        v = rng.gamma(shape, mu / shape) / b
        truth = float(np.sum(eta2 * v))
        out["scaled"][0].append(float(np.sum(eta2 * expand_blocks_scaled(steps, v[steps], T, scaling))) - truth)
        out["scaled"][1].append(fill_standard_error(steps, v[steps] * b_s, eta2, scale=1.0 / b_t))
        out["plain"][0].append(float(np.sum(eta2 * expand_blocks(steps, v[steps], T))) - truth)
        out["plain"][1].append(fill_standard_error(steps, v[steps], eta2))
    return {k: (float(np.mean(e)), float(np.std(e)), float(np.mean(se))) for k, (e, se) in out.items()}


@pytest.mark.parametrize("stride", [3, 5])
def test_scaled_filling_and_its_standard_error_are_calibrated_where_plain_filling_is_not(stride):
    """Measured every 3rd step (prime to the 5-step epoch) or every 5th (the epoch's length: always
    the same batch of the epoch, never the small one). Over 400 simulated runs the scaled filling's
    mean error is within 3 of its SEs of 0 and its SE (``fill_standard_error`` on the levels with
    weights ``η²/b_t`` and noise variance ``∝ 1/b_t``) is within [0.9, 1.5]× the spread of its
    actual error. Plain filling: at the epoch's stride its mean error is many times its own SE (a
    bias its SE cannot see); prime to it it is unbiased, but its SE is larger than the scaled one's."""
    T = 600
    res = _simulate(np.arange(0, T, stride), T)
    mean, spread, se = res["scaled"]
    assert abs(mean) < 3 * spread / math.sqrt(400) + 1e-12, res
    assert 0.9 < se / spread < 1.5, res
    p_mean, _, p_se = res["plain"]
    if stride == 5:
        assert abs(p_mean) > 5 * p_se, res
    else:
        assert p_se > 1.2 * se, res


def test_step_sizes_run_length_accumulation_resume_and_unknown():
    """Runs change only where the size does; micro-batches of one window add up; a fit that starts
    again at an earlier step (from 0, or resumed) overwrites from there; a batch whose size cannot be
    read is unknown (0); the state round-trips with the step under way."""
    x = torch.zeros(32, 3)
    small = torch.zeros(2, 3)
    sizes = StepSizes()
    for step in range(10):
        batch = small if step % 5 == 4 else x
        sizes.add(step, (batch, batch[:, 0]), True)
    assert sizes.runs() == ([0, 4, 5, 9], [32, 2, 32, 2])
    np.testing.assert_array_equal(sizes.array(10), _epoch_sizes(10))
    acc = StepSizes()
    for i, step in enumerate([0, 0, 1, 1]):
        acc.add(step, (x,) if i < 3 else (small,), first=i % 2 == 0)
    np.testing.assert_array_equal(acc.array(2), [64.0, 34.0])
    sizes.truncate(5)
    sizes.add(5, (small,), True)
    sizes.add(6, (x,), True)
    assert sizes.runs() == ([0, 4, 6], [32, 2, 32])  # (step 5 now as small as step 4: one run)
    state = sizes.state_dict()
    again = StepSizes()
    again.load_state_dict(state)
    assert again.runs() == sizes.runs()
    odd = StepSizes()
    odd.add(0, {"a": torch.zeros(3), "b": torch.zeros(4)}, True)
    odd.add(1, (x,), True)
    np.testing.assert_array_equal(odd.array(2), [0.0, 32.0])
    assert size_scaling([1], odd.array(2), 2) is None


class _SmallNet(CrossEntropyModule):
    lr = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


def _small_last_batch_fit(tmp_path, every_n_steps: int) -> GeneralizationBound:
    """A fit whose shuffled loader keeps an 8-sample last batch (72 = 2·32 + 8 samples: three steps
    an epoch, the third with a dispersion about four times the others')."""
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(72, 8, generator=g), torch.randn(64, 8, generator=g)
    y, yv = (x[:, 0] > 0).long(), (xv[:, 0] > 0).long()
    pl.seed_everything(0)
    bound = GeneralizationBound(bounds=["wang_mao_eq3"], num_train=72, summary=False)
    callbacks = [GradientDispersion(every_n_steps=every_n_steps), HessianTrace(min_probes=4, max_probes=8), bound]
    t = trainer(tmp_path / f"every{every_n_steps}", callbacks, max_epochs=20)
    t.fit(_SmallNet(), DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
          DataLoader(TensorDataset(xv, yv), batch_size=64))
    return bound


def test_a_stride_that_skips_the_small_last_batch_keeps_the_dense_sum(tmp_path):
    """Measured every 3rd step, the stride of the epoch's three steps never measures the 8-sample
    batch. The bounds' ``Σ η² V̂`` agrees with the every-step run's within 20 % (the every-step sum
    has its own noise: the small batches' dispersion is estimated from 8 samples); filled as before,
    each measurement standing for the small batch at its own size, it is about a third too low."""
    dense = _small_last_batch_fit(tmp_path, 1).latest
    sparse_bound = _small_last_batch_fit(tmp_path, 3)
    sparse = sparse_bound.latest
    d = dense["bound_terms/sum_eta2_dispersion"]
    s, se = sparse["bound_terms/sum_eta2_dispersion"], sparse["bound_terms/sum_eta2_dispersion_se"]
    assert dense["bound_terms/sum_eta2_dispersion_se"] == 0.0
    assert se > 0 and math.isfinite(se)
    series = sparse_bound.series
    T = len(series.lrs)
    assert T == 60 and set(np.asarray(series.dispersion_steps) % 3) == {0}
    plain = float(np.sum(np.asarray(series.lrs) ** 2 * expand_blocks(series.dispersion_steps,
                                                                      series.dispersion_values, T)))
    assert abs(s - d) < 0.2 * d, (s, d, se)
    assert plain < 0.8 * d, (plain, d)


def test_equal_batches_fill_as_before():
    """Every batch the same size (``drop_last=True``): nothing changes — ``size_scaling`` is None."""
    sizes = StepSizes()
    for step in range(6):
        sizes.add(step, (torch.zeros(32, 2),), True)
    assert size_scaling([0, 3], sizes.array(6), 6) is None


@pytest.mark.parametrize("n, drop_last, fit_kwargs, said", [
    (66, False, {}, "2 to 32 samples", ), (80, False, {}, None), (66, True, {}, None),
    (258, False, {"accumulate_grad_batches": 4}, "2 to 128 samples"),
    (226, False, {"accumulate_grad_batches": 4}, None), (226, False, {"limit_train_batches": 4}, None)])
def test_small_batches_are_said_once_from_the_steps_as_trained(tmp_path, n, drop_last, fit_kwargs, said):
    """Said once, at the first epoch's end, from the optimizer steps' sizes as trained: 66 samples in
    batches of 32 keep a 2-sample last batch (16×); 80 keep 16 (half a batch: not said);
    ``drop_last=True`` none; with ``accumulate_grad_batches=4``, 258 samples leave a 2-sample step
    after two of 128 (64×), 226 a step of 98 (not said); ``limit_train_batches=4`` never trains the
    small last batch (not said). (A review: the first version read the loader alone and was wrong
    in the last three.)"""
    import warnings

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    t = trainer(tmp_path, [GradientDispersion()], max_epochs=2, **fit_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(_SmallNet(), DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=drop_last))
    notes = [str(w.message) for w in caught if "had batches of" in str(w.message)]
    assert len(notes) == (1 if said else 0), notes
    if said:
        ratio = "16×" if said.endswith("32 samples") else "64×"
        assert f"epoch 0 had batches of {said}" in notes[0] and f"about {ratio}" in notes[0], notes[0]


class _StopAt(pl.Callback):
    """Ends the fit after ``step`` optimizer steps (as EarlyStopping would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class _RequiredCost(pl.Callback):
    """Records, after each step, what the budget holds back for Neu's midway Γ probe."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bound = next(cb for cb in trainer.callbacks if isinstance(cb, GeneralizationBound))
        budget = bound.budget
        self.seen.append((trainer.global_step, bound.midway.required_cost(), budget.reserve, budget._reserve or 0.0))


def _neu_suite(gamma_every: int | None, overhead_budget: float | None = None) -> list[pl.Callback]:
    from helpers import bound_suite

    from genbounds.callbacks import GradientSensitivity

    suite = bound_suite(bounds=["neu", "wang_mao_eq3"], summary=False, overhead_budget=overhead_budget)
    suite[2] = GradientSensitivity(sigmas=[1e-3, 1e-2, 1e-1], num_draws=4, every_n_steps=gamma_every)
    return suite


def _neu_fit(tmp_path, gamma_every: int | None, val_every: int = 1, stop_at: int | None = None,
             overhead_budget: float | None = None, suite: list[pl.Callback] | None = None, name: str = "",
             **trainer_kwargs: Any) -> tuple[GeneralizationBound, list[str], _RequiredCost]:
    """By default 24 steps (6 epochs of 4); Neu's midway Γ step is then 12."""
    import warnings

    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    y, yv = (x[:, 0] > 0).long(), (xv[:, 0] > 0).long()
    pl.seed_everything(0)
    suite = suite if suite is not None else _neu_suite(gamma_every, overhead_budget)
    watch = _RequiredCost()
    extra = [watch] + ([_StopAt(stop_at)] if stop_at is not None else [])
    trainer_kwargs.setdefault("max_epochs", 6)
    t = trainer(tmp_path / f"gamma{gamma_every}-{val_every}-{stop_at}-{overhead_budget}{name}", suite + extra,
                check_val_every_n_epoch=val_every, **trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(_SmallNet(), DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
              DataLoader(TensorDataset(xv, yv), batch_size=64))
    return suite[5], [str(w.message) for w in caught], watch


def _gamma_steps(bound: GeneralizationBound) -> list[int]:
    return sorted({s for s in bound.series.sensitivity_steps if s >= 1})


def test_the_bound_asks_for_gamma_at_the_run_s_middle_step_when_the_schedule_gives_none(tmp_path):
    """No Γ probe in the schedule: the bound has Γ probe the weights at the run's middle step (12
    of 24), and the final evaluation the final weights — two probes stand for the run, Neu is
    finite, nothing is said (docs/math.md §6.9). Before, Γ from the final weights alone left Neu NaN.
    The midway probe draws what a scheduled probe at step 12 draws (its generator is seeded from
    the step): its record is bit-identical to that of a run with ``every_n_steps=12``. With bound
    evaluations at the end only, or every epoch."""
    for val_every in (1, 6):
        bound, said, _ = _neu_fit(tmp_path, None, val_every=val_every)
        assert _gamma_steps(bound) == [12, 24]
        assert math.isfinite(bound.latest["bound/neu"]) and bound.latest["bound/neu_se"] > 0
        assert math.isfinite(bound.latest["bound/wang_mao_eq3"])
        assert not [m for m in said if "Γ (GradientSensitivity) was probed at" in m], said
    scheduled, _, _ = _neu_fit(tmp_path, 12, val_every=6)
    assert _gamma_steps(scheduled) == [12, 24]
    i, j = bound.series.sensitivity_steps.index(12), scheduled.series.sensitivity_steps.index(12)
    assert bound.series.sensitivity_values[i] == scheduled.series.sensitivity_values[j]
    assert bound.series.sensitivity_se[i] == scheduled.series.sensitivity_se[j]


def test_a_scheduled_gamma_probe_at_the_middle_step_is_the_midway_one_and_a_later_one_does_not_replace_it(tmp_path):
    """Γ every 12 steps: its probe at step 12 is the midway probe (whichever asks first measures;
    step 12 is in the series once). Γ every 20 steps: the schedule would probe at 20, after the
    middle, but the bound does not wait for it — a fit stopped at step 16 (as EarlyStopping would)
    still has two probes and a finite Neu (a review: leaving it to the schedule left Neu NaN there)."""
    bound, _, _ = _neu_fit(tmp_path, 12, val_every=6)
    assert bound.series.sensitivity_steps.count(12) == 1 and _gamma_steps(bound) == [12, 24]
    bound, said, _ = _neu_fit(tmp_path, 20)
    assert _gamma_steps(bound) == [12, 20]  # (two stand for the run: the final evaluation asks for none)
    bound, said, _ = _neu_fit(tmp_path, 20, stop_at=16)
    assert _gamma_steps(bound) == [12, 16]
    assert math.isfinite(bound.latest["bound/neu"]) and bound.latest["bound/neu_se"] > 0
    assert not [m for m in said if "Γ (GradientSensitivity) was probed at" in m]


def test_a_second_fit_of_the_same_callbacks_takes_its_own_midway_probe(tmp_path):
    """The same callbacks in a second Trainer: the first fit's last Γ probe was at step 12, the
    second fit's middle step is 12 too. Before, the probe of step 12 was taken for done (the last
    probed step was never reset between fits): Neu NaN in the second fit (a review)."""
    suite = _neu_suite(None)
    bound, _, _ = _neu_fit(tmp_path, None, suite=suite, name="first", max_epochs=-1, max_steps=12)
    assert _gamma_steps(bound) == [6, 12]
    bound, said, _ = _neu_fit(tmp_path, None, suite=suite, name="second", max_epochs=-1, max_steps=24)
    assert _gamma_steps(bound) == [12, 24] and math.isfinite(bound.latest["bound/neu"])


def test_under_an_accumulation_schedule_the_middle_step_is_the_run_s(tmp_path):
    """``GradientAccumulationScheduler({0: 1, 1: 4})`` over 6 epochs of 4 batches: 4 steps, then one
    an epoch — 9 in all, where ``estimated_stepping_batches`` read 24 at the fit's start and the
    middle step (12) was never reached (a review). The horizon now sums each epoch at its own
    accumulation: the middle step is 5."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    suite = _neu_suite(None) + [GradientAccumulationScheduler({0: 1, 1: 4})]
    bound, _, _ = _neu_fit(tmp_path, None, suite=suite, val_every=6)
    assert bound.midway.step == 5 and _gamma_steps(bound) == [5, 9]
    assert math.isfinite(bound.latest["bound/neu"])


def test_neu_is_nan_and_says_why_where_the_fit_ends_before_its_middle_step(tmp_path):
    """A fit that stops at step 8 of 24 (as EarlyStopping would) never reaches the midway probe:
    Γ from the final weights alone would stand for the whole run with an error nothing measured
    tells — Neu is NaN, flagged invalid, with one note naming the probe's step and the midway step
    not reached; Eq. 3 is unaffected."""
    bound, said, _ = _neu_fit(tmp_path, None, val_every=6, stop_at=8)
    assert _gamma_steps(bound) == [8]
    assert math.isnan(bound.latest["bound/neu"]) and bound.latest["bound_valid/neu"] == 0.0
    assert math.isfinite(bound.latest["bound/wang_mao_eq3"])
    notes = [m for m in said if "NaN at step 8: Γ (GradientSensitivity) was probed at one step (8)" in m]
    assert len(notes) == 1, said
    assert "the midway probe at step 12 was not taken" in notes[0]


def test_under_a_budget_the_midway_probe_is_reserved_then_runs_whatever_the_budget(tmp_path):
    """Γ due every 3 steps under a budget too small for any probe during training: the midway
    probe runs at step 12 all the same (at its fewest draws), and until it ran its expected cost was
    part of the reserve the other probes and the dispersion leave free; after it, none."""
    bound, said, watch = _neu_fit(tmp_path, 3, overhead_budget=1e-3)
    assert _gamma_steps(bound) == [12, 24]
    assert math.isfinite(bound.latest["bound/neu"])
    before = [(cost, reserve, base) for step, cost, reserve, base in watch.seen if step < 12]
    after = [(cost, reserve, base) for step, cost, reserve, base in watch.seen if step > 12]
    assert before and all(cost > 0 and reserve == pytest.approx(base + cost) for cost, reserve, base in before)
    assert after and all(cost == 0.0 and reserve == base for cost, reserve, base in after)
    assert not [m for m in said if "Γ (GradientSensitivity) was probed at" in m]


def _gamma_fill_coverage(steps: list[int], trend, T: int = 300, runs: int = 400, widen: bool = True) -> float:
    """Fraction of simulated runs whose Γ filling error ``Σ_τ Γ̂_τ − Σ_τ Γ_τ`` lies within ±1.96 of
    ``growing_level_fill_se`` (``Γ_τ = τ·y_τ``, ``y`` a trend with 30 % relative noise per step,
    probed at ``steps``). ``widen=False`` divides :func:`few_differences_factor` back out."""
    from genbounds.bounds.series import few_differences_factor, growing_level_fill_se, growing_level_series

    rng = np.random.default_rng(0)
    tau = np.arange(T + 1)
    inside = 0
    for _ in range(runs):
        gamma = tau * trend(tau / T) * (1 + 0.3 * rng.standard_normal(T + 1))
        values = np.array([[gamma[s]] for s in steps])
        filled, _ = growing_level_series(steps, values, T, "scaled")
        error = float(np.asarray(filled)[:, 0].sum() - gamma[:T].sum())
        se = growing_level_fill_se(steps, values, np.ones(T), "scaled")[0]
        if not widen:
            se /= few_differences_factor(len([s for s in steps if s >= 1]) - 1)
        inside += abs(error) <= 1.96 * se
    return inside / runs


@pytest.mark.parametrize("trend", [lambda u: np.ones_like(u), lambda u: 2.0 - u, lambda u: 1 + 2 * np.exp(-5 * u)],
                         ids=["flat", "declining", "early-bump"])
def test_the_gamma_filling_se_covers_also_from_two_probes(trend):
    """±1.96 filling SE is a 95 % interval of the Γ filling error, simulated (400 runs): probes every
    20 steps, and only the midway and final probes (Neu's fewest, ``docs/math.md`` §6.9). From two
    probes ``κ`` rests on one difference, and the SE unwidened covered 0.72–0.83 of the runs (the
    error over it is Student's t with 1 degree of freedom); widened by ``t_{0.975,k}/1.96`` it covers
    0.95 or more."""
    T = 300
    every = list(range(0, T, 20)) + [T]
    midway = [T // 2, T]
    for steps in (every, midway):
        assert 0.92 <= _gamma_fill_coverage(steps, trend, T) <= 1.0, steps
    assert _gamma_fill_coverage(midway, trend, T, widen=False) < 0.85
