"""Fit set-ups a matrix of users' modules and Lightning options found at fault (README, "Fit
set-ups"): reentrant checkpointing, several training loaders, weights replaced at the end of
training, gradient clipping, spectral normalization, ``trainer.validate`` after ``fit``, an
accumulation schedule, pruning during the fit. Each test failed on the code before its fix (a
crash, a silent wrong number or a lost result)."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genbounds.callbacks import GeneralizationBound, GradientDispersion
from helpers import CrossEntropyModule, bound_suite, trainer
from helpers import MixtureOfExperts as Experts


def _loader(n: int, seed: int, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :3].argmax(1))), batch_size=batch_size)


class Net(CrossEntropyModule):
    """A small classifier as Lightning's docs write one; ``body`` wraps its middle block."""

    def __init__(self, body: str = "plain") -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.out = nn.Linear(16, 3)
        self.body = body
        if body == "spectral":
            self.block[1] = nn.utils.parametrizations.spectral_norm(self.block[1])

    def forward(self, x):
        h = self.inp(x)
        h = checkpoint.checkpoint(self.block, h, use_reentrant=True) if self.body == "reentrant" else self.block(h)
        return self.out(h)



def _fit(tmp_path, module, callbacks, train=None, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks, **kwargs).fit(module, train if train is not None else _loader(64, 0),
                                                    _loader(32, 1))
    return [str(w.message) for w in caught]


def test_reentrant_checkpointing_leaves_the_gradient_probes_out_with_one_warning_and_the_rest_measured(tmp_path):
    torch.manual_seed(0)
    suite = bound_suite()
    records: list = []
    suite[0].add_listener(records.extend)
    said = _fit(tmp_path, Net("reentrant"), suite, max_steps=12)  # (raised in HeldoutGradient at step 0)
    named = [m for m in said if "use_reentrant=True" in m]
    assert len(named) == 1 and "HeldoutGradient, GradientSensitivity, HessianTrace measure nothing" in named[0]
    assert "use_reentrant=False" in named[0]
    assert len(records) > 0 and all(math.isfinite(r.values["grad/dispersion"]) for r in records)
    bound = suite[-1]
    assert math.isfinite(bound.latest["bound/wang_mao_eq2"])  # (dispersion and flatness: not affected)
    assert math.isnan(bound.latest["bound/wang_mao_eq3"]) and bound.latest["bound_valid/wang_mao_eq3"] == 0.0


def test_several_training_loaders_are_refused_before_step_0_with_the_fix(tmp_path):
    class Two(Net):
        def training_step(self, batch, batch_idx):
            return sum(F.cross_entropy(self(x), y) for x, y in batch.values())

    with pytest.raises(MisconfigurationException, match=r"2 training dataloaders \('a', 'b'\).*ConcatDataset"):
        _fit(tmp_path, Two(), [GradientDispersion()], train={"a": _loader(64, 0), "b": _loader(48, 2)}, max_steps=2)


def test_weights_replaced_at_the_end_of_training_are_said(tmp_path):
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    torch.manual_seed(0)
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    said = _fit(tmp_path / "swa", Net(), [swa, *bound_suite()], max_epochs=3)
    replaced = [m for m in said if "weights fit() returns are not those of its final evaluation" in m]
    assert len(replaced) == 1, said
    torch.manual_seed(0)
    said = _fit(tmp_path / "plain", Net(), bound_suite(), max_epochs=3)  # (the probes' perturbations: not a change)
    assert not any("weights fit() returns" in m for m in said)


def test_gradient_clipping_flags_the_bounds_heuristic(tmp_path):
    torch.manual_seed(0)
    suite = bound_suite()
    said = _fit(tmp_path, Net(), suite, max_steps=8, gradient_clip_val=0.5)
    assert sum("gradient clipping (gradient_clip_val=0.5)" in m for m in said) == 1
    assert suite[-1].latest["bound/heuristic"] == 1.0


def test_spectral_norm_extra_passes_compute_the_training_forwards_function(tmp_path):
    """Each forward in training mode advances the power iteration and then divides by the new
    σ: a pass run again in training mode was another function (0.2–0.7 % off)."""
    expected: list[float] = []

    class Reference(pl.Callback):  # after GradientDispersion: the step's gradient, the σ its forward used
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            x, y = self.batch
            params = [p for p in pl_module.parameters() if p.requires_grad]
            sn = pl_module.block[1].parametrizations.weight[0]
            sn.eval()  # (no iteration: the u, v the training forward left)
            try:
                rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                    F.cross_entropy(pl_module(x[i:i + 1]), y[i:i + 1]), params, materialize_grads=True)])
            for i in range(len(x))]
            finally:
                sn.train()
            g = torch.stack(rows).double()
            b = len(g)
            expected.append(float(b / (b - 1) * (g.square().sum(1).mean() - g.mean(0).square().sum())) / b)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

    torch.manual_seed(0)
    cb = GradientDispersion(backend="functorch")
    records: list = []
    cb.add_listener(records.extend)
    _fit(tmp_path, Net("spectral"), [cb, Reference()], max_steps=4)
    assert len(records) == 4
    for r, want in zip(records, expected):
        assert r.values["grad/dispersion"] == pytest.approx(want, rel=1e-5)


