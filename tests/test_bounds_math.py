"""SPEC §6 bound math against hand-computed values on synthetic series."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from genbounds.bounds import (
    block_weights,
    eq2_relaxed,
    expand_blocks,
    growing_level_series,
    neu_theorem1,
    trajectory_comparison,
    wang_mao_eq2,
    wang_mao_eq3,
)
from genbounds.callbacks.channel import DispersionRecord, FlatnessRecord, HeldoutRecord, SensitivityRecord
from genbounds.callbacks.channel import CurvatureRecord
from genbounds.bounds.aggregate import compute_bounds
from genbounds.callbacks.bound_series import BoundSeries

RNG = np.random.default_rng(0)
T, N, D, R = 40, 500, 1000, 1.3
ETA = 0.05 * 0.97 ** np.arange(T)  # a decaying schedule: every step keeps its own η_t
SIGMAS = [1e-3, 3e-3, 1e-2, 3e-2]


def test_block_expansion_and_weights():
    steps, vals = [0, 10, 25], [1.0, 2.0, 3.0]
    x = expand_blocks(steps, vals, 30)
    assert x[0] == 1.0 and x[9] == 1.0 and x[10] == 2.0 and x[24] == 2.0 and x[29] == 3.0
    assert expand_blocks([5], [7.0], 8).tolist() == [7.0] * 8  # back-filled before the first
    w = block_weights(steps, np.arange(30, dtype=float))
    assert w.tolist() == [sum(range(10)), sum(range(10, 25)), sum(range(25, 30))]
    two = expand_blocks(steps, [[1, 10], [2, 20], [3, 30]], 30)
    assert two.shape == (30, 2) and two[12].tolist() == [2, 20]


def test_wang_mao_eq2_matches_hand_computation():
    vhat = RNG.uniform(0.01, 1.0, T)
    flat = [0.002, -0.01, 0.05, 0.3]
    res = wang_mao_eq2(ETA, vhat, R, N, D, SIGMAS, flat, [0.1, 0.2, 0.3, 0.4])
    for i, s in enumerate(SIGMAS):
        total = sum(math.log1p(ETA[t] ** 2 * vhat[t] / (D * s * s)) for t in range(T))
        traj = math.sqrt(R * R * D / N * total)
        assert res.trajectory[i] == pytest.approx(traj, rel=1e-12)
        assert res.bound[i] == pytest.approx(traj + abs(flat[i]), rel=1e-12)
    best = int(np.argmin(res.bound))
    assert res.value == res.bound[best] and res.sigma == SIGMAS[best] and res.standard_error == [0.1, 0.2, 0.3, 0.4][best]


def test_log1p_precision_for_tiny_arguments():
    """η²V/(dσ²) ≈ 1e−12: log(1+x) in float32 would return 0."""
    eta = np.full(10, 1e-4)
    res = wang_mao_eq2(eta, np.full(10, 1e-3), 1.0, 100, 10**6, [1.0], [0.0])
    expected = math.sqrt(10**6 / 100 * 10 * (1e-8 * 1e-3 / 10**6))
    assert res.value == pytest.approx(expected, rel=1e-9) and res.value > 0


def test_eq3_closed_form_and_factors():
    vhat = RNG.uniform(0.01, 1.0, T)
    s = float(np.sum(ETA**2 * vhat))
    tr, tr_se = 37.0, 2.0
    res = wang_mao_eq3(R, T, tr, s, N, tr_se)
    expected = 1.5 * (R * R * T * tr * s / N) ** (1 / 3)
    assert res.value == pytest.approx(expected, rel=1e-12)
    assert res.trajectory_factor == pytest.approx((R * R * s / N) ** (1 / 3), rel=1e-12)
    assert res.flatness_factor == pytest.approx((T * tr) ** (1 / 3), rel=1e-12)
    assert res.value == pytest.approx(1.5 * res.trajectory_factor * res.flatness_factor, rel=1e-12)
    assert res.standard_error == pytest.approx(expected / 3 * tr_se / tr, rel=1e-12)
    assert wang_mao_eq3(R, T, 0.0, s, N) is None and wang_mao_eq3(R, T, -1.0, s, N) is None


def test_eq3_is_the_minimum_over_sigma_of_the_relaxed_eq2():
    """Eq. 2 with log1p(x) ≤ x and γ = ½σ²T Tr H is A/σ + Bσ²; its minimum over σ is Eq. 3."""
    vhat = RNG.uniform(0.01, 1.0, T)
    s = float(np.sum(ETA**2 * vhat))
    tr = 12.5
    eq3 = wang_mao_eq3(R, T, tr, s, N)
    opt = minimize_scalar(lambda u: eq2_relaxed(math.exp(u), R, T, tr, s, N), bounds=(-20, 5), method="bounded",
                          options={"xatol": 1e-12})
    assert opt.fun == pytest.approx(eq3.value, rel=1e-6)
    assert math.exp(opt.x) == pytest.approx(eq3.sigma_star, rel=1e-4)
    # and the relaxation is an upper bound of Eq. 2's trajectory term at every σ (log1p(x) ≤ x)
    for sigma in (1e-3, 1e-2, 1e-1):
        traj = wang_mao_eq2(ETA, vhat, R, N, D, [sigma], [0.0]).trajectory[0]
        assert traj <= math.sqrt(R * R * s / N) / sigma + 1e-15
    # at σ*, the additive trajectory and flatness terms stand 2 : 1
    a = math.sqrt(R * R * s / N)
    sig = eq3.sigma_star
    assert (a / sig) / (0.5 * T * tr * sig * sig) == pytest.approx(2.0, rel=1e-9)


def test_neu_theorem1_matches_hand_computation():
    gamma = np.abs(RNG.normal(size=(T, len(SIGMAS)))) * 1e-4
    gamma[0] = 0.0  # Γ_0 = 0
    v = RNG.normal(0.5, 0.2, T)
    v[3] = -0.1  # a negative held-out estimate stays signed in the sum
    flat = [0.01, -0.02, 0.03, -0.5]
    res = neu_theorem1(ETA, gamma, v, R, N, SIGMAS, flat, [0.01] * 4, [0.0] * 4)
    for i, s in enumerate(SIGMAS):
        total = sum(ETA[t] ** 2 / s**2 * (gamma[t, i] + v[t]) for t in range(T))
        traj = math.sqrt(4 * R * R / N * total)
        assert res.trajectory[i] == pytest.approx(traj, rel=1e-12)
        assert res.bound[i] == pytest.approx(traj + flat[i], rel=1e-12)
        assert res.bound_abs[i] == pytest.approx(traj + abs(flat[i]), rel=1e-12)
    assert res.value == min(res.bound)
    # a negative total under the square root gives a zero trajectory term, not a NaN
    neg = neu_theorem1(ETA, np.zeros((T, 1)), -np.ones(T), R, N, [1e-2], [0.0])
    assert neg.trajectory == [0.0]
    assert math.isnan(neg.value)  # ... and a σ where it is clipped is never selected
    # two σ: the small one's Σ η²(Γ + V) is negative (flatness term alone, −0.5) — the other is chosen
    g = np.zeros((T, 2))
    g[:, 1] = 5.0
    two = neu_theorem1(ETA, g, -np.ones(T), R, N, [1e-3, 1e-1], [-0.5, 0.01], [0.01, 0.01], [0.0, 0.0])
    assert two.trajectory[0] == 0.0 and two.best == 1 and two.value > 0


def test_figure1_comparison_matches_hand_computation():
    gamma = np.abs(RNG.normal(size=(T, 2))) * 1e-3
    v, vhat = RNG.uniform(0.1, 1, T), RNG.uniform(0.1, 1, T)
    neu, wm = trajectory_comparison(ETA, gamma, v, vhat, D, [1e-5, 1e-6])
    for i, s in enumerate([1e-5, 1e-6]):
        assert neu[i] == pytest.approx(math.sqrt(4 * np.sum(ETA**2 * (gamma[:, i] + v)) / s**2), rel=1e-12)
        assert wm[i] == pytest.approx(math.sqrt(D * np.sum(np.log1p(ETA**2 * vhat / (D * s * s)))), rel=1e-12)


def test_aggregator_compute_on_synthetic_channel_records():
    """The bounds from records as the producers publish them, measured every 5 steps: each
    measurement stands for its 5 steps with their own η_t."""
    series = BoundSeries()
    series.lrs = ETA.tolist()
    disp = RNG.uniform(0.1, 1.0, T // 5)
    series.on_dispersion([DispersionRecord(step=5 * i, norm_sq=0, trace_cov=0, dispersion=float(x))
                          for i, x in enumerate(disp)])
    held = RNG.uniform(0.1, 1.0, T // 5)
    series.on_heldout([HeldoutRecord(step=5 * i, lr=0, heldout_dist_sq=float(x), step_realized=0, step_predicted=0,
                                     predicted_cumulative=0) for i, x in enumerate(held)])
    gam = np.abs(RNG.normal(size=(T // 5, len(SIGMAS)))) * 1e-5
    series.on_sensitivity([SensitivityRecord(step=5 * i, sigmas=SIGMAS, value=[0] * 4, standard_error=[0] * 4,
                                             growing_value=g.tolist(), growing_standard_error=[1e-6] * 4)
                           for i, g in enumerate(gam)])
    flat_term = [0.001, 0.002, -0.004, 0.2]
    series.on_flatness([FlatnessRecord(step=T, sigmas=SIGMAS, scale=math.sqrt(T), train=[0] * 4, train_se=[0] * 4,
                                       heldout=[0] * 4, heldout_se=[0] * 4, term=flat_term, term_se=[1e-3] * 4)])
    series.on_curvature([CurvatureRecord(step=T, hessian_trace=20.0, hessian_trace_se=1.0)])
    wanted = ("wang_mao_eq2", "wang_mao_eq3", "neu")
    out = compute_bounds(series.inputs(T, N, D, R, SIGMAS, wanted, z=0.0))  # z = 0: the plain grid minimum
    vhat = np.repeat(disp, 5)
    # Γ fill (default "scaled"): step τ of the block of the probe at s ≥ 1 gets (τ/s)·Γ_s; the
    # block of the s = 0 probe is scaled from the probe at s = 5
    gamma = np.array([(t / (5 * max(t // 5, 1))) * gam[max(t // 5, 1)] for t in range(T)])
    v = np.repeat(held, 5)
    s = float(np.sum(ETA**2 * vhat))
    assert out["bound/wang_mao_eq3"] == pytest.approx(1.5 * (R * R * T * 20.0 * s / N) ** (1 / 3), rel=1e-9)
    eq2 = min(math.sqrt(R * R * D / N * np.sum(np.log1p(ETA**2 * vhat / (D * sg * sg)))) + abs(f)
              for sg, f in zip(SIGMAS, flat_term))
    assert out["bound/wang_mao_eq2"] == pytest.approx(eq2, rel=1e-9)
    neu = min(math.sqrt(4 * R * R / N * np.sum(ETA**2 / sg**2 * (gamma[:, i] + v))) + flat_term[i]
              for i, sg in enumerate(SIGMAS))
    assert out["bound/neu"] == pytest.approx(neu, rel=1e-9)
    assert out["setting/T"] == T and out["setting/n"] == N and out["setting/d"] == D and out["setting/R"] == R
    # a flatness record from other weights (step ≠ T) is never used: the bounds that need it are NaN
    series.on_flatness([FlatnessRecord(step=T - 1, sigmas=SIGMAS, scale=1.0, train=[0] * 4, train_se=[0] * 4,
                                       heldout=[0] * 4, heldout_se=[0] * 4, term=flat_term, term_se=[0] * 4)])
    later = compute_bounds(series.inputs(T, N, D, R, SIGMAS, wanted))
    assert math.isnan(later["bound/wang_mao_eq2"]) and math.isnan(later["bound/neu"])
    assert math.isfinite(later["bound/wang_mao_eq3"])


def test_scaled_fill_recovers_the_exact_sum_of_growing_sensitivities():
    """For a quadratic loss Γ_{σ√τ} = σ²τ·tr(H²) exactly: probes every 50 steps, filled with
    (τ/s)·Γ_s, give the exact Σ_τ η_τ² Γ_τ; the block rule under-counts (and zeroes the first block)."""
    total, every, c = 200, 50, 3.7  # c = σ² tr(H²)
    steps = list(range(0, total, every))
    probes = np.array([[c * s] for s in steps])
    eta2 = (0.05 * 0.99 ** np.arange(total)) ** 2
    exact = float(np.sum(eta2 * c * np.arange(total)))
    scaled, w = growing_level_series(steps, probes, total, "scaled")
    block, _ = growing_level_series(steps, probes, total, "block")
    assert float(eta2 @ scaled[:, 0]) == pytest.approx(exact, rel=1e-12)
    assert float(eta2 @ block[:, 0]) < 0.8 * exact
    assert np.allclose(w.T @ probes, scaled)  # the weights give the SE of any weighted sum
    with pytest.raises(ValueError):
        growing_level_series(steps, probes, total, "linear")


def test_eq2_is_checked_against_the_absolute_gap():
    from genbounds.bounds.aggregate import validity

    flags = validity({"bound/wang_mao_eq2": 0.3, "bound/wang_mao_eq3": 0.3, "gap/measured": -0.5},
                     ("wang_mao_eq2", "wang_mao_eq3"))
    assert flags["bound_valid/wang_mao_eq2"] == 0.0  # Eq. 2 bounds |gap| = 0.5
    assert flags["bound_valid/wang_mao_eq3"] == 1.0  # Eq. 3 bounds the signed gap
    assert flags["bound/valid"] == 0.0


def test_fill_standard_error_is_zero_without_filling_nan_when_unknowable_and_calibrated():
    """The SE of a block-filled sum: 0 when every step was measured, NaN when one measurement stands
    for other steps (no spread to judge it by), and — on a series with 30 % relative per-step noise
    and a trend, measured every 3rd step — within [0.9, 1.4]× the spread of the actual filling error
    over 400 simulated runs (the estimator is conservative by construction)."""
    from genbounds.bounds.series import expand_blocks, fill_standard_error

    T = 600
    w = np.full(T, 0.01)
    assert fill_standard_error(np.arange(T), np.linspace(1, 2, T), w) == 0.0
    assert math.isnan(fill_standard_error([0], [1.0], w))
    rng = np.random.default_rng(0)
    mu = np.linspace(1.0, 3.0, T)
    steps = np.arange(0, T, 3)
    errors, ses = [], []
    for _ in range(400):
        x = mu * (1 + 0.3 * rng.standard_normal(T))
        errors.append(float(np.sum(w * expand_blocks(steps, x[steps], T)) - np.sum(w * x)))
        ses.append(fill_standard_error(steps, x[steps], w))
    ratio = float(np.mean(ses)) / float(np.std(errors))
    assert 0.9 < ratio < 1.4, ratio


def test_absolute_fill_standard_error_is_calibrated_on_a_signed_series():
    """Neu's held-out ``V_t`` is signed and crosses zero, where a relative noise model breaks: the
    absolute model, on a series oscillating around 0 with unit per-step noise measured every 10th
    step, is within [0.9, 1.4]× the spread of the actual filling error (400 simulated runs), and
    the relative model is not used for it."""
    from genbounds.bounds.series import expand_blocks, fill_standard_error

    T = 500
    w = np.full(T, 0.02)
    assert fill_standard_error(np.arange(T), np.zeros(T), w, noise="absolute") == 0.0
    assert math.isnan(fill_standard_error([0], [1.0], w, noise="absolute"))
    with pytest.raises(ValueError):
        fill_standard_error([0, 1], [1.0, 2.0], w, noise="poisson")
    rng = np.random.default_rng(3)
    mu = 0.5 * np.sin(np.linspace(0, 3 * np.pi, T))
    steps = np.arange(0, T, 10)
    errors, ses = [], []
    for _ in range(400):
        x = mu + rng.standard_normal(T)
        errors.append(float(np.sum(w * expand_blocks(steps, x[steps], T)) - np.sum(w * x)))
        ses.append(fill_standard_error(steps, x[steps], w, noise="absolute"))
    ratio = float(np.mean(ses)) / float(np.std(errors))
    assert 0.9 < ratio < 1.4, ratio


def test_neu_standard_error_counts_the_filled_heldout_steps():
    """Theorem 1's SE adds the filling SE of ``Σ η_t² V_t`` (0 when every step was measured)."""
    T = len(ETA)
    gamma = np.full((T, len(SIGMAS)), 0.05)
    v = np.full(T, 0.3)
    flat = [0.01] * len(SIGMAS)
    base = neu_theorem1(ETA, gamma, v, R, N, SIGMAS, flat, [0.01] * len(SIGMAS), [0.0] * len(SIGMAS))
    more = neu_theorem1(ETA, gamma, v, R, N, SIGMAS, flat, [0.01] * len(SIGMAS), [0.0] * len(SIGMAS), v_sum_se=0.5)
    assert all(b < m for b, m in zip(base.standard_errors, more.standard_errors))
    nan = neu_theorem1(ETA, gamma, v, R, N, SIGMAS, flat, [0.01] * len(SIGMAS), None, v_sum_se=math.nan)
    assert all(math.isnan(x) for x in nan.standard_errors)
    assert math.isnan(nan.value)  # an unknown SE is never counted as 0: no σ is selected
    # a negative Σ η²(Γ + V) (V_t is signed) sets the trajectory term to 0, not its error
    neg = neu_theorem1(ETA, np.zeros((T, 1)), -np.ones(T), R, N, [1e-2], [0.0], [0.01], [0.0], v_sum_se=0.5)
    assert neg.trajectory[0] == 0.0 and neg.standard_errors[0] > 0.01


