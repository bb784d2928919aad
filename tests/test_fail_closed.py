"""Fail closed (issue: never pass a run it should fail): NaN-aware gating, incomplete runs, exact
resume, contained bad values, every argument validated before step 0."""

from __future__ import annotations

import glob
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from genbounds.callbacks import (
    BoundGate,
    BoundViolation,
    DispersionPhaseDetector,
    DynamicGradientClipping,
    Flatness,
    GaussianModelPerturbation,
    GeneralizationBound,
    GradientDispersion,
    GradientSensitivity,
    HeldoutGradient,
    HessianContractivity,
    HessianTrace,
    TwinRunStability,
    VariabilityRegularizer,
)
from genbounds.cli import main
from genbounds.data import DigitsDataModule
from genbounds.models import MLP, Classifier
from helpers import DropoutBatchNormNet, bound_suite, trainer


def main_suite(sigmas=(0.001, 0.01, 0.1), draws=6, flat_probe=64):
    """The callbacks of configs/digits_mlp.yaml, smaller (top eigenvalue and contractivity included)."""
    sig = list(sigmas)
    return [
        GradientDispersion(),
        HeldoutGradient(every_n_steps=3),
        GradientSensitivity(sigmas=sig, num_draws=4, every_n_steps=4),
        Flatness(sigmas=sig, scaling="sqrt_steps", num_draws=draws, probe_batch_size=flat_probe, every_n_epochs=None,
                 at_train_end=False),
        HessianTrace(min_probes=6, max_probes=12, top_eigenvalue=True, eig_max_iter=8, every_n_epochs=None,
                     at_train_end=False),
        HessianContractivity(num_points=4, every_n_epochs=2),
        GeneralizationBound(),
    ]


def fit(tmp_path, callbacks, module=None, data=None, seed=0, ckpt_path=None, **kwargs):
    pl.seed_everything(seed, verbose=False)
    module = module if module is not None else Classifier(MLP(64, 10, 32), lr=0.05)
    defaults = dict(max_epochs=2, limit_train_batches=5, limit_val_batches=2)
    defaults.update(kwargs)
    t = trainer(tmp_path, callbacks, **defaults)
    t.fit(module, data if data is not None else DigitsDataModule(batch_size=64, seed=seed), ckpt_path=ckpt_path)
    return t


def aggregator(t):
    return next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return int(info.value.code)


# ---------------------------------------------------------------- NaN weights
class NaNAfter(Classifier):
    """The weights go NaN after step ``at`` (a diverged run)."""

    def __init__(self, at: int, **kwargs) -> None:
        super().__init__(MLP(64, 10, 32), lr=0.05, **kwargs)
        self.at = at

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.global_step == self.at:
            with torch.no_grad():
                self.network.net[1].weight.fill_(float("nan"))


def test_nan_weights_make_the_gate_raise(tmp_path):
    gate = BoundGate(max={"bound/wang_mao_eq3": 1e9}, on_violation="raise")
    with pytest.raises(BoundViolation, match=r"bound/wang_mao_eq3 .* nan"):
        fit(tmp_path, [*bound_suite(), gate], module=NaNAfter(at=7), max_epochs=3)


def test_nan_weights_fail_the_cli_gate_naming_the_metric(tmp_path, capsys):
    logger = TensorBoardLogger(str(tmp_path), name="nan", default_hp_metric=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = fit(tmp_path, bound_suite(), module=NaNAfter(at=7), max_epochs=3, logger=logger)
    assert math.isnan(aggregator(t).latest["bound/wang_mao_eq3"])  # logged as NaN, not left out
    assert aggregator(t).latest["bound/valid"] == 0.0
    capsys.readouterr()
    assert run_cli("gate", logger.log_dir, "--max", "bound/wang_mao_eq3=1e9") == 1
    out = capsys.readouterr().out
    assert "bound/wang_mao_eq3" in out and "nan" in out.lower()


def test_a_nan_threshold_is_refused():
    with pytest.raises(MisconfigurationException, match="max"):
        BoundGate(max={"bound/wang_mao_eq3": float("nan")})
    assert run_cli("gate", ".", "--max", "bound/wang_mao_eq3=nan") == 2


def test_a_killed_run_is_incomplete_for_the_cli(tmp_path, capsys):
    logger = TensorBoardLogger(str(tmp_path), name="killed", default_hp_metric=False)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path, [*bound_suite(), Kill(6)], logger=logger)
    for command in (["gate", logger.log_dir, "--max", "val_loss=100"], ["report", logger.log_dir],
                    ["compare", logger.log_dir, logger.log_dir]):
        assert run_cli(*command) == 2, command
    assert "incomplete" in capsys.readouterr().err.lower()