def test_validate_after_fit_keeps_the_fits_final_values(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    suite = bound_suite()
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    t = trainer(tmp_path, [*suite, every], max_epochs=3, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Net(), _loader(64, 0), _loader(32, 1))
        bound = next(cb for cb in suite if isinstance(cb, GeneralizationBound))
        final, evaluations = dict(bound.latest), bound.evaluations
        first = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))[0]  # (its state: one evaluation in)
        t.validate(dataloaders=_loader(32, 1), ckpt_path=str(first))
    assert evaluations == 3 and bound.evaluations == evaluations and bound.latest == final


def test_reentrant_checkpointing_refuses_an_extra_pass_dispersion_and_vectorizes_no_probe(tmp_path):
    """An extra-pass backend raised at step 0 (found by a review); a vectorized Flatness raised in
    torch.func."""
    from genbounds.callbacks import Flatness

    with pytest.raises(MisconfigurationException, match="use_reentrant=False"):
        _fit(tmp_path / "a", Net("reentrant"), [GradientDispersion(backend="functorch")], max_steps=2)
    torch.manual_seed(0)
    flat = Flatness(sigmas=[0.01], num_draws=8, draws_per_pass=4, every_n_steps=2, at_train_end=False,
                    loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    _fit(tmp_path / "b", Net("reentrant"), [flat], max_steps=4)
    assert flat.num_probes_run >= 2  # (each probe: vectorized no more, so not raising)


class StepReference(pl.Callback):
    """After GradientDispersion: the brute-force ``Tr Σ_B`` of each optimizer step's whole window
    (its micro-batches), from per-sample gradients of the parameters trained at that step."""

    def __init__(self) -> None:
        self.window: list = []
        self.expected: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.window.append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        x = torch.cat([b[0] for b in self.window])
        y = torch.cat([b[1] for b in self.window])
        self.window = []
        params = [p for p in pl_module.parameters() if p.requires_grad]
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(pl_module(x[i:i + 1]), y[i:i + 1]), params, materialize_grads=True)])
            for i in range(len(x))]
        g = torch.stack(rows).double()
        b = len(g)
        trace = b / (b - 1) * (g.square().sum(1).mean() - g.mean(0).square().sum())
        self.expected[trainer.global_step] = float(trace) / b


