"""Layers frozen or unfrozen during a fit (``callbacks/trainable_set.py``): Lightning's
``BackboneFinetuning`` and a hand-written unfreeze. Found by a matrix of user set-ups: the first
crashed at ``on_train_start`` (the parameters had been taken at ``setup``, before the backbone was
frozen in ``on_fit_start``); the second logged a dispersion 30–39 % low after the unfreeze, with
no warning, then crashed at the end of the fit."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genbounds.callbacks import GradientDispersion
from genbounds.callbacks.trainable_set import TrainableSet
from helpers import CrossEntropyModule, bound_suite, trainer


def _data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % 4
    return DataLoader(TensorDataset(x, y), batch_size=16)


class Backbone(CrossEntropyModule):
    """A backbone and a head, written as Lightning's fine-tuning docs write it; ``unfreeze_epoch``:
    the backbone's first layer frozen in ``__init__`` and unfrozen by hand at that epoch."""

    def __init__(self, unfreeze_epoch: int | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        self.unfreeze_epoch = unfreeze_epoch
        if unfreeze_epoch is not None:
            self.backbone[0].requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x))

    def on_train_epoch_start(self):
        if self.unfreeze_epoch is not None and self.current_epoch == self.unfreeze_epoch:
            self.backbone[0].requires_grad_(True)

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()) if self.unfreeze_epoch is None
                               else self.parameters(), lr=0.1)


def _dispersions(tmp_path, backend: str, **fit) -> list[tuple[int, float, tuple[str, ...]]]:
    torch.manual_seed(0)
    module = Backbone(unfreeze_epoch=2)
    cb = GradientDispersion(backend=backend)
    records: list = []
    cb.add_listener(records.extend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / backend, [cb], max_epochs=4, **fit).fit(module, _data(64, 0))
    return [(r.step, r.values["grad/dispersion"],
             tuple(sorted(k.rsplit("/", 1)[1] for k in r.values if "/layer/" in k))) for r in records]


def test_a_layer_unfrozen_by_hand_is_measured_from_the_next_epoch_exactly(tmp_path):
    hooks = _dispersions(tmp_path, "hooks")
    exact = _dispersions(tmp_path, "functorch")
    assert [s for s, _, _ in hooks] == list(range(16)) == [s for s, _, _ in exact]
    for (step, got, layers), (_, want, _) in zip(hooks, exact):
        assert got == pytest.approx(want, rel=1e-5), step  # (the hooks missed the unfrozen layer: 30 % low)
        assert layers == (("backbone.2", "head") if step < 8 else ("backbone.0", "backbone.2", "head"))


def test_backbone_finetuning_with_the_suite_fits_and_fails_closed_after_the_unfreeze(tmp_path):
    from lightning.pytorch.callbacks import BackboneFinetuning

    from genbounds.callbacks import GeneralizationBound

    torch.manual_seed(0)
    suite = bound_suite()
    suite[0] = GradientDispersion()  # (auto: the hooks)
    records: list = []
    suite[0].add_listener(records.extend)
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=2, backbone_initial_ratio_lr=0.1)
    evaluations: list[dict[str, float]] = []

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                evaluations.append(dict(bound.latest))

    bound = next(cb for cb in suite if isinstance(cb, GeneralizationBound))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [finetune, *suite, Record()], max_epochs=4).fit(Backbone(), _data(64, 0), _data(32, 1))
    said = [str(w.message) for w in caught]
    changed = [m for m in said if m.startswith("genbounds: the trained parameters changed")]
    assert len(changed) == 1 and "at step 8 (unfrozen: backbone.0, backbone.2)" in changed[0], changed
    nan = [m for m in said if "could not be computed (NaN)" in m]
    changed_nan = [m for m in nan if "the trained parameters changed at step 8" in m]
    assert len(changed_nan) == 1, nan
    # (any other: Neu's, at an evaluation before a second Γ probe after step 0 — docs/math.md §6.9)
    assert all(m.startswith("GeneralizationBound: bound/neu") and "wang_mao" not in m
               for m in nan if m not in changed_nan), nan
    # frozen from on_fit_start: the head alone until the unfreeze, every layer after it
    assert {tuple(sorted(k for k in r.values if "/layer/" in k)) for r in records if r.step < 8} == \
        {("grad/dispersion/layer/head",)}
    assert all(len([k for k in r.values if "/layer/" in k]) == 3 for r in records if r.step >= 8)
    assert math.isfinite(evaluations[0]["bound/wang_mao_eq3"])  # (the epochs before the change)
    assert math.isnan(bound.latest["bound/wang_mao_eq3"]) and bound.latest["bound/valid"] == 0.0
    assert bound.changed_at == 8 and math.isfinite(bound.latest["gap/measured"])


