"""`genbounds report | compare | gate` on event files from real short runs and on synthetic runs.

The synthetic-run writers here (:func:`write_tb_run`, :func:`write_csv_run`, :func:`standard_scalars`)
are shared with ``test_reporting_integrity.py``, ``test_reporting_rank.py`` and
``test_cli_reporting.py``: they write TensorBoard event files with ``SummaryWriter`` and CSVLogger
tables with Lightning's ``CSVLogger``, independent of the training code.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from genbounds.cli import main
from genbounds.data import DigitsDataModule
from genbounds.models import MLP, Classifier
from genbounds.reporting import load_run
from helpers import bound_suite, trainer

END = 300


# --- synthetic runs (shared) -----------------------------------------------------------------------
def standard_scalars(scale: float = 1.0, end: int = END, every: int = 10,
                     layers: tuple[str, ...] = ("fc1", "fc2")) -> dict[str, list[tuple[int, float]]]:
    """Every tag of the training side's contract, with smooth made-up values; ``scale`` sets the gap."""
    steps = list(range(0, end + 1, every))
    s: dict[str, list[tuple[int, float]]] = {}

    def put(tag, f, at=steps):
        s[tag] = [(t, float(f(t / end))) for t in at]

    put("train_loss_step", lambda u: 2.0 * math.exp(-3 * u) + 0.05, at=list(range(0, end + 1)))
    put("train_loss_epoch", lambda u: 2.0 * math.exp(-3 * u) + 0.05)
    put("val_loss", lambda u: 2.0 * math.exp(-3 * u) + 0.05 + 0.1 * scale * (1 + u))
    put("val_acc", lambda u: 0.5 + 0.4 * u)
    put("train_acc", lambda u: 0.55 + 0.44 * u)
    put("gap/measured", lambda u: 0.1 * scale * (1 + u))
    put("gap/measured_se", lambda u: 0.01 * scale)
    put("gap/error", lambda u: 0.05 * scale * (1 + u))
    put("gap/error_se", lambda u: 0.005 * scale)
    put("gap/train_error", lambda u: 0.3 * (1 - u))
    put("gap/heldout_error", lambda u: 0.3 * (1 - u) + 0.05 * scale * (1 + u))
    put("gap/measured_change", lambda u: 0.1 * scale * u)
    put("gap/predicted_cumulative", lambda u: 0.12 * scale * u)
    for name, k in (("wang_mao_eq2", 3.0), ("wang_mao_eq3", 2.0), ("neu", 1.5), ("neu_abs", 1.6),
                    ("wang_mao_eq2_layerwise", 2.5), ("wang_mao_eq3_layerwise", 1.8), ("neu_layerwise", 1.4)):
        put(f"bound/{name}", lambda u, k=k: k * 0.1 * scale * (1 + u))
        put(f"bound/{name}_se", lambda u, k=k: 0.02 * k * scale)
        put(f"bound_valid/{name}", lambda u: 1.0)
    for name, k in (("wang_mao_eq2_error", 2.0), ("neu_error", 1.5), ("test_error_upper", 4.0)):
        put(f"bound/{name}", lambda u, k=k: k * 0.05 * scale * (1 + u))
        put(f"bound/{name}_se", lambda u: 0.004 * scale)
    put("bound/valid", lambda u: 1.0)
    put("bound_terms/trajectory_wang_mao", lambda u: 0.05 * scale * (1 + u))
    put("bound_terms/flatness_wang_mao", lambda u: 0.02 * scale * (1 + u))
    put("bound_terms/trajectory_neu", lambda u: 0.04 * scale * (1 + u))
    put("bound_terms/flatness_neu", lambda u: 0.01 * scale * (1 + u))
    put("bound_terms/trajectory_factor_wang_mao_eq3", lambda u: 1.5 + u)
    put("bound_terms/flatness_factor_wang_mao_eq3", lambda u: 1.2 + u)
    put("bound_terms/sum_eta2_dispersion", lambda u: 3.0 * scale * u)
    put("grad/dispersion", lambda u: 5.0 * scale * math.exp(-u))
    put("grad/trace_cov", lambda u: 4.0 * scale * math.exp(-u))
    put("grad/norm_sq", lambda u: 1.0 + math.exp(-2 * u))
    put("curv/hessian_trace", lambda u: 20.0 * (1 + u))
    put("curv/hessian_trace_se", lambda u: 1.0)
    for i, layer in enumerate(layers):
        put(f"grad/dispersion/layer/{layer}", lambda u, i=i: (i + 1) * scale * math.exp(-u))
        put(f"curv/hessian_trace/layer/{layer}", lambda u, i=i: 10.0 * (i + 1) * (1 + u))
        put(f"curv/hessian_trace_se/layer/{layer}", lambda u, i=i: 0.5 * (i + 1))
    for name in ("R", "n", "d", "T"):
        put(f"setting/{name}", lambda u, name=name: {"R": 2.3, "n": 1000.0, "d": 2410.0, "T": float(end)}[name])
    return s