def test_an_accumulation_schedule_is_followed_and_the_dispersion_stays_exact(tmp_path, caplog):
    """``GradientAccumulationScheduler`` changes ``accumulate_grad_batches`` at an epoch start: the
    dispersion kept the fit's first value and was 48–67 % low, silently, from the change on."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    torch.manual_seed(0)
    cb, ref, records = GradientDispersion(), StepReference(), []
    cb.add_listener(records.extend)
    with caplog.at_level("INFO"):
        _fit(tmp_path, Net(), [cb, GradientAccumulationScheduler(scheduling={0: 1, 2: 2}), ref], max_epochs=4)
    assert len(records) == 12 and set(ref.expected) == set(range(12))  # (4 + 4 steps of one batch, 2 + 2 of two)
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-5), r.step
    said = [m for m in caplog.messages if "accumulate_grad_batches is 2 from epoch 2" in m]
    assert len(said) == 1


def test_pruning_during_the_fit_is_followed_and_measured_exactly(tmp_path):
    """``ModelPruning`` reparametrizes each layer at an epoch end (``weight`` → ``weight_orig`` and
    a mask): HeldoutGradient's probe crashed the fit at the next step ("the norm hooks recorded no
    gradient"). Now the change is said once as a replacement, the dispersion goes to an extra pass
    that is exact for ``weight_orig``, the probes go on, and the bounds are NaN from the change."""
    from lightning.pytorch.callbacks import ModelPruning

    torch.manual_seed(0)
    suite = bound_suite()
    ref, records = StepReference(), []
    suite[0].add_listener(records.extend)
    said = _fit(tmp_path, Net(), [*suite, ModelPruning("l1_unstructured", amount=0.3), ref], max_epochs=2)
    changed = [m for m in said if m.startswith("genbounds: the trained parameters changed")]
    assert len(changed) == 1 and "replaced: inp (weight, bias → weight_orig, bias_orig)" in changed[0], changed
    assert len(records) == 8
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-5), r.step
    heldout = next(cb for cb in suite if type(cb).__name__ == "HeldoutGradient")
    assert heldout.num_probes_run >= 3  # (past the change at step 4)
    bound = suite[-1]
    assert math.isnan(bound.latest["bound/wang_mao_eq3"]) and bound.latest["bound/valid"] == 0.0


def test_a_batch_size_finder_leaves_the_series_on_the_optimizer_steps(tmp_path):
    """``BatchSizeFinder``'s trial fits leave Lightning's logging index one step ahead of
    ``global_step``: the dispersion records, labelled by it, were shifted one step against the
    learning rates, and the bounds changed (Eq. 3 0.2427 against 0.2412) though training was
    bit-identical. The records are now labelled by the optimizer steps taken."""
    from lightning.pytorch.callbacks import BatchSizeFinder

    class Sized(Net):
        def __init__(self, batch_size: int) -> None:
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            return _loader(64, 0, batch_size=self.batch_size)

        def val_dataloader(self):
            return _loader(32, 1)

    def fit(finder: bool):
        torch.manual_seed(0)
        suite, records = bound_suite(), []
        suite[0].add_listener(records.extend)
        extra = [BatchSizeFinder(mode="power", steps_per_trial=2, init_val=4, max_trials=2)] if finder else []
        module = Sized(4 if finder else 8)
        trainer(tmp_path, [*suite, *extra], max_steps=12).fit(module)
        return module, records, suite[-1].latest

    found, records, latest = fit(True)
    plain, plain_records, plain_latest = fit(False)
    assert found.batch_size == 8 and all(torch.equal(p, q) for p, q in zip(found.parameters(), plain.parameters()))
    assert [r.step for r in records] == [r.step for r in plain_records] == list(range(12))
    for name in ("bound/wang_mao_eq2", "bound/wang_mao_eq3", "bound/neu"):
        assert latest[name] == plain_latest[name], name


@pytest.mark.parametrize("how", [dict(overfit_batches=2), dict(limit_train_batches=2)])
def test_a_fit_on_a_fixed_prefix_of_the_training_set_states_the_bounds_for_it(tmp_path, how):
    """``overfit_batches=2`` (shuffling turned off) trains on the same first 16 of 64 samples every
    epoch: the bounds took n = 64 and gap/measured's training loss averaged 48 samples never
    trained on, and nothing was said. So does ``limit_train_batches`` on a loader that does not
    shuffle."""
    torch.manual_seed(0)
    suite = bound_suite()
    train = _loader(64, 0, batch_size=8)
    module = Net()
    said = _fit(tmp_path, module, suite, train=train, max_steps=8, **how)
    named = [m for m in said if "trains on the first 16 of the 64 training samples" in m]
    assert len(named) == 1, said
    bound = suite[-1]
    assert bound.latest["setting/n"] == 16.0 and "the bounds take n = 16," in named[0]
    x, y = train.dataset.tensors
    with torch.no_grad():
        module.eval()
        prefix_loss = float(F.cross_entropy(module(x[:16]), y[:16]))
    assert bound.latest["gap/train_loss"] == pytest.approx(prefix_loss, rel=1e-5)


def test_an_accumulation_schedule_from_epoch_0_is_taken_before_step_0(tmp_path):
    """A schedule sets ``accumulate_grad_batches`` at each epoch start, after ``on_train_start``:
    batches of one sample accumulated four at a time by ``{0: 4}`` were refused there ("no spread
    to measure") where ``Trainer(accumulate_grad_batches=4)``, the same training, was measured."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    torch.manual_seed(0)
    cb, ref, records = GradientDispersion(), StepReference(), []
    cb.add_listener(records.extend)
    _fit(tmp_path, Net(), [cb, GradientAccumulationScheduler(scheduling={0: 4}), ref],
         train=_loader(32, 0, batch_size=1), max_epochs=1)
    assert len(records) == 8
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-5), r.step


