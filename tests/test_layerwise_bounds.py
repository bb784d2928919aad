"""Layer-wise (block-diagonal) noise bounds (docs/math.md §9) against hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from genbounds.bounds.layerwise import (
    candidate_family,
    dispersion_sums_fill_se,
    eq3_inputs,
    gamma_sigma_inv_from_halves,
    init_rms_shape,
    neu_theorem7_blockdiag,
    optimal_shape,
    optimal_sigmas,
    relaxed_objective_layerwise,
    sigma_min_with_se,
    trajectory_blocks_fill_se,
    trajectory_wang_mao_blocks,
    v_sigma_inv,
    wang_mao_eq2_layerwise,
    wang_mao_eq3_fixed_shape,
    wang_mao_eq3_layerwise,
)
from genbounds.bounds.neu import neu_theorem1
from genbounds.bounds.series import expand_blocks, fill_standard_error
from genbounds.bounds.wang_mao import (
    eq2_relaxed,
    trajectory_fill_se,
    trajectory_wang_mao,
    wang_mao_eq2,
    wang_mao_eq3,
)

T, N, R = 60, 800, 1.3
ETA = 0.05 * 0.97 ** np.arange(T)
SIGMAS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


# ---- a quadratic loss with two parameter blocks --------------------------------------------------
# ℓ(w, z) = ½ Σ_k h_k ‖w_k − z_k‖², z_k ~ N(μ_k, c_k² I_{d_k}): Hessian block k = h_k I (Tr H_k = h_k d_k),
# per-sample gradient h_k (w_k − z_k), so the per-block per-sample covariance trace is h_k² c_k² d_k and
# the batch dispersion V̂_{t,k} = h_k² c_k² d_k / b at every w.
D_BLOCKS = [30, 70]
H_K = np.array([2.0, 0.05])
C_K = np.array([0.2, 3.0])
BATCH = 32


def quadratic_inputs():
    trace_h = H_K * np.array(D_BLOCKS)
    vhat_k = H_K**2 * C_K**2 * np.array(D_BLOCKS) / BATCH
    sum_eta2_vhat = float(np.sum(ETA**2)) * vhat_k
    return trace_h, sum_eta2_vhat, np.outer(np.ones(T), vhat_k)


def test_eq3_layerwise_closed_form_on_two_block_quadratic():
    trace_h, s_vhat, _ = quadratic_inputs()
    res = wang_mao_eq3_layerwise(R, T, trace_h, s_vhat, N)
    assert res.method == "layerwise" and res.reason is None

    # hand formula, written out independently of the module
    a = R**2 * s_vhat / N
    b = T * trace_h / 2
    p = math.sqrt(a[0] * b[0]) + math.sqrt(a[1] * b[1])
    hand = 3 * (p / 2) ** (2 / 3)
    assert res.value == pytest.approx(hand, rel=1e-12)
    per_block = math.sqrt(a[0] * T * trace_h[0]) + math.sqrt(a[1] * T * trace_h[1])
    assert res.value == pytest.approx(1.5 * per_block ** (2 / 3), rel=1e-12)

    # brute force: minimize sqrt(A1/s1² + A2/s2²) + B1 s1² + B2 s2² over (log s1, log s2)
    def f(log_s):
        s2 = np.exp(2 * log_s)
        return math.sqrt(a[0] / s2[0] + a[1] / s2[1]) + b[0] * s2[0] + b[1] * s2[1]

    best = None
    for start in ([-6.0, -6.0], [-2.0, -8.0], [-9.0, -3.0]):
        opt = minimize(f, np.array(start), method="Nelder-Mead",
                       options=dict(xatol=1e-12, fatol=1e-16, maxiter=20000, maxfev=40000))
        if best is None or opt.fun < best.fun:
            best = opt
    assert res.value == pytest.approx(best.fun, rel=1e-6)
    assert res.sigma_star == pytest.approx(np.exp(best.x), rel=1e-3)
    # the reported σ* reaches the value, the terms stand 2 : 1, and every block shares both terms
    assert relaxed_objective_layerwise(res.sigma_star, a, b) == pytest.approx(res.value, rel=1e-12)
    assert res.trajectory_term == pytest.approx(2 * res.flatness_term, rel=1e-12)
    assert math.sqrt(np.sum(a / res.sigma_star**2)) == pytest.approx(res.trajectory_term, rel=1e-12)
    assert np.sum(b * res.sigma_star**2) == pytest.approx(res.flatness_term, rel=1e-12)
    assert res.block_share.sum() == pytest.approx(1.0)
    # per-block factors recompose the value: 3/2 (Σ_k (a_k f_k)^{3/2})^{2/3}
    assert 1.5 * np.sum((res.trajectory_factors * res.flatness_factors) ** 1.5) ** (2 / 3) == pytest.approx(res.value)
    # optimal shape σ_k² ∝ sqrt(A_k/B_k), and it beats the isotropic closed form here (A not ∝ B)
    ratio = res.sigma_star**2 / np.sqrt(a / b)
    assert ratio[0] == pytest.approx(ratio[1], rel=1e-12)
    iso = wang_mao_eq3(R, T, float(trace_h.sum()), float(s_vhat.sum()), N)
    assert res.isotropic.value == pytest.approx(iso.value, rel=1e-14)
    assert res.value < 0.98 * iso.value


def test_eq3_with_equal_sigmas_is_the_isotropic_closed_form():
    trace_h, s_vhat, _ = quadratic_inputs()
    # K = 1: bit for bit
    one = wang_mao_eq3(R, T, float(trace_h[0]), float(s_vhat[0]), N)
    v1, lam1 = wang_mao_eq3_fixed_shape(R, T, trace_h[:1], s_vhat[:1], N, [1.0])
    assert v1 == one.value and lam1 == one.sigma_star
    lw1 = wang_mao_eq3_layerwise(R, T, trace_h[:1], s_vhat[:1], N)
    assert lw1.value == pytest.approx(one.value, rel=1e-14)
    # K = 2 with the shape forced to 1: the isotropic Eq. 3 on the summed inputs (up to summation rounding)
    iso = wang_mao_eq3(R, T, float(trace_h.sum()), float(s_vhat.sum()), N)
    v2, lam2 = wang_mao_eq3_fixed_shape(R, T, trace_h, s_vhat, N, [1.0, 1.0])
    assert v2 == pytest.approx(iso.value, rel=1e-14) and lam2 == pytest.approx(iso.sigma_star, rel=1e-14)
    # the relaxed block objective at σ·1 is the isotropic relaxed objective
    a, b = eq3_inputs(R, T, trace_h, s_vhat, N)
    for s in (1e-3, 1e-2, 0.1):
        assert relaxed_objective_layerwise([s, s], a, b) == pytest.approx(
            eq2_relaxed(s, R, T, float(trace_h.sum()), float(s_vhat.sum()), N), rel=1e-13)
    # any fixed shape: never below the free block optimum; the optimal shape attains it
    lw = wang_mao_eq3_layerwise(R, T, trace_h, s_vhat, N)
    for shape in ([1.0, 3.0], [3.0, 1.0], [0.2, 1.0]):
        assert wang_mao_eq3_fixed_shape(R, T, trace_h, s_vhat, N, shape)[0] >= lw.value * (1 - 1e-12)
    v_opt, lam = wang_mao_eq3_fixed_shape(R, T, trace_h, s_vhat, N, optimal_shape(a, b, D_BLOCKS))
    assert v_opt == pytest.approx(lw.value, rel=1e-12)
    assert lam * optimal_shape(a, b, D_BLOCKS) == pytest.approx(lw.sigma_star, rel=1e-12)


def test_layerwise_eq3_never_exceeds_isotropic_on_random_inputs():
    rng = np.random.default_rng(1)
    for _ in range(1000):
        k = int(rng.integers(1, 7))
        steps = int(rng.integers(1, 10_000))
        n = int(rng.integers(10, 100_000))
        r = float(rng.uniform(0.1, 5))
        trace_h = np.exp(rng.normal(0, 3, k))
        s_vhat = np.exp(rng.normal(-5, 3, k))
        lw = wang_mao_eq3_layerwise(r, steps, trace_h, s_vhat, n)
        iso = wang_mao_eq3(r, steps, float(trace_h.sum()), float(s_vhat.sum()), n)
        assert lw.method == "layerwise"
        assert lw.value <= iso.value * (1 + 1e-12)
        # A ∝ B: equality (Cauchy–Schwarz is tight), and the optimal σ_k are all equal
        prop = wang_mao_eq3_layerwise(r, steps, trace_h, 0.37 * trace_h, n)
        iso_prop = wang_mao_eq3(r, steps, float(trace_h.sum()), float(0.37 * trace_h.sum()), n)
        assert prop.value == pytest.approx(iso_prop.value, rel=1e-12)
        assert prop.sigma_star == pytest.approx(np.full(k, iso_prop.sigma_star), rel=1e-10)


def test_eq3_layerwise_refuses_nonpositive_block_trace():
    s_vhat = np.array([1e-3, 2e-3])
    res = wang_mao_eq3_layerwise(R, T, [5.0, -1.0], s_vhat, N, trace_h_se=[0.5, 0.5])
    iso = wang_mao_eq3(R, T, 4.0, 3e-3, N, trace_h_se=1.0)
    assert res.method == "isotropic_fallback" and "block(s) [1]" in res.reason
    assert res.value == pytest.approx(iso.value) and res.standard_error == pytest.approx(iso.standard_error)
    assert res.sigma_star == pytest.approx([iso.sigma_star] * 2)
    assert np.isnan(res.flatness_factors[1])
    ref = wang_mao_eq3_layerwise(R, T, [5.0, 0.0], s_vhat, N, fallback="refuse")
    assert ref.method == "undefined" and math.isnan(ref.value) and ref.isotropic is not None
    none = wang_mao_eq3_layerwise(R, T, [1.0, -2.0], s_vhat, N)
    assert none.method == "undefined" and math.isnan(none.value) and none.isotropic is None
    with pytest.raises(ValueError):
        optimal_sigmas([1.0, 1.0], [1.0, 0.0])
    # a block with no dispersion gets σ_k* = 0 and contributes nothing
    zero = wang_mao_eq3_layerwise(R, T, [5.0, 2.0], [1e-3, 0.0], N)
    assert zero.sigma_star[1] == 0.0
    assert zero.value == pytest.approx(wang_mao_eq3(R, T, 5.0, 1e-3, N).value, rel=1e-12)


def test_eq3_layerwise_is_undefined_not_raising_for_a_nan_loss_range():
    """No per-sample losses, a data-dependent ``R``: NaN in, NaN out (with its reason), as every
    other bound does — not the ``ValueError`` of ``optimal_sigmas``."""
    res = wang_mao_eq3_layerwise(math.nan, T, [5.0, 2.0], [1e-3, 2e-3], N, trace_h_se=[0.5, 0.5])
    assert res.method == "undefined" and math.isnan(res.value) and res.reason == "non-finite input"
    assert res.isotropic is None and np.all(np.isnan(res.sigma_star))
    assert wang_mao_eq3(math.nan, T, 7.0, 3e-3, N) is None  # (the isotropic form: undefined likewise)


def test_eq3_layerwise_gradient_and_standard_errors():
    trace_h, s_vhat, _ = quadratic_inputs()
    res = wang_mao_eq3_layerwise(R, T, trace_h, s_vhat, N, trace_h_se=[1.0, 0.5])
    # envelope theorem: ∂value/∂Tr H_k = (T/2) σ_k*²  (finite differences)
    for k in range(2):
        h = 1e-6 * trace_h[k]
        up, dn = trace_h.copy(), trace_h.copy()
        up[k] += h
        dn[k] -= h
        fd = (wang_mao_eq3_layerwise(R, T, up, s_vhat, N).value
              - wang_mao_eq3_layerwise(R, T, dn, s_vhat, N).value) / (2 * h)
        assert res.gradient[k] == pytest.approx(fd, rel=1e-6)
    assert res.se_kind == "upper_bound"
    assert res.standard_error == pytest.approx(res.gradient[0] * 1.0 + res.gradient[1] * 0.5)
    # K = 1: the isotropic delta method B_3/3 · SE/Tr H
    one = wang_mao_eq3_layerwise(R, T, trace_h[:1], s_vhat[:1], N, trace_h_se=[0.7])
    assert one.standard_error == pytest.approx(wang_mao_eq3(R, T, trace_h[0], s_vhat[0], N, 0.7).standard_error,
                                               rel=1e-12)


def test_eq3_layerwise_se_from_correlated_hutchinson_probes():
    """Per-block Hutchinson samples x_jk = v_kᵀ(Hv)_k from shared Rademacher probes are correlated
    (the cross-block terms v_kᵀH_kl v_l enter both blocks); the delta-method SE from the per-probe
    samples' covariance matches the spread of the value over repeated estimates, and the
    perfect-correlation bound from per-block SEs is never below it."""
    rng = np.random.default_rng(2)
    d1, d2, probes, reps = 6, 9, 40, 2000
    d = d1 + d2
    m = rng.normal(size=(d, d))
    h = np.diag(np.r_[np.full(d1, 3.0), np.full(d2, 1.5)]) + 0.2 * (m + m.T)
    traces = np.array([np.trace(h[:d1, :d1]), np.trace(h[d1:, d1:])])
    assert np.all(traces > 0)
    s_vhat = np.array([2e-3, 5e-2])
    truth = wang_mao_eq3_layerwise(R, T, traces, s_vhat, N).value
    values, ses = [], []
    for _ in range(reps):
        v = rng.choice([-1.0, 1.0], size=(probes, d))
        hv = v @ h
        x = np.stack([np.sum(v[:, :d1] * hv[:, :d1], 1), np.sum(v[:, d1:] * hv[:, d1:], 1)], axis=1)
        res = wang_mao_eq3_layerwise(R, T, None, s_vhat, N, trace_h_samples=x)
        assert res.se_kind == "probe_covariance"
        bound = wang_mao_eq3_layerwise(R, T, x.mean(0), s_vhat, N, trace_h_se=x.std(0, ddof=1) / math.sqrt(probes))
        assert bound.standard_error >= res.standard_error * (1 - 1e-12)
        values.append(res.value)
        ses.append(res.standard_error)
    assert np.std(values) == pytest.approx(np.mean(ses), rel=0.1)
    assert np.mean(values) == pytest.approx(truth, rel=0.02)
    # the blocks' samples really are correlated here: ignoring it would misstate the SE
    assert abs(np.corrcoef(x.T)[0, 1]) > 0.1


# ---- Eq. 2 with block noise ---------------------------------------------------------------------

def test_block_trajectory_reduces_to_isotropic():
    rng = np.random.default_rng(3)
    vhat = np.exp(rng.normal(-3, 1, T))
    d = 5000
    for s in SIGMAS:
        iso = trajectory_wang_mao(ETA, vhat, R, N, d, s)
        assert trajectory_wang_mao_blocks(ETA, vhat[:, None], R, N, [d], [s]) == iso
    # equal σ_k and V̂_{t,k} ∝ d_k: the isotropic trajectory; otherwise ≤ it (concavity of log)
    d_blocks = [1000, 2500, 1500]
    frac = np.array(d_blocks) / d
    other = np.outer(vhat, [0.7, 0.1, 0.2])
    for s in SIGMAS:
        iso = trajectory_wang_mao(ETA, vhat, R, N, d, s)
        prop = trajectory_wang_mao_blocks(ETA, np.outer(vhat, frac), R, N, d_blocks, [s] * 3)
        assert prop == pytest.approx(iso, rel=1e-12)
        assert trajectory_wang_mao_blocks(ETA, other, R, N, d_blocks, [s] * 3) <= iso


def _eq2_inputs(rng, k_blocks):
    vhat = np.exp(rng.normal(-3, 1, (T, k_blocks)))
    flat = rng.normal(0, 0.05, len(SIGMAS)) + 10 * np.array(SIGMAS) ** 2
    flat_se = np.abs(rng.normal(0, 0.01, len(SIGMAS)))
    return vhat, flat, flat_se


def test_eq2_layerwise_isotropic_candidates_reproduce_wang_mao_eq2():
    rng = np.random.default_rng(4)
    d = 4000
    vhat, flat, flat_se = _eq2_inputs(rng, 1)
    ref = wang_mao_eq2(ETA, vhat[:, 0], R, N, d, SIGMAS, flat, flat_se)
    fam = candidate_family(SIGMAS, [d])
    lw = wang_mao_eq2_layerwise(ETA, vhat, R, N, [d], fam.candidates, flat, flat_se, z=0.0)
    assert lw.bound.tolist() == ref.bound and lw.trajectory.tolist() == ref.trajectory
    assert lw.best == ref.best and lw.value == ref.value and lw.se == ref.standard_error
    # K = 3, V̂_{t,k} ∝ d_k: same numbers up to rounding
    d_blocks = [1000, 2000, 1000]
    vb = np.outer(vhat[:, 0], np.array(d_blocks) / d)
    lw3 = wang_mao_eq2_layerwise(ETA, vb, R, N, d_blocks, candidate_family(SIGMAS, d_blocks).candidates, flat, flat_se,
                                 z=0.0)
    assert lw3.bound == pytest.approx(ref.bound, rel=1e-12) and lw3.best == ref.best
    assert lw3.sigmas == pytest.approx([ref.sigma] * 3)
    # general split at isotropic σ: never above
    vg = np.outer(vhat[:, 0], [0.8, 0.15, 0.05])
    lwg = wang_mao_eq2_layerwise(ETA, vg, R, N, d_blocks, candidate_family(SIGMAS, d_blocks).candidates, flat, flat_se,
                                 z=0.0)
    assert np.all(lwg.bound <= np.array(ref.bound) * (1 + 1e-12)) and lwg.value <= ref.value


def test_eq2_adding_candidates_never_increases_the_minimum():
    rng = np.random.default_rng(5)
    d_blocks = [300, 1200]
    for _ in range(50):
        vhat, flat, flat_se = _eq2_inputs(rng, 2)
        base = wang_mao_eq2_layerwise(ETA, vhat, R, N, d_blocks, candidate_family(SIGMAS, d_blocks).candidates, flat,
                                      flat_se, z=0.0)
        shape = np.exp(rng.normal(0, 1, 2))
        fam = candidate_family(SIGMAS, d_blocks, shape)
        extra_flat = rng.normal(0, 0.05, len(SIGMAS)) + 10 * np.array(SIGMAS) ** 2
        lw = wang_mao_eq2_layerwise(ETA, vhat, R, N, d_blocks, fam.candidates, np.r_[flat, extra_flat],
                                    np.r_[flat_se, flat_se], z=0.0, groups=fam.groups)
        assert lw.value <= base.value
        assert lw.bound[: len(SIGMAS)].tolist() == base.bound.tolist()


# ---- Neu Theorem 7 with block-diagonal Σ --------------------------------------------------------

def _neu_inputs(rng, n_sigmas):
    gamma = np.abs(rng.normal(0, 1e-3, (T, n_sigmas))) * np.arange(T)[:, None]
    v = rng.normal(2e-3, 1e-3, T)  # signed held-out estimates
    flat = rng.normal(0, 0.05, n_sigmas)
    flat_se = np.abs(rng.normal(0, 0.01, n_sigmas))
    gamma_se = np.abs(rng.normal(0, 1e-4, n_sigmas))
    return gamma, v, flat, flat_se, gamma_se


def test_theorem7_isotropic_candidates_reproduce_neu_theorem1():
    rng = np.random.default_rng(6)
    gamma, v, flat, flat_se, gamma_se = _neu_inputs(rng, len(SIGMAS))
    ref = neu_theorem1(ETA, gamma, v, R, N, SIGMAS, flat, flat_se, gamma_se)
    s2 = np.array(SIGMAS) ** 2
    split = rng.uniform(0, 1, T)
    v_blocks = np.stack([v * split, v * (1 - split)], axis=1)
    fam = candidate_family(SIGMAS, [100, 900])
    res = neu_theorem7_blockdiag(ETA, gamma / s2, v_blocks, R, N, fam.candidates, flat, flat_se, gamma_se / s2, z=0.0)
    assert res.bound == pytest.approx(ref.bound, rel=1e-12)
    assert res.bound_abs == pytest.approx(ref.bound_abs, rel=1e-12)
    assert res.trajectory == pytest.approx(ref.trajectory, rel=1e-12)
    assert res.best == ref.best and res.best_abs == ref.best_abs
    assert res.value == pytest.approx(ref.value, rel=1e-12) and res.se == pytest.approx(ref.standard_error, rel=1e-12)
    # V in the Σ⁻¹ norm
    assert v_sigma_inv(v_blocks, [0.1, 0.2]) == pytest.approx(v_blocks[:, 0] / 0.01 + v_blocks[:, 1] / 0.04)


def test_theorem7_filling_se_matches_theorem1_on_isotropic_candidates():
    """With held-out ``v_{t,k}`` measured every 4th step (the rest filled), Theorem 7's isotropic
    candidates carry the same filling SE as Theorem 1 given the filled-sum SE of ``V_t`` itself."""
    from genbounds.bounds.series import expand_blocks, fill_standard_error

    rng = np.random.default_rng(8)
    gamma, v, flat, flat_se, gamma_se = _neu_inputs(rng, len(SIGMAS))
    split = rng.uniform(0, 1, T)
    v_blocks_full = np.stack([v * split, v * (1 - split)], axis=1)
    steps = np.arange(0, T, 4)
    measured = v_blocks_full[steps]
    v_blocks = expand_blocks(steps, measured, T)
    v_filled = v_blocks.sum(1)
    v_se = fill_standard_error(steps, measured.sum(1), ETA**2, noise="absolute")
    assert v_se > 0
    ref = neu_theorem1(ETA, gamma, v_filled, R, N, SIGMAS, flat, flat_se, gamma_se, v_sum_se=v_se)
    s2 = np.array(SIGMAS) ** 2
    fam = candidate_family(SIGMAS, [100, 900])
    base = neu_theorem7_blockdiag(ETA, gamma / s2, v_blocks, R, N, fam.candidates, flat, flat_se, gamma_se / s2, z=0.0)
    res = neu_theorem7_blockdiag(ETA, gamma / s2, v_blocks, R, N, fam.candidates, flat, flat_se, gamma_se / s2, z=0.0,
                                 v_steps=steps, v_measured=measured)
    assert list(res.standard_error[: len(SIGMAS)]) == pytest.approx(ref.standard_errors, rel=1e-9)
    assert res.se == pytest.approx(ref.standard_error, rel=1e-9)
    assert all(a >= b for a, b in zip(res.standard_error, base.standard_error))


def test_theorem7_adding_candidates_never_increases_the_minimum():
    rng = np.random.default_rng(7)
    for _ in range(50):
        gamma, v, flat, flat_se, gamma_se = _neu_inputs(rng, len(SIGMAS))
        s2 = np.array(SIGMAS) ** 2
        v_blocks = np.stack([0.3 * v, 0.7 * v], axis=1)
        fam0 = candidate_family(SIGMAS, [100, 900])
        base = neu_theorem7_blockdiag(ETA, gamma / s2, v_blocks, R, N, fam0.candidates, flat, flat_se, z=0.0)
        fam = candidate_family(SIGMAS, [100, 900], init_rms_shape([4.0, 9.0], [100, 900]))
        g_extra = np.abs(rng.normal(0, 1, (T, len(SIGMAS)))) * np.arange(T)[:, None] * 1e-3
        res = neu_theorem7_blockdiag(ETA, np.c_[gamma / s2, g_extra], v_blocks, R, N, fam.candidates,
                                     np.r_[flat, rng.normal(0, 0.05, len(SIGMAS))], np.r_[flat_se, flat_se], z=0.0,
                                     groups=fam.groups)
        assert res.value <= base.value and res.value_abs <= base.value_abs


def test_gamma_in_sigma_inverse_norm_on_a_quadratic():
    """g(w) = H(w − μ): Γ_{Σ,LΣ} = E‖Hξ‖²_{Σ⁻¹} = L·tr(HΣHΣ⁻¹), ξ ~ N(0, LΣ) — independent of
    the scale of Σ, equal to L·tr(H²) for isotropic Σ and never below it for a block shape."""
    rng = np.random.default_rng(8)
    d_blocks = [3, 4]
    d = sum(d_blocks)
    m = rng.normal(size=(d, d))
    h = m @ m.T / d + np.eye(d)
    level = 7.0  # t − 1
    for sig_k in ([0.01, 0.01], [0.01, 0.05], [0.3, 0.02]):
        per_coord = np.repeat(sig_k, d_blocks)
        eps = rng.normal(size=(20000, d))
        diff = -(np.sqrt(level) * eps * per_coord) @ h  # g(w) − g(w + ξ), both halves exact (no batch noise)
        dots = np.stack([np.sum(diff[:, :3] ** 2, 1), np.sum(diff[:, 3:] ** 2, 1)], axis=1)
        est, se = gamma_sigma_inv_from_halves(dots, sig_k)
        cov = np.diag(per_coord**2)
        closed = level * np.trace(h @ cov @ h @ np.linalg.inv(cov))
        assert abs(est - closed) < 4 * se
        assert closed >= level * np.trace(h @ h) * (1 - 1e-12)


# ---- selection, non-finite candidates, families -------------------------------------------------

def test_selection_by_value_plus_z_se_and_edge_flags():
    sel = sigma_min_with_se([3.0, 1.0, 2.0, 4.0], [0.0, 5.0, 0.1, 0.0], z=1.0)
    assert sel.index == 2 and not sel.at_edge
    assert sigma_min_with_se([3.0, 1.0, 2.0], [0.0, 5.0, 0.1], z=0.0).index == 1
    assert sigma_min_with_se([3.0, 2.0, 1.0], None, z=1.0).at_edge
    assert sigma_min_with_se([3.0, 2.0, 1.0], None, z=1.0).se_missing
    # an unknown SE cannot win when z ≠ 0, but is irrelevant when z = 0
    sel = sigma_min_with_se([3.0, 1.0, 2.0], [0.0, np.nan, 0.1], z=1.0)
    assert sel.index == 2 and sel.ignored.tolist() == [False, True, False]
    assert sigma_min_with_se([3.0, 1.0, 2.0], [0.0, np.nan, 0.1], z=0.0).index == 1
    # two ordered grids: the edge is judged within the minimizer's own grid (ignoring NaN ends)
    groups = [0, 0, 0, 1, 1, 1]
    assert not sigma_min_with_se([5, 4, 5, 3, 1, 3], None, 0, groups).at_edge
    assert sigma_min_with_se([5, 4, 5, np.nan, 1, 3], None, 0, groups).at_edge
    assert not sigma_min_with_se([5, 4, 5, 3, 3, 1], None, 0, [0, 0, 0, 1, 1, -1]).at_edge
    empty = sigma_min_with_se([np.nan, np.inf], None)
    assert empty.index == -1 and empty.n_ignored == 2


def test_nonfinite_candidates_are_ignored_and_flagged():
    rng = np.random.default_rng(9)
    d_blocks = [50, 150]
    vhat = np.exp(rng.normal(-3, 1, (T, 2)))
    cand = np.array([[1e-2, 1e-2], [np.nan, 1e-2], [0.0, 1e-2], [3e-2, 3e-2], [1e-1, 1e-1]])
    flat = np.array([0.01, 0.0, 0.0, np.nan, 0.5])
    se = np.array([0.001, 0.001, 0.001, 0.001, 0.001])
    res = wang_mao_eq2_layerwise(ETA, vhat, R, N, d_blocks, cand, flat, se)
    assert res.selection.ignored.tolist() == [False, True, True, True, False]
    assert res.best in (0, 4) and math.isfinite(res.value)
    none = wang_mao_eq2_layerwise(ETA, vhat, R, N, d_blocks, cand[1:3], flat[1:3], se[1:3])
    assert none.best == -1 and math.isnan(none.value) and np.isnan(none.sigmas).all()
    gam = np.abs(rng.normal(0, 1, (T, len(cand))))
    neu = neu_theorem7_blockdiag(ETA, gam, vhat, R, N, cand, np.nan_to_num(flat, nan=np.nan), se)
    assert neu.selection.ignored.tolist() == [False, True, True, True, False]
    gam[5, 4] = np.inf
    neu = neu_theorem7_blockdiag(ETA, gam, vhat, R, N, cand, flat, se)
    assert neu.selection.ignored.tolist() == [False, True, True, True, True] and neu.best == 0


def test_shapes_and_families():
    d_blocks = [10, 90]
    a, b = np.array([4.0, 1.0]), np.array([1.0, 4.0])
    s = optimal_shape(a, b, d_blocks)
    assert np.sum(np.array(d_blocks) * s**2) == pytest.approx(100.0)
    assert s[0] / s[1] == pytest.approx((4.0 / 1.0 / (1.0 / 4.0)) ** 0.25)
    assert s / optimal_sigmas(a, b) == pytest.approx(np.full(2, s[0] / optimal_sigmas(a, b)[0]))
    fam = candidate_family([0.1, 0.2], d_blocks, [1.0, 2.0], scale_grid=[0.1, 0.2, 0.4])
    assert fam.candidates.shape == (5, 2) and fam.groups.tolist() == [0, 0, 1, 1, 1]
    # a ray member carries the same total noise power as the isotropic σ = λ
    assert np.sum(np.array(d_blocks) * fam.candidates[3] ** 2) == pytest.approx(100 * 0.2**2)
    rms = init_rms_shape([25.0, 0.0], d_blocks)  # second block initialized at 0 → overall RMS
    assert rms[1] == pytest.approx(rms[0] * math.sqrt(0.25 / 2.5))
    with pytest.raises(ValueError):
        candidate_family([0.1], d_blocks, [1.0, 0.0])


# ---- the Wang–Mao layer-wise bounds' filling SE (docs/math.md §6.7) ------------------------------


def _filled_blocks(rng, k_blocks, every=5):
    """A per-block dispersion with relative per-step noise, measured every ``every``-th step."""
    level = rng.uniform(0.5, 2.0, k_blocks) * 1e-3
    full = level[None, :] * (1.0 + 0.3 * rng.standard_normal((T, k_blocks)))
    full = np.maximum(full, 1e-6)
    steps = np.arange(0, T, every)
    return full, steps, full[steps], expand_blocks(steps, full[steps], T)


def test_one_block_filling_se_is_the_isotropic_rule():
    rng = np.random.default_rng(11)
    d = 5000
    _, steps, measured, vb = _filled_blocks(rng, 1)
    for s in SIGMAS:
        ref = trajectory_fill_se(ETA, vb[:, 0], R, N, d, s, steps, measured[:, 0])
        assert ref > 0
        assert trajectory_blocks_fill_se(ETA, vb, R, N, [d], [s], steps, measured) == pytest.approx(ref, rel=1e-12)
    # Eq. 2: the candidates' SE is the flatness SE and that filling SE in quadrature, as wang_mao_eq2's
    vhat, flat, flat_se = _eq2_inputs(rng, 1)
    iso = wang_mao_eq2(ETA, vb[:, 0], R, N, d, SIGMAS, flat, flat_se, z=0.0, filled=(steps, measured[:, 0]))
    lw = wang_mao_eq2_layerwise(ETA, vb, R, N, [d], candidate_family(SIGMAS, [d]).candidates, flat, flat_se, z=0.0,
                                filled=(steps, measured))
    expected = [math.hypot(f, trajectory_fill_se(ETA, vb[:, 0], R, N, d, s, steps, measured[:, 0]))
                for f, s in zip(flat_se, SIGMAS)]
    assert lw.standard_error.tolist() == pytest.approx(expected, rel=1e-12)
    assert all(e > f for e, f in zip(expected, flat_se))
    assert lw.se == pytest.approx(iso.standard_error, rel=1e-12) and lw.best == iso.best
    # Eq. 3: with one block, the layer-wise SE is the isotropic one (trace SE and filling SE in quadrature)
    sums = np.sum(ETA[:, None] ** 2 * vb, axis=0)
    sum_se = dispersion_sums_fill_se(ETA, steps, measured)
    assert sum_se[0] == pytest.approx(fill_standard_error(steps, measured[:, 0], ETA**2), rel=1e-12) and sum_se[0] > 0
    ref3 = wang_mao_eq3(R, T, 40.0, float(sums[0]), N, 3.0, float(sum_se[0]))
    lw3 = wang_mao_eq3_layerwise(R, T, [40.0], sums, N, trace_h_se=[3.0], sum_se_blocks=sum_se)
    assert lw3.value == pytest.approx(ref3.value, rel=1e-12)
    assert lw3.standard_error == pytest.approx(ref3.standard_error, rel=1e-9)
    assert lw3.isotropic.standard_error == pytest.approx(ref3.standard_error, rel=1e-12)


def test_layerwise_filling_se_is_zero_when_every_step_is_measured_and_grows_with_the_gaps():
    rng = np.random.default_rng(12)
    d_blocks = [300, 1700]
    full, _, _, _ = _filled_blocks(rng, 2)
    every = np.arange(T)
    cand = candidate_family(SIGMAS, d_blocks).candidates
    _, flat, flat_se = _eq2_inputs(rng, len(cand))
    flat, flat_se = flat[: len(cand)], flat_se[: len(cand)]
    base = wang_mao_eq2_layerwise(ETA, full, R, N, d_blocks, cand, flat, flat_se, z=0.0)
    same = wang_mao_eq2_layerwise(ETA, full, R, N, d_blocks, cand, flat, flat_se, z=0.0, filled=(every, full))
    assert same.standard_error.tolist() == base.standard_error.tolist()
    assert dispersion_sums_fill_se(ETA, every, full).tolist() == [0.0, 0.0]
    ses = []
    for gap in (2, 5, 15):
        steps = np.arange(0, T, gap)
        vb = expand_blocks(steps, full[steps], T)
        res = wang_mao_eq2_layerwise(ETA, vb, R, N, d_blocks, cand, flat, flat_se, z=0.0, filled=(steps, full[steps]))
        assert np.all(res.standard_error >= np.asarray(flat_se) - 1e-15)
        ses.append(float(np.mean(res.standard_error - np.asarray(flat_se))))
        sums = np.sum(ETA[:, None] ** 2 * vb, axis=0)
        plain = wang_mao_eq3_layerwise(R, T, [30.0, 10.0], sums, N, trace_h_se=[1.0, 1.0])
        with_fill = wang_mao_eq3_layerwise(R, T, [30.0, 10.0], sums, N, trace_h_se=[1.0, 1.0],
                                           sum_se_blocks=dispersion_sums_fill_se(ETA, steps, full[steps]))
        assert with_fill.value == plain.value and with_fill.standard_error > plain.standard_error
    assert ses[0] < ses[1] < ses[2]
    # one measurement cannot judge its filling error: NaN, never a silent 0
    nan = wang_mao_eq3_layerwise(R, T, [30.0, 10.0], [1e-4, 1e-4], N, trace_h_se=[1.0, 1.0],
                                 sum_se_blocks=dispersion_sums_fill_se(ETA, [0], full[:1]))
    assert math.isnan(nan.standard_error)


def test_layerwise_filling_se_covers_the_actual_filling_error():
    """Simulated runs (two blocks, independent relative noise per step and block, measured every
    6th step): the SE of the filled Eq. 2 trajectory, summed over blocks (perfect correlation), is
    not smaller than the spread of the actual error against the every-step trajectory, and not
    absurdly larger (≤ √K × the spread with independent blocks, plus sampling slack)."""
    rng = np.random.default_rng(13)
    d_blocks, sig = [400, 1600], [2e-3, 1e-3]
    errors, ses = [], []
    for _ in range(300):
        full, steps, measured, vb = _filled_blocks(rng, 2, every=6)
        truth = trajectory_wang_mao_blocks(ETA, full, R, N, d_blocks, sig)
        filled = trajectory_wang_mao_blocks(ETA, vb, R, N, d_blocks, sig)
        errors.append(filled - truth)
        ses.append(trajectory_blocks_fill_se(ETA, vb, R, N, d_blocks, sig, steps, measured, trajectory=filled))
    spread = float(np.sqrt(np.mean(np.square(errors))))
    ratio = float(np.mean(ses)) / spread
    print(f"layer-wise filling SE / actual error spread: {ratio:.3f}")
    assert 0.9 <= ratio <= 1.45, ratio


def test_eq3_layerwise_filling_se_is_the_finite_difference_slope():
    """``Σ_k |∂B/∂Σ_k| SE_k`` with the analytic slope ``(P/2)^{-1/3} √(B_k/A_k)/2 · R²/n`` equals the
    central finite difference of the closed form in each block's dispersion sum."""
    th, sums = [30.0, 4.0], np.array([2e-3, 7e-4])
    for k in range(2):
        se = np.zeros(2)
        se[k] = 1e-5
        res = wang_mao_eq3_layerwise(R, T, th, sums, N, trace_h_se=[0.0, 0.0], sum_se_blocks=se)
        h = 1e-9
        up, down = sums.copy(), sums.copy()
        up[k] += h
        down[k] -= h
        slope = (wang_mao_eq3_layerwise(R, T, th, up, N).value - wang_mao_eq3_layerwise(R, T, th, down, N).value) / (2 * h)
        assert res.standard_error == pytest.approx(abs(slope) * 1e-5, rel=1e-5)
    # every Σ_k = 0 with an unknown filling error: NaN, not a ZeroDivisionError
    zero = wang_mao_eq3_layerwise(R, T, th, [0.0, 0.0], N, trace_h_se=[1.0, 1.0], sum_se_blocks=[math.nan, 0.0])
    assert zero.value == 0.0 and math.isnan(zero.standard_error)


