"""Layer-wise (block-diagonal) noise versions of the bounds (docs/math.md §9). Pure numpy.

The trainable parameters are split into ``K`` blocks (layers) of sizes ``d_k`` (``Σ_k d_k = d``);
the auxiliary noise of both papers' proofs is ``N(0, Σ)`` with ``Σ = diag(σ_k² I_{d_k})``, the same
at every step. ``x_k`` is the block-``k`` part of a vector ``x``, ``‖x‖²_{Σ⁻¹} = Σ_k ‖x_k‖²/σ_k²``.
Per-block inputs are the per-block parts of the isotropic quantities (their sums over ``k`` are
the SPEC quantities): ``V̂_{t,k}`` (block part of ``grad/dispersion``), ``v_{t,k}`` (block part of
``grad/heldout_dist_sq``), ``Tr H_k`` (Hutchinson on block ``k``: ``v_kᵀ(Hv)_k`` per probe).

* Wang–Mao Eq. 2, block noise (§9.1):
  ``traj(σ) = sqrt( R²/n · Σ_t Σ_k d_k log1p( η_t² V̂_{t,k} / (d_k σ_k²) ) )``,
  ``flat(σ) = |γ_Σ(W_T,S) − γ_Σ(W_T,S')|`` with ``Δ_T ~ N(0, T·Σ)``.
* Wang–Mao Eq. 3, block noise (§9.2): with ``A_k = R² Σ_t η_t² V̂_{t,k}/n``, ``B_k = T Tr H_k/2``,
  ``min_σ sqrt(Σ_k A_k/σ_k²) + Σ_k B_k σ_k² = 3 (P/2)^{2/3}``, ``P = Σ_k sqrt(A_k B_k)``, reached at
  ``σ_k*² = sqrt(A_k/B_k) · (P/2)^{2/3} / P``; ``≤`` the isotropic Eq. 3 (Cauchy–Schwarz).
* Neu Theorem 7, ``Σ_t = Σ`` (§9.3):
  ``sqrt( 4R²/n Σ_t η_t² (Γ_{Σ,(t−1)Σ}(W_{t−1}) + Σ_k v_{t,k}/σ_k²) )``
  ``+ (γ_{TΣ}(W_T,S) − γ_{TΣ}(W_T,S'))``.
* Candidate families and the selection by ``value + z·SE`` (§9.4).

Nothing here imports torch or Lightning; the isotropic functions of ``wang_mao.py`` are reused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from genbounds.bounds.neu import sqrt_term_se
from genbounds.bounds.selection import Selection, sigma_min_with_se
from genbounds.bounds.series import fill_standard_error
from genbounds.bounds.wang_mao import Eq3Result, log1p_sum_fill_se, wang_mao_eq3

__all__ = [
    "Eq2LayerwiseResult",
    "Eq3LayerwiseResult",
    "Family",
    "Selection",
    "Theorem7Result",
    "candidate_family",
    "dispersion_sums_fill_se",
    "eq3_inputs",
    "gamma_sigma_inv_from_halves",
    "init_rms_shape",
    "neu_theorem7_blockdiag",
    "optimal_shape",
    "optimal_sigmas",
    "relaxed_objective_layerwise",
    "sigma_min_with_se",
    "trajectory_blocks_fill_se",
    "trajectory_wang_mao_blocks",
    "v_sigma_inv",
    "wang_mao_eq2_layerwise",
    "wang_mao_eq3_fixed_shape",
    "wang_mao_eq3_layerwise",
]


# --------------------------------------------------------------------------------------------
# selection over a family of candidates
# --------------------------------------------------------------------------------------------


def _valid_sigmas(sig: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(sig)) and np.all(sig > 0))


# --------------------------------------------------------------------------------------------
# Wang–Mao Eq. 2 with block noise
# --------------------------------------------------------------------------------------------


def trajectory_wang_mao_blocks(eta: np.ndarray, vhat_blocks: np.ndarray, r: float, n: int,
                               d_blocks: Sequence[int], sigmas: Sequence[float]) -> float:
    """``sqrt( R²/n · Σ_k d_k Σ_t log1p( η_t² V̂_{t,k} / (d_k σ_k²) ) )`` (§9.1).

    ``vhat_blocks``: ``[T, K]`` per-step per-block dispersion (block ``k``'s part of ``s²/b``).
    As in ``trajectory_wang_mao``, a slightly negative dispersion estimate counts as 0 inside the
    logarithm only. ``K = 1`` gives ``trajectory_wang_mao`` exactly; with equal ``σ_k`` it is
    ``≤`` the isotropic trajectory (concavity of ``log``), with equality iff ``V̂_{t,k} ∝ d_k``.
    """
    eta = np.asarray(eta, dtype=np.float64)
    d_blocks = [int(dk) for dk in d_blocks]
    k_blocks = len(d_blocks)
    v = np.maximum(np.asarray(vhat_blocks, dtype=np.float64).reshape(len(eta), k_blocks), 0.0)
    sig = [float(s) for s in np.asarray(sigmas, dtype=np.float64).ravel()]
    if len(sig) != k_blocks:
        raise ValueError(f"{len(sig)} sigmas for {k_blocks} blocks")
    parts = []
    for k in range(k_blocks):
        col = np.ascontiguousarray(v[:, k])
        total = float(np.sum(np.log1p(eta**2 * col / (d_blocks[k] * sig[k] ** 2))))
        parts.append(r * r * d_blocks[k] / n * total)
    return math.sqrt(math.fsum(parts))


def trajectory_blocks_fill_se(eta: np.ndarray, vhat_blocks: np.ndarray, r: float, n: int, d_blocks: Sequence[int],
                              sigmas: Sequence[float], steps: Sequence[int], measured_blocks: np.ndarray,
                              scale: np.ndarray | None = None, trajectory: float | None = None) -> float:
    """SE of :func:`trajectory_wang_mao_blocks` from the steps whose ``V̂_{t,k}`` were filled from a
    neighbouring measurement (``steps``; ``measured_blocks [m, K]``: the per-block measurements;
    ``scale``: :func:`~genbounds.bounds.wang_mao.log1p_sum_fill_se`'s).

    Block ``k``'s part of the sum under the root gets the isotropic rule with ``d_k, σ_k``
    (:func:`~genbounds.bounds.wang_mao.log1p_sum_fill_se`: linearized in ``V̂_{t,k}``, relative
    noise). The blocks are filled from the same
    measurements at the same steps, so their errors are correlated: the SE of the sum is bounded by
    the sum of the blocks' SEs (perfect correlation), then ``SE(√x) = SE(x)/(2√x)``. ``K = 1`` is the
    isotropic rule exactly (``docs/math.md`` §6.7)."""
    d = [int(dk) for dk in d_blocks]
    v = np.asarray(vhat_blocks, dtype=np.float64).reshape(len(eta), len(d))
    x = np.asarray(measured_blocks, dtype=np.float64).reshape(len(steps), len(d))
    sig = np.asarray(sigmas, dtype=np.float64).ravel()
    inner = sum(log1p_sum_fill_se(eta, v[:, k], r, n, d[k], float(sig[k]), steps, x[:, k], scale)
                for k in range(len(d)))
    if inner == 0.0:
        return 0.0
    traj = trajectory_wang_mao_blocks(eta, vhat_blocks, r, n, d, sig) if trajectory is None else trajectory
    return inner / (2.0 * traj) if traj > 0 else math.nan


def dispersion_sums_fill_se(eta: np.ndarray, steps: Sequence[int], measured_blocks: np.ndarray,
                            scale: np.ndarray | None = None) -> np.ndarray:
    """Per block, the filling SE of ``Σ_t η_t² V̂_{t,k}`` (relative noise; ``0`` when nothing was
    filled; ``docs/math.md`` §6.7; ``scale``: per step ``1/b_t`` with size-free measurements, §6.8)."""
    eta = np.asarray(eta, dtype=np.float64)
    x = np.atleast_2d(np.asarray(measured_blocks, dtype=np.float64))
    return np.array([fill_standard_error(steps, x[:, k], eta**2, scale=scale) for k in range(x.shape[1])])


class _SelectedCandidate:
    """The selected candidate of a result with ``candidates [C, K]``, ``bound [C]``,
    ``standard_error [C]`` and a ``selection`` (index −1: none)."""

    candidates: np.ndarray
    bound: np.ndarray
    standard_error: np.ndarray
    selection: Selection

    @property
    def best(self) -> int:
        return self.selection.index

    @property
    def value(self) -> float:
        return float(self.bound[self.best]) if self.best >= 0 else math.nan

    @property
    def se(self) -> float:
        return float(self.standard_error[self.best]) if self.best >= 0 else math.nan

    @property
    def sigmas(self) -> np.ndarray:
        return self.candidates[self.best] if self.best >= 0 else np.full(self.candidates.shape[1], np.nan)


@dataclass
class Eq2LayerwiseResult(_SelectedCandidate):
    candidates: np.ndarray
    """``[C, K]`` noise levels ``σ_k`` per candidate."""
    trajectory: np.ndarray
    flatness: np.ndarray
    """``|γ_Σ(W_T,S) − γ_Σ(W_T,S')|`` per candidate."""
    bound: np.ndarray
    standard_error: np.ndarray
    """Per candidate: the flatness estimate's Monte Carlo SE (NaN when not given)."""
    selection: Selection


def wang_mao_eq2_layerwise(eta: np.ndarray, vhat_blocks: np.ndarray, r: float, n: int, d_blocks: Sequence[int],
                           candidates: np.ndarray, flatness_terms: Sequence[float],
                           flatness_term_se: Sequence[float] | None = None, z: float = 1.0,
                           groups: Sequence[int] | None = None,
                           filled: tuple[Sequence[int], np.ndarray, np.ndarray | None] | None = None
                           ) -> Eq2LayerwiseResult:
    """Eq. 2 with block noise for every candidate ``σ ∈ R^K`` and the family minimum (§9.1, §9.4).

    ``bound_c = traj(σ_c) + |flatness_terms[c]|`` with ``flatness_terms[c] = γ_{Σ_c}(W_T,S) −
    γ_{Σ_c}(W_T,S')`` measured with block-shaped draws ``√T·σ_c ⊙ ε``. The selected candidate
    minimizes ``bound + z·SE`` (``sigma_min_with_se``); candidates with a non-finite or non-positive
    ``σ_k`` or a non-finite flatness are ignored (``selection.ignored``). ``filled``: ``(steps,
    measured_blocks, scale)`` of the dispersion measurements when ``vhat_blocks`` was block-filled between
    them; each candidate's trajectory SE from the filling (:func:`trajectory_blocks_fill_se`) is then
    added to its flatness SE in quadrature.
    """
    cand = np.atleast_2d(np.asarray(candidates, dtype=np.float64))
    if cand.shape[1] != len(d_blocks):
        raise ValueError(f"candidates have {cand.shape[1]} columns for {len(d_blocks)} blocks")
    flat_in = np.asarray(flatness_terms, dtype=np.float64).ravel()
    if flat_in.shape[0] != cand.shape[0]:
        raise ValueError("one flatness term per candidate")
    traj = np.array([trajectory_wang_mao_blocks(eta, vhat_blocks, r, n, d_blocks, c) if _valid_sigmas(c)
                     else math.nan for c in cand])
    flat = np.abs(flat_in)
    bound = traj + flat
    se = (np.full(len(cand), np.nan) if flatness_term_se is None
          else np.asarray(flatness_term_se, dtype=np.float64).ravel())
    if flatness_term_se is not None and filled is not None:
        fill = np.array([trajectory_blocks_fill_se(eta, vhat_blocks, r, n, d_blocks, c, *filled, trajectory=t)
                         if math.isfinite(t) else math.nan for c, t in zip(cand, traj)])
        se = np.hypot(se, fill)
    sel = sigma_min_with_se(bound, None if flatness_term_se is None else se, z, groups)
    return Eq2LayerwiseResult(cand, traj, flat, bound, se, sel)


# --------------------------------------------------------------------------------------------
# Wang–Mao Eq. 3 with block noise
# --------------------------------------------------------------------------------------------


def eq3_inputs(r: float, total_steps: int, trace_h_blocks: Sequence[float], sum_eta2_vhat_blocks: Sequence[float],
               n: int) -> tuple[np.ndarray, np.ndarray]:
    """``A_k = R² Σ_t η_t² V̂_{t,k} / n`` and ``B_k = T Tr H_k / 2`` (a negative ``Σ η² V̂`` from
    rounding counts as 0, as inside ``trajectory_wang_mao``'s logarithm)."""
    a = r * r * np.maximum(np.asarray(sum_eta2_vhat_blocks, dtype=np.float64).ravel(), 0.0) / n
    b = total_steps * np.asarray(trace_h_blocks, dtype=np.float64).ravel() / 2.0
    if a.shape != b.shape:
        raise ValueError(f"{a.size} dispersion sums for {b.size} Hessian traces")
    return a, b


def relaxed_objective_layerwise(sigmas: Sequence[float], a: Sequence[float], b: Sequence[float]) -> float:
    """``f(σ) = sqrt(Σ_k A_k/σ_k²) + Σ_k B_k σ_k²`` — Eq. 2 with block noise after ``log1p(x) ≤ x``
    and the second-order flatness ``½T Σ_k σ_k² Tr H_k`` (used by the tests and for plots)."""
    s2 = np.asarray(sigmas, dtype=np.float64) ** 2
    return math.sqrt(float(np.sum(np.asarray(a, dtype=np.float64) / s2))) + float(np.sum(np.asarray(b) * s2))


def optimal_sigmas(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """The minimizer of ``f``: ``σ_k*² = sqrt(A_k/B_k) · (P/2)^{2/3} / P``, ``P = Σ_k sqrt(A_k B_k)``.

    Requires ``A_k ≥ 0`` and ``B_k > 0`` (raises ``ValueError`` otherwise). A block with ``A_k = 0``
    gets ``σ_k* = 0`` (the limit; every positive ``σ_k`` gives a valid bound).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(a >= 0) and np.all(b > 0)):
        raise ValueError("optimal σ needs finite A_k ≥ 0 and B_k > 0 (Tr H_k > 0)")
    p = float(np.sum(np.sqrt(a * b)))
    if p == 0.0:
        return np.zeros_like(a)
    return np.sqrt(np.sqrt(a / b) * (p / 2.0) ** (2.0 / 3.0) / p)


def optimal_shape(a: Sequence[float], b: Sequence[float], d_blocks: Sequence[int] | None = None) -> np.ndarray:
    """The Eq. 3 optimal *shape* ``s_k ∝ (A_k/B_k)^{1/4}`` (i.e. ``σ_k*² ∝ sqrt(A_k/B_k)``),
    normalized to ``Σ_k d_k s_k² = Σ_k d_k`` (mean per-parameter variance 1; ``d_blocks=None``:
    all ``d_k = 1``), so that the scale ``λ`` of ``λ·s`` has the total noise power ``λ² d`` of the
    isotropic ``σ = λ``. Same requirements as ``optimal_sigmas``."""
    return _normalize_shape(optimal_sigmas(a, b), d_blocks)


def _normalize_shape(s: np.ndarray, d_blocks: Sequence[int] | None) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    d = np.ones_like(s) if d_blocks is None else np.asarray(d_blocks, dtype=np.float64)
    power = float(np.sum(d * s**2))
    if not power > 0:
        raise ValueError("a shape needs at least one positive entry")
    return s * math.sqrt(float(np.sum(d)) / power)


def wang_mao_eq3_fixed_shape(r: float, total_steps: int, trace_h_blocks: Sequence[float],
                             sum_eta2_vhat_blocks: Sequence[float], n: int,
                             shape: Sequence[float]) -> tuple[float, float]:
    """Minimum over the scale ``λ`` of ``f(λ·s)`` for a fixed shape ``s``:
    ``3/2 · (R² Σ_k Σ_t η_t² V̂_{t,k}/(n s_k²))^{1/3} · (T Σ_k s_k² Tr H_k)^{1/3}``, at
    ``λ* = (A'/(2B'))^{1/3}`` with ``A' = sqrt(Σ_k A_k/s_k²)``, ``B' = Σ_k B_k s_k²``.

    ``s = 1`` is the isotropic Eq. 3 (``K = 1``: bit for bit ``wang_mao_eq3``). Returns
    ``(value, λ*)``; ``(nan, nan)`` when ``Σ_k s_k² Tr H_k ≤ 0`` (unbounded relaxation).
    """
    s2 = np.asarray(shape, dtype=np.float64).ravel() ** 2
    sv = np.maximum(np.asarray(sum_eta2_vhat_blocks, dtype=np.float64).ravel(), 0.0)
    th = np.asarray(trace_h_blocks, dtype=np.float64).ravel()
    weighted_h = math.fsum((th * s2).tolist())
    if not (weighted_h > 0 and np.all(s2 > 0)):
        return math.nan, math.nan
    weighted_v = math.fsum((sv / s2).tolist())
    traj = (r * r * weighted_v / n) ** (1.0 / 3.0)
    flat = (total_steps * weighted_h) ** (1.0 / 3.0)
    a = math.sqrt(max(r * r * weighted_v / n, 0.0))
    b = total_steps * weighted_h / 2.0
    return 1.5 * traj * flat, (a / (2.0 * b)) ** (1.0 / 3.0)


@dataclass
class Eq3LayerwiseResult:
    value: float
    """The closed form (NaN when undefined)."""
    method: str
    """``"layerwise"``, ``"isotropic_fallback"`` (some ``Tr H_k ≤ 0``; the equal-σ closed form is
    reported instead) or ``"undefined"``."""
    sigma_star: np.ndarray
    """``σ_k*`` at which the minimum is reached (all equal for the fallback)."""
    trajectory_term: float
    """``sqrt(Σ_k A_k/σ_k*²) = 2(P/2)^{2/3}`` (the trajectory part stands 2 : 1 to the flatness part)."""
    flatness_term: float
    """``½T Σ_k σ_k*² Tr H_k = (P/2)^{2/3}``."""
    trajectory_factors: np.ndarray
    """``(R² Σ_t η_t² V̂_{t,k}/n)^{1/3}`` per block."""
    flatness_factors: np.ndarray
    """``(T Tr H_k)^{1/3}`` per block (NaN where ``Tr H_k ≤ 0``); value ``= 3/2 (Σ_k (a_k f_k)^{3/2})^{2/3}``."""
    block_share: np.ndarray
    """``sqrt(A_k B_k)/P``: block ``k``'s share of both terms at the optimum."""
    standard_error: float
    se_kind: str
    """``"probe_covariance"`` (delta method with the per-probe per-block samples' covariance),
    ``"upper_bound"`` (``Σ_k |∂B/∂Tr H_k| SE_k``: perfect correlation), ``"isotropic"`` (the
    fallback's §6 SE, from the summed samples or ``Σ_k SE_k``), or ``"none"``."""
    isotropic: Eq3Result | None
    """``wang_mao_eq3`` on the summed inputs, for comparison (``value ≤ isotropic.value``)."""
    reason: str | None = None
    gradient: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """``∂value/∂Tr H_k = (T/2) σ_k*²`` (envelope theorem), used by the delta method."""


def wang_mao_eq3_layerwise(r: float, total_steps: int, trace_h_blocks: Sequence[float] | None,
                           sum_eta2_vhat_blocks: Sequence[float], n: int,
                           trace_h_samples: np.ndarray | None = None, trace_h_se: Sequence[float] | None = None,
                           fallback: str = "isotropic", sum_se_blocks: Sequence[float] | None = None) -> Eq3LayerwiseResult:
    """Block-noise Eq. 3 (§9.2): ``3(P/2)^{2/3} = 3/2 · (Σ_k sqrt(R² Σ_t η_t² V̂_{t,k}/n · T Tr H_k))^{2/3}``.

    Args:
        trace_h_blocks: ``Tr H_k`` estimates ``[K]`` (``None``: the mean of ``trace_h_samples``).
        sum_eta2_vhat_blocks: ``Σ_t η_t² V̂_{t,k}`` ``[K]``.
        trace_h_samples: per-probe per-block Hutchinson samples ``[J, K]``, ``x_{jk} = v_{j,k}ᵀ(H v_j)_k``
            from the same Rademacher ``v_j`` for every block (so the blocks' estimates are correlated):
            SE ``= std_j(Σ_k g_k x_{jk}) / sqrt(J)``, ``g_k = (T/2)σ_k*²``.
        trace_h_se: per-block SEs ``[K]`` when no samples are kept: SE upper bound ``Σ_k g_k SE_k``.
        fallback: ``"isotropic"`` — when some ``Tr H_k ≤ 0`` the block relaxation is unbounded below
            (``B_k < 0``: ``σ_k → ∞``) or has no minimizer (``B_k = 0``), so it is refused and the
            equal-σ closed form (defined while ``Σ_k Tr H_k > 0``) is returned, flagged
            ``method="isotropic_fallback"``; ``"refuse"`` — return NaN.
        sum_se_blocks: per-block SEs of ``Σ_t η_t² V̂_{t,k}`` from filled steps
            (:func:`dispersion_sums_fill_se`): ``Σ_k |∂value/∂Σ_k| SE_k`` (perfect correlation: the
            blocks are filled at the same steps) is added to the curvature SE in quadrature; the
            isotropic comparison gets ``Σ_k SE_k``. ``None`` (or all 0): every step measured.
    """
    if fallback not in ("isotropic", "refuse"):
        raise ValueError(f"fallback must be 'isotropic' or 'refuse', got {fallback!r}")
    samples = None if trace_h_samples is None else np.atleast_2d(np.asarray(trace_h_samples, dtype=np.float64))
    if trace_h_blocks is None:
        if samples is None:
            raise ValueError("give trace_h_blocks or trace_h_samples")
        trace_h_blocks = samples.mean(axis=0)
    th = np.asarray(trace_h_blocks, dtype=np.float64).ravel()
    sv = np.asarray(sum_eta2_vhat_blocks, dtype=np.float64).ravel()
    k_blocks = th.size
    if samples is not None and samples.shape[1] != k_blocks:
        raise ValueError(f"trace_h_samples has {samples.shape[1]} columns for {k_blocks} blocks")
    a, b = eq3_inputs(r, total_steps, th, sv, n)
    traj_f = a ** (1.0 / 3.0)
    with np.errstate(invalid="ignore"):
        flat_f = np.where(th > 0, (total_steps * np.where(th > 0, th, 1.0)) ** (1.0 / 3.0), np.nan)

    # isotropic comparison (and fallback): Tr H = Σ_k Tr H_k, Σ η² V̂ = Σ_k Σ η² V̂_k
    iso_se = None
    if samples is not None and samples.shape[0] >= 2:
        iso_se = float(np.std(samples.sum(axis=1), ddof=1) / math.sqrt(samples.shape[0]))
    elif trace_h_se is not None:
        iso_se = float(np.sum(np.abs(np.asarray(trace_h_se, dtype=np.float64))))
    fill_se = None if sum_se_blocks is None else np.asarray(sum_se_blocks, dtype=np.float64).ravel()
    if fill_se is not None and fill_se.size != k_blocks:
        raise ValueError(f"{fill_se.size} dispersion-sum SEs for {k_blocks} blocks")
    iso = None
    finite = math.isfinite(r) and bool(np.all(np.isfinite(th)) and np.all(np.isfinite(sv)))
    if finite:
        iso = wang_mao_eq3(r, total_steps, math.fsum(th.tolist()), math.fsum(sv.tolist()), n, iso_se,
                           0.0 if fill_se is None else float(np.sum(fill_se)))

    nan_k = np.full(k_blocks, np.nan)
    if not finite:  # (a NaN R: no per-sample losses to take the loss range from)
        return Eq3LayerwiseResult(math.nan, "undefined", nan_k, math.nan, math.nan, traj_f, flat_f, nan_k,
                                  math.nan, "none", None, "non-finite input")
    if not np.all(th > 0):
        bad = np.flatnonzero(~(th > 0)).tolist()
        reason = (f"Tr H_k ≤ 0 in block(s) {bad}: the second-order block relaxation is unbounded below "
                  f"(or has no minimizer)")
        if fallback == "isotropic" and iso is not None:
            return Eq3LayerwiseResult(iso.value, "isotropic_fallback", np.full(k_blocks, iso.sigma_star),
                                      2.0 / 3.0 * iso.value, iso.value / 3.0, traj_f, flat_f, nan_k,
                                      iso.standard_error, "isotropic" if iso_se is not None else "none", iso,
                                      reason + "; isotropic Eq. 3 reported")
        why = reason + ("" if fallback == "refuse" else "; isotropic Eq. 3 undefined too (Σ_k Tr H_k ≤ 0)")
        return Eq3LayerwiseResult(math.nan, "undefined", nan_k, math.nan, math.nan, traj_f, flat_f, nan_k,
                                  math.nan, "none", iso, why)

    p = float(np.sum(np.sqrt(a * b)))
    q = (p / 2.0) ** (2.0 / 3.0)
    value = 3.0 * q
    sig = optimal_sigmas(a, b)
    share = np.sqrt(a * b) / p if p > 0 else np.full(k_blocks, np.nan)
    grad = total_steps / 2.0 * sig**2
    if samples is not None and samples.shape[0] >= 2:
        y = samples @ grad
        se, kind = float(np.std(y, ddof=1) / math.sqrt(samples.shape[0])), "probe_covariance"
    elif trace_h_se is not None:
        se, kind = float(np.sum(grad * np.abs(np.asarray(trace_h_se, dtype=np.float64)))), "upper_bound"
    else:
        se, kind = math.nan, "none"
    if fill_se is not None and np.any(fill_se != 0.0):
        if p > 0.0:
            # ∂value/∂A_k = (P/2)^{-1/3} · sqrt(B_k/A_k)/2 and ∂A_k/∂Σ_k = R²/n (infinite at A_k = 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                d_sum = (p / 2.0) ** (-1.0 / 3.0) * np.sqrt(b / a) / 2.0 * r * r / n
                fill = float(np.sum(np.where(fill_se != 0.0, d_sum * fill_se, 0.0)))
        else:
            fill = math.nan  # every Σ_k = 0: the value has no slope to linearize by
        se = math.hypot(se, fill)
    return Eq3LayerwiseResult(value, "layerwise", sig, 2.0 * q, q, traj_f, flat_f, share, se, kind, iso, None,
                              grad)


# --------------------------------------------------------------------------------------------
# Neu Theorem 7 with Σ = diag(σ_k² I_{d_k})
# --------------------------------------------------------------------------------------------


def v_sigma_inv(v_blocks: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """``V_{t,Σ} = Σ_k v_{t,k}/σ_k²`` per step from per-block ``[T, K]`` estimates (signed)."""
    inv = 1.0 / np.asarray(sigmas, dtype=np.float64).ravel() ** 2
    return np.asarray(v_blocks, dtype=np.float64).reshape(-1, inv.size) @ inv


def gamma_sigma_inv_from_halves(dot_blocks: np.ndarray, sigmas: Sequence[float]) -> tuple[float, float]:
    """``Γ`` in the ``Σ⁻¹`` norm from §3's half-batch estimator, and its SE over draws.

    ``dot_blocks[j, k] = δ̄¹_k · δ̄²_k`` for draw ``j``: the dot product over block ``k`` of the two
    halves' differences ``ĝʰ(w) − ĝʰ(w+ξ_j)``, with the block-shaped perturbation
    ``ξ_j = sqrt(t−1) · σ ⊙ ε_j`` (``ε_j ~ N(0, I_d)``, the same ``ε_j`` for every candidate).
    Per draw ``Σ_k dot_{jk}/σ_k²``; mean and SE over the draws.
    """
    per_draw = np.atleast_2d(np.asarray(dot_blocks, dtype=np.float64)) @ (
        1.0 / np.asarray(sigmas, dtype=np.float64).ravel() ** 2)
    se = float(np.std(per_draw, ddof=1) / math.sqrt(per_draw.size)) if per_draw.size >= 2 else math.nan
    return float(per_draw.mean()), se


@dataclass
class Theorem7Result(_SelectedCandidate):
    candidates: np.ndarray
    trajectory: np.ndarray
    """``sqrt(max(4R²/n Σ_t η_t² (Γ_{Σ_c} + V_{t,Σ_c}), 0))`` per candidate."""
    flatness: np.ndarray
    """Signed ``γ_{TΣ}(W_T,S) − γ_{TΣ}(W_T,S')`` per candidate."""
    bound: np.ndarray
    """Signed version (bounds the signed gap)."""
    bound_abs: np.ndarray
    """With ``|flatness|`` (bounds ``|gen|``)."""
    standard_error: np.ndarray
    """Per candidate: flatness SE and the trajectory's SE (from ``gamma_sum_se`` and the filled
    held-out steps) combined."""
    selection: Selection
    selection_abs: Selection

    @property
    def best_abs(self) -> int:
        return self.selection_abs.index

    @property
    def value_abs(self) -> float:
        return float(self.bound_abs[self.best_abs]) if self.best_abs >= 0 else math.nan


def neu_theorem7_blockdiag(eta: np.ndarray, gamma_sigma_inv: np.ndarray, v_blocks: np.ndarray, r: float, n: int,
                           candidates: np.ndarray, flatness_terms: Sequence[float],
                           flatness_term_se: Sequence[float] | None = None,
                           gamma_sum_se: Sequence[float] | None = None, z: float = 1.0,
                           groups: Sequence[int] | None = None, v_steps: Sequence[int] | None = None,
                           v_measured: np.ndarray | None = None) -> Theorem7Result:
    """Neu et al. Theorem 7 with ``Σ_t = Σ_c = diag(σ_{c,k}² I_{d_k})`` per candidate ``c`` (§9.3).

    Args:
        eta: ``[T]`` learning rates.
        gamma_sigma_inv: ``[T, C]``, column ``c``: ``Γ_{Σ_c,(t−1)Σ_c}(W_{t−1})`` measured in the
            ``Σ_c⁻¹`` norm with block-shaped perturbations (``gamma_sigma_inv_from_halves``).
        v_blocks: ``[T, K]`` per-block ``v_{t,k}`` (block ``k``'s part of ``grad/heldout_dist_sq``);
            ``V_{t,Σ} = Σ_k v_{t,k}/σ_k²`` (signed; a negative total under the root counts as 0).
        candidates: ``[C, K]`` noise levels.
        flatness_terms: signed ``γ_{TΣ_c}(W_T,S) − γ_{TΣ_c}(W_T,S')`` per candidate.
        flatness_term_se: its SE per candidate.
        gamma_sum_se: SE of ``Σ_t η_t² Γ_t`` (in the ``Σ_c⁻¹`` norm) per candidate.
        z: selection by ``bound + z·SE`` (signed and absolute variants selected separately).
        v_steps, v_measured: the steps ``v_{t,k}`` was measured at and the measurements ``[m, K]``;
            the SE of filling ``V_{t,Σ_c}`` between them (absolute noise, ``docs/math.md`` §6.7) is
            added to ``gamma_sum_se`` in quadrature (``None``: every step measured).

    Isotropic candidates ``σ·1`` with ``gamma_sigma_inv = Γ_σ/σ²`` reproduce ``neu_theorem1``.
    """
    eta = np.asarray(eta, dtype=np.float64)
    cand = np.atleast_2d(np.asarray(candidates, dtype=np.float64))
    n_c, k_blocks = cand.shape
    gam = np.asarray(gamma_sigma_inv, dtype=np.float64).reshape(len(eta), n_c)
    vb = np.asarray(v_blocks, dtype=np.float64).reshape(len(eta), k_blocks)
    flat = np.asarray(flatness_terms, dtype=np.float64).ravel()
    if flat.size != n_c:
        raise ValueError("one flatness term per candidate")
    flat_se = (np.full(n_c, np.nan) if flatness_term_se is None
               else np.asarray(flatness_term_se, dtype=np.float64).ravel())
    g_se = None if gamma_sum_se is None else np.asarray(gamma_sum_se, dtype=np.float64).ravel()
    traj = np.full(n_c, np.nan)
    traj_se = np.zeros(n_c)
    for c in range(n_c):
        if not _valid_sigmas(cand[c]):
            continue
        total = float(np.sum(eta**2 * (gam[:, c] + v_sigma_inv(vb, cand[c]))))
        inner = 4.0 * r * r / n * total
        if not math.isfinite(inner):
            continue
        traj[c] = math.sqrt(max(inner, 0.0))
        sum_se = float(g_se[c]) if g_se is not None else 0.0
        if v_steps is not None and v_measured is not None:
            x = np.asarray(v_measured, dtype=np.float64).reshape(len(v_steps), k_blocks) @ (1.0 / cand[c] ** 2)
            sum_se = math.hypot(sum_se, fill_standard_error(v_steps, x, eta**2, noise="absolute"))
        traj_se[c] = sqrt_term_se(float(traj[c]), 4.0 * r * r / n * sum_se)
    bound = traj + flat
    bound_abs = traj + np.abs(flat)
    se = np.hypot(flat_se, traj_se)
    sel_se = None if flatness_term_se is None else se
    # as Theorem 1 (bounds/neu.py): a candidate whose Σ η²(Γ + V) estimate is ≤ 0 is not selected
    estimated = traj > 0
    return Theorem7Result(cand, traj, flat, bound, bound_abs, se,
                          sigma_min_with_se(np.where(estimated, bound, np.nan), sel_se, z, groups),
                          sigma_min_with_se(np.where(estimated, bound_abs, np.nan), sel_se, z, groups))


# --------------------------------------------------------------------------------------------
# candidate families (§9.4)
# --------------------------------------------------------------------------------------------


@dataclass
class Family:
    candidates: np.ndarray
    """``[C, K]``: the isotropic grid ``σ·1`` first, then ``λ·s`` for the scale grid."""
    groups: np.ndarray
    """``0`` for the isotropic grid, ``1`` for the shape ray (for the edge flag)."""
    shape: np.ndarray | None
    """The normalized shape (``Σ_k d_k s_k² = d``), ``None`` when only the isotropic grid is used."""


def candidate_family(sigma_grid: Sequence[float], d_blocks: Sequence[int], shape: Sequence[float] | None = None,
                     scale_grid: Sequence[float] | None = None) -> Family:
    """``{σ·1 : σ ∈ sigma_grid} ∪ {λ·s : λ ∈ scale_grid}`` (default ``scale_grid = sigma_grid``).

    The shape is normalized to ``Σ_k d_k s_k² = d`` so that ``λ·s`` has the total noise power
    ``λ² d`` of the isotropic ``σ = λ``. It must be computed before looking at the held-out gap:
    Wang–Mao — ``optimal_shape(A, B, d_blocks)`` from training quantities; Neu — fixed at the
    start, e.g. ``init_rms_shape`` (§9.4). A non-finite or non-positive shape (e.g. ``Tr H_k ≤ 0``)
    must not be passed: use the isotropic grid alone.
    """
    k_blocks = len(d_blocks)
    sg = np.asarray(sigma_grid, dtype=np.float64).ravel()
    iso = np.outer(sg, np.ones(k_blocks))
    if shape is None:
        return Family(iso, np.zeros(len(sg), dtype=np.int64), None)
    s = np.asarray(shape, dtype=np.float64).ravel()
    if s.size != k_blocks or not _valid_sigmas(s):
        raise ValueError("the shape needs one finite positive entry per block")
    s = _normalize_shape(s, d_blocks)
    lg = sg if scale_grid is None else np.asarray(scale_grid, dtype=np.float64).ravel()
    ray = np.outer(lg, s)
    groups = np.concatenate([np.zeros(len(sg), dtype=np.int64), np.ones(len(lg), dtype=np.int64)])
    return Family(np.vstack([iso, ray]), groups, s)


def init_rms_shape(init_sq_norms: Sequence[float], d_blocks: Sequence[int]) -> np.ndarray:
    """Per-block RMS of the initial weights, ``s_k = ‖W_{0,k}‖/sqrt(d_k)``, normalized to
    ``Σ_k d_k s_k² = d``; a block initialized at 0 (e.g. biases kept as their own block) gets the
    RMS of all initial weights. Depends on ``W_0`` only, never on the data (§9.4)."""
    sq = np.asarray(init_sq_norms, dtype=np.float64).ravel()
    d = np.asarray(d_blocks, dtype=np.float64).ravel()
    if sq.shape != d.shape or not np.all(np.isfinite(sq)) or np.any(sq < 0):
        raise ValueError("one finite non-negative squared norm per block")
    total = float(sq.sum())
    if not total > 0:
        raise ValueError("all initial weights are 0: no scale to take a shape from")
    rms = np.sqrt(sq / d)
    rms[rms == 0] = math.sqrt(total / float(d.sum()))
    return _normalize_shape(rms, d_blocks)
