"""`genbounds report | compare | gate` on event files from real short runs."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from genbounds.cli import main
from genbounds.data import DigitsDataModule
from genbounds.models import MLP, Classifier
from genbounds.reporting import load_run
from helpers import bound_suite, trainer


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for lr in (0.05, 0.2):
        pl.seed_everything(0, verbose=False)
        logger = TensorBoardLogger(str(root), name=f"lr{lr}", default_hp_metric=False)
        t = trainer(root, bound_suite(), logger=logger, max_epochs=2, limit_train_batches=5, limit_val_batches=2)
        t.fit(Classifier(MLP(64, 10, 32), lr=lr), DigitsDataModule(batch_size=64))
        paths.append(logger.log_dir)
    return paths


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return int(info.value.code)


def test_gate_exit_codes(two_runs, capsys, tmp_path):
    run = two_runs[0]
    final = load_run(run).final("bound/wang_mao_eq3")
    assert final is not None and final > 0
    assert run_cli("gate", run, "--max", f"bound/wang_mao_eq3={final * 2}", "--min", "bound/R=0") == 0
    assert "all thresholds hold" in capsys.readouterr().out
    assert run_cli("gate", run, "--max", f"bound/wang_mao_eq3={final / 2}", "--max", "gap/measured=1e9") == 1
    out = capsys.readouterr().out
    assert "1 threshold(s) violated" in out and "bound/wang_mao_eq3" in out and "<=" in out
    assert run_cli("gate", str(tmp_path / "nothing-here"), "--max", "bound/neu=1") == 2
    assert run_cli("gate", run, "--max", "bound/not_a_metric=1") == 2
    assert "not found" in capsys.readouterr().err
    assert run_cli("gate", os.path.dirname(os.path.dirname(run)), "--max", "bound/neu=1") == 2  # two runs: ambiguous
    assert run_cli("gate", run, "--max", "bound/neu") == 2  # malformed threshold
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "events.out.tfevents.123.host").write_bytes(b"\x00garbage")
    assert run_cli("gate", str(corrupt), "--max", "bound/neu=1") == 2


def test_gate_as_a_subprocess(two_runs):
    proc = subprocess.run([sys.executable, "-m", "genbounds", "gate", two_runs[0], "--max", "bound/wang_mao_eq3=0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "violated" in proc.stdout


def test_report_writes_pngs_and_summary(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli("report", two_runs[0], "--out", str(out)) == 0
    for name in ("loss.png", "bounds_vs_gap.png", "trajectory_vs_flatness.png", "dispersion.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 5000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "`bound/wang_mao_eq3`" in summary and "±" in summary and "`gap/measured`" in summary


def test_compare_prints_both_runs(two_runs, tmp_path, capsys):
    plot = tmp_path / "overlay.png"
    assert run_cli("compare", *two_runs, "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    assert two_runs[0] in out and two_runs[1] in out
    row = next(line for line in out.splitlines() if line.startswith("| `bound/wang_mao_eq3`"))
    assert row.count("|") == 4  # metric + two runs
    assert plot.exists() and plot.stat().st_size > 5000