def test_trajectory_fill_se_matches_the_spread_of_the_thinned_eq2_trajectory():
    """Eq. 2's trajectory term from every 4th step's V̂ (the rest block-filled) against the same
    term from every step: the linearized SE is within [0.8, 1.5]× the error's spread."""
    from genbounds.bounds.series import expand_blocks
    from genbounds.bounds.wang_mao import trajectory_fill_se, trajectory_wang_mao

    T, n, d, r, sigma = 400, 1000, 5000, 1.0, 1e-3
    eta = np.full(T, 0.05)
    rng = np.random.default_rng(1)
    steps = np.arange(0, T, 4)
    errors, ses = [], []
    for _ in range(300):
        v = 2.0 * (1 + 0.4 * rng.standard_normal(T)).clip(0.05)
        filled = expand_blocks(steps, v[steps], T)
        errors.append(trajectory_wang_mao(eta, filled, r, n, d, sigma) - trajectory_wang_mao(eta, v, r, n, d, sigma))
        ses.append(trajectory_fill_se(eta, filled, r, n, d, sigma, steps, v[steps]))
    ratio = float(np.mean(ses)) / float(np.std(errors))
    assert 0.8 < ratio < 1.5, ratio


def test_bound_notes_name_the_cause_not_a_bystander():
    """A NaN R (a hand-written loss, no per-sample losses) left Eq. 3 undefined and the note blamed
    a positive trace ("328 ± 30 (≤ 0 or not finite)"); no Hessian trace at all (HessianTrace
    unable to take second derivatives) and Σ η²(Γ + V) ≤ 0 at every σ (Neu) had no note."""
    from genbounds.bounds.aggregate import BoundInputs

    def notes(**kwargs):
        base = dict(T=4, n=100, d=10, r=1.0, eta=np.full(4, 0.1), vhat=np.ones(4), sigmas=[0.1, 0.2],
                    wanted=("wang_mao_eq3", "neu"))
        inp = BoundInputs(**{**base, **kwargs})
        compute_bounds(inp)
        return inp.notes

    assert not any("Hessian trace" in n for n in notes(r=math.nan, curvature={"hessian_trace": 328.0,
                                                                               "hessian_trace_se": 30.0}))
    (missing,) = [n for n in notes(curvature=None) if n.startswith("trace:")]
    assert "no Hessian trace was measured" in missing
    flat = {"term": [0.01, 0.02], "term_se": [0.001, 0.001], "train": [0.1, 0.1]}
    negative = notes(curvature={"hessian_trace": 5.0}, gamma=-np.ones((4, 2)), v=np.zeros(4), flat=flat)
    (neu,) = [n for n in negative if n.startswith("neu:")]
    assert "≤ 0 at every σ" in neu
    assert not any(n.startswith("neu:") for n in notes(curvature={"hessian_trace": 5.0}, gamma=np.ones((4, 2)),
                                                       v=np.ones(4), flat=flat))


