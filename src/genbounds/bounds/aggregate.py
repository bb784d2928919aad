"""All bounds of one evaluation, from the accumulated series (pure numpy; SPEC §6 and §9).

:func:`compute_bounds` returns the logged values: every requested headline bound (``NaN`` when
it cannot be computed — missing or non-finite inputs, ``Tr H ≤ 0`` — never left out), its SE, the
terms, the selected σ with its flags, and the constants. Validity flags compare each bound with the
measured gap (:func:`validity`).

The selection over σ minimizes ``value + z·SE`` (:mod:`genbounds.bounds.selection`); a grid
point whose perturbation raises the training-probe loss by more than ``max_loss_increase × R``
can be excluded (``None``: all allowed), and a selected point whose perturbation raises it by
more than ``R`` is flagged ``…_degenerate``: the flatness term is then a difference of losses of a
destroyed model, and Eq. 2 tends to a held-out estimate of the gap itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genbounds.bounds.layerwise import (
    candidate_family,
    dispersion_sums_fill_se,
    neu_theorem7_blockdiag,
    optimal_shape,
    wang_mao_eq2_layerwise,
    wang_mao_eq3_layerwise,
)
from genbounds.bounds.neu import neu_theorem1, trajectory_comparison
from genbounds.bounds.series import fill_standard_error
from genbounds.bounds.wang_mao import wang_mao_eq2, wang_mao_eq3

ERROR_R = 0.5
"""The 0-1 loss takes values in [0, 1]: it is ½-sub-Gaussian, exactly."""

ISOTROPIC = ("wang_mao_eq2", "wang_mao_eq3", "neu")
ERROR = ("wang_mao_eq2_error", "neu_error")
LAYERWISE = ("wang_mao_eq2_layerwise", "wang_mao_eq3_layerwise", "neu_layerwise")
ALL_BOUNDS = ISOTROPIC + ERROR + LAYERWISE


@dataclass
class BoundInputs:
    T: int
    n: int
    d: int
    r: float
    eta: np.ndarray
    vhat: np.ndarray
    """Per-step ``V̂_t`` (``[T]``, blocks expanded)."""
    sigmas: list[float]
    wanted: tuple[str, ...]
    v: np.ndarray | None = None
    """Neu's ``V_t`` per step (held-out), ``None``: ``vhat`` stands in."""
    v_steps: np.ndarray | None = None
    """The steps ``V_t`` was measured at, with ``v_measured``: the SE of the steps filled in
    between (absolute noise: ``V_t`` is signed)."""
    v_measured: np.ndarray | None = None
    v_measured_blocks: np.ndarray | None = None
    """``[m, K]`` per-block held-out measurements at ``v_steps`` (the layer-wise Neu bound's filling SE)."""
    gamma: np.ndarray | None = None
    """``[T, S]`` Neu's ``Γ_{σ√(t−1)}`` per step and grid σ."""
    gamma_sum_se: np.ndarray | None = None
    flat: dict[str, Any] | None = None
    """The isotropic flatness record at ``T``."""
    flat_shaped: dict[str, Any] | None = None
    """The flatness record at ``T`` for the Wang–Mao block shape."""
    flat_neu_shaped: dict[str, Any] | None = None
    curvature: dict[str, Any] | None = None
    vhat_steps: np.ndarray | None = None
    """The steps ``V̂`` was measured at (``None``: every step); with ``vhat_measured``, the SE of
    the steps filled in between (:func:`~genbounds.bounds.series.fill_standard_error`)."""
    vhat_measured: np.ndarray | None = None
    fill_scale: np.ndarray | None = None
    """Per step ``1/b_t`` where the batches differ in size (:func:`~genbounds.bounds.series.size_scaling`):
    ``vhat_measured`` (and ``vhat_measured_blocks``) are then the size-free levels ``V̂_{s_i}·b_{s_i}``,
    and the filling SE weighs step ``t`` by it and takes it as the level's relative noise variance
    (``docs/math.md`` §6.8); ``None``: one batch size."""
    vhat_blocks: np.ndarray | None = None
    """``[T, K]`` per-step per-group dispersion."""
    vhat_measured_blocks: np.ndarray | None = None
    """``[m, K]`` per-group dispersion measurements at ``vhat_steps`` (the layer-wise Wang–Mao
    bounds' filling SE)."""
    v_blocks: np.ndarray | None = None
    gamma_shaped: np.ndarray | None = None
    """``[T, S]``: Γ in the Σ⁻¹ norm under the Neu block shape, per scale."""
    gamma_shaped_sum_se: np.ndarray | None = None
    d_blocks: list[int] | None = None
    neu_shape: np.ndarray | None = None
    z: float = 1.0
    max_loss_increase: float | None = None
    notes: list[str] = field(default_factory=list)


