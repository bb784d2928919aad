"""Readers fail closed: cut, corrupted and killed runs; CSVLogger runs; gate semantics (NaN, missing,
stale); several runs under one parent folder."""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import struct

import pytest

from genbounds.reporting import CorruptRun, read_run_dir
from genbounds.reporting.csv_runs import CorruptCSV, read_metrics_csv
from genbounds.reporting.tfrecord import CorruptEventFile, iter_records
from test_reporting import END, run_cli, standard_scalars, write_csv_run, write_tb_run

GATE_OK = ("--max", "bound/wang_mao_eq3=1", "--min", "gap/measured=0")


def _event_file(run_dir) -> str:
    (path,) = glob.glob(os.path.join(str(run_dir), "events.out.tfevents.*"))
    return path


@pytest.fixture
def good_run(tmp_path):
    return write_tb_run(tmp_path / "good" / "version_0", standard_scalars(), {"lr": 0.1, "batch_size": 32})


@pytest.fixture
def truncated_run(tmp_path):
    run = write_tb_run(tmp_path / "truncated" / "version_0", standard_scalars(), {"lr": 0.1})
    path = _event_file(run)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    return run


@pytest.fixture
def corrupted_run(tmp_path):
    run = write_tb_run(tmp_path / "corrupted" / "version_0", standard_scalars(), {"lr": 0.1})
    path = _event_file(run)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\xa5" * 200)
    return run


@pytest.fixture
def killed_run(tmp_path):
    """A run whose training was killed: healthy files, but run/complete was never logged."""
    return write_tb_run(tmp_path / "killed" / "version_0", standard_scalars(), {"lr": 0.1}, complete=False)


def test_a_crashed_rerun_into_the_same_folder_is_not_passed_on_the_earlier_fit(tmp_path, capsys):
    """A fit run again into a used folder (a re-run CI job, a fixed logger version) that crashed at
    step 30: the earlier, complete fit's run/complete and final values were read as its own and
    the gate passed (a new user's walk, round 33). The later fit supersedes the earlier from the
    step it starts at: incomplete."""
    run = write_tb_run(tmp_path / "ci", standard_scalars(), {"lr": 0.1})
    short = {tag: [(s, v) for s, v in pts if s <= 30] for tag, pts in standard_scalars(scale=50.0).items()}
    write_tb_run(tmp_path / "ci", short, complete=False)
    assert run_cli("gate", run, *GATE_OK) == 2
    out = capsys.readouterr().out
    assert "incomplete" in out and "superseded" in out


def test_a_fit_resumed_into_its_folder_keeps_the_history_before_it(tmp_path, capsys):
    """A fit killed at step 150 and resumed from its step-100 checkpoint into the same folder: the
    resumed fit's values from step 100 on, the killed fit's before, and the resumed run/complete."""
    from genbounds.reporting import read_run_dir

    whole = standard_scalars()
    write_tb_run(tmp_path / "r", {t: [(s, v + 7.0) for s, v in p if s <= 150] for t, p in whole.items()},
                 complete=False)
    run_dir = write_tb_run(tmp_path / "r", {t: [(s, v) for s, v in p if s >= 100] for t, p in whole.items()})
    run = read_run_dir(run_dir)
    assert run.complete and run.end_step == END
    steps, values = run.series("val_acc")
    want_steps, want = zip(*whole["val_acc"])
    assert steps == list(want_steps)
    assert values == pytest.approx([v + 7.0 if s < 100 else v for s, v in zip(want_steps, want)], rel=1e-6)
    assert any("superseded" in note for note in run.notes)
    assert run_cli("gate", run_dir, *GATE_OK) == 0


def test_a_test_stage_after_fit_supersedes_nothing(tmp_path, capsys):
    """``trainer.test`` after ``fit`` on the same TensorBoardLogger: Lightning opens a new event file,
    whose first values are at the fit's last step. It goes on from there and drops nothing (as
    TensorBoard keeps them); before, it superseded the fit's final values and ``run/complete`` at
    that step, and a finished run failed the gate as killed (exit 2; an engineer's walk, round 34)."""
    run_dir = write_tb_run(tmp_path / "t", standard_scalars())
    write_tb_run(tmp_path / "t", {"test_loss": [(END, 0.3)], "test_acc": [(END, 0.9)]}, complete=False)
    run = read_run_dir(run_dir)
    assert run.complete and run.end_step == END and not run.notes
    assert run.final("bound/wang_mao_eq3") is not None and run.final("test_loss") == pytest.approx(0.3)
    assert run_cli("gate", run_dir, *GATE_OK) == 0