def test_a_non_positive_trace_estimate_is_named_with_its_value():
    """Eq. 3 is undefined for Tr H ≤ 0: NaN, and the note gives the estimate with its SE (a
    Hutchinson estimate within its SE of 0 reads as a failed estimate without it) and the remedy."""
    from genbounds.bounds.aggregate import BoundInputs

    inp = BoundInputs(T=4, n=100, d=10, r=1.0, eta=np.full(4, 0.1), vhat=np.ones(4), sigmas=[0.1],
                      wanted=("wang_mao_eq3",), curvature={"hessian_trace": -6.6, "hessian_trace_se": 4.9})
    out = compute_bounds(inp)
    assert math.isnan(out.get("bound/wang_mao_eq3", math.nan))
    (note,) = [n for n in inp.notes if n.startswith("trace:")]
    assert "-6.6 ± 4.9" in note and "max_probes" in note


def test_a_block_without_curvature_leaves_the_layerwise_eq3_nan_and_says_so_plainly():
    """``Tr H_k = 0`` in one block (a layer the loss at the final weights does not use): the
    layer-wise Eq. 3 is undefined and logged NaN, while its note said "isotropic Eq. 3 reported"
    beside a NaN — it now says the layer-wise value is left NaN and where the equal-σ form is."""
    from genbounds.bounds.aggregate import BoundInputs

    inp = BoundInputs(T=4, n=100, d=10, r=1.0, eta=np.full(4, 0.1), vhat=np.ones(4), sigmas=[0.1],
                      wanted=("wang_mao_eq3", "wang_mao_eq3_layerwise"), vhat_blocks=np.ones((4, 2)) / 2,
                      d_blocks=[6, 4], curvature={"hessian_trace": 5.0, "group_traces": [5.0, 0.0]})
    out = compute_bounds(inp)
    assert math.isfinite(out["bound/wang_mao_eq3"]) and math.isnan(out["bound/wang_mao_eq3_layerwise"])
    (note,) = [n for n in inp.notes if n.startswith("layerwise:")]
    assert "block(s) [1]" in note and "left NaN" in note and "reported" not in note, note


def test_no_block_with_curvature_points_to_no_bound():
    from genbounds.bounds.aggregate import BoundInputs

    inp = BoundInputs(T=4, n=100, d=10, r=1.0, eta=np.full(4, 0.1), vhat=np.ones(4), sigmas=[0.1],
                      wanted=("wang_mao_eq3", "wang_mao_eq3_layerwise"), vhat_blocks=np.ones((4, 2)) / 2,
                      d_blocks=[6, 4], curvature={"hessian_trace": -1.0, "group_traces": [-1.0, 0.0]})
    out = compute_bounds(inp)
    assert math.isnan(out["bound/wang_mao_eq3"]) and math.isnan(out["bound/wang_mao_eq3_layerwise"])
    (note,) = [n for n in inp.notes if n.startswith("layerwise:")]
    assert "undefined too" in note and "equal-σ form" not in note, note
