"""Per-step series from scheduled measurements (pure math, numpy).

A quantity measured at optimizer steps ``s_1 < s_2 < …`` (0-based step indices: the statistic of
step ``t`` is logged at ``t − 1``) *stands for the steps of its block* ``[s_i, s_{i+1})``, the last
one until the end of the run, each step keeping its own learning rate. Steps before the first
measurement take the first measurement's value (a back-fill, which only matters when a schedule
does not measure step 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def expand_blocks(steps: Sequence[int], values: Sequence[float] | np.ndarray, total_steps: int) -> np.ndarray:
    """Per-step array of length ``total_steps`` (float64) from block measurements.

    ``values`` may be 2-d (``[len(steps), k]``): each column is expanded.
    """
    vals = np.asarray(values, dtype=np.float64)
    if total_steps <= 0:
        return np.zeros((0,) + vals.shape[1:], dtype=np.float64)
    if len(steps) == 0:
        raise ValueError("no measurement to expand")
    order = np.argsort(np.asarray(steps), kind="stable")
    s = np.asarray(steps)[order]
    vals = vals[order]
    # index of the block each step falls in: the last measurement at or before it (0 before the first)
    idx = np.searchsorted(s, np.arange(total_steps), side="right") - 1
    idx = np.clip(idx, 0, len(s) - 1)
    return vals[idx]


def size_scaling(steps: Sequence[int], sizes: np.ndarray | None, total_steps: int
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """How a per-batch dispersion measured at ``steps`` stands for the steps of its block when the
    batches differ in size (``docs/math.md`` §6.8): ``Tr Σ_B = tr Σ/b``, so the block carries the
    measurement's size-free level ``V̂_{s_i}·b_{s_i}`` and each step divides it by its own ``b_t``.

    ``sizes``: each step's batch size (``≥ total_steps`` long, 0 where unknown). Returns
    ``(b_{s_i}`` per measurement in the order of ``steps``, ``b_t`` per step``)``, or ``None`` —
    plain block filling — when every step's batch has one size (nothing changes) or a size the
    filling needs is unknown."""
    if sizes is None or total_steps <= 0 or len(steps) == 0:
        return None
    b = np.asarray(sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.int64)
    if len(b) < total_steps or np.any(s < 0) or np.any(s >= len(b)):
        return None
    b_t, b_s = b[:total_steps], b[s]
    if not (np.all(b_t > 0) and np.all(b_s > 0)):
        return None
    if np.all(b_t == b_t[0]) and np.all(b_s == b_t[0]):
        return None
    return b_s, b_t


def expand_blocks_scaled(steps: Sequence[int], values: Sequence[float] | np.ndarray, total_steps: int,
                         scaling: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """:func:`expand_blocks` of a per-batch dispersion, each step at its own batch size
    (:func:`size_scaling`; ``None``: plain block filling). ``values`` may be 2-d (per group)."""
    if scaling is None:
        return expand_blocks(steps, values, total_steps)
    b_s, b_t = scaling
    filled = expand_blocks(steps, values, total_steps)
    ratio = expand_blocks(steps, b_s, total_steps) / b_t  # (exactly 1 where the sizes are equal)
    return filled * (ratio if filled.ndim == 1 else ratio[:, None])


def block_weights(steps: Sequence[int], weights: np.ndarray) -> np.ndarray:
    """Sum of per-step ``weights`` (length ``T``) over each measurement's block, in the order of
    ``steps`` (sorted) — e.g. ``Σ_{t∈block} η_t²``, the weight of that measurement's error."""
    total = len(weights)
    s = np.sort(np.asarray(steps))
    idx = np.clip(np.searchsorted(s, np.arange(total), side="right") - 1, 0, len(s) - 1)
    return np.bincount(idx, weights=weights, minlength=len(s)).astype(np.float64)


