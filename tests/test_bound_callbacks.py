"""GeneralizationBound and BoundGate in real runs: setup checks, gating, resume, DDP, TensorBoard."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import sys
import time
import warnings

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from genbounds.callbacks import BoundGate, BoundViolation, GeneralizationBound, GradientDispersion
from genbounds.data import DigitsDataModule
from genbounds.models import MLP, Classifier
from helpers import (EndProcessGroup, RankBranchNet, RankGatedNet, RankSubsetNet, RecordDispersion,
                     RecordFinalStep, RecordSecondOrder, bound_suite, trainer)

BOUND_TAGS = ["bound/wang_mao_eq2", "bound/wang_mao_eq3", "bound/neu", "bound/neu_abs", "setting/R", "setting/n",
              "setting/d", "setting/T", "gap/measured", "gap/measured_se", "gap/error", "bound_terms/trajectory_wang_mao",
              "bound_terms/flatness_wang_mao", "bound_terms/trajectory_neu", "bound_terms/sigma_neu",
              "bound_terms/sigma_wang_mao_eq2", "bound_terms/trajectory_factor_wang_mao_eq3",
              "bound_terms/flatness_factor_wang_mao_eq3", "bound/wang_mao_eq2_error", "bound/neu_error",
              "bound/test_error_upper", "bound/wang_mao_eq2_layerwise", "bound/wang_mao_eq3_layerwise",
              "bound/neu_layerwise", "bound/valid", "bound/heuristic"]


def small_fit(tmp_path, callbacks, max_epochs=2, ckpt_path=None, seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    module = Classifier(MLP(64, 10, 32), lr=0.05, **kwargs.pop("module_kwargs", {}))
    defaults = dict(max_epochs=max_epochs, limit_train_batches=5, limit_val_batches=2)
    defaults.update(kwargs)
    t = trainer(tmp_path, callbacks, **defaults)
    t.fit(module, DigitsDataModule(batch_size=64, seed=seed), ckpt_path=ckpt_path)
    return t, module


def test_setup_names_the_missing_producers(tmp_path):
    with pytest.raises(MisconfigurationException) as err:
        small_fit(tmp_path, [GradientDispersion(), GeneralizationBound()])
    text = str(err.value)
    assert 'Flatness(scaling="sqrt_steps")' in text and "HessianTrace()" in text and "GradientSensitivity" in text
    # restricting the bounds restricts what is needed
    with pytest.raises(MisconfigurationException, match="HessianTrace"):
        small_fit(tmp_path, [GradientDispersion(), GeneralizationBound(bounds=["wang_mao_eq3"])])


def test_sigma_grids_must_agree(tmp_path):
    suite = bound_suite()
    suite[2].sigmas = [0.5]
    with pytest.raises(MisconfigurationException, match="same σ grid"):
        small_fit(tmp_path, suite)


def test_bounds_are_logged_and_monitorable(tmp_path):
    from genbounds.callbacks.run_summary import TOP_LEVEL_SETTINGS, run_settings

    early = EarlyStopping(monitor="bound/wang_mao_eq3", mode="min", patience=100, check_finite=True)
    t, module = small_fit(tmp_path, [*bound_suite(), early])
    for tag in BOUND_TAGS:
        assert tag in t.callback_metrics, tag  # pl_module.log: EarlyStopping/ModelCheckpoint can use them
    agg = next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))
    assert agg.latest["setting/T"] == 10 and agg.latest["setting/n"] == 1258
    assert agg.latest["bound/wang_mao_eq3"] > 0 and agg.optimizer == "SGD"
    # every un-namespaced setting the run writes is one `genbounds report` keeps (the list is not
    # derived from run_settings: this keeps the two from drifting apart)
    bare = {k for k in run_settings(t, module, agg) if "/" not in k}
    assert "seed" in bare and bare <= set(TOP_LEVEL_SETTINGS), bare - set(TOP_LEVEL_SETTINGS)


def test_non_sgd_optimizer_warns_once_and_is_recorded(tmp_path):
    with pytest.warns(UserWarning, match="not plain SGD") as caught:
        t, _ = small_fit(tmp_path, bound_suite(), module_kwargs={"momentum": 0.9})
    assert sum("not plain SGD" in str(w.message) for w in caught) == 1
    agg = next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))
    assert agg.optimizer == "SGD(momentum=0.9)"


@pytest.mark.parametrize("mode", ["warn", "stop", "raise"])
def test_bound_gate_actions(tmp_path, mode):
    gate = BoundGate(max={"bound/wang_mao_eq3": 1e-9}, on_violation=mode)
    if mode == "raise":
        with pytest.raises(BoundViolation, match="bound/wang_mao_eq3"):
            small_fit(tmp_path, [*bound_suite(), gate], max_epochs=4)
        return
    if mode == "warn":
        with pytest.warns(UserWarning, match="threshold violated") as caught:
            t, _ = small_fit(tmp_path, [*bound_suite(), gate], max_epochs=3)
        assert sum("BoundGate" in str(w.message) for w in caught) == 1  # warned once
        assert t.current_epoch == 3 and len(gate.violations) == 4  # 3 validations + the final values
        assert gate.verdict().startswith("FAIL") and " > max 1e-09)" in gate.verdict()  # (the limit said)
    else:
        t, _ = small_fit(tmp_path, [*bound_suite(), gate], max_epochs=4)
        assert t.global_step == 5 and gate.stopped_step == 5  # stopped after the first validation
    assert gate.violations[0]["metric"] == "bound/wang_mao_eq3" and gate.violations[0]["kind"] == "max"
    restored = BoundGate(max={"bound/wang_mao_eq3": 1e-9}, on_violation=mode)
    restored.load_state_dict(gate.state_dict())
    assert restored.violations == gate.violations


def test_bound_gate_passes_and_skips_fast_dev_run(tmp_path):
    ok = BoundGate(max={"bound/wang_mao_eq3": 1e9}, min={"bound/wang_mao_eq3": 0.0}, on_violation="raise")
    t, _ = small_fit(tmp_path, [*bound_suite(), ok])
    assert ok.checks == 3 and not ok.violations and ok.verdict().startswith("PASS")
    skipped = BoundGate(max={"val_loss": -1.0}, on_violation="raise")
    small_fit(tmp_path / "fdr", [skipped], fast_dev_run=2)
    assert skipped.checks == 0
    with pytest.raises(MisconfigurationException):
        BoundGate()


def test_resume_gives_the_same_final_bounds(tmp_path):
    """2 epochs, checkpoint, resume for 2 more == 4 uninterrupted epochs (same seed)."""
    full, _ = small_fit(tmp_path / "full", bound_suite(), max_epochs=4)
    ckpt_dir = tmp_path / "ckpt"
    small_fit(tmp_path / "first", [*bound_suite(), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
              max_epochs=2, enable_checkpointing=True)
    resumed, _ = small_fit(tmp_path / "second", bound_suite(), max_epochs=4, ckpt_path=str(ckpt_dir / "last.ckpt"))

    def bounds(t):
        agg = next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))
        return {k: v for k, v in agg.latest.items() if k.startswith(("bound/", "gap/"))}

    a, b = bounds(full), bounds(resumed)
    assert a.keys() == b.keys() and len(a) > 20
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), key


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """Same data: 1 process with batch 32 vs 2 processes with 16 each. Lightning's distributed
    sampler (seeded by seed_everything) draws the permutation EpochSeededSampler draws, and the
    ranks' interleaved halves make up the same global batches."""

    def run(devices, batch, directory):
        pl.seed_everything(0, verbose=False)
        module = Classifier(MLP(64, 10, 32), lr=0.05)
        gate = BoundGate(max={"bound/wang_mao_eq3": 1e9}, on_violation="stop")
        kwargs = dict(strategy="ddp_spawn") if devices > 1 else {}
        # a fixed Hutchinson count: with the adaptive stop, a rounding difference between the
        # one-process and the rank-averaged HVPs can stop the two runs one probe apart (a
        # difference of the order of the SE, not of 1e-4; it failed 1 run in 8)
        from genbounds.callbacks import HessianTrace

        suite = [HessianTrace(min_probes=8, max_probes=8, rel_tol=0.0, abs_tol=0.0, every_n_epochs=None,
                              at_train_end=False) if isinstance(cb, HessianTrace) else cb for cb in bound_suite()]
        t = trainer(directory, [*suite, gate, RecordFinalStep(str(directory)), EndProcessGroup()], devices=devices,
                    max_epochs=2, limit_train_batches=4, limit_val_batches=2, **kwargs)
        t.fit(module, DigitsDataModule(batch_size=batch, seed=0))
        return t

    os.makedirs(tmp_path / "one"), os.makedirs(tmp_path / "two")
    one = run(1, 32, tmp_path / "one")
    two = run(2, 16, tmp_path / "two")
    for key in ("bound/wang_mao_eq3", "bound/wang_mao_eq2", "setting/R", "curv/hessian_trace", "gap/measured",
                "bound/wang_mao_eq3_layerwise", "bound/wang_mao_eq2_layerwise", "bound/neu_layerwise"):
        a, b = float(one.callback_metrics[key]), float(two.callback_metrics[key])
        assert b == pytest.approx(a, rel=1e-4), key
    # per layer too: the moments' per-group sums were dropped by the ranks' reduction, so under DDP
    # no per-layer held-out distance was logged and the layer-wise bounds were NaN (a review)
    layers = [k for k in one.callback_metrics if "/layer/" in k and k.startswith(("grad/dispersion", "grad/heldout"))]
    assert {k.split("/layer/")[0] for k in layers} == {"grad/dispersion", "grad/heldout_dist_sq"}, layers
    for key in layers:
        a, b = float(one.callback_metrics[key]), float(two.callback_metrics[key])
        assert b == pytest.approx(a, rel=1e-4, abs=1e-9), key


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
@pytest.mark.slow
@pytest.mark.parametrize("one_size, two_size", [(48, 48), (46, 47)])
def test_ddp_probe_sets_of_a_given_size_are_the_one_process_sets(tmp_path, one_size, two_size):
    """``probe_batch_size`` counts samples in all: under DDP each process takes an equal share, so
    two processes probe the set one process probes (a size they do not divide, 47, is rounded down
    to 46: the processes' values are averaged with equal weights). It counted per process — a
    2-process run probed twice the samples and reported other values (a DDP matrix: Eq. 2 0.02313
    against 0.01724 with the main config's size)."""
    from genbounds.callbacks import Flatness, HeldoutGradient

    def run(devices, batch, directory):
        size = one_size if devices == 1 else two_size
        pl.seed_everything(0, verbose=False)
        suite = [Flatness(sigmas=[0.01, 0.1], num_draws=4, probe_batch_size=size, precision="float64",
                          every_n_epochs=1, at_train_end=False),
                 HeldoutGradient(every_n_steps=2, probe_batch_size=size)]
        kwargs = dict(strategy="ddp_spawn") if devices > 1 else {}
        t = trainer(directory, [*suite, EndProcessGroup()], devices=devices, max_epochs=1, limit_train_batches=4,
                    limit_val_batches=2, **kwargs)
        t.fit(Classifier(MLP(64, 10, 32), lr=0.05), DigitsDataModule(batch_size=batch, seed=0))
        return t.callback_metrics

    os.makedirs(tmp_path / "one"), os.makedirs(tmp_path / "two")
    one, two = run(1, 32, tmp_path / "one"), run(2, 16, tmp_path / "two")
    keys = [k for k in one if k.startswith(("flat/", "grad/heldout"))]
    assert len(keys) >= 8 and all(k in two for k in keys), sorted(set(one) ^ set(two))
    for key in keys:
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-4, abs=1e-9), key


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
@pytest.mark.slow
def test_ddp_per_sample_dispersion_and_its_standard_error_are_one_process_values(tmp_path):
    """``backend="functorch"`` under DDP: the dispersion was exact, but its standard error's terms
    were centred on each process's own mean (a DDP matrix: 0.1546 against 0.1409); they are centred
    on the processes' mean (DDP's averaged ``.grad``) now."""

    def run(devices, batch, directory):
        pl.seed_everything(0, verbose=False)
        kwargs = dict(strategy="ddp_spawn") if devices > 1 else {}
        t = trainer(directory, [GradientDispersion(backend="functorch"), EndProcessGroup()], devices=devices,
                    max_epochs=1, limit_train_batches=3, limit_val_batches=0, **kwargs)
        t.fit(Classifier(MLP(64, 10, 32), lr=0.05), DigitsDataModule(batch_size=batch, seed=0))
        return t.callback_metrics

    os.makedirs(tmp_path / "one"), os.makedirs(tmp_path / "two")
    one, two = run(1, 32, tmp_path / "one"), run(2, 16, tmp_path / "two")
    keys = [k for k in one if k.startswith("grad/")]
    assert "grad/trace_cov_se" in keys and all(k in two for k in keys), sorted(set(one) ^ set(two))
    for key in keys:
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-4, abs=1e-9), key


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
@pytest.mark.slow
def test_a_missing_second_derivative_in_one_ddp_process_disables_the_hessian_in_every_process(tmp_path):
    """Mid-fit, only rank 1 takes a branch without a second derivative (``RankGatedNet``): its
    Hessian-vector product raised, its probe left the Hessian out and went on, while rank 0 waited
    in the product's collective — the two processes' collectives no longer matched and the fit
    died (process 1 SIGABRT; a hang is the other way it ends, which the 2-minute timeout bounds).
    Now both processes reach every collective and leave the Hessian out together, rank 0 (which
    warns) with rank 1's reason, and the fit runs to its end."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    pl.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [*bound_suite(), RecordFinalStep(str(tmp_path)), RecordSecondOrder(str(tmp_path)),
                           EndProcessGroup()], devices=2,
                strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
                max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    t.fit(RankGatedNet(late=2), DigitsDataModule(batch_size=16, seed=0))
    steps = {os.path.basename(p): open(p).read() for p in sorted(glob.glob(str(tmp_path / "rank?.txt")))}
    assert steps == {"rank0.txt": "6", "rank1.txt": "6"}, steps
    said = {os.path.basename(p): open(p).read() for p in sorted(glob.glob(str(tmp_path / "rank?_second_order.txt")))}
    assert "hardsigmoid_backward" in said["rank0_second_order.txt"], said
    assert said["rank0_second_order.txt"].endswith("(in process 1)"), said
    assert "hardsigmoid_backward" in said["rank1_second_order.txt"], said
    assert math.isnan(float(t.callback_metrics.get("bound/wang_mao_eq3", float("nan"))))


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
@pytest.mark.slow
def test_a_branch_one_ddp_process_leaves_unused_keeps_every_process_measuring_alike(tmp_path):
    """From step 2, only rank 1 leaves a called block's output unused (``RankBranchNet``): its
    hooks' read gave nothing, rank 1 alone left the step unmeasured and went to an extra pass, and
    the processes' collectives no longer matched — the fit waited until the process group's timeout
    (60 s here). The unused call adds zero, but under DDP the block's weights hold the processes'
    average in ``.grad``, which the read cannot tell from gradient that came another way: rank 1's
    step is failed, skipped in both, and both fall back together at the next flush."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    pl.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [GradientDispersion(), RecordFinalStep(str(tmp_path)), RecordDispersion(str(tmp_path)),
                           EndProcessGroup()], devices=2,
                strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True,
                                     timeout=timedelta(seconds=60)),
                max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    t.fit(RankBranchNet(late=2), DigitsDataModule(batch_size=16, seed=0))
    steps = {os.path.basename(p): open(p).read() for p in sorted(glob.glob(str(tmp_path / "rank?.txt")))}
    assert steps == {"rank0.txt": "6", "rank1.txt": "6"}, steps
    measured = {os.path.basename(p): open(p).read() for p in sorted(glob.glob(str(tmp_path / "rank?_dispersion.txt")))}
    assert measured["rank0_dispersion.txt"] == measured["rank1_dispersion.txt"], measured
    assert math.isfinite(float(t.callback_metrics["grad/dispersion/layer/mid"]))


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
@pytest.mark.slow
@pytest.mark.parametrize("late", [0, 2])
def test_hooks_failing_in_one_ddp_process_fall_back_in_every_process_together(tmp_path, late):
    """From step 2, only rank 1 applies a layer to part of its batch (``RankSubsetNet``): its hooks
    fail there, rank 1 alone went to an extra pass and the other process waited in the step's
    reduction until the process group's timeout (a matrix, round 30). Now rank 1 enters the
    reduction with NaN moments flagged failed, the step is skipped in both, and both fall back
    at the next flush, with rank 1's reason in rank 0's one warning. From step 0 the check before
    step 0 sees it in rank 1's first batch only: the processes' verdicts are agreed (rank 1 alone
    went to an extra pass, and gloo aborted: a review)."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    pl.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [GradientDispersion(), RecordFinalStep(str(tmp_path)), RecordDispersion(str(tmp_path)),
                           EndProcessGroup()], devices=2,
                strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
                max_epochs=2, limit_train_batches=3, limit_val_batches=0, log_every_n_steps=2)
    t.fit(RankSubsetNet(late=late), DigitsDataModule(batch_size=16, seed=0))
    steps = {os.path.basename(p): open(p).read() for p in sorted(glob.glob(str(tmp_path / "rank?.txt")))}
    assert steps == {"rank0.txt": "6", "rank1.txt": "6"}, steps
    measured = {os.path.basename(p): open(p).read() for p in sorted(glob.glob(str(tmp_path / "rank?_dispersion.txt")))}
    assert measured["rank0_dispersion.txt"] == measured["rank1_dispersion.txt"], measured
    assert measured["rank0_dispersion.txt"].startswith("functorch "), measured
    assert math.isfinite(float(t.callback_metrics["grad/dispersion"]))


@pytest.mark.slow
def test_bound_gate_stop_stops_every_ddp_rank(tmp_path):
    pl.seed_everything(0, verbose=False)
    gate = BoundGate(max={"bound/wang_mao_eq3": 1e-9}, on_violation="stop")
    t = trainer(tmp_path, [*bound_suite(), gate, RecordFinalStep(str(tmp_path)), EndProcessGroup()], devices=2, strategy="ddp_spawn",
                max_epochs=5, limit_train_batches=3, limit_val_batches=1)
    t.fit(Classifier(MLP(64, 10, 16), lr=0.05), DigitsDataModule(batch_size=16, shuffle=False))
    steps = {p: open(p).read() for p in sorted(glob.glob(str(tmp_path / "rank*.txt")))}
    assert len(steps) == 2 and set(steps.values()) == {"3"}, steps  # both ranks stopped after epoch 1


def test_tensorboard_layout_and_hparams(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    small_fit(tmp_path, bound_suite(), logger=logger)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = glob.glob(os.path.join(logger.log_dir, "events.out.tfevents*"))
    acc = EventAccumulator(path)
    acc.Reload()
    plugins = acc.PluginAssets("custom_scalars") if hasattr(acc, "PluginAssets") else None
    raw = open(path, "rb").read()
    assert b"bound vs gap/measured" in raw and b"trajectory vs flatness" in raw  # custom-scalars layout
    assert b"ci/bound/wang_mao_eq3_lower" in raw  # the ± SE margin charts
    assert b"hparams" in raw and b"bound/wang_mao_eq3" in raw and b"sigma_grid" in raw  # HPARAMS session
    assert "bound/wang_mao_eq3" in acc.Tags()["scalars"]
    del plugins


def test_the_tensorboard_layout_follows_a_freeze_at_the_fits_start(tmp_path):
    """A freeze at ``on_fit_start`` leaves one trained layer: no layer-wise bound is computed, yet
    the layout, written from the setup's groups, charted them (and the per-layer panels), empty
    all run. It is written at the first step now, from the groups and bounds settled there."""

    class FreezeAllButHead(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            params = list(pl_module.parameters())
            for p in params[:-2]:  # (the last Linear's weight and bias stay trained)
                p.requires_grad_(False)

    def layout(directory, extra):
        logger = TensorBoardLogger(str(directory), name="tb", default_hp_metric=False)
        agg = next(cb for cb in bound_suite() if isinstance(cb, GeneralizationBound))
        suite = [cb for cb in bound_suite() if not isinstance(cb, GeneralizationBound)]
        small_fit(directory, [*extra, *suite, agg], logger=logger, max_epochs=1)
        (path,) = glob.glob(os.path.join(logger.log_dir, "events.out.tfevents*"))
        return open(path, "rb").read(), agg

    raw, agg = layout(tmp_path / "all", [])
    assert b"bound/wang_mao_eq3_layerwise" in raw and b"dispersion per layer" in raw
    raw, agg = layout(tmp_path / "frozen", [FreezeAllButHead()])
    assert "wang_mao_eq3_layerwise" not in agg.wanted and b"bound vs gap/measured" in raw
    assert b"bound/wang_mao_eq3_layerwise" not in raw and b"dispersion per layer" not in raw


def test_given_r_without_validation_still_gives_the_bounds_that_need_no_heldout(tmp_path):
    # R given as a number: a run without a validation loader has it from the start (it was NaN
    # until a gap evaluation, which never came, so Eq. 3 was NaN although nothing held-out enters it)
    from genbounds.callbacks import HessianTrace

    agg = GeneralizationBound(bounds=["wang_mao_eq3"], R=1.0)
    small_fit(tmp_path, [GradientDispersion(backend="backpack"),
                         HessianTrace(min_probes=8, max_probes=24, every_n_epochs=None, at_train_end=False), agg],
              max_epochs=1, limit_val_batches=0)
    assert agg.latest["setting/R"] == 1.0
    assert math.isfinite(agg.latest["bound/wang_mao_eq3"]) and agg.latest["bound/wang_mao_eq3"] > 0
    assert math.isfinite(agg.latest["bound/wang_mao_eq3_se"])
    assert "gap/measured" not in agg.latest  # nothing held-out was measured


@pytest.mark.parametrize("watcher", ["early", "checkpoint"])
def test_a_monitor_of_a_bound_under_a_budget_is_refused_before_step_0(tmp_path, watcher):
    """With an overhead budget the bounds are evaluated only when affordable: Lightning's monitors
    would find no value at the first validations (EarlyStopping stopped the README's own snippet
    with "not available") and the last evaluation's value again afterwards. Refused at fit start,
    naming the monitor and the way out; a monitor of the user's own metric is untouched."""
    monitor = {"early": EarlyStopping(monitor="bound/wang_mao_eq3", mode="min"),
               "checkpoint": ModelCheckpoint(monitor="gap/measured", mode="min")}[watcher]
    steps: list[int] = []

    class CountSteps(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            steps.append(trainer.global_step)

    with pytest.raises(MisconfigurationException, match=r"overhead_budget=0\.2.*Remove overhead_budget") as err:
        small_fit(tmp_path, [*bound_suite(overhead_budget=0.2), monitor, CountSteps()], enable_checkpointing=True)
    assert f"{type(monitor).__name__}(monitor={monitor.monitor!r})" in str(err.value)
    assert steps == []  # refused before step 0
    t, _ = small_fit(tmp_path, [*bound_suite(overhead_budget=0.2), CountSteps(),
                                EarlyStopping(monitor="val_loss", mode="min", patience=100)], max_epochs=1)
    assert t.global_step == 5 and steps


def test_the_results_table_names_a_probe_that_never_ran(tmp_path, capsys):
    """A configured probe that never measured (its schedule never came, or the budget never
    afforded it) is named at the end — the main job's HessianContractivity(every_n_epochs=10)
    under its budget left no tag and no word. The producers the bounds asked for at the end
    (Flatness and HessianTrace with no schedule of their own) did run and are not named."""
    from genbounds.callbacks import HessianContractivity

    small_fit(tmp_path, [*bound_suite(), HessianContractivity(num_points=2, every_n_epochs=10, at_train_end=False)])
    out = capsys.readouterr().out
    assert "genbounds — final values at step 10" in out
    lines = [line for line in out.splitlines() if line.startswith("not measured in this run:")]
    assert lines == ["not measured in this run: HessianContractivity (its schedule never let it run)"], out
    small_fit(tmp_path, bound_suite())
    assert "not measured in this run" not in capsys.readouterr().out


def test_the_results_table_says_what_measuring_cost_and_why_it_is_over_the_budget(tmp_path, capsys):
    """The end-of-fit table says ``perf/overhead`` against the budget: the main job logged 0.20–0.23
    under ``overhead_budget: 0.2`` and said nothing of it at the end. Over the budget it says what
    runs whatever the budget affords; without one, that there is none."""
    from genbounds.callbacks.run_summary import measurement_line

    t, _ = small_fit(tmp_path, bound_suite(overhead_budget=1e-3))
    bound = next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))
    overhead = bound.latest["perf/overhead"]
    assert overhead > 1e-3
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("measurement time:")]
    assert lines == [measurement_line(overhead, 1e-3)]
    assert lines[0].startswith(f"measurement time: {overhead:.3g} × the training time (perf/overhead; "
                               "overhead_budget 0.001) — over it: the final evaluation") and "64th step" in lines[0]
    t, _ = small_fit(tmp_path, bound_suite())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("measurement time:")]
    assert len(lines) == 1 and lines[0].endswith("(perf/overhead; no overhead_budget: every probe ran on its schedule)")
    under = "measurement time: 0.15 × the training time (perf/overhead; overhead_budget 0.2)"
    assert measurement_line(0.15, 0.2) == under
    assert measurement_line(math.nan, 0.2) is None and measurement_line(None, None) is None