def test_trainable_set_says_each_change_once_naming_layers():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0].requires_grad_(False)
    trained = TrainableSet.shared(net)
    trained.take(net, 0)
    assert trained.check(net, 3) == 0
    net[0].requires_grad_(True)
    net[1].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"changed at step 5 \(unfrozen: 0; frozen: 1\)"):
        assert trained.check(net, 5) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trained.check(net, 6) == 1  # (no change: nothing said)
    assert TrainableSet.shared(net) is trained
    trained.reset()
    assert trained.names is None and trained.version == 0


# ---------------------------------------------------------------- found by a review of the above
class Schedule(Backbone):
    """``freeze_epochs``: the backbone's first layer frozen in ``on_train_epoch_start`` for those
    epochs (a freeze schedule: the hooks run after ``on_train_start``); ``unfreeze_step``: unfrozen
    in the module's own ``on_train_batch_start`` at that step (inside a step, after ours)."""

    def __init__(self, freeze_epochs: tuple[int, ...] = (), unfreeze_step: int | None = None) -> None:
        super().__init__()
        self.freeze_epochs, self.unfreeze_step = freeze_epochs, unfreeze_step
        if unfreeze_step is not None:
            self.backbone[0].requires_grad_(False)

    def on_train_epoch_start(self):
        if self.freeze_epochs:
            self.backbone[0].requires_grad_(self.current_epoch not in self.freeze_epochs)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == self.unfreeze_step:
            self.backbone[0].requires_grad_(True)

    configure_optimizers = CrossEntropyModule.configure_optimizers  # (every parameter: some unfreeze)


def _exact_per_step(records_out: dict):
    class Reference(pl.Callback):  # the exact dispersion of the parameters the step trains
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            x, y = self.batch
            params = [p for p in pl_module.parameters() if p.requires_grad]
            rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                F.cross_entropy(pl_module(x[i:i + 1]), y[i:i + 1]), params)]) for i in range(len(x))]
            g = torch.stack(rows).double()
            b = len(g)
            records_out[trainer.global_step] = float(b / (b - 1) * (g.square().sum(1).mean()
                                                                    - g.mean(0).square().sum())) / b

    return Reference()


@pytest.mark.parametrize("backend", ["hooks", "functorch"])
def test_a_freeze_in_the_first_epochs_start_is_the_fits_set_and_a_later_unfreeze_a_change(tmp_path, backend):
    """The first epoch's first batch was never compared (functorch raised an IndexError at step 0,
    and the freeze was dated as a change)."""
    exact: dict[int, float] = {}
    cb = GradientDispersion(backend=backend)
    records: list = []
    cb.add_listener(records.extend)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb, _exact_per_step(exact)], max_epochs=3).fit(Schedule(freeze_epochs=(0, 1)),
                                                                           _data(64, 0))
    changed = [str(w.message) for w in caught if str(w.message).startswith("genbounds: the trained parameters")]
    assert len(changed) == 1 and "changed at step 8 (unfrozen: backbone.0)" in changed[0], changed
    assert [r.step for r in records] == list(range(12))
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(exact[r.step], rel=1e-5), r.step