def test_a_fit_resumed_from_the_last_step_that_crashed_is_incomplete(tmp_path, capsys):
    """A complete fit, then a fit resumed from its last checkpoint into the same folder (more
    epochs) that crashed: its first values are at the earlier fit's last step and go on past it,
    so it supersedes from there — the earlier ``run/complete`` is not its own (a review, round 34:
    the reader took it for a test stage and the gate passed)."""
    whole = standard_scalars(end=600)
    run_dir = write_tb_run(tmp_path / "r", {t: [(s, v) for s, v in p if s <= END] for t, p in whole.items()})
    write_tb_run(tmp_path / "r", {t: [(s, v) for s, v in p if END <= s <= 450] for t, p in whole.items()},
                 complete=False)
    assert run_cli("gate", run_dir, *GATE_OK) == 2
    out = capsys.readouterr().out
    assert "incomplete" in out and "superseded" in out


def test_fit_then_test_and_validate_with_lightning_then_gate(tmp_path):
    """The same, from Lightning itself: fit, then ``validate`` and ``test`` on the same Trainer."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from genbounds.callbacks import GradientDispersion
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier
    from helpers import trainer

    class WithTest(Classifier):
        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", torch.nn.functional.cross_entropy(self(x), y))

    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    t = trainer(tmp_path, [GradientDispersion()], logger=logger,
                max_epochs=1, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2)
    model, data = WithTest(MLP(64, 10, 16), lr=0.05), DigitsDataModule(batch_size=64, seed=0, test_fraction=0.2)
    t.fit(model, data)
    t.validate(model, data)
    t.test(model, datamodule=data)
    assert len(glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))) >= 2  # (what made the case)
    run = read_run_dir(logger.log_dir)
    assert run.complete and run.end_step == 4 and run.final("test_loss") is not None
    assert run_cli("gate", logger.log_dir, "--max", "grad/dispersion=1e9", "--max", "val_loss=1e9") == 0


# --- TFRecord framing --------------------------------------------------------------------------------
def test_event_accumulator_would_not_notice(truncated_run):
    """Why the reader checks framing itself: tensorboard's loader reads the cut file without an error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(_event_file(truncated_run), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Tags()["scalars"]  # some scalars, no exception: the cut is silent there