@pytest.mark.parametrize("place", ["before", "after"])
def test_an_at_train_end_probe_runs_first_in_the_final_evaluation_at_its_fewest_points(tmp_path, capsys, place):
    """Under a budget the bound's final probes take all that is left, so an ``at_train_end`` probe the
    bound does not ask for (HessianContractivity) never ran on its own: the main job's summary said
    "not measured in this run: HessianContractivity". The final evaluation now runs it first at its
    fewest points, whichever side of GeneralizationBound it stands, and the reserve the
    intermediate probes leave includes it; without a budget it takes all its points."""
    from genbounds.callbacks import HessianContractivity

    def fit(budget, place):
        hc = HessianContractivity(num_points=12, min_points=3, every_n_epochs=None, at_train_end=True)
        seen: list[tuple[str, dict]] = []
        for cb in [hc] + [c for c in suite if hasattr(c, "measure")]:
            def spy(trainer, values, _cb=cb, _orig=cb.finalize):
                seen.append((type(_cb).__name__, dict(values)))
                return _orig(trainer, values)
            cb.finalize = spy
        callbacks = [hc, *suite] if place == "before" else [*suite, hc]
        t, _ = small_fit(tmp_path, callbacks)
        return t, hc, seen

    suite = bound_suite(overhead_budget=1e-3)
    t, hc, seen = fit(1e-3, place)
    assert hc.num_probes_run == 1
    names = [n for n, _ in seen if n != "HeldoutGradient"]
    final = names[names.index("HessianContractivity"):]
    assert final[0] == "HessianContractivity" and "HessianTrace" in final[1:] and "Flatness" in final[1:], names
    values = next(v for n, v in seen if n == "HessianContractivity")
    assert values["curv/contractivity_points"] == 3.0 and math.isfinite(values["curv/contractivity_mean_se"])
    assert "not measured in this run" not in capsys.readouterr().out
    budget = t.__dict__["_genbounds_overhead"]
    assert budget.by_owner["HessianContractivity"] > 0
    bound = next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))
    assert bound.producers.end_probes(bound.series) == [hc]
    assert hc.first_cost() > 0 and bound.producers.end_cost(bound.series) == pytest.approx(hc.first_cost())
    # (the final evaluation's reserve includes it; an intermediate evaluation, which runs no end probe, does not)
    # (the final one asks for Γ too where fewer than two probes stand for the run: first_cost(final=True))
    assert budget.reserve_estimate() == pytest.approx(bound.first_cost(final=True) + hc.first_cost())
    suite = bound_suite()  # no budget: every point
    _, hc, seen = fit(None, place)
    assert next(v for n, v in seen if n == "HessianContractivity")["curv/contractivity_points"] == 12.0