def test_a_misspelled_gate_metric_is_refused_at_setup(tmp_path):
    gate = BoundGate(max={"bound/wang_mao_eq33": 1.0})
    t = trainer(tmp_path, [*bound_suite(), gate], max_steps=2)
    with pytest.raises(MisconfigurationException, match="did you mean 'bound/wang_mao_eq3'"):
        t.fit(Classifier(MLP(64, 10, 8)), DigitsDataModule())
    assert t.global_step == 0


def test_a_gate_on_a_bound_that_is_not_asked_for_is_refused_at_setup(tmp_path):
    """``bound/neu_abs`` and ``bound/test_error_upper`` were always taken as known, so a gate on
    them passed setup in a Trainer whose bound never logs them and failed only after the fit
    ("missing", a new user's walk)."""
    from genbounds.callbacks import GeneralizationBound

    for tag in ("bound/neu_abs", "bound/test_error_upper"):
        suite = [cb for cb in bound_suite() if not isinstance(cb, GeneralizationBound)]
        gate = BoundGate(max={tag: 5.0})
        t = trainer(tmp_path, [*suite, GeneralizationBound(bounds=["wang_mao_eq3"]), gate], max_steps=2)
        with pytest.raises(MisconfigurationException, match="will never be logged"):
            t.fit(Classifier(MLP(64, 10, 8)), DigitsDataModule())
        assert t.global_step == 0
    gate = BoundGate(max={"bound/neu_abs": 50.0, "bound/test_error_upper": 1.0})
    trainer(tmp_path, [*bound_suite(), gate], max_steps=2).fit(Classifier(MLP(64, 10, 8)), DigitsDataModule())
    # the test-error bound is a value alone: no SE, no validity flag (accepted at setup, then
    # "missing" at the end: a new user's walk, round 31)
    for tag in ("bound/test_error_upper_se", "bound_valid/test_error_upper"):
        t = trainer(tmp_path, [*bound_suite(), BoundGate(max={tag: 10.0})], max_steps=2)
        with pytest.raises(MisconfigurationException, match="will never be logged"):
            t.fit(Classifier(MLP(64, 10, 8)), DigitsDataModule())


# ---------------------------------------------------------------- exact resume
class Kill(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


def killed_and_resumed(tmp_path, suite, kill_at: int):
    """The uninterrupted 3-epoch fit of ``suite()``, and the same fit killed after the checkpoint
    of step ``kill_at`` and resumed from it."""
    full = fit(tmp_path / "full", suite(), max_epochs=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=kill_at, save_top_k=-1)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "first", [*suite(), ckpt, Kill(kill_at + 1)], max_epochs=3, enable_checkpointing=True)
    (path,) = glob.glob(str(tmp_path / "ckpt" / f"*step={kill_at}*.ckpt"))
    return full, fit(tmp_path / "second", suite(), max_epochs=3, ckpt_path=path)


@pytest.mark.parametrize("kill_at", [5, 7])  # 5: at an epoch boundary; 7: mid-epoch
def test_resume_is_exact_with_the_main_suite(tmp_path, kill_at):
    full, resumed = killed_and_resumed(tmp_path, main_suite, kill_at)
    a, b = aggregator(full).latest, aggregator(resumed).latest
    tags = [k for k in a if k.startswith(("bound/", "gap/", "setting/"))]
    assert len(tags) > 20 and "bound/wang_mao_eq3" in tags
    for key in tags:
        x, y = a[key], b.get(key)
        assert y is not None, key
        if math.isnan(x):
            assert math.isnan(y), key
        else:
            assert y == pytest.approx(x, rel=1e-6, abs=1e-12), key
    hessian = [cb for cb in resumed.callbacks if isinstance(cb, HessianTrace)][0]
    assert hessian._eigvec is not None  # the power-iteration warm start travelled with the checkpoint


@pytest.mark.parametrize("kill_at", [5, 10])  # before and after Neu's midway Γ probe (step 8 of 15)
def test_resume_is_exact_around_neu_s_midway_gamma_probe(tmp_path, kill_at):
    """Γ without a schedule: the bound asks for it at the run's middle step (docs/math.md §6.9).
    Resumed from a checkpoint before that step, the resumed fit asks at the same step; after it,
    the probe travelled in the checkpoint's series and is not asked for again: both give the
    uninterrupted run's Γ probes and bounds."""
    def suite():
        callbacks = main_suite()
        callbacks[2] = GradientSensitivity(sigmas=[0.001, 0.01, 0.1], num_draws=4, every_n_steps=None)
        return callbacks

    full, resumed = killed_and_resumed(tmp_path, suite, kill_at)
    a, b = aggregator(full), aggregator(resumed)
    assert sorted(s for s in a.series.sensitivity_steps if s >= 1) == [8, 15]
    assert b.series.sensitivity_steps == a.series.sensitivity_steps
    assert b.series.sensitivity_values == a.series.sensitivity_values
    assert math.isfinite(a.latest["bound/neu"])
    for key in [k for k in a.latest if k.startswith(("bound/", "gap/", "setting/"))]:
        x, y = a.latest[key], b.latest.get(key)
        assert y is not None, key
        assert (math.isnan(x) and math.isnan(y)) or y == pytest.approx(x, rel=1e-6, abs=1e-12), key