def test_records_verify_and_locate_the_defect(good_run):
    blob = open(_event_file(good_run), "rb").read()
    records = list(iter_records(blob))
    assert records[0][0] == 0 and len(records) > 100
    offsets = [o for o, _ in records]
    # a flipped bit in the 10th record's payload: reported at that record's offset
    start, data = records[10]
    bad = bytearray(blob)
    bad[start + 12 + len(data) // 2] ^= 0x01
    with pytest.raises(CorruptEventFile) as info:
        list(iter_records(bytes(bad), "f"))
    assert info.value.offset == start and "data checksum" in str(info.value) and f"byte {start}" in str(info.value)
    # a cut inside the last record, and garbage after the last complete record
    with pytest.raises(CorruptEventFile, match="truncated"):
        list(iter_records(blob[:-3], "f"))
    with pytest.raises(CorruptEventFile) as info:
        list(iter_records(blob + b"\x00" * 5, "f"))
    assert info.value.offset == len(blob) and "trailing" in str(info.value)
    # a bad length checksum
    bad = bytearray(blob)
    bad[offsets[3] + 8] ^= 0xFF
    with pytest.raises(CorruptEventFile, match="length checksum") as info:
        list(iter_records(bytes(bad), "f"))
    assert info.value.offset == offsets[3]
    assert struct.unpack("<Q", blob[:8])[0] == len(records[0][1])


@pytest.mark.parametrize("fixture", ["truncated_run", "corrupted_run"])
def test_cut_or_corrupted_run_is_exit_2_everywhere(fixture, request, good_run, tmp_path, capsys):
    run = request.getfixturevalue(fixture)
    event_file = _event_file(run)
    with pytest.raises(CorruptRun) as info:
        read_run_dir(run)
    assert event_file in str(info.value) and re.search(r"at byte \d+", str(info.value))

    assert run_cli("gate", run, *GATE_OK) == 2
    out = capsys.readouterr().out
    assert "ERROR" in out and event_file in out and "byte" in out
    assert run_cli("gate", run, *GATE_OK, "--allow-incomplete") == 2  # corrupt is never allowed
    capsys.readouterr()
    assert run_cli("report", run, "--out", str(tmp_path / "rep")) == 2
    err = capsys.readouterr().err
    assert event_file in err and "byte" in err
    assert not (tmp_path / "rep" / "summary.md").exists()
    assert run_cli("compare", good_run, run, "--out", str(tmp_path / "cmp")) == 2
    assert event_file in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    # a parent folder with one good and one bad run: the good one is gated, the bad one named, exit 2
    parent = tmp_path
    assert run_cli("gate", str(parent), *GATE_OK) == 2
    out = capsys.readouterr().out
    assert "PASS" in out and "ERROR" in out and event_file in out and "-> exit 2" in out


def test_trailing_bytes_are_corrupt(good_run, capsys):
    with open(_event_file(good_run), "ab") as fh:
        fh.write(b"\x01\x02\x03")
    assert run_cli("gate", good_run, *GATE_OK) == 2
    assert "trailing" in capsys.readouterr().out


def test_killed_run_is_incomplete_unless_allowed(killed_run, good_run, tmp_path, capsys):
    assert run_cli("gate", killed_run, *GATE_OK) == 2
    out = capsys.readouterr().out
    assert "incomplete" in out and "run/complete" in out and killed_run in out
    assert run_cli("report", killed_run, "--out", str(tmp_path / "rep")) == 2
    assert "incomplete" in capsys.readouterr().err
    assert run_cli("compare", good_run, killed_run) == 2
    assert "incomplete" in capsys.readouterr().err
    assert run_cli("rank", good_run, killed_run, "--out", str(tmp_path / "rank")) == 2
    assert "incomplete" in capsys.readouterr().err

    assert run_cli("gate", killed_run, *GATE_OK, "--allow-incomplete") == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "INCOMPLETE" in out
    assert run_cli("gate", killed_run, "--max", "bound/wang_mao_eq3=0.1", "--allow-incomplete") == 1
    capsys.readouterr()
    assert run_cli("report", killed_run, "--out", str(tmp_path / "rep"), "--allow-incomplete") == 0
    assert "INCOMPLETE" in (tmp_path / "rep" / "summary.md").read_text()
    assert run_cli("compare", good_run, killed_run, "--allow-incomplete") == 0
    assert "INCOMPLETE" in capsys.readouterr().out


# --- gate semantics ---------------------------------------------------------------------------------
def test_nan_final_value_is_a_violation(tmp_path, capsys):
    scalars = standard_scalars()
    scalars["bound/neu"][-1] = (END, float("nan"))
    run = write_tb_run(tmp_path / "nan_run", scalars)
    assert run_cli("gate", run, "--max", "bound/neu=10", "--max", "bound/wang_mao_eq3=10") == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith(("FAIL bound/neu ", "ok   bound/neu ")))
    assert "FAIL" in line and "nan: the final value (step 300) is NaN" in line
    assert run_cli("gate", run, "--max", "bound/neu=10", "--lenient", "nan") == 0
    assert "warn" in capsys.readouterr().out


@pytest.mark.parametrize("value, rule", [(float("-inf"), "bound/neu=10"), (float("inf"), "bound/neu=-1")])
def test_an_infinite_final_value_is_a_violation_even_when_nan_is_lenient(tmp_path, capsys, value, rule):
    """A −inf upper bound passed ``--max`` and a +inf value passed ``--min`` (a new user's walk,
    round 33): no bound or measurement is infinite where it holds."""
    scalars = standard_scalars()
    scalars["bound/neu"][-1] = (END, value)
    run = write_tb_run(tmp_path / "inf_run", scalars)
    flag = "--max" if value < 0 else "--min"
    assert run_cli("gate", run, flag, rule, "--lenient", "nan") == 1
    out = capsys.readouterr().out
    assert f"infinite: the final value (step {END}) is" in out