def test_a_resumed_fit_chooses_the_backend_at_a_change_as_the_uninterrupted_one(tmp_path):
    """A resumed fit restores the backend it measured with ('hooks' under 'auto'); at a later
    change of the trained parameters (pruning) it was forced again and failed, and the user was told
    that backend='hooks' cannot measure the model and to use 'auto' — which they had asked for."""
    from lightning.pytorch.callbacks import ModelPruning

    def callbacks():
        return [GradientDispersion(), ModelPruning("l1_unstructured", amount=0.3, apply_pruning=lambda e: e >= 1,
                                                   verbose=0)]

    def said(messages):
        return [m.split(" because")[0] for m in messages if "GradientDispersion(backend=" in m]

    torch.manual_seed(0)
    whole = callbacks()
    uninterrupted = said(_fit(tmp_path / "a", Net(), whole, max_epochs=3))
    torch.manual_seed(0)
    module, first = Net(), callbacks()
    t = trainer(tmp_path / "b", first, max_epochs=1)
    t.fit(module, _loader(64, 0), _loader(32, 1))
    t.save_checkpoint(tmp_path / "one.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = callbacks()
        trainer(tmp_path / "b", resumed, max_epochs=3).fit(module, _loader(64, 0), _loader(32, 1),
                                                            ckpt_path=tmp_path / "one.ckpt")
    assert uninterrupted == said([str(w.message) for w in caught]) == [
        "GradientDispersion(backend='auto'): not reading the training backward"]
    assert whole[0].active_backend == resumed[0].active_backend == "functorch"



def test_the_prefix_warning_names_the_n_the_bounds_take(tmp_path):
    """With ``num_train=`` given, the bounds take it; the warning said they took the prefix's size."""
    torch.manual_seed(0)
    suite = bound_suite(num_train=100)
    said = _fit(tmp_path, Net(), suite, train=_loader(64, 0, batch_size=8), max_steps=4, limit_train_batches=2)
    named = [m for m in said if "trains on the first 16 of the 64" in m]
    assert len(named) == 1 and "the bounds take n = 100 as num_train gives it" in named[0], said
    assert suite[-1].latest["setting/n"] == 100.0


class HardNet(Net):
    """MobileNetV3's squeeze-excitation gate: ``nn.Hardsigmoid``, which has no second derivative in
    PyTorch (from step ``late`` on only, when given: a branch the check before step 0 cannot see)."""

    def __init__(self, late: int | None = None) -> None:
        super().__init__()
        self.gate = nn.Hardsigmoid()
        self.late = late

    def forward(self, x):
        h = self.inp(x)
        if self.late is None or self._trainer is not None and self.trainer.global_step >= self.late:
            h = h * self.gate(h)
        return self.out(self.block(h))


@pytest.mark.parametrize("late", [None, 3])
def test_a_model_without_second_derivatives_leaves_the_hessian_out_with_one_warning(tmp_path, late):
    """``HessianTrace`` met ``aten::hardsigmoid_backward``'s missing derivative at its first probe,
    after training had run, and ended the fit. Now one Hessian-vector product on (up to 64 samples
    of) the probe set before step 0 finds it (and a probe that meets it later says the same):
    HessianTrace measures nothing (one warning), Eq. 3 is NaN with the reason, HessianContractivity
    leaves its exact form out, and the rest of the suite and training are untouched."""
    from genbounds.callbacks import HessianContractivity

    torch.manual_seed(0)
    plain = HardNet(late)
    _fit(tmp_path / "plain", plain, [], max_epochs=2)
    torch.manual_seed(0)
    module = HardNet(late)
    contractivity = HessianContractivity(num_points=3, every_n_epochs=1)
    suite = [*bound_suite(), contractivity]
    values: list[dict] = []
    original = contractivity.finalize
    contractivity.finalize = lambda trainer, v: values.append(dict(v)) or original(trainer, v)
    said = _fit(tmp_path / "suite", module, suite, max_epochs=2)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), plain.parameters()))
    for owner in ("HessianTrace", "HessianContractivity"):
        head = f"{owner}: Hessian-vector products of this model's loss cannot be"
        named = [m for m in said if m.startswith(head)]
        assert len(named) == 1 and "hardsigmoid_backward" in named[0], said
    bound = suite[-2]
    assert math.isnan(bound.latest["bound/wang_mao_eq3"]) and math.isfinite(bound.latest["bound/wang_mao_eq2"])
    assert any("no Hessian trace was measured" in m for m in said)
    assert values and "curv/contractivity_exact" not in values[-1]
    assert math.isfinite(values[-1]["curv/contractivity_mean"])


def test_batchnorm_set_to_eval_by_the_module_is_said_to_give_exact_values(tmp_path, caplog):
    """Fine-tuning often sets BatchNorm to eval in ``on_train_epoch_start``, after the backend is
    chosen: the line before step 0 said the values were the train-mode decomposition, an
    approximation, though every value is an exact per-sample one."""

    class Frozen(Net):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(16)

        def forward(self, x):
            return self.out(self.block(self.norm(self.inp(x))))

        def on_train_epoch_start(self):
            self.norm.eval()

    torch.manual_seed(0)
    cb, ref, records = GradientDispersion(), StepReference(), []
    cb.add_listener(records.extend)
    with caplog.at_level("INFO"):
        _fit(tmp_path, Frozen(), [cb, ref], max_epochs=2)
    said = [m for m in caplog.messages if "no BatchNorm layer normalizes with batch statistics from epoch 0" in m]
    assert len(said) == 1 and any("train-mode BatchNorm" in m for m in caplog.messages)
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-5), r.step