def test_resume_from_a_checkpoint_without_the_suite_says_why_the_bounds_are_nan(tmp_path):
    """A checkpoint saved by a run without the callbacks holds none of the steps before it: the
    bounds (sums from step 0) are NaN and flagged, and one warning says why before any is computed
    (before, only "a failed estimate", and the resumed steps' learning rates stood for steps 0…)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "first", [ckpt], max_epochs=1, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path / "second", main_suite(), max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    said = [str(w.message) for w in caught if "but the checkpoint holds the learning rates" in str(w.message)]
    assert len(said) == 1 and "resumes at step 5" in said[0] and "of 0 steps only" in said[0]
    latest = aggregator(t).latest
    assert math.isnan(latest["bound/wang_mao_eq3"]) and latest["bound_valid/wang_mao_eq3"] == 0.0
    assert math.isfinite(latest["gap/measured"])  # (what needs no history is still measured)


def test_resume_with_another_sigma_grid_is_refused(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "first", [*main_suite(), ckpt], max_epochs=1, enable_checkpointing=True)
    with pytest.raises(MisconfigurationException, match="σ grid"):
        fit(tmp_path / "second", main_suite(sigmas=(0.002, 0.02, 0.2)), max_epochs=2,
            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_bounds_selection_change_keeps_the_history(tmp_path):
    """GeneralizationBound's state key does not depend on its arguments: restricting bounds=…
    on resume keeps the accumulated series (T counts every step)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "first", [*main_suite(), ckpt], max_epochs=2, enable_checkpointing=True)
    suite = main_suite()
    suite[-1] = GeneralizationBound(bounds=["wang_mao_eq3"])
    t = fit(tmp_path / "second", suite, max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert aggregator(t).latest["setting/T"] == 20


# ---------------------------------------------------------------- containment
SENTINEL = 123.0


class InfLossClassifier(Classifier):
    """A classifier whose per-sample loss is +inf for a sample marked by a sentinel pixel (its
    gradient stays finite: the constant +inf does not depend on the weights)."""

    def per_sample_loss(self, batch):
        x, y = batch
        losses = super().per_sample_loss(batch)
        return torch.where(x[:, 5] == SENTINEL, torch.full_like(losses, float("inf")), losses)


def _digits_with_bad_heldout_sample(kind: str | None, seed: int = 0) -> DigitsDataModule:
    """Digits whose held-out set gets one extra sample with a NaN pixel (``"nan"``) or marked to
    have an infinite loss (``"inf"``); ``None``: the same data without it."""

    class Data(DigitsDataModule):
        def build(self) -> None:
            super().build()
            x, y = self.val_set.tensors
            if kind is not None:
                bad = x[:1].clone()
                bad[0, 5] = float("nan") if kind == "nan" else SENTINEL
                x, y = torch.cat([bad, x]), torch.cat([y[:1], y])
            self.val_set = TensorDataset(x, y)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(self.val_set, batch_size=1000)

    return Data(batch_size=64, seed=seed)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_one_bad_heldout_sample_affects_only_itself(tmp_path, kind):
    """The probe sets, the measured gap and R leave the bad sample out: every later bound equals
    the run without it, with at most two warnings about it."""
    def module():
        pl.seed_everything(0, verbose=False)
        return InfLossClassifier(MLP(64, 10, 32), lr=0.05)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = fit(tmp_path / "bad", main_suite(flat_probe=None), module=module(),
                  data=_digits_with_bad_heldout_sample(kind), limit_val_batches=1)
    about_it = [str(w.message) for w in caught if ("NaN/inf" in str(w.message) or "non-finite" in str(w.message))
                and "could not be computed (NaN)" not in str(w.message)]  # (Neu's before a second Γ probe: §6.9)
    assert 1 <= len(about_it) <= 2, about_it
    clean = fit(tmp_path / "clean", main_suite(flat_probe=None), module=module(),
                data=_digits_with_bad_heldout_sample(None), limit_val_batches=1)
    a, b = aggregator(bad).latest, aggregator(clean).latest
    for key in ("bound/wang_mao_eq2", "bound/wang_mao_eq3", "bound/neu", "gap/measured", "setting/R"):
        assert math.isfinite(a[key]), key
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_a_heldout_probe_set_left_out_whole_is_not_called_missing(tmp_path):
    """Every held-out probe sample non-finite: the held-out quantities are disabled with that
    reason, not "there is no validation dataloader" (there is one)."""
    from genbounds.callbacks import HeldoutGradient

    class AllBad(DigitsDataModule):
        def build(self) -> None:
            super().build()
            x, y = self.val_set.tensors
            self.val_set = TensorDataset(torch.full_like(x, float("nan")), y)

    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [HeldoutGradient(every_n_steps=2)], module=Classifier(MLP(64, 10, 32), lr=0.05),
            data=AllBad(batch_size=64, seed=0), max_steps=2, limit_val_batches=1)
    said = [str(w.message) for w in caught if "HeldoutGradient:" in str(w.message)]
    assert any("every sample of the held-out probe set was left out" in m for m in said), said
    assert not any("no validation dataloader" in m for m in said), said


