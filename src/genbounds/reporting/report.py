"""``genbounds report`` and ``genbounds compare``: Markdown tables and figures from runs on disk."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from genbounds.reporting.events import Run, fmt
from genbounds.reporting.plots import compare_figures, report_figures, se_tag

BOUND_TAGS = ("bound/wang_mao_eq2", "bound/wang_mao_eq3", "bound/neu", "bound/neu_abs")
#: Rows of the summary tables, in order; ``_se`` columns are looked up with :func:`se_tag`.
SUMMARY_TAGS = (
    "run/complete", "train_loss_epoch", "val_loss", "val_acc", "train_acc",
    "gap/measured", "gap/error", "gap/train_loss", "gap/heldout_loss", "gap/train_error", "gap/heldout_error",
    "gap/measured_change", "gap/predicted_cumulative",
    "bound/wang_mao_eq2", "bound/wang_mao_eq3", "bound/neu", "bound/neu_abs", "bound/wang_mao_eq2_layerwise",
    "bound/wang_mao_eq3_layerwise", "bound/neu_layerwise", "bound/wang_mao_eq2_error", "bound/neu_error",
    "bound/test_error_upper", "bound/valid",
    "bound_terms/trajectory_wang_mao", "bound_terms/flatness_wang_mao", "bound_terms/sigma_wang_mao",
    "bound_terms/sum_eta2_dispersion", "bound_terms/trajectory_neu", "bound_terms/flatness_neu",
    "bound_terms/trajectory_factor_wang_mao_eq3", "bound_terms/flatness_factor_wang_mao_eq3",
    # older names of the terms and constants
    "bound/trajectory_wang_mao", "bound/flatness_wang_mao", "bound/sigma_wang_mao",
    "bound/trajectory_factor_wang_mao_eq3", "bound/flatness_factor_wang_mao_eq3", "bound/trajectory_neu",
    "bound/sigma_neu", "bound/R", "bound/n", "bound/d", "bound/T",
    "setting/R", "setting/n", "setting/d", "setting/T",
    "curv/hessian_trace", "curv/hessian_top_eig", "curv/contractivity_mean",
    "grad/dispersion", "grad/trace_cov", "grad/norm_sq", "gate/violations", "gate/checks", "perf/overhead",
)


def summary_tags(runs: Sequence[Run], extra: Sequence[str] = ()) -> list[str]:
    tags = [t for t in (*SUMMARY_TAGS, *extra) if any(r.final(t) is not None for r in runs)]
    return list(dict.fromkeys(tags))


def cell(run: Run, tag: str) -> tuple[float | None, float | None]:
    value = run.final(tag)
    se = run.final(se_tag(tag)) if value is not None else None
    return value, se


def summary_table(runs: Sequence[Run], labels: Sequence[str] | None = None, extra: Sequence[str] = ()) -> str:
    """Markdown table of final values (± SE where logged), one column per run."""
    labels = list(labels) if labels is not None else [r.label or r.name for r in runs]
    header = "| metric | " + " | ".join(labels) + " |"
    rows = [header, "|---|" + "---:|" * len(runs)]
    for tag in summary_tags(runs, extra):
        cells = []
        for r in runs:
            value, se = cell(r, tag)
            cells.append(fmt(value) + (f" ± {fmt(se)}" if se is not None else ""))
        rows.append(f"| `{tag}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def status_line(run: Run) -> str:
    if run.complete:
        return f"complete (`run/complete` = 1 at step {run.end_step})"
    return (f"**INCOMPLETE** — `run/complete` was never logged (training ended before `Trainer.fit` finished); "
            f"last logged step {run.end_step}; reported because of --allow-incomplete")


def settings(hparams: dict) -> dict:
    """The run's settings as ``report`` lists them: without Lightning's own keys (``_instantiator``),
    and without a bare key (``label_noise``, saved by the data module) that a namespaced one of
    genbounds' HParams (``data/label_noise``) repeats with the same value (``True`` and ``1`` alike).
    genbounds' own un-namespaced settings (``seed``: the global seed) always stay."""
    from genbounds.callbacks.run_summary import TOP_LEVEL_SETTINGS

    shown = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
    namespaced: dict[str, list] = {}
    for key, value in shown.items():
        if "/" in key:
            namespaced.setdefault(key.rsplit("/", 1)[1], []).append(value)
    return {k: v for k, v in shown.items() if "/" in k or k in TOP_LEVEL_SETTINGS
            or not any(_same(v, other) for other in namespaced.get(k, ()))}


def _same(a, b) -> bool:
    def norm(v):
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return float(v.lower() == "true")
        try:
            return float(v)
        except (TypeError, ValueError):
            return str(v)
    return norm(a) == norm(b)


def report(run: Run, out_dir: str) -> tuple[list[str], str]:
    """Figures plus ``summary.md`` in ``out_dir``; returns (paths, markdown)."""
    os.makedirs(out_dir, exist_ok=True)
    pngs = report_figures(run, out_dir)
    hparams = ", ".join(f"`{k}={v}`" for k, v in sorted(settings(run.hparams).items())) or "none logged"
    md = (f"# genbounds report\n\nRun: `{run.path}` ({run.source})\n\nStatus: {status_line(run)}\n\n"
          f"Hyper-parameters: {hparams}\n\n")
    md += "".join(f"Note: {n}\n\n" for n in run.notes)
    md += "Final values (± standard error where the estimate has one):\n\n"
    md += summary_table([run], ["final"]) + "\n\n"
    md += "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs) + "\n"
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(md)
    return [*pngs, path], md


def compare(runs: Sequence[Run], out_dir: str | None, overlay_path: str | None = None,
            extra: Sequence[str] = ()) -> tuple[str, list[str]]:
    """Side-by-side Markdown table (columns labelled by run and differing settings) and, with
    ``out_dir`` (or ``overlay_path``), the comparison figures; returns (text, paths written)."""
    legend = "\n".join(f"- `{r.label or r.name}`: `{r.path}` ({r.source}"
                       + ("" if r.complete else ", INCOMPLETE") + ")" for r in runs)
    text = "Runs:\n" + legend + "\n\n" + summary_table(runs, extra=extra)
    written: list[str] = []
    if out_dir or overlay_path:
        written = compare_figures(runs, out_dir or os.path.dirname(os.path.abspath(overlay_path)), overlay_path)
        if written:
            text += "\n\nFigures:\n" + "\n".join(f"- `{p}`" for p in written)
    return text, written


def compare_records(runs: Sequence[Run], extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Long format: one ``{metric, run, label, value, se, step}`` per metric and run."""
    out = []
    for tag in summary_tags(runs, extra):
        for r in runs:
            value, se = cell(r, tag)
            out.append({"metric": tag, "run": r.name, "label": r.label, "value": value, "se": se,
                        "step": r.last_step(tag)})
    return out