def test_batchnorm_back_in_train_mode_or_without_running_statistics_is_not_said_exact(tmp_path, caplog):
    """The note fired once and never said the opposite when BatchNorm went back to train mode; and
    a BatchNorm without running statistics normalizes with the batch's even in eval mode."""

    class Toggles(Net):
        def __init__(self, track: bool) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(16, track_running_stats=track)

        def forward(self, x):
            return self.out(self.block(self.norm(self.inp(x))))

        def on_train_epoch_start(self):
            self.norm.train(self.current_epoch != 1)

    for track, expected in ((True, ["from epoch 1 on", "again from epoch 2"]), (False, [])):
        caplog.clear()
        torch.manual_seed(0)
        with caplog.at_level("INFO"):
            _fit(tmp_path, Toggles(track), [GradientDispersion()], max_epochs=3)
        said = [m for m in caplog.messages if "normalizes with batch statistics" in m]
        assert len(said) == len(expected) and all(e in m for e, m in zip(expected, said)), said



def _square(ctx, x):
    ctx.save_for_backward(x)
    return x * x


def _square_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return 2 * x * g


class Square(torch.autograd.Function):
    """``x²`` as a C++/CUDA extension layer is usually written: a backward marked
    ``@once_differentiable`` (and no ``jvp``)."""

    forward = staticmethod(_square)
    backward = staticmethod(torch.autograd.function.once_differentiable(_square_backward))


class SquareNoJvp(torch.autograd.Function):
    """``x²`` with an ordinary backward (twice differentiable) and no ``jvp``."""

    forward = staticmethod(_square)
    backward = staticmethod(_square_backward)


class SquareNet(Net):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.out(self.block(self.function.apply(self.inp(x))))


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_a_layer_without_an_exact_second_derivative_is_found_before_step_0(tmp_path, method):
    """A backward marked ``@once_differentiable`` raises nothing in a double backward: its part of
    the Hessian is left out and the trace was silently wrong (11.0 against 18.0 in a review); a
    Function without ``jvp`` failed the forward-mode product at the first probe. Both are found
    before step 0: HessianTrace measures nothing, said once."""
    from genbounds.callbacks import HessianTrace

    torch.manual_seed(0)
    trace = HessianTrace(hvp_method=method, every_n_epochs=1)
    said = _fit(tmp_path, SquareNet(Square if method == "reverse" else SquareNoJvp), [trace], max_epochs=1)
    named = [m for m in said if m.startswith("HessianTrace: Hessian-vector products of this model's loss cannot")]
    assert len(named) == 1 and ("once_differentiable" in named[0] if method == "reverse" else "jvp" in named[0])
    assert trace.num_probes_run == 0 and not trace.active
    torch.manual_seed(0)
    fine = HessianTrace(every_n_epochs=1)  # (the ordinary backward, reverse mode: measured)
    assert not [m for m in _fit(tmp_path, SquareNet(SquareNoJvp), [fine], max_epochs=1) if "HessianTrace" in m]
    assert fine.num_probes_run == 1


def test_a_forward_mode_hessian_product_leaves_the_modules_metrics_as_they_were(tmp_path):
    """The muted training step put back a metric's states as copies made inside the forward-mode
    transform: tensors of the transform's level left in the user's metric; the next probe failed
    on them ("escaped?") and ended the fit."""
    import torchmetrics

    from genbounds.callbacks import HessianTrace

    class WithMetric(Net):
        def __init__(self) -> None:
            super().__init__()
            self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)

    torch.manual_seed(0)
    module = WithMetric()
    trace = HessianTrace(hvp_method="forward", min_probes=4, max_probes=6, every_n_epochs=1)
    _fit(tmp_path, module, [trace], max_epochs=2)
    assert trace.num_probes_run == 2
    assert not torch._C._functorch.is_functorch_wrapped_tensor(module.acc.tp) and int(module.acc.tp.sum()) == 0


def test_contractivity_does_not_take_a_first_order_failure_for_a_missing_second_derivative(tmp_path):
    """The guard for the exact form's product caught errors anywhere in the probe, so a layer that
    fails in float64 ("… is not implemented") lost every contractivity value, with a warning that
    said the finite-difference values were measured. It now guards the product only."""
    from genbounds.callbacks import HessianContractivity

    class NoDouble(nn.Module):
        def forward(self, x):
            if x.dtype == torch.float64:
                raise NotImplementedError("the fused kernel for float64 is not implemented")
            return torch.tanh(x)

    class Net64(Net):
        def __init__(self) -> None:
            super().__init__()
            self.block[0] = NoDouble()

    torch.manual_seed(0)
    with pytest.raises(NotImplementedError, match="float64 is not implemented"):
        _fit(tmp_path, Net64(), [HessianContractivity(num_points=2, precision="float64", every_n_epochs=1)],
             max_epochs=1)


def _timed(fn):
    """A user's own decorator (``functools.wraps``), as profiling code writes one."""
    import functools

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        return fn(*args, **kwargs)

    return inner


class SquareCustomBwd(torch.autograd.Function):
    forward = staticmethod(_square)
    backward = staticmethod(torch.amp.custom_bwd(device_type="cpu")(
        torch.autograd.function.once_differentiable(_square_backward)))


class SquareWrapped(torch.autograd.Function):
    forward = staticmethod(_square)
    backward = staticmethod(_timed(torch.autograd.function.once_differentiable(_square_backward)))