def test_a_layer_unfrozen_inside_a_step_leaves_that_step_unmeasured_and_the_next_exact(tmp_path):
    exact: dict[int, float] = {}
    cb = GradientDispersion(backend="hooks")
    records: list = []
    cb.add_listener(records.extend)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [cb, _exact_per_step(exact)], max_steps=10).fit(Schedule(unfreeze_step=5), _data(64, 0))
    assert [r.step for r in records] == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # (step 5 was measured on the old set)
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(exact[r.step], rel=1e-5), r.step


def test_a_change_before_a_checkpoint_holds_in_the_resumed_fit(tmp_path):
    """Saved between the change (step 4) and the bound's next evaluation, the checkpoint had no
    record of it; resumed, BaseFinetuning froze the backbone again and the bounds were finite."""
    from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint

    from genbounds.callbacks import GeneralizationBound

    def suite_with(*extra):
        return [BackboneFinetuning(unfreeze_backbone_at_epoch=1), *bound_suite(), *extra]

    torch.manual_seed(0)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, suite_with(every), max_steps=7, enable_checkpointing=True).fit(
            Backbone(), _data(64, 0), _data(32, 1))
        resumed = suite_with()
        trainer(tmp_path / "b", resumed, max_epochs=3).fit(Backbone(), _data(64, 0), _data(32, 1),
                                                          ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt"))))
    bound = next(cb for cb in resumed if isinstance(cb, GeneralizationBound))
    assert bound.changed_at == 4 and math.isnan(bound.latest["bound/wang_mao_eq2"])
    assert bound.latest["bound/valid"] == 0.0


def test_after_a_change_no_bound_keeps_a_value_of_before_and_a_second_fit_runs(tmp_path):
    """``bound/neu_abs`` kept its last finite value; a second fit raised about a checkpoint."""
    from genbounds.callbacks import GeneralizationBound

    suite = bound_suite()
    bound = next(cb for cb in suite if isinstance(cb, GeneralizationBound))
    module = Backbone(unfreeze_epoch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, suite, max_epochs=4)
        t.fit(module, _data(64, 0), _data(32, 1))
        assert bound.changed_at == 8
        assert all(math.isnan(bound.latest[k]) for k in ("bound/neu", "bound/neu_abs", "bound/neu_abs_se"))
        t.fit_loop.max_epochs = 5
        t.fit(module, _data(64, 0), _data(32, 1))  # (continues: the bounds stay NaN)
    assert math.isnan(bound.latest["bound/wang_mao_eq3"]) and t.global_step == 20


def test_the_layerwise_bounds_follow_the_layers_trained_not_those_at_setup(tmp_path):
    """BackboneFinetuning listed after the suite freezes the backbone after the bound's setup: the
    one layer left (the head) has no layer-wise bounds, and nothing is flagged invalid for it."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    suite = bound_suite()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [*suite, BackboneFinetuning(unfreeze_backbone_at_epoch=10)], max_epochs=2).fit(
            Backbone(), _data(64, 0), _data(32, 1))
    bound = suite[-1]
    assert not any(w.endswith("_layerwise") for w in bound.wanted)
    assert not any("layerwise" in k for k in bound.latest)  # (they were NaN and flagged invalid)


def test_a_failed_fit_leaves_no_trained_set_behind(tmp_path):
    from genbounds.callbacks import HessianTrace

    class Fails(Backbone):
        def on_train_epoch_start(self):
            if self.current_epoch == 1:
                raise RuntimeError("boom")

    module = Fails()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="boom"):
        warnings.simplefilter("ignore")
        trainer(tmp_path, [HessianTrace(every_n_steps=2, min_probes=4, max_probes=4)], max_epochs=3).fit(
            module, _data(64, 0))
    assert TrainableSet.shared(module).names is None


# ---------------------------------------------------------------- found by a second review
class Frozen(Backbone):
    """The backbone's first layer frozen for the whole fit: in ``__init__``, or by an epoch-start
    hook (``schedule``: the set at ``on_train_start`` still trains it)."""

    def __init__(self, schedule: bool) -> None:
        super().__init__()
        self.schedule = schedule
        if not schedule:
            self.backbone[0].requires_grad_(False)

    def on_train_epoch_start(self):
        if self.schedule:
            self.backbone[0].requires_grad_(False)

    configure_optimizers = CrossEntropyModule.configure_optimizers


def _bounds_of(tmp_path, schedule: bool, **fit) -> dict[str, float]:
    from genbounds.callbacks import GeneralizationBound, GradientSensitivity

    torch.manual_seed(0)
    module = Frozen(schedule)
    suite = bound_suite()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, suite, **fit).fit(module, _data(64, 0), _data(32, 1))
    bound = next(cb for cb in suite if isinstance(cb, GeneralizationBound))
    sensitivity = next(cb for cb in suite if isinstance(cb, GradientSensitivity))
    assert bound.changed_at is None and sensitivity.shape is not None
    return {k: v for k, v in bound.latest.items() if k.startswith("bound")}


def test_a_freeze_schedule_in_the_epoch_start_gives_the_bounds_of_the_same_freeze_from_init(tmp_path):
    """The bound compared the set of on_train_start with the first batch's and made every bound
    NaN (and GradientSensitivity dropped Neu's shape on the silent re-take)."""
    by_init = _bounds_of(tmp_path / "init", False, max_epochs=2)
    by_hook = _bounds_of(tmp_path / "hook", True, max_epochs=2)
    assert math.isfinite(by_hook["bound/wang_mao_eq3"]) and by_hook["bound/valid"] == 1.0
    assert by_hook == pytest.approx(by_init, rel=1e-12, nan_ok=True)


def test_a_fit_resumed_with_the_same_freeze_schedule_ends_as_the_uninterrupted_one(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    whole = _bounds_of(tmp_path / "whole", True, max_epochs=3)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        trainer(tmp_path / "a", [*bound_suite(), every], max_epochs=3, enable_checkpointing=True).fit(
            Frozen(schedule=True), _data(64, 0), _data(32, 1))
        first = str(sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))[0])
        torch.manual_seed(0)
        suite = bound_suite()
        trainer(tmp_path / "b", suite, max_epochs=3).fit(Frozen(schedule=True), _data(64, 0), _data(32, 1),
                                                          ckpt_path=first)
    resumed = {k: v for k, v in suite[-1].latest.items() if k.startswith("bound")}
    assert suite[-1].changed_at is None and resumed == pytest.approx(whole, rel=1e-9, nan_ok=True)


def test_a_second_dispersion_callback_drops_a_step_the_first_saw_change(tmp_path):
    exact: dict[int, float] = {}
    first, second = GradientDispersion(backend="hooks"), GradientDispersion(backend="hooks", every_n_steps=5)
    kept: list[list] = [[], []]
    first.add_listener(kept[0].extend)
    second.add_listener(kept[1].extend)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [first, second, _exact_per_step(exact)], max_steps=11).fit(
            Schedule(unfreeze_step=5), _data(64, 0))
    assert [r.step for r in kept[1]] == [0, 10]  # (step 5: planned on the old set, by both)
    for r in kept[0] + kept[1]:
        assert r.values["grad/dispersion"] == pytest.approx(exact[r.step], rel=1e-5), r.step


