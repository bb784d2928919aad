"""Figures of ``genbounds report`` and ``genbounds compare`` (matplotlib, Agg backend).

Rules every figure follows: labelled axes with units; legends outside the data area (right of the
axes); ± SE bands wherever a ``<tag>_se`` series exists; panels whose series are all absent are
dropped, and a figure with no panel left is not written (no blank plots); log scales only on
positive data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from genbounds.reporting.events import Run

STEP = "optimizer step"
NATS = "bound / gap (nats)"
LOSS = "loss (nats)"
ERROR = "error rate"

#: Headline bounds in nats, and what they bound.
NAT_BOUNDS = ("bound/wang_mao_eq2", "bound/wang_mao_eq3", "bound/neu", "bound/neu_abs",
              "bound/wang_mao_eq2_layerwise", "bound/wang_mao_eq3_layerwise", "bound/neu_layerwise")
ERROR_BOUNDS = ("bound/wang_mao_eq2_error", "bound/neu_error")
#: bound tag → the measured quantity it bounds (for the tightness ratio).
TIGHTNESS = {**{b: "gap/measured" for b in NAT_BOUNDS}, **{b: "gap/error" for b in ERROR_BOUNDS},
             "bound/test_error_upper": "gap/heldout_error"}

#: New tag names first, the older names the training side logged before as fallbacks.
ADDITIVE_TERMS = (
    ("bound_terms/trajectory_wang_mao", "bound/trajectory_wang_mao"),
    ("bound_terms/flatness_wang_mao", "bound/flatness_wang_mao"),
    ("bound_terms/trajectory_neu", "bound/trajectory_neu"),
    ("bound_terms/flatness_neu", "bound/flatness_neu"),
)
FACTORS = (
    ("bound_terms/trajectory_factor_wang_mao_eq3", "bound/trajectory_factor_wang_mao_eq3"),
    ("bound_terms/flatness_factor_wang_mao_eq3", "bound/flatness_factor_wang_mao_eq3"),
)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> str:
    plt = pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def se_tag(tag: str) -> str:
    """``bound/neu`` → ``bound/neu_se``; ``curv/hessian_trace/layer/fc1`` → ``curv/hessian_trace_se/layer/fc1``."""
    if "/layer/" in tag:
        head, tail = tag.split("/layer/", 1)
        return f"{head}_se/layer/{tail}"
    return f"{tag}_se"


def first_tag(run: Run, candidates: Sequence[str]) -> str | None:
    return next((t for t in candidates if has_data(run, t)), None)


def has_data(run: Run, tag: str) -> bool:
    return any(math.isfinite(v) for _, v in run.scalars.get(tag, []))


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def outside_legend(ax, handles=None, labels=None) -> None:
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncol = 1 if len(handles) <= 14 else 2
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              fontsize=7 if len(handles) > 8 else 8, ncol=ncol, frameon=False)


@dataclass
class Curve:
    tag: str
    label: str | None = None
    style: dict = field(default_factory=dict)
    band: bool = True


def draw_curve(ax, run: Run, curve: Curve, prefix: str = "") -> list[float]:
    """Plot one series (± SE band when ``<tag>_se`` exists); returns its finite values ([] = nothing drawn)."""
    steps, values = run.series(curve.tag)
    finite = _finite(values)
    if not finite:
        return []
    label = prefix + (curve.label or curve.tag)
    alone = set(_lone_points(values))
    style = dict(curve.style)
    if alone and "marker" not in style:  # (a point without a finite neighbour draws no line: a bound
        style["marker"] = "o"  # evaluated once under a budget was invisible, a new user's walk, round 33)
        style.setdefault("markersize", 4)
    (line,) = ax.plot(steps, values, label=label, **style)
    if curve.band and has_data(run, se_tag(curve.tag)):
        se_by_step = dict(zip(*run.series(se_tag(curve.tag))))
        pts = [(i, s, v, se_by_step[s]) for i, (s, v) in enumerate(zip(steps, values))
               if s in se_by_step and math.isfinite(v) and math.isfinite(se_by_step[s])]
        if pts:
            xs = [p[1] for p in pts]
            ax.fill_between(xs, [p[2] - p[3] for p in pts], [p[2] + p[3] for p in pts], color=line.get_color(),
                            alpha=0.2, linewidth=0, label=f"{label} ± SE")
            lone = [p for p in pts if p[0] in alone]  # (a band of one point has no width: an error bar)
            if lone:
                ax.errorbar([p[1] for p in lone], [p[2] for p in lone], yerr=[p[3] for p in lone], fmt="none",
                            ecolor=line.get_color(), capsize=3, linewidth=1)
            finite += [p[2] - p[3] for p in pts] + [p[2] + p[3] for p in pts]
    return finite


def _lone_points(values: Sequence[float]) -> list[int]:
    """Indices of the finite values whose neighbours are not finite (or absent): a line skips them."""
    ok = [math.isfinite(v) for v in values]
    return [i for i, good in enumerate(ok)
            if good and not (i > 0 and ok[i - 1]) and not (i + 1 < len(ok) and ok[i + 1])]


def set_scale(ax, values: Sequence[float], scale: str) -> None:
    """``log`` only on positive data (else ``symlog``), ``symlog`` with a threshold from the data."""
    if scale == "linear" or not values:
        return
    if scale == "log" and all(v > 0 for v in values):
        ax.set_yscale("log")
        return
    nonzero = [abs(v) for v in values if v != 0]
    if nonzero:
        ax.set_yscale("symlog", linthresh=max(min(nonzero), 1e-12))


@dataclass
class Panel:
    title: str
    ylabel: str
    curves: list[Curve]
    scale: str = "linear"
    twin: Panel | None = None


def draw_panels(run: Run, panels: Sequence[Panel], path: str, title: str | None = None) -> str | None:
    """One stacked figure of the panels that have data; None (nothing written) when none has."""
    def has_any(p: Panel) -> bool:
        return any(has_data(run, c.tag) for c in p.curves)

    live = [p for p in panels if has_any(p)]
    if not live:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(live), 1, figsize=(8, 3.3 * len(live)), squeeze=False)
    for ax, panel in zip(axes[:, 0], live):
        values: list[float] = []
        for curve in panel.curves:
            values += draw_curve(ax, run, curve)
        set_scale(ax, values, panel.scale)
        ax.set_xlabel(STEP)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        if panel.twin is not None and has_any(panel.twin):
            ax2 = ax.twinx()
            twin_values: list[float] = []
            for curve in panel.twin.curves:
                twin_values += draw_curve(ax2, run, curve)
            set_scale(ax2, twin_values, panel.twin.scale)
            ax2.set_ylabel(panel.twin.ylabel)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
            outside = (1.12, 1.0)
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=outside, borderaxespad=0.0, fontsize=8,
                      frameon=False)
        else:
            outside_legend(ax, handles, labels)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(hspace=0.55)
    return save(fig, path)


def _tagged(run: Run, pairs: Sequence[Sequence[str]], **style) -> list[Curve]:
    out = []
    for candidates in pairs:
        tag = first_tag(run, candidates)
        if tag:
            out.append(Curve(tag, style=dict(style)))
    return out


def tightness_figure(run: Run, path: str) -> str | None:
    """Each headline bound divided by the quantity it bounds, per step (log y)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    values: list[float] = []
    for bound, measured in TIGHTNESS.items():
        b_steps, b_vals = run.series(bound)
        by_step = dict(zip(*run.series(measured)))
        pts = [(s, b / by_step[s]) for s, b in zip(b_steps, b_vals)
               if s in by_step and math.isfinite(b) and math.isfinite(by_step[s]) and by_step[s] > 0 and b > 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{bound} ÷ {measured}")
            values += [p[1] for p in pts]
    if not values:
        plt.close(fig)
        return None
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="ratio 1 (a tight bound)")
    ax.set_yscale("log")
    ax.set_xlabel(STEP)
    ax.set_ylabel("bound ÷ measured gap (ratio, log scale)")
    ax.set_title("Tightness: how many times the measured gap each bound is\n"
                 "(steps where the measured quantity is ≤ 0 are left out)", fontsize=10)
    outside_legend(ax)
    return save(fig, path)