def test_end_probes_take_their_fewest_draws_before_the_final_probes_and_share_the_rest_otherwise():
    """What each of the Trainer's other final-weight probes may spend when it runs: nothing beyond its
    fewest draws before the final evaluation's own probes (which take all that is left); a share of
    what is left when the last validation already evaluated the final weights (no final
    evaluation follows); the producers the bound asks for are not among them."""
    from genbounds.callbacks import Flatness, HessianContractivity
    from genbounds.callbacks.bound_producers import Producers
    from genbounds.callbacks.bound_series import BoundSeries

    class Recording(HessianContractivity):
        def probe_now(self, trainer, pl_module, *, log=True, epoch_end=True):
            seen.append((self, self.final_share, self.final_floor_after, log))

        def first_cost(self):
            return 0.5

    seen: list = []
    a, b = Recording(), Recording()
    flat = Flatness(scaling="sqrt_steps")
    producers = Producers(flatness=flat, at_end=[a, flat, b])
    series = BoundSeries()
    assert producers.end_probes(series) == [a, b] and producers.end_cost(series) == 1.0
    producers.measure_at_end(None, None, series, fewest=True)
    assert seen == [(a, 0.0, 0.0, False), (b, 0.0, 0.0, False)]
    seen.clear()
    producers.measure_at_end(None, None, series, fewest=False)
    assert seen == [(a, 0.5, 0.5, False), (b, 1.0, 0.0, False)]
    assert a.final_share is None and b.final_share is None  # (reset afterwards)


