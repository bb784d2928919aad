"""The README's main job, run as a user would."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from helpers import tensorboard_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_main_job_runs_and_logs_dispersion_and_every_bound(tmp_path):
    cmd = [
        sys.executable, "-m", "genbounds", "fit", "--config", os.path.join(ROOT, "configs", "digits_mlp.yaml"),
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = tensorboard_scalars(str(tmp_path))
    assert "grad/dispersion" in scalars and len(scalars["grad/dispersion"]) > 0
    assert all(v > 0 for _, v in scalars["grad/dispersion"])
    assert "train_loss_step" in scalars
    # the whole default suite: every bound of the aggregator, R and the measured gap
    for tag in ("bound/wang_mao_eq2", "bound_terms/sigma_wang_mao_eq2", "bound_terms/trajectory_wang_mao",
                "bound_terms/flatness_wang_mao", "bound/wang_mao_eq3", "bound_terms/trajectory_factor_wang_mao_eq3",
                "bound_terms/flatness_factor_wang_mao_eq3", "bound/neu", "bound/neu_abs", "setting/R", "setting/n", "setting/d", "setting/T", "gap/measured",
                "gap/measured_se", "gap/error", "bound/wang_mao_eq2_error", "bound/neu_error",
                "bound/test_error_upper", "bound/wang_mao_eq2_layerwise", "bound/wang_mao_eq3_layerwise",
                "bound/neu_layerwise", "bound/valid", "run/complete", "grad/heldout_dist_sq",
                "gap/predicted_cumulative", "curv/hessian_trace", "curv/hessian_trace_se", "perf/overhead"):
        assert tag in scalars, tag
    assert any(t.startswith("bound_terms/fig1_trajectory_neu/") for t in scalars)
    # Neu under the main job's budget: no scheduled Γ probe fits during training, the bound's midway
    # probe (step 315) and the final weights' are two: a value with its trajectory, no NaN note (§6.9;
    # round 35: NaN, one probe standing for the run)
    assert math.isfinite(scalars["bound/neu"][-1][1]) and "bound_terms/trajectory_neu" in scalars
    assert "Neu's bounds are NaN at step" not in proc.stderr
    # the results table on stdout, with the final values that were logged
    assert "genbounds — final values" in proc.stdout
    for tag in ("bound/wang_mao_eq3", "bound/wang_mao_eq2", "gap/measured"):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(tag + " "))
        printed = float(line.split()[1])
        final = max(scalars[tag])[1]
        assert printed == pytest.approx(final, rel=1e-3), (tag, line)
    assert any(t.startswith("flat/term/") for t in scalars) and any(t.startswith("sens/gradient_sensitivity/") for t in scalars)


CONFIGS = sorted(
    os.path.join(dirpath, f)
    for dirpath, _, files in os.walk(os.path.join(ROOT, "configs"))
    for f in files
    if f.endswith(".yaml")
)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_parses(config, capsys):
    from genbounds.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_command_line_overrides_name_the_run(tmp_path, monkeypatch):
    """``genbounds fit … --data.init_args.label_noise=0.4`` from the command line (the console
    script calls ``main()`` without arguments, so the overrides come from ``sys.argv``): the log
    folder is named after the overrides and HParams records them (written by the suite's run
    summary)."""
    from genbounds.cli import main
    from genbounds.reporting.events import load_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "genbounds", "fit", "--config", os.path.join(ROOT, "configs", "digits_mlp.yaml"),
        "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.label_noise=0.4"])
    main()
    names = os.listdir(tmp_path / "digits_mlp")
    assert names == ["max_steps=3,limit_val_batches=1,label_noise=0.4"], names
    run = load_run(str(tmp_path / "digits_mlp" / names[0]))
    assert "label_noise=0.4" in str(run.hparams.get("cli_overrides")), run.hparams
    assert run.hparams.get("run_name") == f"digits_mlp/{names[0]}"
    # its stored config run again (as the README says) names the folder: the run goes to the next
    # free name, not into it (it wrote a second event file there, and report read both as one run)
    monkeypatch.setattr(sys, "argv", ["genbounds", "fit", "--config",
                                      str(tmp_path / "digits_mlp" / names[0] / "config.yaml")])
    main()
    assert sorted(os.listdir(tmp_path / "digits_mlp")) == sorted([names[0], names[0] + "_2"])
    assert len([f for f in os.listdir(tmp_path / "digits_mlp" / names[0]) if f.startswith("events.")]) == 1
