"""Loose ends from trying the suite on users' modules: wrong-signed bounds, non-SGD optimizers,
two dispersion callbacks, silent dead ends, torch.compile, other loggers, one clear error."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from genbounds.callbacks import GeneralizationBound, GradientDispersion, HessianTrace
from genbounds.cli import main
from genbounds.data import DigitsDataModule
from genbounds.models import MLP, Classifier
from genbounds.reporting import load_run
from helpers import bound_suite, trainer


class AutoEncoder(pl.LightningModule):
    """Written as Lightning's docs write it: no per_sample_loss, an MSE reconstruction loss."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 64))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        loss = F.mse_loss(self.decoder(self.encoder(x)), x)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", F.mse_loss(self.decoder(self.encoder(x)), x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, callbacks, module, seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    defaults = dict(max_epochs=2, limit_train_batches=5, limit_val_batches=2)
    defaults.update(kwargs)
    t = trainer(tmp_path, callbacks, **defaults)
    t.fit(module, DigitsDataModule(batch_size=64, seed=seed))
    return t


def aggregator(t):
    return next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))


def test_autoencoder_neu_is_never_a_silent_negative(tmp_path):
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path, bound_suite(), AutoEncoder(), max_epochs=3)
    latest = aggregator(t).latest
    for name in ("neu", "wang_mao_eq2", "wang_mao_eq3"):
        value, valid = latest[f"bound/{name}"], latest[f"bound_valid/{name}"]
        assert (math.isfinite(value) and value >= latest["gap/measured"]) or valid == 0.0, name
        if valid == 0.0:  # flagged, and said
            assert any(f"bound/{name}" in str(w.message) for w in caught), name
    assert latest["bound/neu_abs"] >= 0