def test_the_trainer_gate_fails_an_infinite_value():
    from genbounds.callbacks.bound_gate import check_thresholds

    got = check_thresholds({"bound/neu": float("-inf"), "val_acc": float("inf")}, max={"bound/neu": 5.0},
                           min={"val_acc": 0.9}, lenient=("nan", "missing"))
    assert [(v["metric"], v["reason"]) for v in got] == [("bound/neu", "infinite"), ("val_acc", "infinite")]


def test_stale_value_is_a_violation_naming_the_step(tmp_path, capsys):
    scalars = standard_scalars()
    scalars["bound/neu"] = [(s, v) for s, v in scalars["bound/neu"] if s <= 120]
    run = write_tb_run(tmp_path / "stale_run", scalars)
    assert run_cli("gate", run, "--max", "bound/neu=10") == 1
    out = capsys.readouterr().out
    assert "stale: last logged at step 120, run ended at step 300" in out
    assert run_cli("gate", run, "--max", "bound/neu=10", "--lenient", "stale") == 0
    assert "lenient: stale" in capsys.readouterr().out
    # a lenient stale value is still compared with its limit
    assert run_cli("gate", run, "--max", "bound/neu=0.01", "--lenient", "stale") == 1
    assert "--stale-tolerance" not in capsys.readouterr().out
    assert run_cli("gate", run, "--max", "bound/neu=10", "--stale-tolerance", "200") == 0


def test_missing_metric_is_a_violation_with_suggestions(good_run, capsys):
    assert run_cli("gate", good_run, "--max", "bound/wang_mao_eq4=1") == 1
    out = capsys.readouterr().out
    assert "missing" in out and "did you mean bound/wang_mao_eq3" in out and "available under bound/" in out
    assert run_cli("gate", good_run, "--max", "bound/wang_mao_eq4=1", "--lenient", "missing") == 0


def test_threshold_values(good_run, capsys):
    assert run_cli("gate", good_run, "--max", "bound/neu=nan") == 2
    assert "NaN limit" in capsys.readouterr().err
    assert run_cli("gate", good_run, "--max", "bound/neu=inf", "--min", "gap/measured=-inf") == 0
    assert run_cli("gate", good_run) == 2  # no threshold at all


def test_gate_parent_folder_pass_and_fail_per_run(tmp_path, capsys):
    root = tmp_path / "digits_mlp"
    write_tb_run(root / "version_0", standard_scalars(1.0), {"lr": 0.1, "label_noise": 0.0})
    write_tb_run(root / "version_1", standard_scalars(4.0), {"lr": 0.1, "label_noise": 0.4})
    assert run_cli("gate", str(tmp_path), "--max", "bound/wang_mao_eq3=1") == 1
    out = capsys.readouterr().out
    assert re.search(r"^PASS digits_mlp/version_0 \(label_noise=0\)", out, re.M)
    assert re.search(r"^FAIL digits_mlp/version_1 \(label_noise=0\.4\)", out, re.M)
    assert "1.6 > max 1" in out and "run 1" not in out
    assert run_cli("gate", str(root), "--max", "bound/wang_mao_eq3=1", "--format", "json") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 1
    assert [(r["run"], r["status"]) for r in data["runs"]] == [("version_0", "PASS"), ("version_1", "FAIL")]
    assert data["runs"][1]["checks"][0]["value"] == pytest.approx(1.6)
    assert run_cli("gate", str(root), "--max", "bound/wang_mao_eq3=1", "--format", "csv") == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["run"], r["verdict"], r["check"]) for r in rows] == [("version_0", "PASS", "pass"),
                                                                  ("version_1", "FAIL", "fail")]


def test_json_keeps_nan_parseable(tmp_path, capsys):
    scalars = standard_scalars()
    scalars["bound/neu"][-1] = (END, float("nan"))
    run = write_tb_run(tmp_path / "nan_run", scalars)
    assert run_cli("gate", run, "--max", "bound/neu=1", "--format", "json") == 1
    data = json.loads(capsys.readouterr().out)
    check = data["runs"][0]["checks"][0]
    assert check["value"] == "nan" and check["status"] == "fail" and check["reason"].startswith("nan")