class SquareVjp(torch.autograd.Function):
    forward = staticmethod(_square)
    vjp = staticmethod(torch.autograd.function.once_differentiable(_square_backward))


@pytest.mark.parametrize("function", [SquareCustomBwd, SquareWrapped, SquareVjp])
def test_once_differentiable_is_found_under_other_decorators_and_as_vjp(function):
    """The search looked at ``backward``'s own code only: under ``torch.amp.custom_bwd`` (as
    extension layers write it) or a user's ``functools.wraps`` decorator, or written as ``vjp``,
    the marked backward passed and the trace was silently wrong (2.60 against 7.00 in a review)."""
    from genbounds.callbacks.second_order import second_order_problem

    torch.manual_seed(0)
    module, (x, y) = SquareNet(function), next(iter(_loader(16, 0)))
    problem = second_order_problem(module, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
                                   (x, y), "eval")
    assert problem is not None and "once_differentiable" in problem
    assert second_order_problem(SquareNet(SquareNoJvp), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
                                (x, y), "eval") is None


def test_a_metric_list_appended_by_hand_is_put_back_after_a_forward_mode_probe(tmp_path):
    """Inside the forward-mode transform the muted step kept the metric's list object itself, so a
    ``training_step`` appending to it by hand kept the probes' appends (13 entries for 4 steps)."""
    import torchmetrics

    from genbounds.callbacks import HessianTrace

    class Appends(Net):
        def __init__(self) -> None:
            super().__init__()
            self.losses = torchmetrics.CatMetric()

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.value.append(loss.detach().reshape(1))
            return loss

    torch.manual_seed(0)
    module = Appends()
    trace = HessianTrace(hvp_method="forward", every_n_steps=1, min_probes=2, max_probes=2, at_train_end=False,
                         every_n_epochs=None)
    _fit(tmp_path, module, [trace], max_epochs=1)
    assert trace.num_probes_run == 4 and len(module.losses.value) == 4


def test_the_second_order_check_is_decided_alike_in_every_process():
    """Under DDP a process whose check failed would leave the probe out while the others wait for
    it in the probe's collectives: every process takes the same decision (any failure counts)."""
    from types import SimpleNamespace

    from genbounds.callbacks import HessianTrace

    torch.manual_seed(0)
    x, y = next(iter(_loader(16, 0)))
    trace = HessianTrace()
    trace.train_probe = (x, y)
    trace._loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
    asked: list = []

    def other_failed(decision, all=True):  # (what Lightning's strategy answers: another process failed)
        asked.append((decision, all))
        return True

    ddp = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=other_failed))
    with pytest.warns(UserWarning, match="the check failed in another process"):
        trace._check_second_order(ddp, Net())
    assert asked == [(False, False)] and not trace.active
    trace._check_second_order(SimpleNamespace(world_size=1), Net())
    assert trace.twice_differentiable_problem is None and trace.active


def test_a_hand_written_loss_is_told_what_the_0_1_error_needs(tmp_path):
    """A hand-written loss drops the 0-1 error bounds with the per-sample losses; the one warning
    named what per-sample losses give and not the 0-1 error's own remedy (a new user's walk)."""

    class ByHand(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return -torch.log_softmax(self(x), -1).gather(1, y[:, None]).mean()

    torch.manual_seed(0)
    suite = bound_suite()
    suite[0] = GradientDispersion()  # (auto: chunks, where the suite's helper asks for the hooks)
    said = _fit(tmp_path, ByHand(), suite, max_steps=4)
    named = [m for m in said if "Without per-sample losses these parts are not available" in m]
    assert len(named) == 1 and "per_sample_error(self, batch)" in named[0], said


def test_a_training_step_that_returns_none_is_said_once_as_unmeasured(tmp_path, caplog):
    """``training_step`` returning ``None`` (a batch skipped on purpose): Lightning runs no backward
    but still counts the optimizer step, and the bounds count it too, with the measured step before
    it standing for it. That was said nowhere; now once, and the step carries no record."""

    class Skips(Net):
        def training_step(self, batch, batch_idx):
            return None if batch_idx in (1, 2) else super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    cb, records = GradientDispersion(), []
    cb.add_listener(records.extend)
    with caplog.at_level("INFO"):
        _fit(tmp_path, Skips(), [cb], max_epochs=1)
    said = [m for m in caplog.messages if "ran no backward" in m]
    assert len(said) == 1 and said[0].startswith("GradientDispersion: step 1 ran no backward"), said
    assert [r.step for r in records] == [0, 3]


def test_a_branch_some_batches_leave_unused_keeps_the_hooks_and_their_exact_values(tmp_path):
    """A block called on every batch whose output only some steps use (an auxiliary branch a batch
    skips): at the first such step the hooks' read gave nothing, the dispersion warned, left the
    step unmeasured and measured the rest of the fit by an extra pass. The unused call adds zero to
    every per-sample gradient: the hooks stay, and every step equals the brute force."""

    class Branch(Net):
        def forward(self, x):
            h = self.inp(x)
            a = self.block(h)
            return self.out(a if self.global_step % 3 else torch.tanh(h))

    torch.manual_seed(0)
    cb, ref, records = GradientDispersion(), StepReference(), []
    cb.add_listener(records.extend)
    said = _fit(tmp_path, Branch(), [cb, ref], max_epochs=2)
    assert not [m for m in said if "GradientDispersion" in m], said
    assert cb.active_backend == "hooks" and [r.step for r in records] == list(range(8))
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-5), r.step