def test_adam_is_flagged_a_heuristic_in_the_record_and_the_summary(tmp_path, capsys):
    class AdamClassifier(Classifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    t = fit(tmp_path, bound_suite(), AdamClassifier(MLP(64, 10, 16)))
    latest = aggregator(t).latest
    assert latest["bound/heuristic"] == 1.0
    assert all(f"bound_valid/{n}" in latest for n in ("wang_mao_eq2", "wang_mao_eq3", "neu"))
    assert "not plain SGD" in capsys.readouterr().out


def test_plain_sgd_with_clipping_is_said_as_clipping_in_the_summary(tmp_path, capsys):
    """Plain SGD with ``gradient_clip_val``: a heuristic for the clipping, which the summary says
    (it read "SGD: not plain SGD", a new user's walk, round 31)."""
    t = fit(tmp_path, bound_suite(), Classifier(MLP(64, 10, 16)), gradient_clip_val=0.01)
    assert aggregator(t).latest["bound/heuristic"] == 1.0
    out = capsys.readouterr().out
    assert "with gradient clipping: the step is not" in out and "not plain SGD" not in out


def test_a_missing_producers_note_is_said_once_a_fit(tmp_path):
    """Without ``HeldoutGradient`` Neu's ``V_t`` takes ``grad/dispersion``: said once a fit (it
    was said at setup and again at the run's start, a new user's walk, round 31), and again in
    another Trainer's fit of the same callbacks."""
    from genbounds.callbacks import HeldoutGradient

    suite = [cb for cb in bound_suite() if not isinstance(cb, HeldoutGradient)]
    for run in ("a", "b"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(tmp_path / run, suite, Classifier(MLP(64, 10, 16)), max_epochs=1)
        assert sum("no HeldoutGradient" in str(w.message) for w in caught) == 1, run


def test_bounds_left_out_for_want_of_callbacks_are_named_at_setup(tmp_path, caplog):
    """With ``bounds`` at its default, a bound whose callbacks are missing is not computed: one
    info line names it and what it needs (nothing said before: a new user's walk, round 31)."""
    import logging

    from genbounds.callbacks import HessianTrace as Trace

    suite = [cb for cb in bound_suite() if not isinstance(cb, Trace)]
    with caplog.at_level(logging.INFO):
        t = fit(tmp_path, suite, Classifier(MLP(64, 10, 16)), max_epochs=1)
    said = [r.getMessage() for r in caplog.records if "not computed" in r.getMessage()]
    assert len(said) == 1 and "wang_mao_eq3 (HessianTrace())" in said[0], said
    assert "bound/wang_mao_eq3" not in aggregator(t).latest and "bound/wang_mao_eq2" in aggregator(t).latest


def test_a_measured_module_pickles_and_copies_without_the_suites_objects(tmp_path):
    """``torch.save`` of a whole module the suite measured failed ("Can't pickle local object":
    the norm hooks kept on it, a review); now it pickles, during the fit and after, with builtins
    only in place of what the suite keeps on it, and a deep copy carries none of it either."""
    import copy
    import io

    from lightning.pytorch import Callback

    saved = []

    class SaveMidFit(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                buffer = io.BytesIO()
                torch.save(pl_module, buffer)
                saved.append(buffer.getvalue())

    module = Classifier(MLP(64, 10, 16))
    fit(tmp_path, [*bound_suite(), SaveMidFit()], module, max_epochs=1)
    keys = ("_genbounds_norm_hooks", "_genbounds_loss_contract", "_genbounds_trainable_set")
    assert all(module.__dict__.get(k) is not None for k in keys)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    for blob in (saved[0], buffer.getvalue()):
        assert b"genbounds.callbacks" not in blob  # (no class of the suite's; its keys hold None)
        loaded = torch.load(io.BytesIO(blob), weights_only=False)
        assert all(loaded.__dict__.get(k) is None for k in keys)
    twin = copy.deepcopy(module)
    assert all(twin.__dict__.get(k) is None for k in keys)


def test_a_failed_neu_abs_is_said_failed_in_the_summary():
    """``bound/neu_abs`` NaN (``bound_valid/neu_abs`` 0): its row says FAILED, as every other
    bound's (it printed a bare ``nan``, a new user's walk, round 31)."""
    from types import SimpleNamespace

    from genbounds.callbacks.run_summary import results_table

    latest = {"bound/neu": 1.0, "bound_valid/neu": 1.0, "bound/neu_abs": math.nan, "bound_valid/neu_abs": 0.0,
              "setting/R": 1.0}
    bound = SimpleNamespace(latest=latest, wanted=("neu",), headline="neu", R="quantile", plain_sgd=True,
                            optimizer="SGD", budget=None)
    fake = SimpleNamespace(global_step=3, loggers=[], callbacks=[bound], optimizers=[])
    text, _ = results_table(fake, bound)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("bound/neu_abs")]
    assert "FAILED" in line
    (line,) = [ln for ln in text.splitlines() if ln.startswith("bound/neu ")]
    assert "FAILED" not in line


def test_two_dispersion_callbacks_share_the_hooks_and_both_are_correct(tmp_path):
    every, second = GradientDispersion(every_n_steps=1), GradientDispersion(every_n_steps=2)
    a, b = [], []
    every.add_listener(a.extend)
    second.add_listener(b.extend)
    torch.manual_seed(0)  # the same initial weights for both runs
    fit(tmp_path / "two", [every, second], Classifier(MLP(64, 10, 16), lr=0.0))
    alone = GradientDispersion(every_n_steps=1)
    ref = []
    alone.add_listener(ref.extend)
    torch.manual_seed(0)
    fit(tmp_path / "one", [alone], Classifier(MLP(64, 10, 16), lr=0.0))
    assert every.active_backend == second.active_backend == "hooks"
    assert [r.step for r in b] == [r.step for r in ref][::2] and len(a) == len(ref) == 10
    for got, want in zip(a, ref):
        assert got.values["grad/dispersion"] == pytest.approx(want.values["grad/dispersion"], rel=1e-9)
    for got in b:
        want = next(r for r in ref if r.step == got.step)
        assert got.values["grad/dispersion"] == pytest.approx(want.values["grad/dispersion"], rel=1e-9)


def test_the_shared_read_is_not_modified_by_its_readers():
    """Callbacks sharing the hooks get one cached read of a backward: the per-step path (raw sums)
    and the general path (scaled group sums) both leave it as it was."""
    from genbounds.callbacks.dispersion.base import StepContext
    from genbounds.callbacks.dispersion.norm_hooks import HookSums, NormHooksBackend

    torch.manual_seed(0)
    module = Classifier(MLP(6, 3, 5), num_classes=3)
    net = module.network
    ghost = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    backends = [NormHooksBackend(ghost, {}, {n: i for i, n in enumerate(ghost)}, len(ghost), False) for _ in range(2)]
    for backend in backends:
        backend.attach(module)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    params = list(net.parameters())
    groups = [[2 * i, 2 * i + 1] for i in range(len(ghost))]

    class _Trainer:
        world_size = 1

    ctx = [StepContext(_Trainer(), module, params, groups, (x, y), 8, 1, 1.0, {}, partition) for partition in (True, False)]
    for backend, c in zip(backends, ctx):
        backend.before_forward(c)
    for backend, c in zip(backends, ctx):  # (as the callback does: a backward is announced)
        backend.before_backward(c)
    torch.nn.functional.cross_entropy(module(x), y).backward()
    shared = backends[0].shared
    cached = shared.read()[0].clone()
    raw, general = (backend.after_backward(c) for backend, c in zip(backends, ctx))
    assert isinstance(raw, HookSums) and not isinstance(general, HookSums)
    assert torch.equal(shared.read()[0], cached) and torch.equal(raw.sums, cached)
    assert float(general.weighted_sq_norm_sum) == pytest.approx(float(cached.sum()) * 64, rel=1e-12)
    for backend in backends:
        backend.detach()


def test_hessian_trace_without_schedule_or_aggregator_warns_at_setup(tmp_path):
    with pytest.warns(UserWarning, match="HessianTrace has no schedule .* will never run"):
        fit(tmp_path, [HessianTrace(every_n_epochs=None, at_train_end=False)], Classifier(MLP(64, 10, 8)),
            max_epochs=1, limit_train_batches=1)


def test_gate_and_report_read_a_csv_logger_run_like_a_tensorboard_run(tmp_path, capsys):
    tb = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    csv = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, bound_suite(), Classifier(MLP(64, 10, 16), lr=0.05), logger=[tb, csv])
    runs = {"tb": load_run(tb.log_dir), "csv": load_run(csv.log_dir)}
    for tag in ("bound/wang_mao_eq3", "bound/neu", "gap/measured", "setting/R", "grad/dispersion"):
        assert runs["csv"].final(tag) == pytest.approx(runs["tb"].final(tag), rel=1e-6), tag

    def gate(path: str) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(["gate", path, "--max", "bound/wang_mao_eq3=1e-9", "--min", "gap/measured=-10"])
        return int(info.value.code), capsys.readouterr().out

    code_tb, out_tb = gate(tb.log_dir)
    code_csv, out_csv = gate(csv.log_dir)
    assert code_tb == code_csv == 1 and "FAIL" in out_tb and "FAIL" in out_csv
    with pytest.raises(SystemExit) as info:
        main(["report", csv.log_dir, "--out", str(tmp_path / "report")])
    assert info.value.code == 0


def test_one_error_names_every_callback_that_needs_a_loss(tmp_path):
    class NoLoss(Classifier):
        per_sample_loss = None  # type: ignore[assignment]

        def training_step(self, batch, batch_idx):
            return None  # skips every step: nothing to measure a loss on

    t = trainer(tmp_path, bound_suite(), max_steps=2)
    with pytest.raises(MisconfigurationException) as err:
        t.fit(NoLoss(MLP(64, 10, 8)), DigitsDataModule())
    text = str(err.value)
    for owner in ("GradientDispersion", "HeldoutGradient", "GradientSensitivity", "Flatness", "HessianTrace",
                  "GeneralizationBound"):
        assert owner in text, owner
    assert "per_sample_loss" in text and "loss_fn" in text and t.global_step == 0


@pytest.mark.slow
def test_a_compiled_module_fits_twice_without_a_spurious_fallback(tmp_path):
    module = Classifier(MLP(64, 10, 16), lr=0.05)
    compiled = torch.compile(module, backend="eager")
    for run in range(2):
        cb = GradientDispersion()
        records = []
        cb.add_listener(records.extend)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = trainer(tmp_path / str(run), [cb], max_steps=4)
            t.fit(compiled, DigitsDataModule(batch_size=32))
        messages = [str(w.message) for w in caught]
        assert not any("no per-sample norms" in m or "received no gradient" in m for m in messages), messages
        assert cb.active_backend in ("functorch", "microbatch") and len(records) == 4
        assert all(math.isfinite(r.values["grad/dispersion"]) and r.values["grad/dispersion"] > 0 for r in records)
        assert sum("torch.compile" in m for m in messages) == 1  # said once, explicitly


@pytest.mark.parametrize("head_first", [False, True])
def test_parameter_groups_at_other_rates_take_the_largest_and_are_a_heuristic(tmp_path, head_first):
    """Plain SGD whose parameter groups have different learning rates (a body and a head): the
    bounds took the first group's η_t — 14× apart with the groups listed in the other order, and
    flagged exact (a new user's walk, round 32). Now η_t is the largest group's, whatever the
    order, the bounds are flagged heuristics, and the warning says why."""
    class TwoRates(Classifier):
        def configure_optimizers(self):
            body = {"params": self.network.net[1].parameters(), "lr": 0.01}
            head = {"params": self.network.net[3].parameters(), "lr": 0.5}
            return torch.optim.SGD([head, body] if head_first else [body, head])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path, bound_suite(), TwoRates(MLP(64, 10, 16)))
    bound = aggregator(t)
    assert bound.latest["bound/heuristic"] == 1.0
    assert set(bound.series.lrs) == {0.5}
    said = [str(w.message) for w in caught if "lr per group" in str(w.message)]
    assert len(said) == 1 and "the largest group's learning rate" in said[0]