def test_a_zero_hessian_probe_does_not_poison_the_warm_start():
    from genbounds.estimators.hessian_eigenvalue import top_eigenvalue
    from genbounds.estimators.hessian_vector_product import LossHessian

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(16, 4)

    def linear_loss(module, batch):  # linear in the weights: H = 0
        return module(batch).squeeze(1)

    def quadratic_loss(module, batch):
        return 0.5 * module(batch).squeeze(1) ** 2

    gen = torch.Generator().manual_seed(0)
    zero = top_eigenvalue(LossHessian(model, linear_loss, x), gen, max_iter=20)
    assert zero.value == 0.0 and zero.vector is not None
    assert all(bool(torch.isfinite(v).all()) for v in zero.vector)
    warm = top_eigenvalue(LossHessian(model, quadratic_loss, x), gen, init=zero.vector, max_iter=200, tol=1e-10)
    cold = top_eigenvalue(LossHessian(model, quadratic_loss, x), torch.Generator().manual_seed(1), max_iter=200,
                          tol=1e-10)
    assert math.isfinite(warm.value) and warm.value == pytest.approx(cold.value, rel=1e-4)


def test_nan_statistics_warn_once_then_count(tmp_path):
    class NaNSteps(Classifier):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if self.global_step % 2 == 1:
                out["loss"] = out["loss"] * float("nan")
            return out

        def on_before_optimizer_step(self, optimizer):
            for p in self.parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    p.grad.zero_()

    cb = GradientDispersion()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [cb], module=NaNSteps(MLP(64, 10, 16)), max_epochs=4)
    about = [w for w in caught if "non-finite statistics" in str(w.message)]
    assert len(about) == 1 and cb.step_log.skipped_count == 10


# ---------------------------------------------------------------- bad configuration
BAD_INT = [-1, 0, float("nan"), float("inf"), 1.5, "abc", True]
BAD_POS_FLOAT = [-1.0, 0.0, float("nan"), float("inf"), "abc", True]
BAD_NONNEG_FLOAT = [-1.0, float("nan"), float("inf"), "abc"]

CASES = [
    (GradientDispersion, "every_n_steps", BAD_INT), (GradientDispersion, "num_chunks", [1, 2.5, "x", float("nan")]),
    (GradientDispersion, "chunk_size", BAD_INT), (GradientDispersion, "memory_budget_mb", BAD_POS_FLOAT),
    (GradientDispersion, "backend", ["magic", 1]), (GradientDispersion, "prog_bar", ["yes"]),
    (HeldoutGradient, "every_n_steps", BAD_INT), (HeldoutGradient, "num_chunks", [1, 2.5]),
    (HeldoutGradient, "num_train", BAD_INT), (HeldoutGradient, "probe_batch_size", BAD_INT),
    (GradientSensitivity, "num_draws", [1, 2.5, float("nan"), "x"]), (GradientSensitivity, "sigmas",
                                                                      [0.01, "0.1", [-0.1], [float("nan")], []]),
    (GradientSensitivity, "every_n_steps", BAD_INT), (GradientSensitivity, "draws_per_pass", BAD_INT),
    (Flatness, "sigmas", [0.01, [0.0], [0.1, 0.1], [float("inf")]]), (Flatness, "num_draws", [1, 1.5, "8"]),
    (Flatness, "min_draws", [1, 1.5]), (Flatness, "every_n_epochs", BAD_INT), (Flatness, "log_spaced", BAD_INT),
    (Flatness, "probe_batch_size", BAD_INT), (Flatness, "num_probe_batches", BAD_INT), (Flatness, "seed", [1.5, "x"]),
    (Flatness, "scaling", ["linear"]), (Flatness, "probe_mode", ["both"]), (Flatness, "overhead_budget", BAD_POS_FLOAT),
    (HessianTrace, "rel_tol", BAD_NONNEG_FLOAT), (HessianTrace, "abs_tol", BAD_NONNEG_FLOAT),
    (HessianTrace, "eig_tol", BAD_POS_FLOAT), (HessianTrace, "eig_max_iter", [0, 1, 2.5]),
    (HessianTrace, "min_probes", [0, 1, 2.5]), (HessianTrace, "max_probes", [0, 1]),
    (HessianTrace, "block_size", BAD_INT), (HessianTrace, "num_chunks", [1]),
    (HessianContractivity, "radius", BAD_NONNEG_FLOAT), (HessianContractivity, "eta", BAD_POS_FLOAT),
    (HessianContractivity, "num_points", [1, 2.5]), (HessianContractivity, "points_per_pass", BAD_INT),
    (GeneralizationBound, "R", [-1.0, 0.0, float("nan"), float("inf"), "median"]),
    (GeneralizationBound, "num_train", BAD_INT), (GeneralizationBound, "gap_samples", [1, 2.5, -1]),
    (GeneralizationBound, "bounds", ["wang_mao_eq3", ["eq4"], []]), (GeneralizationBound, "selection_z", [-1.0]),
    (GeneralizationBound, "max_loss_increase", BAD_POS_FLOAT), (GeneralizationBound, "headline", ["best"]),
    (BoundGate, "on_violation", ["explode"]), (BoundGate, "lenient", [["late"]]),
    (DynamicGradientClipping, "alpha", BAD_POS_FLOAT), (DynamicGradientClipping, "start_step", [-1, 1.5]),
    (GaussianModelPerturbation, "rho", [-0.1, 1.5, float("nan")]), (GaussianModelPerturbation, "k", BAD_INT),
    (GaussianModelPerturbation, "draws_per_pass", BAD_INT),
    (VariabilityRegularizer, "lambda1", [-1.0, float("nan")]),
    (VariabilityRegularizer, "refresh_every_n_steps", BAD_INT),
    (TwinRunStability, "every_n_steps", BAD_INT), (TwinRunStability, "mode", ["swap"]),
    (DispersionPhaseDetector, "rise", BAD_POS_FLOAT), (DispersionPhaseDetector, "patience", BAD_INT),
]
REQUIRED = {BoundGate: {"max": {"bound/wang_mao_eq3": 1.0}}, VariabilityRegularizer: {"lambda1": 0.1}}


