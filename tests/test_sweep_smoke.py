"""Smoke test of the ranking sweep (``benchmarks/sweep.py --quick``): 4 tiny runs, both rankings, the
Markdown and the figures, all under ``tmp_path``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_sweep_quick(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "sweep.py"), "--quick", "--epochs", "1", "--save-dir", str(runs),
         "--results", str(results), "--no-main-job"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    sweep = runs / "sweep_quick"
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("rank_"))
    # named by their settings, in the grid's order (the --epochs override comes last)
    assert names == sorted(f"lr={lr},batch_size=128,label_noise={noise},hidden=128,max_epochs=1"
                           for lr in (0.1, 0.5) for noise in (0.0, 0.4))
    for target in ("gap_measured", "gap_error"):
        assert (sweep / f"rank_{target}" / "rank.md").is_file()
        assert (results / f"sweep_quick_rank_{target}.png").is_file()
    for png in ("sweep_quick_bounds_vs_gap.png", "sweep_quick_checks.png"):
        assert (results / png).stat().st_size > 0

    md = (results / "sweep_quick.md").read_text()
    for heading in ("## Runs", "## Ranking against `gap/measured`", "## Ranking against `gap/error`",
                    "## Test-error bound vs the measured test error", "## Layer-wise vs isotropic"):
        assert heading in md
    assert "`lr/batch` (baseline)" in md and "`bound/wang_mao_eq3_layerwise`" in md

    # the test split's error is in every run's logs, read back by the reporting layer
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from genbounds.reporting.events import load_run

    for name in names:
        run = load_run(str(sweep / name))
        assert run.complete
        error = run.final("test/error")
        assert error is not None and 0.0 <= error <= 1.0
        assert run.last_step("test/error") == run.end_step

    # the rank command's own JSON (kept next to rank.md): 4 runs, two axes (lr, label_noise)
    ranking = json.loads((sweep / "rank_gap_measured" / "rank.json").read_text())
    assert len(ranking["runs"]) == 4
    assert set(ranking["axes"]) == {"lr", "label_noise"}
    assert any(m["metric"] == "test/error" for m in ranking["metrics"])