def _end_step(scalars) -> int:
    return max(step for series in scalars.values() for step, _ in series)


def write_tb_run(path, scalars, hparams=None, complete: bool = True, hparams_in=("plugin", "yaml")) -> str:
    """A TensorBoard run at ``path``: the scalars, the hyper-parameters (HParams plugin and/or
    ``hparams.yaml``) and ``run/complete = 1`` at the last step unless ``complete=False``."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    path = str(path)
    writer = SummaryWriter(log_dir=path)
    if hparams and "plugin" in hparams_in:
        flat = {k: v for k, v in _flatten(hparams).items() if isinstance(v, (bool, int, float, str))}
        for summary in hparams_summary(flat, {}):
            writer._get_file_writer().add_summary(summary)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    if complete:
        writer.add_scalar("run/complete", 1.0, _end_step(scalars))
    writer.close()
    if hparams and "yaml" in hparams_in:
        with open(os.path.join(path, "hparams.yaml"), "w") as fh:
            yaml.safe_dump(hparams, fh)
    return path


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def write_csv_run(save_dir, name, scalars, hparams=None, complete: bool = True, version=None) -> str:
    """A Lightning ``CSVLogger`` run (``metrics.csv`` + ``hparams.yaml``); returns its log_dir.

    Tags are logged in two ``log_metrics`` calls per step (bounds/gap and the rest), so rows are
    sparse as in a real run."""
    logger = CSVLogger(str(save_dir), name=name, version=version)
    if hparams:
        logger.log_hyperparams(hparams)
    by_step: dict[int, dict[str, float]] = {}
    for tag, points in scalars.items():
        for step, value in points:
            by_step.setdefault(step, {})[tag] = value
    for step in sorted(by_step):
        row = by_step[step]
        first = {k: v for k, v in row.items() if k.startswith(("bound", "gap"))}
        rest = {k: v for k, v in row.items() if k not in first}
        for part in (first, rest):
            if part:
                logger.log_metrics(part, step=step)
    if complete:
        logger.log_metrics({"run/complete": 1.0}, step=_end_step(scalars))
    logger.save()
    logger.finalize("success")
    return logger.log_dir


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return int(info.value.code)


# --- real short runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for lr in (0.05, 0.2):
        pl.seed_everything(0, verbose=False)
        logger = TensorBoardLogger(str(root), name=f"lr{lr}", default_hp_metric=False)
        t = trainer(root, bound_suite(), logger=logger, max_epochs=2, limit_train_batches=5, limit_val_batches=2)
        t.fit(Classifier(MLP(64, 10, 32), lr=lr), DigitsDataModule(batch_size=64))
        if load_run(logger.log_dir).final("run/complete") is None:  # until the training side logs it
            logger.log_metrics({"run/complete": 1.0}, step=t.global_step)
            logger.finalize("success")
        paths.append(logger.log_dir)
    return paths


def test_gate_exit_codes(two_runs, capsys, tmp_path):
    run = two_runs[0]
    final = load_run(run).final("bound/wang_mao_eq3")
    assert final is not None and final > 0
    assert run_cli("gate", run, "--max", f"bound/wang_mao_eq3={final * 2}", "--min", "gap/measured=-1e9") == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "all thresholds hold" in out
    assert run_cli("gate", run, "--max", f"bound/wang_mao_eq3={final / 2}", "--max", "gap/measured=1e9") == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 violation(s)" in out and "bound/wang_mao_eq3" in out and "> max" in out
    assert run_cli("gate", str(tmp_path / "nothing-here"), "--max", "bound/neu=1") == 2
    assert run_cli("gate", run, "--max", "bound/not_a_metric=1") == 1  # missing → violation (spec)
    assert "missing" in capsys.readouterr().out
    # a parent folder: every run is gated (here both pass)
    parent = os.path.dirname(os.path.dirname(run))
    assert run_cli("gate", parent, "--max", "bound/wang_mao_eq3=inf") == 0
    assert capsys.readouterr().out.count("PASS") == 2
    assert run_cli("gate", run, "--max", "bound/neu") == 2  # malformed threshold
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "events.out.tfevents.123.host").write_bytes(b"\x00garbage")
    assert run_cli("gate", str(corrupt), "--max", "bound/neu=1") == 2


def test_gate_as_a_subprocess(two_runs):
    proc = subprocess.run([sys.executable, "-m", "genbounds", "gate", two_runs[0], "--max", "bound/wang_mao_eq3=0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "bound/wang_mao_eq3" in proc.stdout


def test_report_writes_pngs_and_summary(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli("report", two_runs[0], "--out", str(out)) == 0
    # (no tightness.png here: two epochs leave the measured gap negative, and a ratio to it is not drawn)
    for name in ("loss.png", "bounds_vs_gap.png", "trajectory_vs_flatness.png", "dispersion.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 5000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "`bound/wang_mao_eq3`" in summary and "±" in summary and "`gap/measured`" in summary
    assert "complete" in summary


def test_compare_prints_both_runs(two_runs, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    assert run_cli("compare", *two_runs, "--out", str(out_dir)) == 0
    out = capsys.readouterr().out
    assert two_runs[0] in out and two_runs[1] in out
    assert "run 1" not in out and "lr=0.05" in out and "lr=0.2" in out
    row = next(line for line in out.splitlines() if line.startswith("| `bound/wang_mao_eq3`"))
    assert row.count("|") == 4  # metric + two runs
    for name in ("bounds_overlay.png", "final_bounds.png"):
        assert (out_dir / name).exists() and (out_dir / name).stat().st_size > 5000


# --- synthetic runs: figures ------------------------------------------------------------------------
@pytest.fixture
def captured_figures(monkeypatch):
    """Record every figure the reporting code saves (name → Figure) before it is closed."""
    import genbounds.reporting.plots as plots

    figures = {}
    original = plots.save

    def save(fig, path):
        fig.canvas.draw()
        figures[os.path.basename(path)] = fig
        return original(fig, path)

    monkeypatch.setattr(plots, "save", save)
    return figures


def _bars(ax):
    from matplotlib.container import BarContainer

    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _assert_figure_rules(name, fig):
    data_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert data_axes, name
    for ax in data_axes:
        assert ax.has_data(), f"{name}: an empty axes"
        assert ax.get_ylabel(), f"{name}: y axis without label"
        if ax.get_xlabel() == "" and ax.get_shared_x_axes().get_siblings(ax) != [ax]:
            continue  # a twinx axes shares the x label of its host
        assert ax.get_xlabel(), f"{name}: x axis without label"
        legend = ax.get_legend()
        if legend is not None:
            box, area = legend.get_window_extent(), ax.get_window_extent()
            assert box.x0 >= area.x1 - 1, f"{name}: legend inside the data area"


def test_report_figures_follow_the_rules(tmp_path, captured_figures):
    run_dir = write_tb_run(tmp_path / "exp" / "version_0", standard_scalars(), {"lr": 0.1, "batch_size": 32})
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_cli("report", run_dir, "--out", str(out)) == 0
    expected = {"loss.png", "bounds_vs_gap.png", "error_bounds.png", "tightness.png", "trajectory_vs_flatness.png",
                "dispersion.png", "curvature.png", "per_layer.png"}
    assert set(captured_figures) == expected
    assert {p.name for p in out.glob("*.png")} == expected
    for name, fig in captured_figures.items():
        _assert_figure_rules(name, fig)
    bounds_ax = captured_figures["bounds_vs_gap.png"].axes[0]
    assert bounds_ax.get_ylabel() == "bound / gap (nats)" and bounds_ax.get_xlabel() == "optimizer step"
    labels = bounds_ax.get_legend_handles_labels()[1]
    assert "bound/wang_mao_eq3 ± SE" in labels and "gap/measured (held-out − train loss) ± SE" in labels
    assert captured_figures["loss.png"].axes[0].get_ylabel() == "loss (nats)"
    assert captured_figures["error_bounds.png"].axes[0].get_ylabel() == "error rate"
    tight = captured_figures["tightness.png"].axes[0]
    assert tight.get_yscale() == "log"
    ratio = next(line for line in tight.get_lines() if line.get_label() == "bound/wang_mao_eq3 ÷ gap/measured")
    assert all(math.isclose(v, 2.0, rel_tol=1e-5) for v in ratio.get_ydata())
    per_layer = captured_figures["per_layer.png"]
    assert [t.get_text() for t in per_layer.axes[0].get_xticklabels()] == ["fc1", "fc2"]
    assert len(per_layer.axes) == 2 and _bars(per_layer.axes[1])[0].errorbar is not None
    summary = (out / "summary.md").read_text()
    assert "| `bound/wang_mao_eq3` | 0.4 ± 0.04 |" in summary and "complete" in summary
    for name in expected:
        assert f"({name})" in summary


def test_no_blank_figures(tmp_path, captured_figures, capsys):
    scalars = {"train_loss_step": [(s, 1.0 / (s + 1)) for s in range(50)],
               "bound/neu": [(s, float("nan")) for s in range(0, 50, 10)]}  # all-NaN series: nothing to draw
    run_dir = write_tb_run(tmp_path / "only_loss", scalars)
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_cli("report", run_dir, "--out", str(out)) == 0
    assert set(captured_figures) == {"loss.png"}
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "summary.md"]
    printed = capsys.readouterr().out
    assert "loss.png" in printed and "bounds_vs_gap.png" not in printed
    assert "| `bound/neu` | nan |" in (out / "summary.md").read_text()


def test_compare_figures_and_labels(tmp_path, captured_figures, capsys):
    root = tmp_path / "digits_mlp"
    a = write_tb_run(root / "version_0", standard_scalars(1.0), {"run_name": "a", "lr": 0.1, "label_noise": 0.0})
    b = write_tb_run(root / "version_1", standard_scalars(2.0), {"run_name": "b", "lr": 0.1, "label_noise": 0.4})
    out = tmp_path / "cmp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_cli("compare", a, b, "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "a (label_noise=0)" in text and "b (label_noise=0.4)" in text and "lr=" not in text
    assert set(captured_figures) == {"bounds_overlay.png", "final_bounds.png", "tightness.png"}
    for name, fig in captured_figures.items():
        _assert_figure_rules(name, fig)
    bars = captured_figures["final_bounds.png"].axes[0]
    assert bars.get_yscale() == "log"
    assert [t.get_text() for t in bars.get_xticklabels()][-1] == "gap/measured"
    assert len(_bars(bars)) == 2 and all(c.errorbar is not None for c in _bars(bars))
    assert bars.get_legend_handles_labels()[1] == ["a (label_noise=0)", "b (label_noise=0.4)"]


def test_report_on_a_parent_folder_reports_every_run(tmp_path, capsys):
    runs = [write_tb_run(tmp_path / "exp" / f"version_{i}", standard_scalars(1.0 + i), {"lr": 0.1 * (i + 1)})
            for i in range(2)]
    assert run_cli("report", str(tmp_path / "exp")) == 0
    for run in runs:
        assert os.path.exists(os.path.join(run, "report", "summary.md"))
    out = tmp_path / "reports"
    assert run_cli("report", str(tmp_path / "exp"), "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["version_0", "version_1"]
    assert (out / "version_1" / "bounds_vs_gap.png").exists()
    # the report folders are not runs: gating the parent still finds exactly two
    assert run_cli("gate", str(tmp_path / "exp"), "--max", "gap/measured=1") == 0
    assert "2 passed, 0 failed" in capsys.readouterr().out


def test_report_lists_settings_not_lightnings_own_keys(tmp_path, capsys):
    """``summary.md``'s hyper-parameter line shows the run's settings; a key of Lightning's own
    (``_instantiator``, written by LightningCLI) is not one and is left out."""
    run = write_tb_run(str(tmp_path / "run"), {"bound/neu": [(0, 1.0), (5, 2.0)]},
                       hparams={"lr": 0.05, "_instantiator": "lightning.pytorch.cli.instantiate_module"})
    out = tmp_path / "report"
    assert run_cli("report", run, "--out", str(out)) == 0
    line = next(x for x in (out / "summary.md").read_text().splitlines() if x.startswith("Hyper-parameters:"))
    assert "`lr=0.05`" in line and "_instantiator" not in line, line


def test_report_settings_drop_a_bare_key_its_namespaced_twin_repeats():
    """The data module's ``label_noise`` beside genbounds' ``data/label_noise``: listed once. A
    bare key whose namespaced twin differs stays (both are shown: the reader sees the conflict),
    and so does a setting of genbounds' own whatever its value."""
    from genbounds.reporting.report import settings

    got = settings({"momentum": 0.0, "model/momentum": 0.0, "shuffle": True, "data/shuffle": 1, "drop_last": "False",
                    "data/drop_last": 0, "val_fraction": 0.3, "data/val_fraction": 0.2, "_instantiator": "x",
                    "seed": 0, "data/seed": 0, "optimizer": "SGD"})
    # (seed is genbounds' own: the global seed, kept beside the data module's even when equal)
    assert got == {"model/momentum": 0.0, "data/shuffle": 1, "data/drop_last": 0, "val_fraction": 0.3,
                   "data/val_fraction": 0.2, "seed": 0, "data/seed": 0, "optimizer": "SGD"}