def layer_names(run: Run) -> list[str]:
    names = set()
    for prefix in ("grad/dispersion/layer/", "curv/hessian_trace/layer/"):
        names |= {t[len(prefix):] for t in run.tags(prefix)}
    return sorted(names)


def per_layer_figure(run: Run, path: str) -> str | None:
    """Bars of the final per-layer gradient dispersion and Hessian trace (± SE)."""
    layers = layer_names(run)
    specs = [("grad/dispersion/layer/", "gradient dispersion\n((nats/param)²)", "Gradient dispersion per layer"),
             ("curv/hessian_trace/layer/", "Hessian trace\n(nats/param²)", "Hessian trace per layer (± SE)")]
    live = []
    for prefix, ylabel, title in specs:
        vals = [run.final(prefix + name) for name in layers]
        if any(v is not None and math.isfinite(v) for v in vals):
            live.append((prefix, ylabel, title, vals))
    if not live:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(live), 1, figsize=(max(6.0, 0.6 * len(layers) + 3), 3.3 * len(live)),
                             squeeze=False)
    for ax, (prefix, ylabel, title, vals) in zip(axes[:, 0], live):
        xs = list(range(len(layers)))
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        errs = [run.final(se_tag(prefix + name)) for name in layers]
        yerr = [e if e is not None and math.isfinite(e) else 0.0 for e in errs]
        ax.bar(xs, heights, yerr=yerr if any(yerr) else None, capsize=3, color="tab:blue",
               label="final value" + (" ± SE" if any(yerr) else ""))
        missing = [layers[i] for i, v in enumerate(vals) if v is None or not math.isfinite(v)]
        ax.set_xticks(xs)
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title + (f" (no value: {', '.join(missing)})" if missing else ""), fontsize=10)
        outside_legend(ax)
    fig.subplots_adjust(hspace=0.75)
    return save(fig, path)


