"""``genbounds report`` and ``genbounds compare``: plots and Markdown tables from event files."""

from __future__ import annotations

import os
from collections.abc import Sequence

from genbounds.reporting.events import Run, fmt

BOUND_TAGS = ("bound/wang_mao_eq2", "bound/wang_mao_eq3", "bound/neu", "bound/neu_abs")
SUMMARY_TAGS = (
    ("train_loss_epoch", None), ("val_loss", None), ("val_acc", None), ("gap/measured", None),
    ("bound/wang_mao_eq2", "bound/wang_mao_eq2_se"), ("bound/wang_mao_eq3", "bound/wang_mao_eq3_se"),
    ("bound/neu", "bound/neu_se"), ("bound/neu_abs", None),
    ("bound/trajectory_wang_mao", None), ("bound/flatness_wang_mao", None), ("bound/sigma_wang_mao", None),
    ("bound/trajectory_factor_wang_mao_eq3", None), ("bound/flatness_factor_wang_mao_eq3", None),
    ("bound/trajectory_neu", None), ("bound/sigma_neu", None),
    ("bound/R", None), ("bound/n", None), ("bound/d", None), ("bound/T", None),
    ("gap/measured_change", None), ("gap/predicted_cumulative", None), ("curv/hessian_trace", "curv/hessian_trace_se"),
    ("curv/hessian_top_eig", None), ("curv/contractivity_mean", "curv/contractivity_mean_se"),
    ("grad/dispersion", None),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(ax, run: Run, tag: str, label: str | None = None, **kwargs) -> bool:
    steps, values = run.series(tag)
    if not steps:
        return False
    ax.plot(steps, values, label=label or tag, **kwargs)
    return True


def plot_run(run: Run, out_dir: str) -> list[str]:
    """Write the report's PNGs; returns their paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for tag in ("train_loss_step", "train_loss_epoch", "val_loss"):
        _plot(ax, run, tag, alpha=0.5 if tag == "train_loss_step" else 1.0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    any_bound = False
    for tag in BOUND_TAGS:
        any_bound |= _plot(ax, run, tag, marker=".")
    _plot(ax, run, "gap/measured", label="gap/measured (held-out − train loss)", color="black", linewidth=2)
    _plot(ax, run, "gap/measured_change", label="gap/measured_change (gap(t) − gap(0))", color="black",
          linestyle=":")
    _plot(ax, run, "gap/predicted_cumulative", label="gap/predicted_cumulative (Σ η s²/n, predicts the change)",
          color="gray", linestyle="--")
    if any_bound:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("optimizer step")
    ax.set_title("Generalization bounds vs measured gap")
    ax.legend(fontsize=8)
    save(fig, "bounds_vs_gap.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for tag in ("bound/trajectory_wang_mao", "bound/flatness_wang_mao", "bound/trajectory_neu", "bound/flatness_neu"):
        _plot(axes[0], run, tag, marker=".")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[0].set_title("Additive terms at the grid minimum")
    axes[0].legend(fontsize=8)
    for tag in ("bound/trajectory_factor_wang_mao_eq3", "bound/flatness_factor_wang_mao_eq3"):
        _plot(axes[1], run, tag, marker=".")
    axes[1].set_yscale("log")
    axes[1].set_title("Eq. 3 multiplicative factors")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("optimizer step")
    save(fig, "trajectory_vs_flatness.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    _plot(ax, run, "grad/dispersion", label="grad/dispersion (Tr Σ_B)", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title("Gradient dispersion")
    ax2 = ax.twinx()
    _plot(ax2, run, "val_acc", color="tab:green", label="val_acc")
    _plot(ax2, run, "train_acc", color="tab:olive", label="train_acc")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    save(fig, "dispersion.png")
    return written


def summary_table(runs: Sequence[Run], labels: Sequence[str] | None = None) -> str:
    """Markdown table of final values (± SE where logged), one column per run."""
    labels = list(labels) if labels is not None else [r.name for r in runs]
    header = "| metric | " + " | ".join(labels) + " |"
    rows = [header, "|---|" + "---:|" * len(runs)]
    for tag, se_tag in SUMMARY_TAGS:
        values = [r.final(tag) for r in runs]
        if all(v is None for v in values):
            continue
        cells = []
        for r, v in zip(runs, values):
            se = r.final(se_tag) if se_tag else None
            cells.append(fmt(v) + (f" ± {fmt(se)}" if se is not None and v is not None else ""))
        rows.append(f"| `{tag}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(run: Run, out_dir: str) -> tuple[list[str], str]:
    """PNGs plus ``summary.md`` in ``out_dir``; returns (paths, markdown)."""
    pngs = plot_run(run, out_dir)
    md = f"# genbounds report\n\nRun: `{run.path}`\n\nFinal values (± standard error where the estimate has one):\n\n"
    md += summary_table([run], ["final"]) + "\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs) + "\n"
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as fh:
        fh.write(md)
    return [*pngs, path], md


def compare(runs: Sequence[Run], out_path: str | None) -> str:
    """Side-by-side table; an overlay plot of the bounds and measured gaps when ``out_path``."""
    labels = [f"run {i + 1}" for i in range(len(runs))]
    legend = "\n".join(f"- run {i + 1}: `{r.path}`" for i, r in enumerate(runs))
    text = legend + "\n\n" + summary_table(runs, labels)
    if out_path:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, r in enumerate(runs):
            c = colors[i % len(colors)]
            for tag, style in (("bound/wang_mao_eq3", "-"), ("bound/wang_mao_eq2", ":")):
                _plot(ax, r, tag, label=f"run {i + 1} {tag}", color=c, linestyle=style)
            _plot(ax, r, "gap/measured", label=f"run {i + 1} gap/measured", color=c, linestyle="--", linewidth=2)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("optimizer step")
        ax.set_title("Bounds (solid: Eq. 3, dotted: Eq. 2) and measured gap (dashed)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        fig.savefig(out_path, dpi=110)
        plt.close(fig)
        text += f"\n\nOverlay plot: `{out_path}`"
    return text