def test_a_run_too_short_for_the_final_probes_is_told_it_went_over_its_budget(tmp_path):
    """The final evaluation always runs, each probe at its fewest draws: a run too short for them
    (a matrix's 40 slow steps logged perf/overhead = 10 against 0.2) now says so once, with the
    numbers; a run within its budget, or without one, says nothing."""
    import warnings

    def said(**kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small_fit(tmp_path, bound_suite(**kwargs))
        return [str(w.message) for w in caught if "measurement took" in str(w.message)]

    over = said(overhead_budget=1e-3)
    assert len(over) == 1 and "above overhead_budget=0.001" in over[0] and "the last evaluation alone" in over[0]
    assert said() == [] and said(overhead_budget=100.0) == []


def test_contractivity_is_priced_at_its_fewest_points_and_sized_by_the_budget():
    from genbounds.callbacks import HessianContractivity
    from genbounds.callbacks.overhead import OverheadBudget

    hc = HessianContractivity(num_points=40, min_points=50)
    assert hc.min_points == 40  # (never more than num_points)
    hc = HessianContractivity(num_points=40, min_points=5, exact=False)
    assert hc.forward_equivalents() == 30.0
    assert HessianContractivity(num_points=40, min_points=5).forward_equivalents() == 34.0
    hc.budget = OverheadBudget(0.2)
    hc.budget.start = time.perf_counter() - 10.0  # 2 s of room
    hc._unit_cost = 0.01  # 60 ms a point
    assert hc.draws_within_budget(hc.num_points, hc.min_points, 6.0) == 33
    hc.budget.reserve = 1.9
    assert hc.draws_within_budget(hc.num_points, hc.min_points, 6.0) == 5
    with pytest.raises(MisconfigurationException, match="min_points"):
        HessianContractivity(min_points=1)


def test_the_results_table_in_tensorboard_keeps_every_cell(tmp_path):
    """The Markdown results table (TensorBoard's Text tab) renders every row with its three cells:
    the ``|flatness|`` of ``bound/neu_abs``'s note is escaped (it cut the row short before), as
    TensorBoard's own renderer shows it."""
    import numpy as np
    from tensorboard.plugins.text import text_plugin

    from genbounds.callbacks.run_summary import results_table

    t, _ = small_fit(tmp_path, bound_suite())
    bound = next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))
    assert "bound/neu_abs" in bound.latest
    _, markdown = results_table(t, bound)
    html = text_plugin.text_array_to_html(np.array(markdown.encode()), True)
    assert "<td>Neu Thm 1 with |flatness| (bounds |gap|)</td>" in html
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert rows and html.count("<tr>") == len(rows) + 1  # (the header row)
    assert html.count("<td>") == 3 * len(rows)