@pytest.mark.parametrize("backend", ["functorch", "microbatch"])
def test_an_extra_pass_runs_the_steps_own_loss_for_a_step_that_reads_its_batch_idx(tmp_path, backend):
    """A ``training_step`` that adds an auxiliary term on odd batches: the extra pass called
    ``training_step(batch, 0)``, so on odd steps it measured the even steps' loss — 14–22 % off,
    silently (a matrix, round 30). It passes the step's own ``batch_idx`` now (the probes' batches,
    drawn apart from training, keep 0)."""

    class AuxOnOdd(Net):
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.Linear(16, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.block(self.inp(x))
            loss = F.cross_entropy(self.out(h), y)
            if batch_idx % 2:
                loss = loss + 0.5 * F.cross_entropy(self.aux(h), y)
            self.log("train_loss", loss)
            return loss

        def forward(self, x):  # (the reference's per-sample loss: the aux term on odd steps)
            h = self.block(self.inp(x))
            return self.out(h)

    class OddReference(StepReference):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            self.odd = batch_idx % 2 == 1

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            x, y = self.window[0]
            self.window = []
            params = [p for p in pl_module.parameters() if p.requires_grad]

            def loss(i):
                h = pl_module.block(pl_module.inp(x[i:i + 1]))
                value = F.cross_entropy(pl_module.out(h), y[i:i + 1])
                return value + 0.5 * F.cross_entropy(pl_module.aux(h), y[i:i + 1]) if self.odd else value

            g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
                loss(i), params, materialize_grads=True)]) for i in range(len(x))]).double()
            b = len(g)
            self.expected[trainer.global_step] = float(b / (b - 1) * (g.square().sum(1).mean()
                                                                       - g.mean(0).square().sum())) / b

    torch.manual_seed(0)
    module = AuxOnOdd()
    cb, ref, records = GradientDispersion(backend=backend, num_chunks=16), OddReference(), []
    cb.add_listener(records.extend)
    _fit(tmp_path, module, [cb, ref], max_epochs=1)
    assert cb.active_backend == backend and [r.step for r in records] == [0, 1, 2, 3]
    if backend == "functorch":
        for r in records:
            assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-5), r.step
    else:  # 16 chunks of one sample of a batch of 16: the chunk estimator is the per-sample one
        for r in records:
            assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-4), r.step


class MixtureOfExperts(CrossEntropyModule):
    """``helpers.MixtureOfExperts`` as a classifier (8 inputs, 3 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Experts(8, 16, 3)

    def forward(self, x):
        return self.net(x)


def test_a_mixture_of_experts_is_measured_from_step_0_and_the_suite_goes_on(tmp_path):
    """Experts applied to the rows routed to them: the hooks cannot give those rows to samples.
    On one sample (the check before step 0) each expert sees the sample or nothing, so step 0's
    read failed and the step was lost; and HeldoutGradient's first probe ended the fit with the
    hooks' error (a matrix, round 30). One forward of the first batch now finds it before step 0
    (an extra pass, exact from step 0), and the held-out probe goes to exact per-sample gradients
    with one warning."""
    torch.manual_seed(0)
    cb, ref, records = GradientDispersion(), StepReference(), []
    cb.add_listener(records.extend)
    said = _fit(tmp_path / "alone", MixtureOfExperts(), [cb, ref], max_epochs=1)
    before = [m for m in said if m.startswith("GradientDispersion")]
    assert len(before) == 1 and "before step 0" in before[0] and "rows of a batch of 16" in before[0], before
    assert cb.active_backend == "functorch" and [r.step for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-5), r.step
    torch.manual_seed(0)
    suite = bound_suite()
    said = _fit(tmp_path / "suite", MixtureOfExperts(), suite, max_epochs=2)
    held = [m for m in said if m.startswith("HeldoutGradient: the norm hooks cannot measure")]
    assert len(held) == 1, said
    heldout = next(cb for cb in suite if type(cb).__name__ == "HeldoutGradient")
    assert heldout.num_probes_run >= 2
    assert math.isfinite(suite[-1].latest["bound/neu"])


def test_a_batch_whose_every_target_is_ignored_is_said_as_such(tmp_path):
    """A training batch whose targets are all ``ignore_index``: its loss is NaN (a mean over no
    element), and the capture said "a term beyond its captured losses (of nan, nan unexplained)…
    add per_sample_loss" — a fault it does not have (a matrix, round 30). It says what it is."""

    class Masked(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y, ignore_index=-100)
            self.log("train_loss", loss)
            return loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x[:, :3].argmax(1)
    y[32:48] = -100
    torch.manual_seed(0)
    suite = bound_suite()
    said = _fit(tmp_path, Masked(), suite, train=DataLoader(TensorDataset(x, y), batch_size=16), max_epochs=2)
    assert not [m for m in said if "unexplained" in m or "otherwise than the trial batch" in m], said
    (nonfinite,) = [m for m in said if "returned it is nan" in m]
    assert "ignore_index" in nonfinite
    assert math.isfinite(suite[-1].latest["bound/wang_mao_eq3"])