def test_fmt_writes_counts_and_sizes_as_integers():
    """``setting/d`` 38410 reads as 38410 in report and compare, not 3.841e+04; other values keep
    four significant digits."""
    from genbounds.reporting.events import fmt

    assert fmt(38410.0) == "38410" and fmt(1.0) == "1" and fmt(0.0) == "0" and fmt(-3.0) == "-3"
    assert fmt(2.3141) == "2.314" and fmt(1e20) == "1e+20" and fmt(float("inf")) == "inf"
    assert fmt(float("nan")) == "nan" and fmt(None) == "—"


def test_the_overlay_shows_a_bound_evaluated_once(tmp_path, captured_figures):
    """Under a budget a bound is often evaluated once, at the end: a line through one point draws
    nothing, and its ± SE band has no width (the overlay of two main-job runs showed only the gaps,
    a new user's walk, round 33). A lone point gets a marker and an error bar."""
    from matplotlib.collections import LineCollection

    scalars = standard_scalars()
    for tag in ("bound/wang_mao_eq3", "bound/wang_mao_eq2"):
        scalars[tag] = [(END, 3.0)]
        scalars[f"{tag}_se"] = [(END, 0.2)]
    runs = [write_tb_run(tmp_path / name, scalars) for name in ("a", "b")]
    assert run_cli("compare", *runs, "--out", str(tmp_path / "cmp")) == 0
    ax = captured_figures["bounds_overlay.png"].axes[0]
    lone = [ln for ln in ax.lines if "wang_mao" in ln.get_label()]
    assert len(lone) == 4 and all(ln.get_marker() == "o" for ln in lone)
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(bars) == 4 and all(len(c.get_segments()) == 1 for c in bars)
    gaps = [ln for ln in ax.lines if "gap/measured" in ln.get_label()]
    assert gaps and all(ln.get_marker() in ("None", None, "") for ln in gaps)  # (lines as before)