@pytest.mark.parametrize("kind", ["max", "min"])
def test_bound_gate_thresholds_given_as_a_number_are_refused_with_the_form_to_use(kind):
    """``BoundGate(max=5.0)`` (a number where a mapping goes): a clear error at construction, with
    the form to write (an ``AttributeError`` on ``.items`` before)."""
    with pytest.raises(MisconfigurationException, match=r"mapping \{metric: limit\}, e\.g\. " + kind):
        BoundGate(**{kind: 5.0})


def test_the_gate_verdict_shows_enough_digits_to_tell_a_value_from_its_limit():
    from genbounds.callbacks.bound_gate import _apart

    assert _apart(0.50000001, 0.5) == "0.50000001" and _apart(6.407, 5.0) == "6.407"
    assert _apart(0.123456, 0.123457) == "0.123456"  # (0.1235 would read as over the limit)


def test_a_final_violation_under_raise_leaves_the_fits_results(tmp_path, capsys):
    """``on_violation="raise"`` on the final values: the exception comes after the fit's end, with
    the results table printed, its Text-tab copy and ``gate/passed`` = 0 logged (raised inside the
    final check, it cut all three short; a new user's walk, round 33)."""
    from helpers import tensorboard_scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gate = BoundGate(max={"bound/wang_mao_eq3": 1e-9}, on_violation="raise")
    logger = TensorBoardLogger(str(tmp_path), name="raise", default_hp_metric=False)
    # (the run's validations pass: the limit is only checked on the final values)
    gate.max, late = {}, {"bound/wang_mao_eq3": 1e-9}

    class Tighten(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            gate.max = late

    with pytest.raises(BoundViolation, match="final values violated"), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        small_fit(tmp_path, [*bound_suite(), gate, Tighten()], max_epochs=2, logger=logger)
    assert not [w for w in said if "BoundGate" in str(w.message)]  # (said once: by the exception)
    out = capsys.readouterr().out
    assert "gate: FAIL" in out and "bound/wang_mao_eq3" in out  # (the table, with the verdict)
    scalars = tensorboard_scalars(logger.log_dir)
    assert scalars["gate/passed"][-1][1] == 0.0 and scalars["run/complete"][-1][1] == 1.0
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    assert any("genbounds/results" in tag for tag in acc.Tags()["tensors"])


@pytest.mark.parametrize("every", [1, 4])
def test_the_trainer_gate_reads_a_probes_value_at_the_step_it_was_logged(tmp_path, every):
    """A genbounds callback's value in ``callback_metrics`` carries the step its step log wrote it at:
    the Trainer's gate passed a value `genbounds gate` failed as stale on the same logs (a new
    user's walk, round 33). Ten steps: measured every step, the last value (step 9) is current; every
    4th step, the last (step 8) is stale, as the CLI reads it (one step of slack)."""
    gate = BoundGate(max={"grad/dispersion": 1e9})
    with pytest.warns(UserWarning, match="final values violated") if every == 4 else contextlib.nullcontext():
        small_fit(tmp_path, [GradientDispersion(every_n_steps=every), gate], max_epochs=2)
    assert gate.final is not None
    if every == 1:
        assert gate.final["passed"]
    else:
        (v,) = gate.final["violations"]
        assert v["metric"] == "grad/dispersion" and v["reason"].startswith("stale: last computed at step 8,")


def test_both_gates_allow_a_logged_value_the_same_slack():
    """The Trainer's gate and `genbounds gate` call a genbounds value stale beyond the same number of
    steps, and the CLI reads the tag the Trainer's gate logs where it raises."""
    from genbounds.callbacks.bound_gate import RAISED_TAG, STALE_TOLERANCE
    from genbounds.reporting import events
    from genbounds.reporting.gate import DEFAULT_STALE_TOLERANCE

    assert STALE_TOLERANCE == DEFAULT_STALE_TOLERANCE and RAISED_TAG == events.RAISED_TAG


def test_a_fit_ended_by_raise_during_training_reads_back_as_ended_by_the_gate(tmp_path, capsys):
    """``on_violation="raise"`` during training ends the fit: `genbounds gate` on its logs exits 2
    (incomplete: no final values) and says the gate ended it, not "killed or crashed" (an
    engineer's walk, round 34)."""
    from genbounds.cli import main

    gate = BoundGate(max={"val_loss": -1.0}, on_violation="raise")
    logger = TensorBoardLogger(str(tmp_path), name="raise", default_hp_metric=False)
    with pytest.raises(BoundViolation, match="threshold violated"):
        small_fit(tmp_path, [GradientDispersion(), gate], max_epochs=2, logger=logger)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["gate", logger.log_dir, "--max", "grad/dispersion=1e9"])
    out = capsys.readouterr()
    assert info.value.code == 2
    assert "ended by BoundGate(on_violation='raise') at step" in out.out + out.err
    assert "killed or crashed" not in out.out + out.err