def report_figures(run: Run, out_dir: str) -> list[str]:
    """Every report figure that has data; returns the paths written."""
    specs = {
        "loss.png": [Panel("Loss", LOSS, [
            Curve("train_loss_step", style={"alpha": 0.5, "linewidth": 0.8}), Curve("train_loss_epoch"),
            Curve("val_loss"), Curve("gap/train_loss", style={"linestyle": "--"}),
            Curve("gap/heldout_loss", style={"linestyle": "--"})])],
        "bounds_vs_gap.png": [Panel("Generalization bounds vs measured gap", NATS, [
            *(Curve(b, style={"marker": "."}) for b in NAT_BOUNDS),
            Curve("gap/measured", "gap/measured (held-out − train loss)", {"color": "black", "linewidth": 2}),
            Curve("gap/measured_change", "gap/measured_change (gap(t) − gap(0))",
                  {"color": "black", "linestyle": ":"}),
            Curve("gap/predicted_cumulative", "gap/predicted_cumulative (Roberts: predicts the change)",
                  {"color": "gray", "linestyle": "--"})], scale="symlog")],
        "error_bounds.png": [Panel("Error-rate bounds vs measured error gap", ERROR, [
            *(Curve(b, style={"marker": "."}) for b in (*ERROR_BOUNDS, "bound/test_error_upper")),
            Curve("gap/error", style={"color": "black", "linewidth": 2}),
            Curve("gap/train_error", style={"linestyle": "--"}),
            Curve("gap/heldout_error", style={"linestyle": "--"})])],
        "trajectory_vs_flatness.png": [
            Panel("Additive terms at the grid minimum", "term (nats)", _tagged(run, ADDITIVE_TERMS, marker="."),
                  scale="symlog"),
            Panel("Eq. 3 multiplicative factors", "factor (dimensionless)", _tagged(run, FACTORS, marker="."),
                  scale="log")],
        "dispersion.png": [Panel("Gradient dispersion", "squared gradient norm\n((nats/param)²)", [
            Curve("grad/dispersion", "grad/dispersion (Tr Σ_B)", {"linewidth": 0.8}),
            Curve("grad/trace_cov", style={"linewidth": 0.8}), Curve("grad/norm_sq", style={"linewidth": 0.8})],
            scale="log", twin=Panel("", "accuracy (fraction correct)", [
                Curve("val_acc", style={"color": "tab:green"}), Curve("train_acc", style={"color": "tab:olive"})]))],
        "curvature.png": [Panel("Hessian trace", "Hessian trace (nats/param²)", [Curve("curv/hessian_trace")],
                                scale="log")],
    }
    written = []
    for name, panels in specs.items():
        path = draw_panels(run, panels, os.path.join(out_dir, name))
        if path:
            written.append(path)
    for name, make in (("tightness.png", tightness_figure), ("per_layer.png", per_layer_figure)):
        path = make(run, os.path.join(out_dir, name))
        if path:
            written.append(path)
    return written