@pytest.mark.parametrize("cls,arg,bad", [(c, a, v) for c, a, values in CASES for v in values],
                         ids=lambda x: x.__name__ if isinstance(x, type) else repr(x))
def test_every_bad_argument_is_refused_at_construction_with_its_name(cls, arg, bad):
    kwargs = dict(REQUIRED.get(cls, {}))
    kwargs[arg] = bad
    with pytest.raises(MisconfigurationException, match=arg.split("[")[0]):
        cls(**kwargs)


def test_batch_size_one_is_refused_before_step_0(tmp_path):
    t = trainer(tmp_path, bound_suite(), max_steps=3)
    with pytest.raises(MisconfigurationException, match="batches of 1 sample"):
        t.fit(Classifier(MLP(64, 10, 8)), DigitsDataModule(batch_size=1))
    assert t.global_step == 0


def test_a_tiny_validation_set_says_the_probe_is_smaller_than_asked(tmp_path):
    class Tiny(DigitsDataModule):
        def build(self):
            super().build()
            x, y = self.val_set.tensors
            self.val_set = TensorDataset(x[:10], y[:10])

    with pytest.warns(UserWarning, match="fewer than the 500 asked"):
        fit(tmp_path, [Flatness(probe_batch_size=500, num_draws=2, every_n_epochs=1)], data=Tiny(batch_size=64),
            max_epochs=1)


@pytest.mark.parametrize("probe", [
    lambda: GradientSensitivity(sigmas=[0.01], num_draws=2, every_n_steps=2, probe_mode="train"),
    lambda: HessianContractivity(num_points=2, every_n_epochs=1, probe_mode="train"),
    lambda: HessianTrace(max_probes=4, min_probes=2, top_eigenvalue=True, eig_max_iter=3, probe_mode="train"),
    lambda: Flatness(sigmas=[0.01], num_draws=2, probe_mode="train"),
])
def test_train_mode_probes_work_with_batchnorm(tmp_path, probe):
    module = Classifier(DropoutBatchNormNet(), lr=0.05)
    cb = probe()
    t = fit(tmp_path, [cb], module=module, max_epochs=2, limit_train_batches=3)
    assert cb.num_probes_run >= 1 and t.global_step == 6


def test_probe_without_schedule_or_aggregator_warns_at_setup(tmp_path):
    with pytest.warns(UserWarning, match="will never run"):
        fit(tmp_path, [Flatness(every_n_epochs=None, at_train_end=False)], max_epochs=1, limit_train_batches=1)


class _HandWrittenLoss(Classifier):
    """A loss written by hand (no torch loss function to capture) and no ``per_sample_loss``."""

    per_sample_loss = None  # type: ignore[assignment]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = -(torch.log_softmax(self(x), 1).gather(1, y[:, None])).mean()
        self.log("train_loss", loss)
        return loss