# --- CSVLogger runs -----------------------------------------------------------------------------------
def _six_digits(scalars):
    """Values with 6 significant digits: a TensorBoard scalar (float32, read back as its shortest
    decimal) and a CSV cell then hold the same number."""
    return {tag: [(s, float(f"{v:.6g}")) for s, v in pts] for tag, pts in scalars.items()}


@pytest.fixture
def twin_runs(tmp_path):
    """The same training logged twice: TensorBoard and CSVLogger (two runs each, varying label noise)."""
    out = {"tb": [], "csv": []}
    for i, noise in enumerate((0.0, 0.4)):
        scalars = _six_digits(standard_scalars(1.0 + 3 * noise))
        scalars["bound/neu"][-1] = (END, float("nan"))
        hparams = {"run_name": f"noise{noise}", "model": {"lr": 0.1}, "data": {"label_noise": noise, "batch_size": 32}}
        out["tb"].append(write_tb_run(tmp_path / "tb" / f"version_{i}", scalars, hparams))
        out["csv"].append(write_csv_run(tmp_path / "csv", "exp", scalars, hparams, version=i))
    return out


def test_csv_reader_reads_every_sparse_column(twin_runs):
    tb, cs = read_run_dir(twin_runs["tb"][1]), read_run_dir(twin_runs["csv"][1])
    assert cs.source == "csv" and tb.source == "tensorboard"
    assert set(tb.scalars) <= set(cs.scalars) and set(cs.scalars) - set(tb.scalars) <= {"epoch"}
    for tag in tb.scalars:
        assert tb.series(tag)[0] == cs.series(tag)[0], tag
        assert all(a == b or (math.isnan(a) and math.isnan(b))
                   for a, b in zip(tb.series(tag)[1], cs.series(tag)[1])), tag
    assert cs.hparams == tb.hparams == {"run_name": "noise0.4", "model/lr": 0.1, "data/label_noise": 0.4,
                                        "data/batch_size": 32}
    assert cs.complete and cs.end_step == END


def test_csv_and_tensorboard_give_the_same_verdicts(twin_runs, tmp_path, capsys):
    gate = ("--max", "bound/wang_mao_eq3=0.5", "--max", "bound/neu=1", "--min", "gap/measured=0", "--format", "json")
    results = {}
    for kind, runs in twin_runs.items():
        code = run_cli("gate", *runs, *gate)
        data = json.loads(capsys.readouterr().out)
        results[kind] = (code, [(r["run"], r["label"], r["status"],
                                 [(c["metric"], c["value"], c["status"], c["reason"]) for c in r["checks"]])
                                for r in data["runs"]])
    assert results["tb"] == results["csv"]
    code, runs = results["tb"]
    assert code == 1 and [r[2] for r in runs] == ["FAIL", "FAIL"]  # bound/neu is NaN at the end in both
    assert runs[1][1] == "noise0.4 (data/label_noise=0.4)"
    compared = {}
    for kind, runs in twin_runs.items():
        assert run_cli("compare", *runs, "--format", "json") == 0
        data = json.loads(capsys.readouterr().out)
        compared[kind] = [(m["metric"], m["run"], m["value"], m["se"]) for m in data["metrics"]]
    assert compared["tb"] == compared["csv"]
    ranked = {}
    for kind, runs in twin_runs.items():
        assert run_cli("rank", *runs, "--format", "json", "--out", str(tmp_path / kind)) == 0
        data = json.loads(capsys.readouterr().out)
        ranked[kind] = [(m["metric"], m["tau"], m["psi"], m["note"]) for m in data["metrics"] if m["metric"] != "epoch"]
    assert ranked["tb"] == ranked["csv"]
    assert run_cli("report", twin_runs["csv"][0], "--out", str(tmp_path / "rep")) == 0
    assert "| `bound/wang_mao_eq3` |" in (tmp_path / "rep" / "summary.md").read_text()