def test_a_freeze_inside_the_first_steps_accumulation_window_is_a_change(tmp_path):
    class Late(Backbone):
        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == 0 and batch_idx == 1:  # (micro-batch 0's backward ran on the layer)
                self.backbone[0].requires_grad_(False)

    module = Late()
    seen: dict = {}

    class Watch(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            seen["changes"] = list(TrainableSet.shared(pl_module).changes)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [GradientDispersion(), Watch()], max_steps=3, accumulate_grad_batches=2).fit(
            module, _data(64, 0))
    assert [c.step for c in seen["changes"]] == [0] and seen["changes"][0].removed == ("backbone.0.weight",
                                                                                       "backbone.0.bias")


# ---------------------------------------------------------------- found by a third review
def test_a_float64_probe_of_a_model_with_a_frozen_layer(tmp_path):
    """A probe below σ = 1e-3 runs in float64: the frozen parameters stayed float32 and it raised."""
    from genbounds.callbacks import Flatness, GradientSensitivity

    flat = Flatness(sigmas=[1e-4], num_draws=4, every_n_steps=2, at_train_end=False)
    sens = GradientSensitivity(sigmas=[1e-4], num_draws=4, every_n_steps=2)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [flat, sens], max_steps=4).fit(Backbone(unfreeze_epoch=99), _data(64, 0), _data(32, 1))
    assert flat.num_probes_run >= 2 and sens.num_probes_run >= 2