def test_a_hand_written_loss_gives_nan_bounds_named_before_step_0_not_a_crash(tmp_path):
    """Only a batch-mean loss: the data-dependent ``R`` cannot be read, so every bound is NaN and
    flagged — the fit ends normally (it raised in the layer-wise Eq. 3 before), and the loss
    contract's one warning, before step 0, names ``R`` and what to add; a given ``R`` gives bounds."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path / "q", main_suite(), module=_HandWrittenLoss(MLP(64, 10, 32), lr=0.05))
    contract = [str(w.message) for w in caught if str(w.message).startswith("genbounds: no torch loss")]
    assert len(contract) == 1 and "GeneralizationBound: R='quantile'" in contract[0], contract
    nan = [str(w.message) for w in caught
           if "bound/wang_mao_eq3" in str(w.message) and "could not be computed (NaN)" in str(w.message)]
    assert len(nan) == 1 and "R is NaN" in nan[0]
    values = aggregator(t).latest
    assert math.isnan(values["setting/R"])
    for tag in ("bound/wang_mao_eq3", "bound/wang_mao_eq3_layerwise", "bound/wang_mao_eq2", "bound/neu"):
        assert math.isnan(values[tag]), tag
    assert values["bound/valid"] == 0.0
    t = fit(tmp_path / "r", main_suite()[:-1] + [GeneralizationBound(R=2.0)],
            module=_HandWrittenLoss(MLP(64, 10, 32), lr=0.05))
    values = aggregator(t).latest
    assert values["setting/R"] == 2.0 and math.isfinite(values["bound/wang_mao_eq3"])


@pytest.mark.parametrize("make", [lambda: TwinRunStability(mode="replace"), GaussianModelPerturbation,
                                  lambda: VariabilityRegularizer(lambda1=0.01), DynamicGradientClipping],
                         ids=["twin", "gmp", "regularizer", "clipping"])
def test_a_run_with_interventions_only_is_complete_for_the_cli(tmp_path, make, capsys):
    """Interventions and the twin run write ``run/complete`` at the end of ``fit`` like every
    measurement callback: ``genbounds gate`` read such a run as killed (exit 2). Killed, it still is."""
    logger = TensorBoardLogger(str(tmp_path), name="done", default_hp_metric=False)
    fit(tmp_path, [make()], logger=logger)
    assert run_cli("gate", logger.log_dir, "--max", "val_loss=100") == 0, capsys.readouterr().err

    logger = TensorBoardLogger(str(tmp_path), name="killed", default_hp_metric=False)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path, [make(), Kill(3)], logger=logger)
    assert run_cli("gate", logger.log_dir, "--max", "val_loss=100") == 2


def test_an_overhead_budget_over_one_warns_that_it_is_a_fraction():
    """``overhead_budget=20`` (20 % meant) is legal but almost surely a slip: one warning says what
    it means and names 0.2; a fraction does not warn."""
    with pytest.warns(UserWarning, match=r"overhead_budget=20\): the budget is a fraction .* Was 0\.2 meant\?"):
        GeneralizationBound(overhead_budget=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GeneralizationBound(overhead_budget=0.2)
        Flatness(sigmas=[0.01], overhead_budget=1.0)


def test_a_reduction_over_processes_raises_in_every_process_when_one_fails():
    """``reduce_computed``: before the values, every process reduces two failure flags — also the
    one whose part failed — so the others' collective completes and they raise there too
    (``FailedElsewhere``, telling a missing second derivative from other errors), instead of
    waiting in it or going on with collectives that no longer match (the DDP test:
    ``test_a_missing_second_derivative_in_one_ddp_process_disables_the_hessian_in_every_process``)."""
    from genbounds.estimators.collective import FailedElsewhere, not_twice_differentiable, reduce_computed

    cpu = torch.device("cpu")

    def other_process(flags: list[float]):
        # a two-process mean: the first collective is the flags (the other's given), then the values (its 3s)
        calls = [0]

        def reduce(flat):
            calls[0] += 1
            other = torch.tensor(flags) if calls[0] == 1 else torch.full_like(flat, 3.0)
            return (flat + other) / 2
        return reduce

    ok = reduce_computed(lambda: [torch.tensor([1.0, 5.0])], other_process([0.0, 0.0]), cpu)
    assert torch.equal(ok[0], torch.tensor([2.0, 4.0]))
    missing = RuntimeError("derivative for aten::hardsigmoid_backward is not implemented")

    def fails():
        raise missing

    with pytest.raises(RuntimeError) as here:  # the process it failed in: its own error
        reduce_computed(fails, other_process([0.0, 0.0]), cpu)
    assert here.value is missing
    with pytest.raises(FailedElsewhere) as elsewhere:  # the other: told, as a second-order failure
        reduce_computed(lambda: [torch.tensor([1.0, 5.0])], other_process([0.0, 1.0]), cpu)
    assert elsewhere.value.second_order and not_twice_differentiable(elsewhere.value)
    with pytest.raises(FailedElsewhere) as other:  # any other failure there: not a second-order one
        reduce_computed(lambda: [torch.tensor([1.0, 5.0])], other_process([1.0, 0.0]), cpu)
    assert not other.value.second_order and not not_twice_differentiable(other.value)
    with pytest.raises(FailedElsewhere) as both:  # a missing derivative here, another failure there:
        reduce_computed(fails, other_process([1.0, 0.0]), cpu)  # the fit ends here too (a review)
    assert not not_twice_differentiable(both.value) and both.value.__cause__ is missing
    assert reduce_computed(lambda: [torch.ones(1)], None, cpu)[0].item() == 1.0  # one process: no collective


def test_the_hessians_loss_reduced_over_processes_keeps_its_dtype_and_digits():
    """``LossHessian.loss()`` under a reduction (a one-process stand-in here) gives the value and
    dtype of one process: a bf16 model's fp32 loss was rounded to bf16 on its way through the
    collective (a review)."""
    from genbounds.estimators.hessian_vector_product import LossHessian

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).to(torch.bfloat16)
    batch = (torch.randn(5, 3, dtype=torch.bfloat16), torch.randn(5, 2))

    def loss_fn(module, b):
        return ((module(b[0]).float() - b[1]) ** 2).mean(1)

    alone = LossHessian(net, loss_fn, batch).loss()
    reduced = LossHessian(net, loss_fn, batch, reduce=lambda t: t.clone()).loss()
    assert alone.dtype == reduced.dtype == torch.float32 and torch.equal(alone, reduced)


def test_every_probe_reduction_raises_when_another_process_failed():
    """Under DDP each probe reduction first reduces two failure flags (``fail_together``): a
    process that failed elsewhere makes every other process raise there, instead of waiting in the
    values' collective. A stand-in reduce reports "another process failed" at its first call: every
    reduction of ``PerturbedLoss`` (Flatness, the sensitivity, contractivity), ``LossHessian`` and
    the weighted dispersion must raise ``FailedElsewhere`` (before, they reduced the flags as
    values and went on)."""
    from genbounds.estimators.collective import FailedElsewhere
    from genbounds.estimators.hessian_vector_product import LossHessian
    from genbounds.estimators.perturbation import PerturbedLoss
    from genbounds.estimators.weighted_dispersion import hessian_weighted_dispersion

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    batch = (torch.randn(6, 3), torch.randn(6, 2))

    def loss_fn(module, b):
        return ((module(b[0]) - b[1]) ** 2).mean(1)

    def failed_elsewhere():
        calls = [0]

        def reduce(t):
            calls[0] += 1
            return torch.tensor([0.5, 0.0]) if calls[0] == 1 else t  # (the flags: another process failed)
        return reduce

    def raises(run) -> bool:
        try:
            run()
        except FailedElsewhere:
            return True
        return False

    fn = lambda: PerturbedLoss(net, loss_fn, reduce=failed_elsewhere())  # noqa: E731
    points = {k: v.unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in fn().base.items()}
    hessian = lambda: LossHessian(net, loss_fn, batch, reduce=failed_elsewhere())  # noqa: E731
    vector = [torch.ones_like(p) for p in net.parameters()]
    cases = {
        "PerturbedLoss.loss": lambda: fn().loss(fn().base, batch),
        "PerturbedLoss.losses_at": lambda: fn().losses_at(points, batch),
        "PerturbedLoss.gradient": lambda: fn().gradient(fn().base, batch),
        "PerturbedLoss.gradients_at": lambda: fn().gradients_at(points, batch),
        "LossHessian.gradient": lambda: hessian().gradient(),
        "LossHessian.loss": lambda: hessian().loss(),
        "LossHessian.hvp": lambda: hessian().hvp(vector),
        "LossHessian.hvp_batched": lambda: hessian().hvp_batched([v.unsqueeze(0) for v in vector]),
        "weighted dispersion": lambda: hessian_weighted_dispersion(
            net, loss_fn, batch, LossHessian(net, loss_fn, batch), num_chunks=2, reduce=failed_elsewhere()),
    }
    assert {name: raises(run) for name, run in cases.items()} == {name: True for name in cases}
    plain = PerturbedLoss(net, loss_fn, reduce=failed_elsewhere(), fail_together=False)  # (an intervention's)
    assert not raises(lambda: plain.loss(plain.base, batch))


def test_a_single_chunk_is_centred_at_its_own_mean_unless_told():
    """``per_sample_gradient_moments`` with a running sum and a caller's mean: a single chunk's
    standard-error terms are centred at the batch's own mean — the caller's ``.grad`` may hold more
    than this batch (manual optimization that accumulates: the SE moved 0.1727 → 0.2691 when a
    round-29 change centred there, a review) — and at the caller's mean only when told
    (``center_at_mean``: under DDP, the processes' mean)."""
    from genbounds.estimators.functional import trainable_parameters
    from genbounds.estimators.per_sample_gradients import per_sample_gradient_moments

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    batch = (torch.randn(6, 3), torch.randn(6, 2))

    def loss_fn(module, b):
        return ((module(b[0]) - b[1]) ** 2).mean(1)

    own = per_sample_gradient_moments(net, loss_fn, batch)
    wrong = [2.0 * w.reshape(-1) / 6 for w in own.weighted_sum]  # (a .grad holding two batches)
    kept = per_sample_gradient_moments(net, loss_fn, batch, mean_gradient=wrong)
    told = per_sample_gradient_moments(net, loss_fn, batch, mean_gradient=wrong, center_at_mean=True)
    assert torch.equal(kept.centered_sums[0], own.centered_sums[0])
    assert not torch.allclose(told.centered_sums[0], own.centered_sums[0])
    assert len(trainable_parameters(net)) == 2


@pytest.mark.parametrize("pair", [
    (lambda: GradientDispersion(backend="hooks"), lambda: GradientDispersion(backend="functorch", every_n_steps=2)),
    (lambda: HessianTrace(backend="hutchinson"), lambda: HessianTrace(backend="pyhessian")),
    (lambda: HeldoutGradient(every_n_steps=1), lambda: HeldoutGradient(every_n_steps=2)),
])
def test_two_callbacks_that_write_the_same_tags_are_said_once_before_step_0(tmp_path, pair):
    """Two dispersions (two Hessian traces, two held-out gradients) with other settings on one
    Trainer write the same tags, their values interleaved in the loggers, and the bounds read the
    first only (found by a new user's walk, round 31): one warning before step 0 names both. Each
    keeps its own values (a backend compared with another in one fit reads them there)."""
    first, second = pair[0](), pair[1]()
    said = []

    class Count(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            said.append(sum("same tags" in str(w.message) for w in caught))

    module = Classifier(MLP(64, 10, 32), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [first, second, Count()], max_steps=2).fit(module, DigitsDataModule(batch_size=32))
    name = type(first).__name__
    shared = [str(w.message) for w in caught if "same tags" in str(w.message)]
    assert len(shared) == 1 and f"2 {name} callbacks ({first.state_key}; {second.state_key})" in shared[0]
    assert said and said[0] == 1  # (said before step 0)


@pytest.mark.parametrize("every, stale", [(2, True), (1, False)])
def test_a_validation_metric_older_than_the_final_weights_is_stale_in_the_trainer_too(tmp_path, every, stale):
    """The in-Trainer gate on a metric of the user's that validation computes: when the last
    validation ran before the final weights (``check_val_every_n_epoch=2`` over 3 epochs), the value
    is stale — a violation, as ``genbounds gate`` reads it from the logs (it passed in the Trainer
    while the CLI failed the same run, a new user's walk, round 32). The training loss, logged at
    every step, is not stale; a run validated at its end passes."""
    gate = BoundGate(max={"val_loss": 100.0, "train_loss": 100.0}, on_violation="warn")
    module = Classifier(MLP(64, 10, 32), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [gate], max_epochs=3, limit_train_batches=5, limit_val_batches=2,
                check_val_every_n_epoch=every).fit(module, DigitsDataModule(batch_size=32))
    reasons = {v["metric"]: v["reason"] for v in gate.final["violations"]}
    if stale:
        assert set(reasons) == {"val_loss"} and reasons["val_loss"] == (
            "stale: last computed at step 10, the run ended at step 15")
    else:
        assert gate.final["passed"] and not reasons


def test_a_bound_not_computable_yet_does_not_stop_the_run_but_fails_at_the_end(tmp_path):
    """``BoundGate(on_violation="stop")`` on Neu's bound, whose gradient sensitivity is measured
    every 20 steps while validation runs every 10: the first evaluation's bound is NaN (not
    computable yet), and the gate stopped a healthy run there (a new user's walk, round 32). A
    bound's NaN before the end now counts as missing; the final check still fails a NaN."""
    def run(root, sensitivity_every):  # (every 20 steps, validation every 10)
        gate = BoundGate(max={"bound/neu": 1e6}, on_violation="stop")
        suite = [GradientDispersion(), HeldoutGradient(every_n_steps=10),
                 GradientSensitivity(sigmas=[0.01, 0.1], every_n_steps=sensitivity_every),
                 Flatness(sigmas=[0.01, 0.1], scaling="sqrt_steps", every_n_epochs=None, at_train_end=False),
                 GeneralizationBound(bounds=["neu"]), gate]
        t = trainer(root, suite, max_epochs=3, limit_train_batches=10, limit_val_batches=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(Classifier(MLP(64, 10, 32), lr=0.1), DigitsDataModule(batch_size=32))
        return t, gate

    t, gate = run(tmp_path, 20)
    assert t.current_epoch == 3 and gate.stopped_step is None and gate.final["passed"]
    # (a NaN bound at the end is still a violation: test_nan_weights_make_the_gate_raise)
