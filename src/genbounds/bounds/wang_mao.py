"""Wang & Mao (ICLR 2022), Theorem 2: Eq. 2 over a σ grid and the closed form Eq. 3 (SPEC §6).

Eq. 2, constant noise level σ:

    traj(σ) = sqrt( R² d/n · Σ_t log1p( η_t² V̂_t / (d σ²) ) )
    flat(σ) = | γ(W_T, S; σ√T) − γ(W_T, S'; σ√T) |
    bound(σ) = traj(σ) + flat(σ),  minimized over a grid fixed before the run.

``log1p`` in float64: the argument is often below 1e−7. The dispersion ``V̂_t`` is a variance;
an estimate that rounding made slightly negative is taken as 0 *inside the logarithm only*.

Eq. 3 replaces ``log1p(x)`` by ``x`` and the flatness by its second-order value ``½σ²T Tr H`` on the
training set, then minimizes ``A/σ + Bσ²`` (``A = sqrt(R² Σ η_t² V̂_t/n)``, ``B = T Tr H/2``):
minimum ``3(A/2)^{2/3} B^{1/3}``, i.e.

    B_3 = 3/2 · ( R² · T · Tr H(W_T) · Σ_t η_t² V̂_t / n )^{1/3}

reached at ``σ* = (A/(2B))^{1/3}``, where the additive trajectory and flatness terms stand 2 : 1.
It bounds the *signed* gap under ``L_μ(w_T) ≤ E L_μ(w_T + Δ_T)``, is a second-order
approximation, and is undefined for ``Tr H ≤ 0``. Its two multiplicative factors are
``(R² Σ η_t² V̂_t / n)^{1/3}`` (trajectory) and ``(T Tr H)^{1/3}`` (flatness).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from genbounds.bounds.selection import Selection, sigma_min_with_se
from genbounds.bounds.series import fill_standard_error


@dataclass
class Eq2Result:
    sigmas: list[float]
    trajectory: list[float]
    flatness: list[float]
    bound: list[float]
    best: int
    """Index of the selected grid point (the minimizer of ``bound + z·SE``; −1: none usable)."""
    standard_error: float
    """SE of the bound at the selected σ (from the flatness estimate's Monte Carlo SE)."""
    selection: Selection | None = None

    @property
    def value(self) -> float:
        return self.bound[self.best] if self.best >= 0 else math.nan

    @property
    def sigma(self) -> float:
        return self.sigmas[self.best] if self.best >= 0 else math.nan


@dataclass
class Eq3Result:
    value: float
    trajectory_factor: float
    """``(R² Σ η_t² V̂_t / n)^{1/3}``."""
    flatness_factor: float
    """``(T Tr H)^{1/3}``."""
    sigma_star: float
    """The σ at which the closed form's minimum is reached."""
    standard_error: float
    """Delta-method SE from the SE of ``Tr H``: ``B_3/3 · SE(Tr H)/Tr H``."""


def trajectory_wang_mao(eta: np.ndarray, vhat: np.ndarray, r: float, n: int, d: int, sigma: float) -> float:
    """``sqrt(R² d/n Σ_t log1p(η_t² V̂_t/(dσ²)))`` (NaN when an input is not finite)."""
    eta = np.asarray(eta, dtype=np.float64)
    v = np.maximum(np.asarray(vhat, dtype=np.float64), 0.0)
    total = float(np.sum(np.log1p(eta**2 * v / (d * sigma**2))))
    if not math.isfinite(total) or not math.isfinite(r):
        return math.nan
    return math.sqrt(r * r * d / n * total)


def wang_mao_eq2(
    eta: np.ndarray,
    vhat: np.ndarray,
    r: float,
    n: int,
    d: int,
    sigmas: Sequence[float],
    flatness_term: Sequence[float],
    flatness_term_se: Sequence[float] | None = None,
    z: float = 1.0,
    allowed: Sequence[bool] | None = None,
    filled: tuple[Sequence[int], Sequence[float], np.ndarray | None] | None = None,
) -> Eq2Result:
    """Eq. 2 at every grid σ and the selected one. ``flatness_term[i]`` is ``γ(W_T,S;σ_i√T) −
    γ(W_T,S';σ_i√T)`` (signed; its absolute value enters the bound). The selection minimizes
    ``bound + z·SE`` over the finite (and ``allowed``) grid points (:mod:`genbounds.bounds.selection`).
    ``filled``: ``(steps, values, scale)`` of the dispersion measurements when ``vhat`` was
    block-filled between them (``scale``: :func:`log1p_sum_fill_se`'s); the trajectory term's SE
    from the filling (:func:`trajectory_fill_se`) is then added to the flatness SE in quadrature."""
    traj = [trajectory_wang_mao(eta, vhat, r, n, d, s) for s in sigmas]
    flat = [abs(float(f)) for f in flatness_term]
    bound = [a + b for a, b in zip(traj, flat)]
    ses = list(flatness_term_se) if flatness_term_se is not None else None
    if ses is not None and filled is not None:
        ses = [math.hypot(float(f), trajectory_fill_se(eta, vhat, r, n, d, s, *filled, trajectory=t))
               for f, s, t in zip(ses, sigmas, traj)]
    masked = [b if allowed is None or allowed[i] else math.nan for i, b in enumerate(bound)]
    sel = sigma_min_with_se(masked, ses, z if ses is not None else 0.0)
    best = sel.index
    se = float(ses[best]) if ses is not None and best >= 0 else math.nan
    return Eq2Result(list(map(float, sigmas)), traj, flat, bound, best, se, sel)


def log1p_sum_fill_se(eta: np.ndarray, vhat: np.ndarray, r: float, n: int, d: int, sigma: float,
                      steps: Sequence[int], measured: Sequence[float], scale: np.ndarray | None = None) -> float:
    """Filling SE of ``(R²d/n) Σ_t log1p(a_t V̂_t)``, ``a_t = η_t²/(dσ²)`` — the sum inside Eq. 2's
    square root — linearized in ``V̂_t`` (weights ``(R²d/n)·a_t/(1 + a_t V̂_t)``) and taken by
    :func:`~genbounds.bounds.series.fill_standard_error` (``steps``/``measured``: the measurements;
    ``scale``: per step, ``1/b_t`` where the batches differ in size and ``measured`` are the size-free
    levels ``V̂·b``, :func:`~genbounds.bounds.series.size_scaling`)."""
    eta = np.asarray(eta, dtype=np.float64)
    a = eta**2 / (d * sigma**2)
    weights = r * r * d / n * a / (1.0 + a * np.maximum(np.asarray(vhat, dtype=np.float64), 0.0))
    return fill_standard_error(steps, measured, weights, scale=scale)


def trajectory_fill_se(eta: np.ndarray, vhat: np.ndarray, r: float, n: int, d: int, sigma: float,
                       steps: Sequence[int], measured: Sequence[float], scale: np.ndarray | None = None,
                       trajectory: float | None = None) -> float:
    """SE of :func:`trajectory_wang_mao` from the steps whose ``V̂_t`` was filled from a neighbouring
    measurement: :func:`log1p_sum_fill_se`, then ``SE(√x) = SE(x)/(2√x)``.
    ``trajectory``: the term's value when the caller has it (else computed)."""
    se_inner = log1p_sum_fill_se(eta, vhat, r, n, d, sigma, steps, measured, scale)
    if se_inner == 0.0:
        return 0.0
    traj = trajectory_wang_mao(eta, vhat, r, n, d, sigma) if trajectory is None else trajectory
    return se_inner / (2.0 * traj) if traj > 0 else math.nan


def wang_mao_eq3(r: float, total_steps: int, trace_h: float, sum_eta2_vhat: float, n: int,
                 trace_h_se: float | None = None, sum_se: float = 0.0) -> Eq3Result | None:
    """The closed form; ``None`` when ``Tr H ≤ 0`` (undefined) or an input is not finite. ``sum_se``:
    SE of ``Σ η_t² V̂_t`` from filled steps (:func:`~genbounds.bounds.series.fill_standard_error`),
    added to the relative SE of ``Tr H`` in quadrature (both enter with exponent ⅓)."""
    if not trace_h > 0 or not all(math.isfinite(x) for x in (r, trace_h, sum_eta2_vhat)):
        return None
    traj = (r * r * sum_eta2_vhat / n) ** (1.0 / 3.0)
    flat = (total_steps * trace_h) ** (1.0 / 3.0)
    value = 1.5 * traj * flat
    a = math.sqrt(r * r * sum_eta2_vhat / n)
    b = total_steps * trace_h / 2.0
    sigma_star = (a / (2.0 * b)) ** (1.0 / 3.0) if b > 0 else math.inf
    if sum_se == 0.0:
        rel_sum = 0.0  # every step measured
    else:  # a NaN SE (filling with no spread to judge it by) stays NaN
        rel_sum = sum_se / sum_eta2_vhat if sum_eta2_vhat > 0 else math.nan
    se = value / 3.0 * math.hypot(trace_h_se / trace_h, rel_sum) if trace_h_se is not None else math.nan
    return Eq3Result(value, traj, flat, sigma_star, se)


def eq2_relaxed(sigma: float, r: float, total_steps: int, trace_h: float, sum_eta2_vhat: float, n: int) -> float:
    """Eq. 2 after ``log1p(x) ≤ x`` and ``γ = ½σ²T Tr H``: ``A/σ + Bσ²`` — whose minimum over σ
    is Eq. 3 (used by the tests and to plot the relaxation)."""
    a = math.sqrt(r * r * sum_eta2_vhat / n)
    return a / sigma + 0.5 * total_steps * trace_h * sigma**2
