"""The ``genbounds`` command line describes itself; machine-readable output parses."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from test_reporting import run_cli, standard_scalars, write_tb_run

COMMANDS = ("fit", "validate", "test", "report", "compare", "gate", "rank")


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []], ids=["--help", "-h", "no-arguments"])
def test_top_level_help_lists_the_seven_commands(argv, capsys):
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for command in COMMANDS:
        assert sum(line.split()[:1] == [command] for line in lines) == 1, command
    assert "genbounds fit --config configs/digits_mlp.yaml" in out


def test_top_level_help_as_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "genbounds", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and all(f"  {c} " in proc.stdout for c in COMMANDS)


def test_lightning_cli_help_still_works(capsys):
    assert run_cli("fit", "--help") == 0
    assert "--trainer" in capsys.readouterr().out


def test_the_console_script_reaches_lightning_cli_without_its_args_warning():
    """``genbounds fit …`` from a shell: LightningCLI reads the command line itself. Passing it
    ``sys.argv[1:]`` as ``args`` as well made it warn on every run that args and command-line
    arguments were both given."""
    proc = subprocess.run([sys.executable, "-m", "genbounds", "fit", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "--trainer" in proc.stdout
    assert "args parameter is intended" not in proc.stderr + proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("command", ["report", "compare", "gate", "rank"])
def test_each_reporting_help_names_files_and_exit_codes(command, capsys):
    assert run_cli(command, "--help") == 0
    out = capsys.readouterr().out
    assert "exit codes" in out
    for code in ("0 ", "2 "):
        assert f"  {code}" in out, code
    assert "--allow-incomplete" in out
    if command == "gate":
        assert "  1 " in out and "--lenient" in out and "writes no files" in out
    else:
        assert "writes" in out
    files = {"report": ("summary.md", "loss.png", "tightness.png", "per_layer.png"),
             "compare": ("final_bounds.png", "bounds_overlay.png"),
             "rank": ("rank.md", "rank.png"), "gate": ()}[command]
    for name in files:
        assert name in out, name
    if command != "report":
        assert "--format" in out


def test_bad_arguments_are_exit_2(capsys):
    assert run_cli("gate") == 2
    assert run_cli("rank", "--format", "yaml", "x") == 2
    assert run_cli("compare", "--nope") == 2


@pytest.fixture
def pair(tmp_path):
    return [write_tb_run(tmp_path / "exp" / f"version_{i}", standard_scalars(1.0 + i), {"lr": 0.1 * (i + 1)})
            for i in range(2)]


def test_json_outputs_parse(pair, tmp_path, capsys):
    assert run_cli("gate", *pair, "--max", "bound/wang_mao_eq3=0.5", "--format", "json") == 1
    gate = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in gate["runs"]] == ["PASS", "FAIL"] and gate["exit_code"] == 1
    assert gate["runs"][0]["label"] == "version_0 (lr=0.1)"
    assert run_cli("compare", *pair, "--format", "json", "--out", str(tmp_path / "cmp")) == 0
    comp = json.loads(capsys.readouterr().out)
    row = next(m for m in comp["metrics"] if m["metric"] == "bound/wang_mao_eq3" and m["run"] == "version_1")
    assert row["value"] == pytest.approx(0.8) and row["se"] == pytest.approx(0.08) and row["step"] == 300
    assert len(comp["files"]) == 3 and comp["runs"][1]["hparams"] == {"lr": 0.2}
    assert run_cli("rank", *pair, "--format", "json", "--out", str(tmp_path / "rank")) == 0
    rank = json.loads(capsys.readouterr().out)
    assert rank["axes"] == ["lr"] and rank["metrics"][0]["tau"] == 1.0


def test_csv_outputs_parse(pair, capsys):
    assert run_cli("compare", *pair, "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["run"] for r in rows} == {"version_0", "version_1"}
    assert any(r["metric"] == "gap/measured" and float(r["value"]) == pytest.approx(0.2) for r in rows)
    assert run_cli("gate", *pair, "--max", "gap/measured=1", "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["verdict"] for r in rows] == ["PASS", "PASS"]