def test_an_unused_call_whose_weight_gets_gradient_another_way_is_not_taken_for_zero(tmp_path):
    """A hooked layer called but its output dropped, its weight applied by ``F.linear`` instead
    (from step 2, on even steps): the call adds nothing, but the weight's gradient is not zero.
    Taking an unreached call for zero (round 30) measured those steps 43–47 % low, silently, once
    the verification hooks were gone (a review); an unreached call counts as zero only where its
    weights have no gradient at all — here the step is left unmeasured and an extra pass follows,
    as before."""

    class Shared(Net):
        def forward(self, x):
            h = self.inp(x)
            a = self.block(h)
            if self.global_step >= 2 and self.global_step % 2 == 0:
                lin = self.block[1]
                return self.out(torch.tanh(F.linear(torch.tanh(h), lin.weight, lin.bias)))
            return self.out(a)

    torch.manual_seed(0)
    cb, ref, records = GradientDispersion(), StepReference(), []
    cb.add_listener(records.extend)
    said = _fit(tmp_path, Shared(), [cb, ref], max_steps=6)
    assert any("not through the outputs the hooks read" in m for m in said), said
    assert cb.active_backend == "functorch" and [r.step for r in records] == [0, 1, 3, 4, 5]
    for r in records:
        assert r.values["grad/dispersion"] == pytest.approx(ref.expected[r.step], rel=1e-5), r.step


def test_the_held_out_probes_refusal_of_the_hooks_is_one_fits(tmp_path):
    """After a fit whose model the hooks could not measure, the same ``HeldoutGradient`` used the
    extra pass for every later fit, on any model (a review): the refusal is the fit's."""
    from genbounds.callbacks import HeldoutGradient

    torch.manual_seed(0)
    held = HeldoutGradient(every_n_steps=2)
    _fit(tmp_path / "moe", MixtureOfExperts(), [held], max_epochs=1)
    assert not held._hooks_ok
    _fit(tmp_path / "plain", Net(), [held], max_epochs=1)
    assert held._hooks_ok and held.num_probes_run >= 1


def test_mixup_between_hidden_states_applied_with_a_probability_is_found_before_step_0(tmp_path):
    """Manifold mixup drawn with probability ½ per batch: the coupling check ran once, on the
    first two samples of one draw, and the hooks' rows passed for per-sample gradients (6 % off,
    silently; a matrix, round 30). It now runs on four runs of the trial batch's samples, each
    drawing again: the coupling is found, and an extra pass measures through the batch."""

    class MaybeMixup(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.inp(x)
            if float(torch.rand(())) < 0.5:
                lam, perm = 0.7, torch.randperm(len(x))
                h = lam * h + (1 - lam) * h[perm]
                out = self.out(self.block(h))
                loss = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])
            else:
                loss = F.cross_entropy(self.out(self.block(h)), y)
            self.log("train_loss", loss)
            return loss

    torch.manual_seed(0)
    cb = GradientDispersion()
    said = _fit(tmp_path, MaybeMixup(), [cb], train=_loader(64, 0, batch_size=32), max_epochs=1)
    assert cb.active_backend != "hooks", said
    assert any("depend on the other samples" in m for m in said), said


def test_several_validation_loaders_say_which_is_the_held_out_set(tmp_path):
    """Two validation dataloaders: the gap and every held-out probe use the first — which one
    depended on the list's order, silently (a new user's walk, round 32); now said once a fit,
    naming it, however many callbacks read it."""
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier

    class TwoSets(Classifier):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return super().validation_step(batch, batch_idx)

    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    val = data.val_dataloader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, bound_suite(), max_epochs=1, limit_train_batches=4, limit_val_batches=2).fit(
            TwoSets(MLP(64, 10, 16)), data.train_dataloader(), [val, val])
    said = [str(w.message) for w in caught if "validation dataloaders" in str(w.message)]
    assert len(said) == 1 and "the Trainer has 2 validation dataloaders" in said[0] and "the first one (0)" in said[0]
