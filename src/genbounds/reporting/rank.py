"""``genbounds rank``: how well does each logged quantity rank runs by their measured gap?

For every scalar whose final value exists in all runs (and for three baselines), against the
target's final values (default ``gap/measured``):

* **Kendall τ-b** over all runs (ties handled: ``(C − D) / sqrt((n₀ − n₁)(n₀ − n₂))``);
* **granulated τ, Ψ** (Jiang et al. 2019, "Fantastic generalization measures and where to find
  them"): for each hyper-parameter *axis* (a hyper-parameter that varies across the runs), group the
  runs that agree on every other axis, take τ within each group of ≥ 2 runs, average over groups →
  τ_axis; Ψ is the mean of τ_axis over the axes.

Baselines: ``lr/batch`` (from the ``lr`` and ``batch_size`` hyper-parameters),
``Σ η² V̂`` (``bound_terms/sum_eta2_dispersion``) and Roberts' prediction
(``gap/predicted_cumulative``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from genbounds.reporting import hparams as hp
from genbounds.reporting.events import Run
from genbounds.reporting.gate import DEFAULT_STALE_TOLERANCE

HEADLINE_BOUNDS = (
    "bound/wang_mao_eq2", "bound/wang_mao_eq3", "bound/neu", "bound/neu_abs", "bound/wang_mao_eq2_error",
    "bound/neu_error", "bound/test_error_upper", "bound/wang_mao_eq2_layerwise", "bound/wang_mao_eq3_layerwise",
    "bound/neu_layerwise",
)
SUM_ETA2_TAG = "bound_terms/sum_eta2_dispersion"
ROBERTS_TAG = "gap/predicted_cumulative"
LR_BATCH = "lr/batch"
BASELINES = {
    LR_BATCH: "baseline: learning rate / batch size (hyper-parameters)",
    SUM_ETA2_TAG: "baseline: Σ η² V̂",
    ROBERTS_TAG: "baseline: Roberts' predicted gap",
}


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's τ-b of two equally long sequences; None when undefined (fewer than 2 points, or
    one sequence constant)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"kendall_tau_b: {n} vs {len(y)} values")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0:
                ties_x += 1
            if dy == 0:
                ties_y += 1
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    if denominator == 0:
        return None
    return (concordant - discordant) / denominator


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def granulated_tau(x: Sequence[float], y: Sequence[float], settings: Sequence[dict[str, Any]],
                   axes: Sequence[str]) -> tuple[float | None, dict[str, float | None]]:
    """``(Ψ, {axis: τ_axis})``: per axis, τ within groups of runs equal on every other axis, averaged."""
    per_axis: dict[str, float | None] = {}
    for axis in axes:
        others = [a for a in axes if a != axis]
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(settings):
            groups.setdefault(tuple(repr(s.get(a)) for a in others), []).append(i)
        taus = []
        for members in groups.values():
            if len(members) < 2:
                continue
            tau = kendall_tau_b([x[i] for i in members], [y[i] for i in members])
            if tau is not None:
                taus.append(tau)
        per_axis[axis] = _mean(taus)
    defined = [t for t in per_axis.values() if t is not None]
    return _mean(defined), per_axis


@dataclass
class RankRow:
    metric: str
    tau: float | None
    psi: float | None
    tau_axis: dict[str, float | None]
    n_runs: int
    baseline: str | None = None
    note: str = ""

    @property
    def ranked(self) -> bool:
        return self.tau is not None

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "tau": self.tau, "psi": self.psi, "tau_axis": dict(self.tau_axis),
                "n_runs": self.n_runs, "baseline": self.baseline, "note": self.note}


@dataclass
class Ranking:
    target: str
    axes: list[str]
    rows: list[RankRow]
    runs: list[Run]
    notes: list[str] = field(default_factory=list)


def _lr_batch(run: Run) -> float | None:
    lr, batch = hp.lookup(run.hparams, hp.LR_KEYS), hp.lookup(run.hparams, hp.BATCH_KEYS)
    try:
        lr, batch = float(lr), float(batch)
    except (TypeError, ValueError):
        return None
    return lr / batch if batch else None


def choose_axes(runs: Sequence[Run], axes: Sequence[str] | None = None,
                include_seed: bool = False) -> list[str]:
    if axes:
        return list(axes)
    keys = hp.varying_keys([r.hparams for r in runs], aliases="partition")
    return [k for k in keys if include_seed or not hp.is_seed(k)]


def rank_runs(runs: Sequence[Run], target: str = "gap/measured", axes: Sequence[str] | None = None,
         include_seed: bool = False) -> Ranking:
    """Rank every metric of ``runs`` against ``target`` (see the module docstring)."""
    runs = list(runs)
    n = len(runs)
    notes: list[str] = []
    target_values = [r.final(target) for r in runs]
    missing_target = [r.name for r, v in zip(runs, target_values) if v is None or math.isnan(v)]
    if missing_target:
        raise ValueError(f"target {target!r} has no final value (missing or NaN) in: {', '.join(missing_target)}")
    axes = choose_axes(runs, axes, include_seed)
    settings = [r.hparams for r in runs]
    if not axes:
        notes.append("no hyper-parameter varies across the runs: Ψ is undefined")

    getters: dict[str, Callable[[Run], float | None]] = {}
    tags = {t for r in runs for t in r.scalars} | set(HEADLINE_BOUNDS) | {SUM_ETA2_TAG, ROBERTS_TAG}
    # the target's own SE, change and interval ends rank it by construction (they came out on top:
    # a new user's walk, round 31): left out, and said
    derived = sorted(tags & {f"{target}_se", f"{target}_change", f"ci/{target}_lower", f"ci/{target}_upper"})
    if derived:
        notes.append(f"left out, derived from the target: {', '.join(derived)}")
    for tag in sorted(tags - set(derived)):
        if tag != target:
            getters[tag] = lambda r, tag=tag: r.final(tag)
    getters[LR_BATCH] = _lr_batch

    rows = []
    for metric, get in getters.items():
        values = [get(r) for r in runs]
        baseline = BASELINES.get(metric)
        absent = [r.name for r, v in zip(runs, values) if v is None]
        nans = [r.name for r, v in zip(runs, values) if v is not None and math.isnan(v)]
        if len(absent) == n and metric not in HEADLINE_BOUNDS and baseline is None:
            continue
        row = RankRow(metric, None, None, {a: None for a in axes}, n - len(absent) - len(nans), baseline)
        if absent:
            what = "hyper-parameters lr and batch_size" if metric == LR_BATCH else "final value"
            row.note = f"undefined: no {what} in {len(absent)} of {n} runs" + (
                f" ({', '.join(absent[:4])}{', …' if len(absent) > 4 else ''})" if len(absent) < n else "")
        elif nans:
            row.note = (f"undefined: NaN in {len(nans)} of {n} runs "
                        f"({', '.join(nans[:4])}{', …' if len(nans) > 4 else ''})")
        elif len(set(values)) == 1:
            row.note = f"constant across the runs ({values[0]:g}): τ undefined"
        else:
            row.tau = kendall_tau_b(values, target_values)
            row.psi, row.tau_axis = granulated_tau(values, target_values, settings, axes)
            if row.tau is None:
                row.note = "τ undefined (the target is constant)"
            elif axes and row.psi is None:
                row.note = "Ψ undefined: no group of ≥ 2 runs differs along one axis only"
            stale = [r.name for r in runs if metric in r.scalars
                     and r.last_step(metric) < (r.end_step or 0) - DEFAULT_STALE_TOLERANCE]
            if stale:
                row.note = "; ".join(filter(None, [row.note, f"stale in {len(stale)} of {n} runs (last logged "
                                                   f"before the run ended: {', '.join(stale[:3])}"
                                                   f"{', …' if len(stale) > 3 else ''})"]))
        rows.append(row)

    def order(row: RankRow):
        return (row.tau is None, row.psi is None, -(row.psi if row.psi is not None else 0.0),
                -(row.tau if row.tau is not None else 0.0), row.metric)

    rows.sort(key=order)
    return Ranking(target, list(axes), rows, runs, notes)


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def table_rows(ranking: Ranking) -> tuple[list[str], list[list[str]]]:
    header = ["metric", "τ", "Ψ", *(f"τ[{a}]" for a in ranking.axes), "n runs", "note"]
    body = []
    for r in ranking.rows:
        name = r.metric + (" (baseline)" if r.baseline else "")
        body.append([name, _f(r.tau), _f(r.psi), *(_f(r.tau_axis.get(a)) for a in ranking.axes), str(r.n_runs),
                     r.note or (r.baseline or "")])
    return header, body


def markdown(ranking: Ranking) -> str:
    header, body = table_rows(ranking)
    lines = [f"# genbounds rank — target `{ranking.target}`", "",
             f"{len(ranking.runs)} runs; axes: {', '.join(f'`{a}`' for a in ranking.axes) or 'none'}. "
             "τ: Kendall τ-b over all runs; Ψ: granulated τ (Jiang et al. 2019), the mean over axes of the "
             "mean τ within groups of runs that differ along that axis only.", ""]
    lines += [f"- {note}" for note in ranking.notes]
    lines += ["", "Runs:", ""] + [f"- `{r.label or r.name}`: `{r.path}`" for r in ranking.runs] + [""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 2) + "---|")
    for row in body:
        lines.append("| " + " | ".join([f"`{row[0]}`", *row[1:]]) + " |")
    return "\n".join(lines) + "\n"


def text_table(ranking: Ranking) -> str:
    header, body = table_rows(ranking)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    widths[-1] = 0
    fmt_row = lambda row: "  ".join(str(c).ljust(w) if i in (0, len(row) - 1) else str(c).rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt_row(header), *(fmt_row(r) for r in body)])


def plot(ranking: Ranking, path: str, max_rows: int = 60) -> str | None:
    """Horizontal bars of τ and Ψ per ranked metric (baselines highlighted); None when nothing is ranked."""
    from genbounds.reporting.plots import pyplot, save

    rows = [r for r in ranking.rows if r.ranked]
    if not rows:
        return None
    dropped = 0
    if len(rows) > max_rows:
        keep = rows[:max_rows] + [r for r in rows[max_rows:] if r.baseline]
        dropped = len(rows) - len(keep)
        rows = keep
    plt = pyplot()
    height = max(3.0, 0.32 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(9, height), layout="constrained")
    ys = list(range(len(rows)))[::-1]
    taus = [r.tau for r in rows]
    base = [bool(r.baseline) for r in rows]
    ax.barh([y + 0.2 for y in ys], taus, height=0.38, color=["tab:orange" if b else "tab:blue" for b in base])
    with_psi = [(y, r.psi, b) for y, r, b in zip(ys, rows, base) if r.psi is not None]
    if with_psi:
        ax.barh([y - 0.2 for y, _, _ in with_psi], [p for _, p, _ in with_psi], height=0.38,
                color=["tab:red" if b else "tab:cyan" for _, _, b in with_psi])
    ax.set_yticks(ys)
    ax.set_yticklabels([r.metric + (" ★" if r.baseline else "") for r in rows], fontsize=8)
    for tick, b in zip(ax.get_yticklabels(), base):
        if b:
            tick.set_fontweight("bold")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel(f"rank correlation with final {ranking.target} (Kendall τ-b / Ψ, dimensionless, −1…1)")
    ax.set_ylabel("metric (final value)")
    title = "Ranking runs by their measured gap" + (f" (top {max_rows}; {dropped} more in rank.md)" if dropped else "")
    ax.set_title(title)
    from matplotlib.patches import Patch

    handles = [Patch(color="tab:blue", label="τ"), Patch(color="tab:cyan", label="Ψ (granulated τ)"),
               Patch(color="tab:orange", label="τ — baseline ★"),
               Patch(color="tab:red", label="Ψ — baseline ★")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    save(fig, path)
    return path


def as_json(ranking: Ranking) -> dict[str, Any]:
    return {
        "target": ranking.target, "axes": ranking.axes, "notes": ranking.notes,
        "runs": [{"run": r.name, "label": r.label, "path": r.path, "hparams": r.hparams,
                  "complete": r.complete} for r in ranking.runs],
        "metrics": [r.as_dict() for r in ranking.rows],
    }