def growing_level_series(steps: Sequence[int], values: np.ndarray, total_steps: int,
                         fill: str = "scaled") -> tuple[np.ndarray, np.ndarray]:
    """Per-step ``Γ_{σ√τ}(W_τ)`` (``τ = t − 1`` steps taken) from probes of Γ at the growing level
    ``σ√s`` taken at steps ``s`` (``values``: ``[len(steps), k]``, one column per grid σ).

    * ``fill="block"`` — each probe stands for the steps of its block (SPEC §3 literally). Γ grows
      with the level, so this under-counts inside every block, and the probe at ``s = 0`` (where
      ``Γ_0 = 0`` exactly) zeroes its whole block.
    * ``fill="scaled"`` (default) — second order, ``Γ_{σ√τ} ≈ σ²τ·tr(H²)``: the probe at ``s ≥ 1``
      stands for its block as ``(τ/s)·Γ_{σ√s}`` (exact for a quadratic loss); the block of an
      ``s = 0`` probe is scaled from the next probe with ``s ≥ 1``.

    Returns ``(gamma [T, k], weights [len(steps), T])`` with ``gamma = weightsᵀ @ values`` (sorted
    ``steps``), so the standard error of ``Σ_τ c_τ Γ_τ`` is ``sqrt(Σ_i ((weights @ c)_i · SE_i)²)``.
    """
    if fill not in ("scaled", "block"):
        raise ValueError(f"fill must be 'scaled' or 'block', got {fill!r}")
    order = np.argsort(np.asarray(steps), kind="stable")
    s = np.asarray(steps)[order]
    vals = np.asarray(values, dtype=np.float64).reshape(len(s), -1)[order]
    tau = np.arange(total_steps)
    block = np.clip(np.searchsorted(s, tau, side="right") - 1, 0, len(s) - 1)
    weights = np.zeros((len(s), total_steps))
    if fill == "block":
        weights[block, tau] = 1.0
    else:
        positive = np.nonzero(s >= 1)[0]
        for t in tau:
            i = block[t]
            if s[i] < 1:
                if positive.size == 0:
                    continue  # only the s = 0 probe: Γ = 0 everywhere it can speak for
                i = positive[0]
            weights[i, t] = t / s[i]
    return weights.T @ vals, weights


def growing_level_fill_se(steps: Sequence[int], values: np.ndarray, weights: np.ndarray,
                          fill: str = "scaled") -> np.ndarray:
    """Per column (grid σ), the filling SE of ``Σ_τ w_τ Γ_τ`` with ``Γ`` from
    :func:`growing_level_series` (``docs/math.md`` §6.9): §6.7's relative model on the level the
    fill carries through a block — ``Γ_{σ√s}/s`` under ``"scaled"`` (weights ``w_τ·τ``),
    ``Γ_{σ√s}`` itself under ``"block"``; probes at ``s = 0``, where ``Γ_0 = 0``, carry none. NaN where
    steps were filled from fewer than two probes that carry a level: one probe standing for the
    whole run has an error nothing measured tells (``weights``: length ``T``)."""
    if fill not in ("scaled", "block"):
        raise ValueError(f"fill must be 'scaled' or 'block', got {fill!r}")
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(np.asarray(steps), kind="stable")
    s = np.asarray(steps)[order]
    vals = np.asarray(values, dtype=np.float64).reshape(len(s), -1)[order]
    keep = s >= 1  # (Γ_0 = 0 exactly: a level for no fill — under "block" its block's zeros are the fill's own bias)
    s, vals = s[keep], vals[keep]
    if fill == "scaled":
        vals, w = vals / s[:, None], w * np.arange(len(w))
    if len(w) == 0 or not np.any(w != 0):
        return np.zeros(vals.shape[1])
    if len(s) == 0:
        return np.full(vals.shape[1], math.nan)
    return np.array([fill_standard_error(s, vals[:, k], w) for k in range(vals.shape[1])])


_T975 = (12.7062047, 4.3026527, 3.1824463, 2.7764451, 2.5705818, 2.4469119, 2.3646243, 2.3060041, 2.2621572, 2.2281389)
"""Student's ``t_{0.975,k}`` for ``k = 1…10`` degrees of freedom."""
_Z975 = 1.959963984540054


def few_differences_factor(k: int) -> float:
    """``t_{0.975,k} / z_{0.975}``: how much wider a filling SE must be when its variance was
    estimated from ``k`` consecutive differences, so that ±1.96 of it is still a 95 % interval
    (the estimated variance is ``χ²_k/k`` times the true one: the error over the SE is Student's
    ``t_k``; ``docs/math.md`` §6.7). 6.48 at ``k = 1`` (two measurements), 1.14 at 10, 1.04 at 30;
    exact for ``k ≤ 10``, Cornish–Fisher beyond (relative error below 4e-6)."""
    if k < 1:
        return math.nan
    if k <= len(_T975):
        return _T975[k - 1] / _Z975
    z = _Z975
    g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return (z + sum(gi / k ** (i + 1) for i, gi in enumerate(g))) / z