# --- compare ---------------------------------------------------------------------------------------
def overlay_figure(runs: Sequence[Run], path: str) -> str | None:
    """Eq. 3 (solid) and Eq. 2 (dotted) bounds and the measured gap (dashed) of every run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    values: list[float] = []
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        for tag, style in (("bound/wang_mao_eq3", "-"), ("bound/wang_mao_eq2", ":"), ("gap/measured", "--")):
            values += draw_curve(ax, run, Curve(tag, style={"color": c, "linestyle": style}), f"{run.label}: ")
    if not values:
        plt.close(fig)
        return None
    set_scale(ax, values, "symlog")
    ax.set_xlabel(STEP)
    ax.set_ylabel(NATS)
    ax.set_title("Bounds (solid: Eq. 3, dotted: Eq. 2) and measured gap (dashed), ± SE", fontsize=10)
    outside_legend(ax)
    return save(fig, path)


def grouped_bars(runs: Sequence[Run], groups: Sequence[str], value, path: str, ylabel: str, title: str) -> str | None:
    """Grouped bar chart (log y): one group per entry of ``groups``, one bar per run.

    ``value(run, group)`` → ``(value, se)``; non-positive or non-finite values get no bar (log axis).
    """
    table = {(i, g): value(r, g) for i, r in enumerate(runs) for g in groups}
    live = [g for g in groups if any(v is not None and math.isfinite(v) and v > 0
                                     for v, _ in (table[(i, g)] for i in range(len(runs))))]
    if not live:
        return None
    plt = pyplot()
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(live) * max(1, len(runs) / 3) + 2), 4.5))
    skipped = []
    for i, run in enumerate(runs):
        xs, hs, lo, hi = [], [], [], []
        for j, g in enumerate(live):
            v, se = table[(i, g)]
            if v is None or not math.isfinite(v) or v <= 0:
                skipped.append(f"{run.name}: {g}")
                continue
            se = se if se is not None and math.isfinite(se) and se > 0 else 0.0
            xs.append(j - 0.4 + width * (i + 0.5))
            hs.append(v)
            lo.append(min(se, v * 0.999))  # a log axis has no room below 0
            hi.append(se)
        if xs:
            ax.bar(xs, hs, width=width * 0.95, yerr=[lo, hi] if any(hi) else None, capsize=2, label=run.label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(live)))
    ax.set_xticklabels(live, rotation=25, ha="right", fontsize=8)
    ax.set_xlabel("final value of")
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("\n(no bar: NaN or ≤ 0 — " + "; ".join(skipped[:4]) + (" …" if len(skipped) > 4 else "")
                          + ")" if skipped else ""), fontsize=10)
    outside_legend(ax)
    return save(fig, path)


def compare_figures(runs: Sequence[Run], out_dir: str, overlay_path: str | None = None) -> list[str]:
    written = []
    path = overlay_figure(runs, overlay_path or os.path.join(out_dir, "bounds_overlay.png"))
    if path:
        written.append(path)

    def final_with_se(run: Run, tag: str):
        return run.final(tag), run.final(se_tag(tag))

    path = grouped_bars(runs, [*NAT_BOUNDS, "gap/measured"], final_with_se, os.path.join(out_dir, "final_bounds.png"),
                        f"{NATS}, log scale", "Final headline bounds and measured gap per run (error bars: ± SE)")
    if path:
        written.append(path)

    def ratio(run: Run, tag: str):
        b, m = run.final(tag), run.final(TIGHTNESS[tag])
        if b is None or m is None or not m > 0:
            return None, None
        return b / m, None

    path = grouped_bars(runs, list(TIGHTNESS), ratio, os.path.join(out_dir, "tightness.png"),
                        "bound ÷ measured gap (ratio, log scale)", "Tightness of the final bounds per run")
    if path:
        written.append(path)
    return written