def _allowed(flat: dict[str, Any], r: float, max_increase: float | None) -> list[bool] | None:
    if max_increase is None:
        return None
    return [bool(np.isfinite(g)) and g <= max_increase * r for g in flat["train"]]


def _degenerate(flat: dict[str, Any], index: int, r: float) -> float:
    if index < 0:
        return math.nan
    return float(flat["train"][index] > r)


def eq3_shape_inputs(inp: BoundInputs) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A_k, B_k)`` of the block Eq. 3 relaxation, when the per-group inputs exist."""
    rec = inp.curvature
    if inp.vhat_blocks is None or rec is None or rec.get("group_traces") is None:
        return None
    sums = np.sum(inp.eta[:, None] ** 2 * np.maximum(inp.vhat_blocks, 0.0), axis=0)
    a = inp.r * inp.r * sums / inp.n
    b = inp.T * np.asarray(rec["group_traces"], dtype=np.float64) / 2.0
    return a, b


def wang_mao_shape(inp: BoundInputs) -> np.ndarray | None:
    """The Eq. 3-optimal block shape from training quantities (``None`` when undefined)."""
    ab = eq3_shape_inputs(inp)
    if ab is None or inp.d_blocks is None:
        return None
    a, b = ab
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(b > 0) and np.all(a > 0)):
        return None
    return optimal_shape(a, b, inp.d_blocks)


def compute_bounds(inp: BoundInputs) -> dict[str, float]:
    out: dict[str, float] = {"setting/R": inp.r, "setting/n": float(inp.n), "setting/d": float(inp.d),
                             "setting/T": float(inp.T)}
    nan = math.nan
    for name in inp.wanted:
        out[f"bound/{name}"] = nan
        out[f"bound/{name}_se"] = nan
    eta, vhat, n, d, r, T = inp.eta, inp.vhat, inp.n, inp.d, inp.r, inp.T
    sum_eta2_vhat = float(np.sum(eta**2 * np.maximum(vhat, 0.0)))
    out["bound_terms/sum_eta2_dispersion"] = sum_eta2_vhat
    filled = None  # (steps, values, scale) of V̂ when steps between its measurements were block-filled
    if inp.vhat_steps is not None and inp.vhat_measured is not None:  # its SE is 0 when nothing was filled
        filled = (inp.vhat_steps, inp.vhat_measured, inp.fill_scale)
    sum_se = 0.0 if filled is None else fill_standard_error(*filled[:2], eta**2, scale=inp.fill_scale)
    out["bound_terms/sum_eta2_dispersion_se"] = sum_se  # 0: every step measured
    flat = inp.flat

    if "wang_mao_eq3" in inp.wanted:
        rec = inp.curvature
        if rec is None or rec.get("hessian_trace") is None:
            inp.notes.append("trace: no Hessian trace was measured at the evaluated weights (HessianTrace measured "
                             "nothing: its warning says why), so Wang–Mao Eq. 3 is NaN")
        else:
            eq3 = wang_mao_eq3(r, T, rec["hessian_trace"], sum_eta2_vhat, n, rec.get("hessian_trace_se"), sum_se)
            tr = rec["hessian_trace"]
            if eq3 is None and not (tr > 0 and math.isfinite(tr)):  # (else R or the dispersion: said elsewhere)
                tr_se = rec.get("hessian_trace_se")
                est = f"{tr:.3g}" + (f" ± {tr_se:.2g}" if tr_se is not None and math.isfinite(tr_se) else "")
                inp.notes.append(f"trace: the Hessian trace estimate at the evaluated weights is {est} (≤ 0 or not "
                                 "finite): Wang–Mao Eq. 3 is undefined there and logged as NaN (within its SE of 0: "
                                 "more Hutchinson probes, HessianTrace(max_probes=…), or a longer run)")
            elif eq3 is not None:
                out.update({"bound/wang_mao_eq3": eq3.value, "bound/wang_mao_eq3_se": eq3.standard_error,
                            "bound_terms/trajectory_factor_wang_mao_eq3": eq3.trajectory_factor,
                            "bound_terms/flatness_factor_wang_mao_eq3": eq3.flatness_factor,
                            "bound_terms/sigma_star_wang_mao_eq3": eq3.sigma_star})

    if flat is not None and ("wang_mao_eq2" in inp.wanted or "wang_mao_eq2_error" in inp.wanted):
        allowed = _allowed(flat, r, inp.max_loss_increase)
        eq2 = wang_mao_eq2(eta, vhat, r, n, d, inp.sigmas, flat["term"], flat["term_se"], inp.z, allowed, filled)
        if "wang_mao_eq2" in inp.wanted:
            _put_selection(out, "wang_mao_eq2", eq2.value, eq2.standard_error, eq2.sigma, eq2.selection)
            if eq2.best >= 0:
                out["bound_terms/trajectory_wang_mao"] = eq2.trajectory[eq2.best]
                out["bound_terms/flatness_wang_mao"] = eq2.flatness[eq2.best]
                out["bound_terms/wang_mao_eq2_degenerate"] = _degenerate(flat, eq2.best, r)
        if "wang_mao_eq2_error" in inp.wanted and flat.get("error_term") is not None:
            err = wang_mao_eq2(eta, vhat, ERROR_R, n, d, inp.sigmas, flat["error_term"], flat["error_term_se"],
                               inp.z, allowed, filled)
            _put_selection(out, "wang_mao_eq2_error", err.value, err.standard_error, err.sigma, err.selection)
            if err.best >= 0:
                out["bound_terms/trajectory_wang_mao_error"] = err.trajectory[err.best]
                out["bound_terms/flatness_wang_mao_error"] = err.flatness[err.best]
                out["bound_terms/wang_mao_eq2_error_degenerate"] = _degenerate(flat, err.best, r)

    neu_wanted = {"neu", "neu_error", "neu_layerwise"} & set(inp.wanted)
    if neu_wanted and inp.gamma is not None:
        v = inp.v if inp.v is not None else vhat
        if inp.v is None:
            v_sum_se = sum_se  # V̂ stands in: its filling SE
        elif inp.v_steps is not None and inp.v_measured is not None:  # 0 when nothing was filled
            v_sum_se = fill_standard_error(inp.v_steps, inp.v_measured, eta**2, noise="absolute")
        else:
            v_sum_se = 0.0
        out["bound_terms/sum_eta2_v_se"] = v_sum_se
        if flat is not None:
            allowed = _allowed(flat, r, inp.max_loss_increase)
            neu = neu_theorem1(eta, inp.gamma, v, r, n, inp.sigmas, flat["term"], flat["term_se"],
                               inp.gamma_sum_se, inp.z, allowed, v_sum_se)
            if neu.best < 0 and math.isfinite(r) and neu.trajectory and all(t == 0.0 for t in neu.trajectory):
                inp.notes.append("neu: the estimate of Σ_t η_t²(Γ_t + V_t) is ≤ 0 at every σ of the grid (Γ from "
                                 "GradientSensitivity, V from HeldoutGradient: noisy estimates of non-negative "
                                 "quantities), so Neu's bounds are NaN there (more draws, or a longer run)")
            if "neu" in inp.wanted:
                _put_selection(out, "neu", neu.value, neu.standard_error, neu.sigma, neu.selection)
                out["bound/neu_abs"] = neu.value_abs
                out["bound/neu_abs_se"] = neu.standard_errors[neu.best_abs] if neu.best_abs >= 0 and \
                    neu.standard_errors else nan
                if neu.best >= 0:
                    out["bound_terms/trajectory_neu"] = neu.trajectory[neu.best]
                    out["bound_terms/flatness_neu"] = neu.flatness[neu.best]
                    out["bound_terms/neu_degenerate"] = _degenerate(flat, neu.best, r)
            if "neu_error" in inp.wanted and flat.get("error_term") is not None:
                err = neu_theorem1(eta, inp.gamma, v, ERROR_R, n, inp.sigmas, flat["error_term"],
                                   flat["error_term_se"], inp.gamma_sum_se, inp.z, allowed, v_sum_se)
                _put_selection(out, "neu_error", err.value, err.standard_error, err.sigma, err.selection)
                if err.best >= 0:
                    out["bound_terms/neu_error_degenerate"] = _degenerate(flat, err.best, r)
        fig_neu, fig_wm = trajectory_comparison(eta, inp.gamma, v, vhat, d, inp.sigmas)
        for s, a, b in zip(inp.sigmas, fig_neu, fig_wm):
            out[f"bound_terms/fig1_trajectory_neu/sigma={s:g}"] = a
            out[f"bound_terms/fig1_trajectory_wang_mao/sigma={s:g}"] = b

    _layerwise(inp, out)
    return out


def _put_selection(out: dict[str, float], name: str, value: float, se: float, sigma: float, selection: Any) -> None:
    out[f"bound/{name}"] = value
    out[f"bound/{name}_se"] = se
    out[f"bound_terms/sigma_{name}"] = sigma
    if selection is not None:
        out[f"bound_terms/{name}_sigma_at_edge"] = float(selection.at_edge)
        out[f"bound_terms/{name}_sigma_ignored"] = float(selection.n_ignored)


def _layerwise(inp: BoundInputs, out: dict[str, float]) -> None:
    if inp.vhat_blocks is None or inp.d_blocks is None or len(inp.d_blocks) < 2:
        return
    eta, r, n, T = inp.eta, inp.r, inp.n, inp.T
    # the per-block dispersion's filling error (docs/math.md §6.7): steps between measurements
    filled = None
    if inp.vhat_steps is not None and inp.vhat_measured_blocks is not None:
        filled = (inp.vhat_steps, inp.vhat_measured_blocks, inp.fill_scale)
    if "wang_mao_eq3_layerwise" in inp.wanted:
        ab = eq3_shape_inputs(inp)
        rec = inp.curvature
        if ab is not None and rec is not None:
            sums = np.sum(eta[:, None] ** 2 * np.maximum(inp.vhat_blocks, 0.0), axis=0)
            samples = np.asarray(rec["group_samples"]) if rec.get("group_samples") else None
            res = wang_mao_eq3_layerwise(r, T, rec["group_traces"], sums, n, trace_h_samples=samples,
                                         sum_se_blocks=None if filled is None else dispersion_sums_fill_se(eta, *filled))
            out["bound/wang_mao_eq3_layerwise"] = res.value if res.method == "layerwise" else math.nan
            out["bound/wang_mao_eq3_layerwise_se"] = res.standard_error if res.method == "layerwise" else math.nan
            if res.method != "layerwise" and res.reason and math.isfinite(r):  # (a NaN R: said for every bound)
                # (the pure formula's fallback value is not logged here: bound/wang_mao_eq3 is that form)
                if res.method == "isotropic_fallback":
                    why = res.reason.removesuffix("; isotropic Eq. 3 reported")
                    inp.notes.append(f"layerwise: {why}; bound/wang_mao_eq3_layerwise is left NaN (bound/wang_mao_eq3 "
                                     "is the equal-σ form)")
                else:
                    inp.notes.append("layerwise: " + res.reason)
    if "wang_mao_eq2_layerwise" in inp.wanted and inp.flat is not None:
        shape_rec = inp.flat_shaped
        family = candidate_family(inp.sigmas, inp.d_blocks,
                                  shape_rec["shape"] if shape_rec is not None else None)
        terms = list(inp.flat["term"]) + (list(shape_rec["term"]) if shape_rec is not None else [])
        ses = list(inp.flat["term_se"]) + (list(shape_rec["term_se"]) if shape_rec is not None else [])
        res2 = wang_mao_eq2_layerwise(eta, inp.vhat_blocks, r, n, inp.d_blocks, family.candidates, terms, ses,
                                      inp.z, family.groups, filled)
        out["bound/wang_mao_eq2_layerwise"] = res2.value
        out["bound/wang_mao_eq2_layerwise_se"] = res2.se
        out["bound_terms/wang_mao_eq2_layerwise_shaped"] = float(res2.best >= len(inp.sigmas))
    if "neu_layerwise" in inp.wanted and inp.flat is not None and inp.gamma is not None and inp.v_blocks is not None:
        iso_gamma = inp.gamma / np.square(np.asarray(inp.sigmas))[None, :]
        iso_se = None if inp.gamma_sum_se is None else np.asarray(inp.gamma_sum_se) / np.square(inp.sigmas)
        cand_shape = inp.neu_shape if (inp.gamma_shaped is not None and inp.flat_neu_shaped is not None) else None
        family = candidate_family(inp.sigmas, inp.d_blocks, cand_shape)
        gam = iso_gamma if cand_shape is None else np.hstack([iso_gamma, inp.gamma_shaped])
        terms = list(inp.flat["term"]) + ([] if cand_shape is None else list(inp.flat_neu_shaped["term"]))
        ses = list(inp.flat["term_se"]) + ([] if cand_shape is None else list(inp.flat_neu_shaped["term_se"]))
        gse = None
        if iso_se is not None:
            gse = list(iso_se) + ([] if cand_shape is None else list(
                inp.gamma_shaped_sum_se if inp.gamma_shaped_sum_se is not None else [math.nan] * len(inp.sigmas)))
        res3 = neu_theorem7_blockdiag(eta, gam, inp.v_blocks, r, n, family.candidates, terms, ses, gse, inp.z,
                                      family.groups, inp.v_steps if inp.v_measured_blocks is not None else None,
                                      inp.v_measured_blocks)
        out["bound/neu_layerwise"] = res3.value
        out["bound/neu_layerwise_se"] = res3.se


BOUNDS_ABS_GAP = ("neu_abs", "wang_mao_eq2", "wang_mao_eq2_error", "wang_mao_eq2_layerwise")
"""Bounds of ``|gap|`` (Eq. 2's flatness term is an absolute value; ``neu_abs``)."""

HEADLINE_GAP = {name: ("gap/error" if name.endswith("_error") else "gap/measured") for name in ALL_BOUNDS}


def validity(values: dict[str, float], wanted: tuple[str, ...]) -> dict[str, float]:
    """``bound_valid/<name>``: 1 when the bound is finite and not below the measured gap it bounds
    (``|gap|`` for the bounds of ``|gap|``: Eq. 2 and ``neu_abs``), 0 otherwise (a failed estimate);
    ``bound/valid``: all of them."""
    out: dict[str, float] = {}
    names = list(wanted) + (["neu_abs"] if "neu" in wanted else [])
    for name in names:
        value = values.get(f"bound/{name}", math.nan)
        gap = values.get(HEADLINE_GAP.get(name, "gap/measured"), math.nan)
        if name in BOUNDS_ABS_GAP:
            gap = abs(gap)
        ok = math.isfinite(value) and (not math.isfinite(gap) or value >= gap)
        out[f"bound_valid/{name}"] = float(ok)
    out["bound/valid"] = float(all(v == 1.0 for v in out.values())) if out else math.nan
    return out


def upper_test_error(values: dict[str, float], wanted: tuple[str, ...]) -> dict[str, float]:
    """``bound/test_error_upper``: the training 0-1 error plus the tightest finite 0-1 error bound
    (at most 1); NaN when a 0-1 error bound was wanted and none is finite (empty when none was)."""
    finite = [e for e in (values.get(f"bound/{b}", math.nan) for b in ERROR) if math.isfinite(e) and e >= 0]
    train_err = values.get("gap/train_error", math.nan)
    if finite and math.isfinite(train_err):
        return {"bound/test_error_upper": min(1.0, train_err + min(finite))}
    if any(b in wanted for b in ERROR):
        return {"bound/test_error_upper": math.nan}
    return {}