@pytest.mark.parametrize("kinds", [("csv", "tb"), ("csv",)])
def test_the_summary_points_tensorboard_at_a_tensorboard_loggers_folder(tmp_path, capsys, kinds):
    """A CSVLogger listed before a TensorBoardLogger: the summary's ``next: tensorboard --logdir``
    named the CSV folder, which holds no event files (a new user's walk, round 32). It names each
    logger's folder, points TensorBoard at the TensorBoardLogger's, and suggests no TensorBoard
    without one."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(str(tmp_path), name="csv_run")] + (
        [TensorBoardLogger(str(tmp_path), name="tb_run")] if "tb" in kinds else [])
    fit(tmp_path, bound_suite(), Classifier(MLP(64, 10, 16)), logger=loggers)
    out = capsys.readouterr().out
    logs = next(line for line in out.splitlines() if line.startswith("logs: "))
    nxt = next(line for line in out.splitlines() if line.startswith("next: "))
    assert logs.count("version_0") == len(kinds)
    if "tb" in kinds:
        assert f"tensorboard --logdir {tmp_path / 'tb_run'}" in nxt
    else:
        assert "tensorboard" not in nxt and "genbounds report" in nxt


def test_the_final_bounds_reach_callback_metrics_under_a_budget(tmp_path):
    """Under ``overhead_budget`` the final evaluation at the train end writes to the loggers
    directly (``pl_module.log`` cannot run there): the final bounds were missing from
    ``trainer.callback_metrics`` after ``fit`` (an Optuna objective reading it got ``KeyError``; a
    new user's walk, round 32). They are there, equal to the summary's."""
    t = fit(tmp_path, bound_suite(overhead_budget=0.2), Classifier(MLP(64, 10, 16)))
    latest = aggregator(t).latest
    import math

    for key in ("bound/wang_mao_eq3", "bound/neu", "gap/measured"):  # (Neu: NaN when one Γ probe stands for the run)
        got = float(t.callback_metrics[key])
        assert got == latest[key] or (math.isnan(got) and math.isnan(latest[key])), key


def test_the_summary_says_a_probe_without_held_out_data_had_none(tmp_path, capsys):
    """No validation loader: the held-out probes are disabled before step 0 (said then), and the
    summary said their "schedule never let it run" (a new user's walk, round 32); it says there was
    no held-out data."""
    from genbounds.data import DigitsDataModule

    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, bound_suite(), max_epochs=1, limit_train_batches=5).fit(
            Classifier(MLP(64, 10, 16)), data.train_dataloader())
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("not measured in this run"))
    assert "HeldoutGradient" in line and "no held-out data" in line and "schedule" not in line
