"""Honest numbers: the measured gap and its SE, the error gap, a stable R, per-layer quantities
that add up, HParams that tell runs apart (issues on gating-worthy and layer-wise bounds)."""

from __future__ import annotations

import glob
import math
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from genbounds.bounds.gap import measured_gap
from genbounds.bounds.loss_range import quantile_range_r
from genbounds.callbacks import GeneralizationBound, GradientDispersion, HessianTrace
from genbounds.data import DigitsDataModule
from genbounds.models import MLP, Classifier
from helpers import bound_suite, trainer


def fit(tmp_path, callbacks, module=None, data=None, seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    module = module if module is not None else Classifier(MLP(64, 10, 32), lr=0.05)
    defaults = dict(max_epochs=2, limit_train_batches=5, limit_val_batches=2)
    defaults.update(kwargs)
    t = trainer(tmp_path, callbacks, **defaults)
    t.fit(module, data if data is not None else DigitsDataModule(batch_size=64, seed=seed))
    return t, module


def aggregator(t):
    return next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))


def test_measured_gap_and_error_gap_match_a_hand_computation(tmp_path):
    t, module = fit(tmp_path, bound_suite())
    latest = aggregator(t).latest
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    module.eval()
    with torch.no_grad():
        def per_sample(dataset):
            x, y = dataset.tensors
            logits = module(x)
            return (F.cross_entropy(logits, y, reduction="none").double().numpy(),
                    (logits.argmax(1) != y).double().numpy())

        tr_loss, tr_err = per_sample(data.train_set)
        he_loss, he_err = per_sample(data.val_set)
    for tag, tr, he in (("measured", tr_loss, he_loss), ("error", tr_err, he_err)):
        gap = he.mean() - tr.mean()
        se = math.sqrt(he.var(ddof=1) / he.size)  # the whole training set: L_S itself, no error
        assert latest[f"gap/{tag}"] == pytest.approx(gap, rel=1e-6, abs=1e-9), tag
        assert latest[f"gap/{tag}_se"] == pytest.approx(se, rel=1e-6), tag
    assert latest["gap/train_error"] == pytest.approx(tr_err.mean(), abs=1e-12)


def test_gap_on_a_subset_carries_the_finite_population_term():
    rng = np.random.default_rng(0)
    tr, he = rng.normal(1.0, 0.5, 200), rng.normal(1.2, 0.5, 100)
    est = measured_gap(tr, he, num_train=1000)
    want = math.sqrt(he.var(ddof=1) / 100 + (1 - 200 / 1000) * tr.var(ddof=1) / 200)
    assert est.standard_error == pytest.approx(want, rel=1e-12)
    with_nan = measured_gap(np.append(tr, np.inf), np.append(he, np.nan), num_train=1000)
    assert with_nan.dropped == 2 and with_nan.gap == pytest.approx(est.gap, rel=1e-12)


def test_one_extreme_loss_moves_the_default_r_by_less_than_one_percent():
    rng = np.random.default_rng(1)
    losses = rng.gamma(2.0, 0.5, 1000)
    base = quantile_range_r(losses)
    for extreme in (1e3, 1e6, np.inf):
        moved = quantile_range_r(np.append(losses[:-1], extreme))
        assert abs(moved - base) <= 0.01 * base, extreme
    # the observed-range rule, for contrast, is decided by that one sample
    assert (np.max(np.append(losses, 1e6)) - np.min(losses)) / 2 > 1e5 * base


def test_per_layer_dispersion_sums_exactly_and_per_layer_traces_within_se(tmp_path):
    disp, hess = GradientDispersion(), HessianTrace(min_probes=40, max_probes=40, every_n_epochs=1)
    records, curv = [], []
    disp.add_listener(records.extend)
    hess.channel.subscribe(curv.extend)
    fit(tmp_path, [disp, hess], module=Classifier(MLP(64, 10, 32, depth=2), lr=0.05))
    assert len(disp.group_names) == 3
    for rec in records:
        parts = [rec.values[f"grad/dispersion/layer/{g}"] for g in disp.group_names]
        assert sum(parts) == pytest.approx(rec.values["grad/dispersion"], rel=1e-9, abs=1e-15)
    for rec in curv:
        samples = np.asarray(rec.group_samples)
        assert samples.shape == (40, 3)
        # the per-probe parts add up to each probe's sample: the per-layer means add up to the trace
        assert sum(rec.group_traces) == pytest.approx(rec.hessian_trace, rel=1e-9)
        assert abs(sum(rec.group_traces) - rec.hessian_trace) <= 3 * rec.hessian_trace_se