def test_csv_cut_mid_row_or_ragged_is_corrupt(twin_runs, capsys):
    run = twin_runs["csv"][0]
    path = os.path.join(run, "metrics.csv")
    blob = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(blob[: len(blob) - 7])  # cut inside the last row: no line terminator
    with pytest.raises(CorruptRun, match=r"metrics\.csv: corrupt CSV at line \d+ \(byte \d+\): the last line"):
        read_run_dir(run)
    assert run_cli("gate", run, *GATE_OK) == 2
    assert "metrics.csv" in capsys.readouterr().out
    lines = blob.decode().splitlines(keepends=True)
    lines[5] = lines[5].replace(",", "", 1)  # one field short
    with open(path, "w", newline="") as fh:
        fh.write("".join(lines))
    with pytest.raises(CorruptCSV) as info:
        read_metrics_csv(path)
    assert info.value.line == 6 and info.value.offset == len("".join(lines[:5]).encode())


def test_folder_with_both_formats_is_one_run(tmp_path):
    from genbounds.reporting import find_runs

    scalars = standard_scalars()
    run = write_csv_run(tmp_path, "both", scalars, {"lr": 0.1}, version=0)
    write_tb_run(run, scalars)
    assert find_runs(str(tmp_path)) == [os.path.normpath(run)]
    assert read_run_dir(run).source == "tensorboard"
    with open(_event_file(run), "r+b") as fh:  # the event file cut: the intact CSV table is used, with a note
        fh.truncate(1000)
    fallback = read_run_dir(run)
    assert fallback.source == "csv" and "TensorBoard event files not used" in fallback.notes[0]


def test_hparams_from_the_plugin_alone(tmp_path):
    run = write_tb_run(tmp_path / "r", standard_scalars(), {"lr": 0.05, "optimizer": "SGD", "nesterov": True,
                                                            "batch_size": 64}, hparams_in=("plugin",))
    assert not os.path.exists(os.path.join(run, "hparams.yaml"))
    assert read_run_dir(run).hparams == {"lr": 0.05, "optimizer": "SGD", "nesterov": True, "batch_size": 64}


def test_add_hparams_subfolder_is_merged_into_its_run(tmp_path, capsys):
    """``SummaryWriter.add_hparams`` writes the HParams into a timestamped sub-folder of the run."""
    from torch.utils.tensorboard import SummaryWriter

    for i, noise in enumerate((0.0, 0.2)):
        run = write_tb_run(tmp_path / f"version_{i}", standard_scalars(1 + i))
        with SummaryWriter(log_dir=run) as writer:
            writer.add_hparams({"label_noise": noise, "optimizer": "SGD"}, {})
        assert len(glob.glob(os.path.join(run, "*", "events.out.tfevents.*"))) == 1
    assert run_cli("gate", str(tmp_path), "--max", "gap/measured=1", "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in data["runs"]] == ["version_0 (label_noise=0)", "version_1 (label_noise=0.2)"]


def test_the_users_hyperparameters_in_a_csv_loggers_hparams_yaml_keep_their_values(tmp_path):
    """A module whose ``save_hyperparameters()`` has keys the run's settings also use (``model``,
    ``optimizer``, ``n``, ``d``, ``lr``): the settings overwrote them in ``hparams.yaml``, and
    ``load_from_checkpoint(hparams_file=…)`` built another model (a new user's walk, round 32).
    The user's values stay; ours that differ go under ``genbounds/``."""
    import lightning.pytorch as pl
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier
    from helpers import bound_suite, trainer

    class Named(Classifier):
        def __init__(self, model="mlp", optimizer="adam", n=2, d=16, lr=0.1):
            super().__init__(MLP(64, 10, d), lr=lr)
            self.save_hyperparameters("model", "optimizer", "n", "d", "lr")

    logger = CSVLogger(str(tmp_path), name="run")
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, bound_suite(), logger=logger, max_epochs=1, limit_train_batches=4, limit_val_batches=2).fit(
        Named(), DigitsDataModule(batch_size=64))
    saved = yaml.safe_load(open(f"{logger.log_dir}/hparams.yaml"))
    assert {k: saved[k] for k in ("model", "optimizer", "n", "d", "lr")} == {
        "model": "mlp", "optimizer": "adam", "n": 2, "d": 16, "lr": 0.1}
    assert saved["genbounds/model"] == "Named" and saved["genbounds/optimizer"].startswith("SGD")
    assert saved["genbounds/d"] > 16 and "genbounds/lr" not in saved  # (the same value: one key)