def test_a_block_of_zeros_has_no_filling_error_and_an_unknown_one_stays_nan():
    steps = np.arange(0, T, 5)
    assert fill_standard_error(steps, np.zeros(len(steps)), ETA**2) == 0.0
    rng = np.random.default_rng(14)
    d_blocks = [300, 1700]
    full, _, _, _ = _filled_blocks(rng, 2)
    full[:, 1] = 0.0  # a block whose parameters get no gradient
    cand = candidate_family(SIGMAS, d_blocks).candidates
    _, flat, flat_se = _eq2_inputs(rng, len(cand))
    flat, flat_se = flat[: len(cand)], flat_se[: len(cand)]
    vb = expand_blocks(steps, full[steps], T)
    res = wang_mao_eq2_layerwise(ETA, vb, R, N, d_blocks, cand, flat, flat_se, z=1.0, filled=(steps, full[steps]))
    assert np.all(np.isfinite(res.standard_error)) and math.isfinite(res.value)
    # one measurement: the filling error is unknown, every candidate's SE NaN, and so the bound (fail closed)
    one = wang_mao_eq2_layerwise(ETA, expand_blocks([0], full[:1], T), R, N, d_blocks, cand, flat, flat_se, z=1.0,
                                 filled=([0], full[:1]))
    assert np.all(np.isnan(one.standard_error)) and math.isnan(one.value)