@pytest.mark.parametrize("probe", ["Flatness", "GradientSensitivity", "HeldoutGradient", "HessianTrace"])
def test_an_epoch_with_every_parameter_frozen_leaves_training_as_it_is(tmp_path, probe):
    """Nothing trained for an epoch (``training_step`` returns None then): Flatness' and
    GradientSensitivity's StopIteration ended Lightning's epoch early (training changed); the
    others raised."""
    import genbounds.callbacks as cbs

    class Idle(Backbone):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss if loss.requires_grad else None

        def on_train_epoch_start(self):
            for p in self.parameters():
                p.requires_grad_(self.current_epoch != 1)

        configure_optimizers = CrossEntropyModule.configure_optimizers

    made = {"Flatness": lambda: cbs.Flatness(sigmas=[1e-2], num_draws=4, every_n_steps=3),
            "GradientSensitivity": lambda: cbs.GradientSensitivity(sigmas=[1e-2], num_draws=4, every_n_steps=3),
            "HeldoutGradient": lambda: cbs.HeldoutGradient(every_n_steps=2),
            "HessianTrace": lambda: cbs.HessianTrace(min_probes=4, max_probes=4, every_n_steps=3)}[probe]()
    steps: dict[int, int] = {}

    class Count(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            steps[trainer.current_epoch] = trainer.global_step

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [made, Count()], max_epochs=3).fit(Idle(), _data(64, 0), _data(32, 1))
    assert steps == {0: 4, 1: 8, 2: 12}  # (plain Lightning's: the idle epoch's steps still count)


def test_callbacks_reused_by_another_trainer_start_a_new_run(tmp_path):
    """The series kept the first fit's steps (wrong standard errors); a layer frozen in the second
    model read as a change against the first fit's set."""
    from genbounds.callbacks import GeneralizationBound

    suite = bound_suite()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        trainer(tmp_path / "a", suite, max_epochs=2).fit(Backbone(), _data(64, 0), _data(32, 1))
        torch.manual_seed(0)
        trainer(tmp_path / "b", suite, max_epochs=2).fit(Frozen(schedule=False), _data(64, 0), _data(32, 1))
        reused = next(cb for cb in suite if isinstance(cb, GeneralizationBound))
        fresh = _bounds_of(tmp_path / "c", False, max_epochs=2)
    assert reused.changed_at is None and len(reused.series.lrs) == 8
    assert {k: v for k, v in reused.latest.items() if k.startswith("bound")} == pytest.approx(fresh, nan_ok=True)


def test_after_a_change_no_term_or_setting_of_before_stands(tmp_path):
    from genbounds.callbacks import GeneralizationBound

    suite = bound_suite()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, suite, max_epochs=4).fit(Backbone(unfreeze_epoch=2), _data(64, 0), _data(32, 1))
    bound = next(cb for cb in suite if isinstance(cb, GeneralizationBound))
    assert bound.changed_at == 8
    assert not any(k.startswith(("bound_terms/", "setting/")) for k in bound.latest)
    assert all(math.isnan(v) for k, v in bound.latest.items() if k.startswith("ci/bound/"))
