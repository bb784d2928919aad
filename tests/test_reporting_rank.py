"""`genbounds rank`: Kendall τ-b, granulated τ Ψ (Jiang et al. 2019), baselines, outputs."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import warnings

import pytest

from genbounds.reporting import granulated_tau, kendall_tau_b
from test_reporting import END, run_cli, write_tb_run

LRS, BATCHES = (0.01, 0.05, 0.1), (32, 128)


# --- the statistics by hand -------------------------------------------------------------------------
def test_kendall_tau_b_by_hand():
    # one discordant pair of six: (5 − 1) / 6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    # ties: C = 4, D = 0, one tie in x, one in y → 4 / sqrt((6 − 1)(6 − 1)) = 0.8
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None  # constant: undefined
    assert kendall_tau_b([1], [2]) is None


def test_kendall_tau_b_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(3, 12)
        x = [rng.randint(0, 4) for _ in range(n)]
        y = [rng.randint(0, 4) for _ in range(n)]
        ours = kendall_tau_b(x, y)
        theirs = stats.kendalltau(x, y, variant="b").statistic
        if ours is None:
            assert math.isnan(theirs)
        else:
            assert ours == pytest.approx(theirs)


def test_granulated_tau_by_hand():
    # 2 × 2 grid over axes a and b; y increases along both.
    settings = [{"a": 0, "b": 0}, {"a": 0, "b": 1}, {"a": 1, "b": 0}, {"a": 1, "b": 1}]
    y = [1, 2, 3, 4]
    x = [1, 2, 4, 3]
    # axis a (groups b=0: x 1→4, y 1→3 concordant; b=1: x 2→3, y 2→4 concordant) → τ_a = 1
    # axis b (groups a=0: x 1→2, y 1→2 concordant; a=1: x 4→3, y 3→4 discordant) → τ_b = 0
    psi, per_axis = granulated_tau(x, y, settings, ["a", "b"])
    assert per_axis == {"a": 1.0, "b": 0.0} and psi == 0.5
    assert kendall_tau_b(x, y) == pytest.approx(2 / 3)


# --- genbounds rank on synthetic runs ---------------------------------------------------------------
def _grid(root, extra=None):
    """6 runs over lr × batch_size; the gap grows with lr / batch_size."""
    paths = []
    for i, (lr, batch) in enumerate((lr, b) for lr in LRS for b in BATCHES):
        gap = 20 * lr / batch
        finals = {"gap/measured": gap, "good": 2 * gap + 1, "bad": -gap, "const": 3.0,
                  "bound/wang_mao_eq3": 5 * gap, "bound/neu": 1.0 + (i % 3),  # scrambled
                  "bound_terms/sum_eta2_dispersion": gap ** 2,
                  "nan_in_one": float("nan") if i == 2 else gap,
                  "gap/measured_se": gap / 10, "ci/gap/measured_lower": gap * 0.9,
                  "gap/measured_other": 2 * gap}  # (a name that merely begins with the target's)
        finals.update((extra or {}).get(i, {}))
        scalars = {tag: [(0, 0.5), (END, value)] for tag, value in finals.items()}
        hparams = {"run_name": f"lr{lr}_b{batch}", "lr": lr, "batch_size": batch, "seed": 100 + i,
                   "model": {"lr": lr}, "optimizer": "SGD"}
        paths.append(write_tb_run(root / f"version_{i}", scalars, hparams))
    return paths


def test_rank_perfect_and_inverse_metrics(tmp_path, capsys):
    runs = _grid(tmp_path / "grid")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_cli("rank", str(tmp_path / "grid"), "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == "gap/measured" and data["axes"] == ["batch_size", "lr"]  # no seed, no model/lr alias
    assert len(data["runs"]) == 6 and data["runs"][0]["label"].startswith("lr0.01_b32 (batch_size=32, lr=0.01")
    rows = {m["metric"]: m for m in data["metrics"]}
    assert rows["good"]["tau"] == 1.0 and rows["good"]["psi"] == 1.0
    assert rows["good"]["tau_axis"] == {"batch_size": 1.0, "lr": 1.0}
    assert rows["bad"]["tau"] == -1.0 and rows["bad"]["psi"] == -1.0
    assert rows["bound/wang_mao_eq3"]["tau"] == 1.0
    # baselines: lr/batch from the hyper-parameters, Σ η² V̂ from its tag, Roberts absent → noted
    assert rows["lr/batch"]["baseline"] and rows["lr/batch"]["psi"] == 1.0
    assert rows["bound_terms/sum_eta2_dispersion"]["baseline"] and rows["bound_terms/sum_eta2_dispersion"]["tau"] == 1.0
    roberts = rows["gap/predicted_cumulative"]
    assert roberts["tau"] is None and "no final value in 6 of 6" in roberts["note"]
    # constant / NaN / never-logged headline bounds are listed with a note, not dropped
    assert "constant" in rows["const"]["note"] and rows["const"]["tau"] is None
    assert "NaN in 1 of 6 runs" in rows["nan_in_one"]["note"]
    assert rows["bound/wang_mao_eq2"]["tau"] is None and "no final value" in rows["bound/wang_mao_eq2"]["note"]
    assert "gap/measured" not in rows  # the target itself, and what is derived from it (said)
    assert "gap/measured_se" not in rows and "ci/gap/measured_lower" not in rows
    assert rows["gap/measured_other"]["tau"] == 1.0
    assert "left out, derived from the target: ci/gap/measured_lower, gap/measured_se" in data["notes"]
    # sorted by Ψ, then τ; undefined last
    ranked = [m for m in data["metrics"] if m["tau"] is not None]
    psis = [m["psi"] for m in ranked]
    assert psis == sorted(psis, reverse=True) and ranked[-1]["metric"] == "bad"
    assert all(m["tau"] is None for m in data["metrics"][len(ranked):])
    # files next to the runs
    assert set(data["files"]) == {str(tmp_path / "grid" / "rank.md"), str(tmp_path / "grid" / "rank.png")}
    assert (tmp_path / "grid" / "rank.png").stat().st_size > 5000
    md = (tmp_path / "grid" / "rank.md").read_text()
    assert "| `good` | +1.000 | +1.000 | +1.000 | +1.000 | 6 |" in md and "lr/batch (baseline)" in md
    assert len(runs) == 6


def test_rank_text_csv_and_options(tmp_path, capsys):
    _grid(tmp_path / "grid")
    out = tmp_path / "elsewhere"
    assert run_cli("rank", str(tmp_path / "grid"), "--out", str(out)) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "τ", "Ψ", "τ[batch_size]", "τ[lr]", "n", "runs", "note"]
    assert "lr0.05_b128 (batch_size=128, lr=0.05, seed=103)" in text and "run 1" not in text
    assert (out / "rank.md").exists() and (out / "rank.png").exists()
    assert run_cli("rank", str(tmp_path / "grid"), "--out", str(out), "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    good = next(r for r in rows if r["metric"] == "good")
    assert float(good["tau"]) == 1.0 and float(good["psi"]) == 1.0 and good["n_runs"] == "6"
    # explicit axes and a seed axis
    assert run_cli("rank", str(tmp_path / "grid"), "--out", str(out), "--format", "json", "--axis", "lr") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["axes"] == ["lr"]
    assert run_cli("rank", str(tmp_path / "grid"), "--out", str(out), "--format", "json", "--include-seed") == 0
    assert "seed" in json.loads(capsys.readouterr().out)["axes"]
    # another target
    assert run_cli("rank", str(tmp_path / "grid"), "--out", str(out), "--format", "json", "--target", "good") == 0
    rows = {m["metric"]: m for m in json.loads(capsys.readouterr().out)["metrics"]}
    assert rows["gap/measured"]["tau"] == 1.0 and "good" not in rows


def test_rank_refuses_bad_input(tmp_path, capsys):
    paths = _grid(tmp_path / "grid")
    assert run_cli("rank", paths[0]) == 2
    assert "at least 2 runs" in capsys.readouterr().err
    assert run_cli("rank", str(tmp_path / "grid"), "--target", "gap/nope") == 2
    assert "gap/nope" in capsys.readouterr().err
    assert run_cli("rank", str(tmp_path / "grid"), "--target", "nan_in_one", "--format", "json") == 2
    assert json.loads(capsys.readouterr().out)["exit_code"] == 2


def test_stale_metric_is_ranked_with_a_note(tmp_path, capsys):
    _grid(tmp_path / "grid", extra={})
    stale = write_tb_run(tmp_path / "grid" / "version_9",
                         {"gap/measured": [(0, 0.1), (END, 0.9)], "good": [(0, 1.0), (100, 2.8)]},
                         {"lr": 0.2, "batch_size": 32, "seed": 1})
    assert run_cli("rank", str(tmp_path / "grid"), "--format", "json") == 0
    rows = {m["metric"]: m for m in json.loads(capsys.readouterr().out)["metrics"]}
    assert rows["good"]["tau"] == 1.0 and "stale in 1 of 7 runs" in rows["good"]["note"]
    assert stale
