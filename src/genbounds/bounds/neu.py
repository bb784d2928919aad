"""Neu, Dziugaite, Haghifam & Roy (COLT 2021), Theorem 1 with constant σ (SPEC §6):

    bound(σ) = sqrt( 4R²/n · Σ_t η_t²/σ² · (Γ_{σ√(t−1)}(W_{t−1}) + V_t(W_{t−1})) )
               + ( γ(W_T, S; σ√T) − γ(W_T, S'; σ√T) )

with ``Γ_0 = 0``. The flatness term is signed and bounds the signed gap; the variant with its
absolute value bounds ``|gen|``. ``V_t`` estimates (held-out ``‖ḡ_B − ĝ_ref‖² − s²_ref/m``) may be
negative; they are kept signed in the sum, and a negative total under the square root is taken
as 0 (reported as such, not hidden: the trajectory term is then 0) — but such a σ is not
selected: there the value would be the flatness term alone (the clipped estimate is biased low;
``docs/math.md`` §6.4). With no selectable σ the bound is NaN.

Also the seed-001 Figure-1 comparison of the two trajectory terms at the same σ, common
``R²/n`` dropped: Neu ``sqrt(4 Σ_t η_t²(Γ + V)/σ²)`` vs Wang–Mao ``sqrt(d Σ_t log1p(η_t² V̂_t/(dσ²)))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from genbounds.bounds.selection import Selection, sigma_min_with_se


@dataclass
class NeuResult:
    sigmas: list[float]
    trajectory: list[float]
    flatness: list[float]
    """Signed ``γ(S) − γ(S')`` per σ."""
    bound: list[float]
    """Signed version (bounds the signed gap)."""
    bound_abs: list[float]
    """With ``|flatness|`` (bounds ``|gen|``)."""
    best: int
    best_abs: int
    standard_error: float
    """SE at the selected σ: flatness SE and the Γ estimates' SE, combined."""
    standard_errors: list[float] | None = None
    """Per grid σ."""
    selection: Selection | None = None
    selection_abs: Selection | None = None

    @property
    def value(self) -> float:
        return self.bound[self.best] if self.best >= 0 else math.nan

    @property
    def value_abs(self) -> float:
        return self.bound_abs[self.best_abs] if self.best_abs >= 0 else math.nan

    @property
    def sigma(self) -> float:
        return self.sigmas[self.best] if self.best >= 0 else math.nan


def sqrt_term_se(term: float, inner_se: float) -> float:
    """SE of a term ``√max(X, 0)`` (``term``) from the SE of ``X``: ``SE(X)/(2√X)``, capped by
    ``√SE(X)`` (``√(X + δ) − √X ≤ √δ``) — the linearization fails as ``X → 0``, and a clipped
    ``X ≤ 0`` (``V_t`` is signed; the term is 0) must not read as exact. 0 when ``SE(X)`` is 0."""
    if inner_se == 0.0:
        return 0.0
    if term > 0:
        return min(inner_se / (2.0 * term), math.sqrt(inner_se))
    return math.sqrt(inner_se) if math.isfinite(inner_se) else math.nan


def neu_trajectory_sum(eta: np.ndarray, gamma: np.ndarray, v: np.ndarray) -> float:
    """``Σ_t η_t² (Γ_t + V_t)`` for one σ (per-step arrays of length T)."""
    eta = np.asarray(eta, dtype=np.float64)
    return float(np.sum(eta**2 * (np.asarray(gamma, dtype=np.float64) + np.asarray(v, dtype=np.float64))))


def neu_theorem1(
    eta: np.ndarray,
    gamma: np.ndarray,
    v: np.ndarray,
    r: float,
    n: int,
    sigmas: Sequence[float],
    flatness_term: Sequence[float],
    flatness_term_se: Sequence[float] | None = None,
    gamma_sum_se: Sequence[float] | None = None,
    z: float = 1.0,
    allowed: Sequence[bool] | None = None,
    v_sum_se: float = 0.0,
) -> NeuResult:
    """Theorem 1 per grid σ and its minima.

    Args:
        eta: per-step learning rates ``[T]``.
        gamma: per-step ``Γ_{σ√(t−1)}(W_{t−1})``, shape ``[T, len(sigmas)]``.
        v: per-step ``V_t(W_{t−1})``, shape ``[T]``.
        r, n: sub-Gaussian constant and training-set size.
        sigmas: the grid.
        flatness_term: signed ``γ(S) − γ(S')`` at ``σ√T`` per σ.
        flatness_term_se: its SE per σ.
        gamma_sum_se: SE of ``Σ_t η_t² Γ_t`` per σ (the Γ probes' Monte-Carlo SEs and the error of
            filling Γ between them, ``docs/math.md`` §6.9; NaN where one probe stands for the run).
        z: the selection minimizes ``bound + z·SE`` (:mod:`genbounds.bounds.selection`).
        allowed: grid points that may be selected (default: all).
        v_sum_se: SE of ``Σ_t η_t² V_t`` from the steps whose ``V_t`` was filled from a neighbouring
            measurement (:func:`~genbounds.bounds.series.fill_standard_error`; 0: every step
            measured), combined in quadrature with ``gamma_sum_se``.
    """
    gamma = np.asarray(gamma, dtype=np.float64).reshape(len(eta), len(sigmas))
    traj, bound, bound_abs, traj_se, estimated = [], [], [], [], []
    for i, s in enumerate(sigmas):
        total = neu_trajectory_sum(eta, gamma[:, i], v)
        inner = 4.0 * r * r / n * total / (s * s)
        estimated.append(inner > 0)  # False for a non-positive (or NaN) estimate of Σ η²(Γ + V)
        t = math.sqrt(max(inner, 0.0)) if math.isfinite(inner) else math.nan
        traj.append(t)
        f = float(flatness_term[i])
        bound.append(t + f)
        bound_abs.append(t + abs(f))
        sum_se = math.hypot(float(gamma_sum_se[i]) if gamma_sum_se is not None else 0.0, v_sum_se)
        traj_se.append(sqrt_term_se(t, 4.0 * r * r / n / (s * s) * sum_se))
    flat_se = [float(x) for x in flatness_term_se] if flatness_term_se is not None else [math.nan] * len(bound)
    ses = [math.hypot(f, t) for f, t in zip(flat_se, traj_se)]
    use_se = flatness_term_se is not None
    # a σ whose Σ η²(Γ + V) estimate is ≤ 0 is not selectable: the term is clipped to 0 there
    # (biased low: Γ, V ≥ 0 in expectation), so its value would be the flatness term alone
    ok = [estimated[i] and (allowed is None or allowed[i]) for i in range(len(bound))]
    masked = [b if ok[i] else math.nan for i, b in enumerate(bound)]
    masked_abs = [b if ok[i] else math.nan for i, b in enumerate(bound_abs)]
    sel = sigma_min_with_se(masked, ses if use_se else None, z if use_se else 0.0)
    sel_abs = sigma_min_with_se(masked_abs, ses if use_se else None, z if use_se else 0.0)
    best, best_abs = sel.index, sel_abs.index
    se = ses[best] if best >= 0 else math.nan
    return NeuResult(list(map(float, sigmas)), traj, [float(f) for f in flatness_term], bound, bound_abs, best,
                     best_abs, se, ses, sel, sel_abs)


def trajectory_comparison(eta: np.ndarray, gamma: np.ndarray, v: np.ndarray, vhat: np.ndarray, d: int,
                          sigmas: Sequence[float]) -> tuple[list[float], list[float]]:
    """Seed 001 Figure 1: ``(Neu, Wang–Mao)`` trajectory terms per σ, common ``R²/n`` dropped."""
    gamma = np.asarray(gamma, dtype=np.float64).reshape(len(eta), len(sigmas))
    eta = np.asarray(eta, dtype=np.float64)
    vh = np.maximum(np.asarray(vhat, dtype=np.float64), 0.0)
    neu, wm = [], []
    for i, s in enumerate(sigmas):
        neu.append(math.sqrt(max(4.0 * neu_trajectory_sum(eta, gamma[:, i], v) / (s * s), 0.0)))
        wm.append(math.sqrt(d * float(np.sum(np.log1p(eta**2 * vh / (d * s * s))))))
    return neu, wm