def fill_standard_error(steps: Sequence[int], values: Sequence[float] | np.ndarray, weights: np.ndarray,
                        noise: str = "relative", scale: np.ndarray | None = None) -> float:
    """SE of ``Σ_t w_t x̂_t`` (``x̂`` the block-filled series, :func:`expand_blocks`) as an estimate of
    ``Σ_t w_t x_t``, the same sum had ``x`` been measured at every step (``docs/math.md`` §6.7).

    Model: inside the block ``B_i`` of the measurement at ``s_i``, ``x_t = μ_i + ε_t`` with independent
    ``ε_t`` of variance ``κ² μ_i²`` (a relative noise: a per-batch statistic's spread scales with its
    level). The filling error of the block is ``(W_i − w_{s_i}) ε_{s_i} − Σ_{t∈B_i, t≠s_i} w_t ε_t``
    (``W_i = Σ_{B_i} w_t``), so ``Var = Σ_i κ² μ_i² [(W_i − w_{s_i})² + Σ_{t∈B_i, t≠s_i} w_t²]``, with
    ``μ_i`` estimated by ``x_{s_i}`` and ``κ²`` by half the mean squared relative difference of
    consecutive measurements (which also counts any trend between them: conservative).

    ``noise="absolute"`` — for a signed series whose level may cross zero (Neu's held-out ``V_t``):
    ``ε_t`` of one variance ``τ²`` everywhere, estimated by half the mean squared difference of
    consecutive measurements (again counting any trend: conservative), and
    ``Var = τ² Σ_i [(W_i − w_{s_i})² + Σ_{t∈B_i, t≠s_i} w_t²]``.

    ``scale`` (relative model; ``docs/math.md`` §6.8): per step ``v_t = 1/b_t`` where ``values`` are
    the size-free levels ``V̂·b`` of a statistic whose batches differ in size
    (:func:`size_scaling`). Step ``t`` then weighs ``w_t v_t``, and its noise's variance is
    ``κ² μ_i² v_t`` (a statistic estimated from ``b_t`` samples), so ``κ²`` is estimated from
    consecutive measurements as ``mean(d_i² / (v_{s_i} + v_{s_{i+1}}))`` and
    ``Var = Σ_i κ² μ_i² [(W_i − w_{s_i})² v_{s_i} + Σ_{t∈B_i, t≠s_i} w_t² v_t]`` (weights ``w v``);
    ``None``: ``v ≡ 1``.

    ``κ²`` (or ``τ²``) comes from ``k`` consecutive differences, so the SE is widened by
    :func:`few_differences_factor` ``(k)`` (6.48× from two measurements, 1.04× from 31): ±1.96 SE is
    a 95 % interval under the model also where few measurements stand for the run (Neu's Γ from its
    midway and final probes: §6.9).

    Returns 0 when every step was measured (nothing was filled) and, relative, when every
    measurement is 0 (the model's variance ``κ² μ²`` is then 0 whatever ``κ``); NaN when steps were
    filled but fewer than two measurements (or, relative, no two with a non-zero mean) leave ``κ``
    unknown.
    """
    if noise not in ("relative", "absolute"):
        raise ValueError(f"noise must be 'relative' or 'absolute', got {noise!r}")
    w = np.asarray(weights, dtype=np.float64)
    if scale is not None and noise == "relative":
        v = np.asarray(scale, dtype=np.float64)
        w = w * v
    else:
        v = np.ones_like(w)
    total = len(w)
    if total == 0 or len(steps) == 0:
        return 0.0
    order = np.argsort(np.asarray(steps), kind="stable")
    s = np.asarray(steps)[order]
    x = np.asarray(values, dtype=np.float64)[order]
    inside = (s >= 0) & (s < total)
    block = np.clip(np.searchsorted(s, np.arange(total), side="right") - 1, 0, len(s) - 1)
    w_block = np.bincount(block, weights=w, minlength=len(s))
    w2_block = np.bincount(block, weights=w * w * v, minlength=len(s))
    w_own = np.where(inside, w[np.clip(s, 0, total - 1)], 0.0)
    v_own = v[np.clip(s, 0, total - 1)]  # (a measurement past the end: its own size unknown here, its block empty)
    # (W_i − w_{s_i})² v_{s_i} + Σ_{t≠s_i} w_t² v_t per block
    coef = (w_block - w_own) ** 2 * v_own + (w2_block - w_own**2 * v_own)
    if not np.any(coef > 0):
        return 0.0
    if noise == "absolute":
        if len(x) < 2:
            return math.nan
        tau2 = 0.5 * float(np.mean((x[1:] - x[:-1]) ** 2))
        var = tau2 * float(np.sum(coef))
        return math.sqrt(var) * few_differences_factor(len(x) - 1) if math.isfinite(var) else math.nan
    if np.all(x == 0.0):
        return 0.0  # a level of 0 has no relative spread (e.g. a block of unused parameters)
    mean = 0.5 * (x[1:] + x[:-1])
    ok = np.abs(mean) > 0
    if len(x) < 2 or not np.any(ok):
        return math.nan
    rel2 = ((x[1:] - x[:-1])[ok] / mean[ok]) ** 2
    kappa2 = float(np.mean(rel2 / (v_own[1:] + v_own[:-1])[ok]))
    var = kappa2 * float(np.sum(coef * x * x))
    return math.sqrt(var) * few_differences_factor(int(np.count_nonzero(ok))) if math.isfinite(var) else math.nan