def test_hparams_tell_runs_apart(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    dirs = []
    for noise in (0.0, 0.4):
        logger = TensorBoardLogger(str(tmp_path), name="hp", default_hp_metric=False)
        fit(tmp_path, bound_suite(), data=DigitsDataModule(batch_size=64, label_noise=noise), logger=logger)
        dirs.append(logger.log_dir)
    seen = []
    for directory in dirs:
        (path,) = glob.glob(os.path.join(directory, "events.out.tfevents*"))
        acc = EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        params = {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in
                  start.hparams.items()}
        assert "data/label_noise" in params and "lr" in params and "batch_size" in params and "seed" in params
        seen.append(params["data/label_noise"])
        content = acc.SummaryMetadata("_hparams_/experiment").plugin_data.content
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
        metrics = [m.name.tag for m in experiment.metric_infos]
        differs = [h.name for h in experiment.hparam_infos if h.differs]
        assert "data/label_noise" in differs[:5]  # ticked by default in TensorBoard's HParams
        assert metrics[:3] == ["bound/wang_mao_eq3", "bound/wang_mao_eq2", "bound/neu"]  # ticked first
        assert "gap/measured" in metrics[:5]
        latest = [k for k in acc.Tags()["scalars"] if k.startswith("bound/") and not k.endswith("_se")]
        assert all(tag in metrics for tag in latest if tag != "bound/neu_abs_se"), set(latest) - set(metrics)
    assert seen == [0.0, 0.4]


def test_one_training_forward_on_every_step_without_a_probe(tmp_path):
    """With the default suite, a step on which no probe runs costs exactly the training forward:
    no forward for R, no hook-registration pass, nothing (counted with a forward hook)."""
    from genbounds.callbacks.probe import ProbeCallback

    class Count(pl.Callback):
        def __init__(self) -> None:
            self.forwards = 0
            self.per_step: list[tuple[int, int, bool]] = []

        def setup(self, trainer, pl_module, stage):
            pl_module.network.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

        def _probes(self, trainer):
            return sum(cb.num_probes_run for cb in trainer.callbacks if isinstance(cb, ProbeCallback))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start, self._probes_before = self.forwards, self._probes(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            probed = self._probes(trainer) != self._probes_before
            self.per_step.append((trainer.global_step, self.forwards - self._start, probed))

    counter = Count()
    suite = bound_suite()
    fit(tmp_path, [counter, *suite], max_epochs=2, limit_train_batches=8, limit_val_batches=1)
    quiet = [n for _, n, probed in counter.per_step if not probed]
    assert len(quiet) >= 4 and set(quiet) == {1}, counter.per_step
    assert suite[0].measured_steps == 16  # the dispersion was measured on every one of them


def test_overhead_budget_spaces_the_probes_and_reports_the_ratio(tmp_path):
    suite = bound_suite(overhead_budget=0.05)
    dense = bound_suite()
    t, _ = fit(tmp_path / "budget", suite, max_epochs=3)
    fit(tmp_path / "dense", dense, max_epochs=3)
    budget = t.__dict__["_genbounds_overhead"]
    agg = aggregator(t)
    assert budget.fraction == 0.05 and budget.deferred > 0
    # the next evaluation is priced at what a whole evaluation cost (gap, probes, math), not its last
    # block, and that much is kept free for the final one
    assert agg._eval_cost is not None and agg._eval_cost == pytest.approx(budget.reserve)
    assert agg._eval_cost > budget.last_cost["GeneralizationBound"]
    # the per-step statistics are charged too
    assert budget.by_owner.get("GradientDispersion", 0.0) > 0
    assert agg.latest["perf/overhead"] > 0
    probes = lambda s: sum(cb.num_probes_run for cb in s if hasattr(cb, "num_probes_run"))  # noqa: E731
    assert probes(suite) < probes(dense)
    # the final weights are always evaluated: every bound is there
    assert math.isfinite(agg.latest["bound/wang_mao_eq3"]) and agg.latest["setting/T"] == 15


def test_gap_chunks_of_a_tensor_dataset_are_what_the_loaders_collate_makes():
    """The gap evaluation indexes a plain ``TensorDataset`` once per tensor instead of collating
    its items: the same batches as the per-sample path (a subclass, which may override
    ``__getitem__``, takes that path)."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    from genbounds.callbacks.gap_evaluation import GapEvaluation

    class Subclass(TensorDataset):
        pass

    g = torch.Generator().manual_seed(0)
    # images stored channels_last: the stacked batches are contiguous whatever the dataset's strides
    x = torch.randn(23, 3, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (23,), generator=g)
    trainer = SimpleNamespace(strategy=SimpleNamespace(batch_to_device=lambda b: b, root_device=torch.device("cpu")),
                              precision_plugin=SimpleNamespace(convert_input=lambda b: b), lightning_module=None)
    indices = [4, 0, 22, 7, 7, 13, 1, 9, 2, 18, 3]
    gap = GapEvaluation("test", samples=None, chunk=4, mode="eval")
    fast = list(gap._chunks_from_dataset(trainer, DataLoader(TensorDataset(x, y), batch_size=8), indices, "train"))
    slow = list(gap._chunks_from_dataset(trainer, DataLoader(Subclass(x, y), batch_size=8), indices, "train"))
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow):
        assert type(a) is type(b) and len(a) == len(b) == 2
        for ta, tb in zip(a, b):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb) and ta.stride() == tb.stride()
