"""GradientDispersion: closed form, backends, observer effect, fallbacks, NaN steps, AMP."""

from __future__ import annotations

import math
import statistics
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from genbounds.callbacks import GradientDispersion
from genbounds.data import DigitsDataModule
from genbounds.models import MLP, Classifier
from helpers import (
    DropoutBatchNormNet,
    TensorData,
    csv_metric,
    exact_linear_stats,
    linear_regressor,
    trainer,
    unit_sphere_regression,
)


def run_collect(tmp_path, module, data, callback, **kwargs):
    records = []
    callback.add_listener(records.extend)
    trainer(tmp_path, [callback], **kwargs).fit(module, data)
    return records


# ---------------------------------------------------------------- closed form (lr = 0)
@pytest.mark.parametrize("backend", ["hooks", "backpack", "functorch"])
def test_exact_backends_match_closed_form(tmp_path, backend):
    x, y = unit_sphere_regression(32, 6)
    module = linear_regressor(6, lr=0.0)
    truth = exact_linear_stats(module, x, y)
    cb = GradientDispersion(backend=backend)
    records = run_collect(tmp_path, module, TensorData(x, y, 32), cb, max_steps=3)
    assert cb.active_backend == {"backpack": "hooks"}.get(backend, backend)
    assert len(records) == 3
    for rec in records:
        for name, value in truth.items():
            assert rec.values[name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_functorch_takes_the_mean_gradient_from_the_training_step_and_matches_closed_form(tmp_path, monkeypatch,
                                                                                           chunk_size):
    """One backward per step (automatic optimization, no accumulation): the per-sample pass keeps
    no running sum (``gradient_sum=False``; ‖ḡ‖² from the step's ``.grad``), one chunk or seven."""
    from genbounds.callbacks.dispersion import per_sample

    seen: list[bool] = []
    original = per_sample.per_sample_gradient_moments
    monkeypatch.setattr(per_sample, "per_sample_gradient_moments",
                        lambda *a, **k: seen.append(k["gradient_sum"]) or original(*a, **k))
    x, y = unit_sphere_regression(32, 6, seed=5)
    module = linear_regressor(6, lr=0.0)
    truth = exact_linear_stats(module, x, y)
    cb = GradientDispersion(backend="functorch", chunk_size=chunk_size)
    records = run_collect(tmp_path, module, TensorData(x, y, 32), cb, max_steps=2)
    assert seen == [False, False] and len(records) == 2
    for rec in records:
        for name, value in truth.items():
            assert rec.values[name] == pytest.approx(value, rel=1e-5), name
        assert 0 < rec.values["grad/trace_cov_se"] < rec.values["grad/trace_cov"]


def test_functorch_with_a_parameter_the_loss_never_reaches_stays_exact(tmp_path):
    """A trainable parameter the loss does not use has no ``.grad`` after the step's backward: its
    part of ``ḡ`` is read as zeros, as its per-sample gradients are, and the pass stays on
    functorch, exact."""
    x, y = unit_sphere_regression(32, 6, seed=6)
    module = linear_regressor(6, lr=0.0)
    truth = exact_linear_stats(module, x, y)
    module.network.unused = torch.nn.Parameter(torch.zeros(3))
    cb = GradientDispersion(backend="functorch", chunk_size=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = run_collect(tmp_path, module, TensorData(x, y, 32), cb, max_steps=2)
    assert not [w for w in caught if "switching to backend" in str(w.message)]
    assert cb.active_backend == "functorch" and len(records) == 2
    for rec in records:
        for name, value in truth.items():
            assert rec.values[name] == pytest.approx(value, rel=1e-5), name


def test_microbatch_averages_to_closed_form_within_3_se(tmp_path):
    x, y = unit_sphere_regression(32, 6, seed=1)
    module = linear_regressor(6, lr=0.0)
    truth = exact_linear_stats(module, x, y)["grad/dispersion"]
    cb = GradientDispersion(backend="microbatch", num_chunks=4, seed=3)
    records = run_collect(tmp_path, module, TensorData(x, y, 32), cb, max_steps=400)
    values = [r.values["grad/dispersion"] for r in records]
    mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    assert abs(mean - truth) < 3 * se, (mean, truth, se)
    # and it is genuinely noisy (a constant estimate would make this test vacuous)
    assert statistics.stdev(values) > 0.05 * truth


def test_functorch_standard_error_is_reported_and_sane(tmp_path):
    x, y = unit_sphere_regression(64, 6, seed=2)
    module = linear_regressor(6, lr=0.0)
    cb = GradientDispersion(backend="functorch")
    (rec,) = run_collect(tmp_path, module, TensorData(x, y, 64), cb, max_steps=1)
    se = rec.values["grad/trace_cov_se"]
    assert 0 < se < rec.values["grad/trace_cov"]


# ---------------------------------------------------------------- accumulation
def test_functorch_under_accumulation_is_exact_over_the_effective_batch(tmp_path):
    x, y = unit_sphere_regression(32, 5, seed=4)
    module = linear_regressor(5, lr=0.0)
    truth = exact_linear_stats(module, x, y)
    cb = GradientDispersion(backend="functorch")
    records = run_collect(tmp_path, module, TensorData(x, y, 16), cb, max_steps=2, accumulate_grad_batches=2)
    assert len(records) == 2
    for name, value in truth.items():
        assert records[0].values[name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_microbatch_uses_accumulation_steps_as_chunks(tmp_path, precision):
    """Two micro-batches of 16 are the k = 2 chunks: dispersion = Σ_j m‖h_j − ḡ‖²/((k−1)b).
    Under fp16 AMP the micro-step gradients are loss-scaled (×65536); the callback undoes it."""
    x, y = unit_sphere_regression(32, 5, seed=5)
    module = linear_regressor(5, lr=0.0)
    w = module.network.linear.weight.detach().double().squeeze(0)
    g = (x.double() @ w - y.double().squeeze(1))[:, None] * x.double()
    h = [g[:16].mean(0), g[16:].mean(0)]
    gbar = g.mean(0)
    expected = sum(16 * float(((hj - gbar) ** 2).sum()) for hj in h) / (1 * 32)
    kwargs = {}
    if precision == "16-mixed":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]
    cb = GradientDispersion(backend="microbatch")
    # the GradScaler's first steps overflow at its initial scale 2^16 and are skipped (with a
    # warning); lr = 0 keeps the weights, so every finite record must match the closed form
    records = run_collect(tmp_path, module, TensorData(x, y, 16), cb, max_steps=4,
                          accumulate_grad_batches=2, **kwargs)
    assert cb.active_backend == "accumulation" and records
    tol = 1e-5 if precision == "32-true" else 2e-2  # fp16 forward under autocast
    for rec in records:
        assert rec.values["grad/dispersion"] == pytest.approx(expected, rel=tol)
        assert rec.values["grad/norm_sq"] == pytest.approx(float(gbar @ gbar), rel=tol)


# ---------------------------------------------------------------- zero observer effect
def _digits_run(tmp_path, network, callbacks, seed=0, **kwargs):
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    module = Classifier(network(), lr=0.05)
    data = DigitsDataModule(batch_size=64, seed=seed)
    logger = CSVLogger(str(tmp_path), name="log")
    t = trainer(tmp_path, callbacks, max_epochs=2, logger=logger, limit_train_batches=6,
                limit_val_batches=2, **kwargs)
    t.fit(module, data)
    return module, csv_metric(logger.log_dir, "train_loss_step")


@pytest.mark.parametrize(
    "backend,network",
    [
        ("hooks", lambda: MLP(64, 10, 32, dropout=0.2)),
        ("hooks", DropoutBatchNormNet),
        ("functorch", lambda: MLP(64, 10, 32, dropout=0.2)),
        ("microbatch", DropoutBatchNormNet),
    ],
)
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, backend, network):
    plain, plain_losses = _digits_run(tmp_path / "plain", network, [])
    cb = GradientDispersion(backend=backend)
    observed, observed_losses = _digits_run(tmp_path / "observed", network, [cb])
    assert cb.measured_steps == 12
    for (name, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm buffers
    assert plain_losses == observed_losses and len(plain_losses) == 12


def test_bit_identical_under_accumulation_with_free_chunks(tmp_path):
    net = lambda: MLP(64, 10, 32)  # noqa: E731
    plain, _ = _digits_run(tmp_path / "p", net, [], accumulate_grad_batches=3)
    cb = GradientDispersion(backend="microbatch")
    observed, _ = _digits_run(tmp_path / "o", net, [cb], accumulate_grad_batches=3)
    assert cb.active_backend == "accumulation" and cb.measured_steps > 0
    for a, b in zip(plain.parameters(), observed.parameters()):
        assert torch.equal(a, b)


def test_hooks_are_removed_after_training(tmp_path):
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    module = Classifier(MLP(64, 10, 32))
    trainer(tmp_path, [GradientDispersion(backend="hooks")], max_steps=2).fit(module, DigitsDataModule())
    for m in module.modules():
        assert not m._forward_hooks and not m._backward_hooks
        assert not hasattr(m, "input0") and not hasattr(m, "output")
    shared = module.__dict__["_genbounds_norm_hooks"]  # its process-wide forward hook is removed too
    assert shared.ghost is not None and not shared.ghost.attached


# ---------------------------------------------------------------- unsupported layers
class AttentionNet(torch.nn.Module):
    """nn.MultiheadAttention uses its projection weights inside a fused function; its projections are
    matched in the autograd graph (estimators/ghost_attention.py) except with ``add_bias_kv``
    (``refused=True``), which no hook reaches."""

    def __init__(self, refused: bool = True, cross: bool = False, sequence_first: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=not sequence_first, add_bias_kv=refused)
        self.head = torch.nn.Linear(16, 10)
        self.cross = cross
        self.sequence_first = sequence_first

    def forward(self, x):
        rows = x.reshape(x.shape[0], 8, 8)
        h = self.embed(rows.transpose(0, 1) if self.sequence_first else rows)  # (sequence-first: [8, b, 8])
        t = 0 if self.sequence_first else 1
        if self.cross:  # queries from half the positions; key and value different tensors
            h, _ = self.attn(h.narrow(t, 0, 4), h, torch.tanh(h), need_weights=False)
        else:
            h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(t))


def first_batch_trace_cov(module, data) -> float:
    """The reference ``s²`` of the first training batch: a plain per-sample loop."""
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    params = [p for p in module.parameters() if p.requires_grad]
    grads = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(module(x[i : i + 1]), y[i : i + 1])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    g = torch.stack(grads)
    return float(((g - g.mean(0)) ** 2).sum() / (g.shape[0] - 1))


def test_hooks_refuse_attention_before_step_0(tmp_path):
    module = Classifier(AttentionNet())
    t = trainer(tmp_path, [GradientDispersion(backend="hooks")], max_steps=2)
    with pytest.raises(MisconfigurationException, match="hooks do not reach network.attn"):
        t.fit(module, DigitsDataModule())
    assert t.global_step == 0  # refused before any training step


def test_auto_falls_back_with_one_warning_and_correct_values(tmp_path):
    torch.manual_seed(0)
    module = Classifier(AttentionNet(), lr=0.0)
    data = DigitsDataModule(batch_size=32, shuffle=False)
    cb = GradientDispersion(backend="auto")
    with pytest.warns(UserWarning, match="not reading the training backward") as caught:
        records = run_collect(tmp_path, module, data, cb, max_steps=1)
    assert sum("not reading the training backward" in str(w.message) for w in caught) == 1
    assert cb.active_backend == "functorch"
    assert records[0].values["grad/trace_cov"] == pytest.approx(first_batch_trace_cov(module, data), rel=1e-5)


@pytest.mark.parametrize("sequence_first", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_auto_reads_attention_in_the_training_backward(tmp_path, cross, sequence_first):
    """Self- and cross-attention are covered by the hooks: no warning, no extra pass, the
    per-sample loop's values."""
    torch.manual_seed(0)
    module = Classifier(AttentionNet(refused=False, cross=cross, sequence_first=sequence_first), lr=0.0)
    data = DigitsDataModule(batch_size=32, shuffle=False)
    cb = GradientDispersion(backend="auto")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not reading the training backward.*")
        records = run_collect(tmp_path, module, data, cb, max_steps=1)
    assert cb.active_backend == "hooks"
    assert records[0].values["grad/trace_cov"] == pytest.approx(first_batch_trace_cov(module, data), rel=1e-5)


def test_sequence_first_with_length_equal_to_batch_falls_back_exactly(tmp_path):
    """A sequence-first model whose sequence length equals the batch size: a layer outside the
    attention cannot tell its batch dimension. The check before step 0 sees it in one forward of
    the first batch (on one sample the layout is clear): one warning, and every step, step 0
    included, is measured by an exact extra pass."""
    torch.manual_seed(0)
    module = Classifier(AttentionNet(refused=False, sequence_first=True), lr=0.0)
    data = DigitsDataModule(batch_size=8, shuffle=False)  # T = 8 positions
    cb = GradientDispersion(backend="auto")
    with pytest.warns(UserWarning, match="both have the batch size 8") as caught:
        records = run_collect(tmp_path, module, data, cb, max_steps=2)
    said = [str(w.message) for w in caught if "both have the batch size" in str(w.message)]
    assert len(said) == 1 and "before step 0, on the first batch" in said[0], said
    assert cb.active_backend != "hooks"
    assert [r.step for r in records] == [0, 1]
    data.setup("fit")
    batches = list(iter(data.train_dataloader()))
    params = [p for p in module.parameters() if p.requires_grad]
    for rec, (x, y) in zip(records, batches):
        g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            F.cross_entropy(module(x[i:i + 1]), y[i:i + 1]), params)]).double() for i in range(8)])
        expected = float(((g - g.mean(0)) ** 2).sum() / 7)
        assert rec.values["grad/trace_cov"] == pytest.approx(expected, rel=1e-5)


class HookedHead(Classifier):
    """A user's forward hook that returns a new output (``× 3``) on the last layer, registered in
    ``__init__`` or in the module's own ``on_train_start`` (which Lightning calls after the
    callbacks')."""

    def __init__(self, when: str) -> None:
        super().__init__(MLP(64, 10, 32), lr=0.0)
        self.when = when
        if when == "init":
            self._hook_head()

    def _hook_head(self) -> None:
        last = [m for m in self.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.register_forward_hook(lambda module, args, out: out * 3)

    def on_train_start(self) -> None:
        if self.when == "on_train_start":
            self._hook_head()


@pytest.mark.parametrize("when", ["init", "on_train_start"])
def test_a_user_hook_that_changes_the_output_does_not_change_the_norms(tmp_path, when):
    """Our forward hook is global, so it runs before any module hook of the user's and reads the
    product's own output: the values are the per-sample loop's (the user's hook included in the
    model). A module hook registered after the user's saw ``3 · out`` and gave wrong, even
    negative, values."""
    torch.manual_seed(0)
    module = HookedHead(when)
    data = DigitsDataModule(batch_size=32, shuffle=False)
    cb = GradientDispersion(backend="hooks")
    records = run_collect(tmp_path, module, data, cb, max_steps=1)
    assert cb.active_backend == "hooks"
    assert records[0].values["grad/trace_cov"] == pytest.approx(first_batch_trace_cov(module, data), rel=1e-5)


def test_functorch_refuses_train_mode_batchnorm(tmp_path):
    module = Classifier(DropoutBatchNormNet())
    with pytest.raises(MisconfigurationException, match="BatchNorm"):
        trainer(tmp_path, [GradientDispersion(backend="functorch")], max_steps=1).fit(module, DigitsDataModule())


def test_auto_reads_batchnorm_models_from_the_training_backward(tmp_path):
    """Train-mode BatchNorm: the per-sample terms of the batch gradient's decomposition (no extra
    pass); under accumulation the micro-steps (exact for the procedure that trains)."""
    cb = GradientDispersion(backend="auto")
    trainer(tmp_path, [cb], max_steps=2).fit(Classifier(DropoutBatchNormNet()), DigitsDataModule())
    assert cb.active_backend == "hooks" and "decomposition" in cb.impl.description
    cb = GradientDispersion(backend="auto")
    trainer(tmp_path, [cb], max_steps=2, accumulate_grad_batches=2).fit(Classifier(DropoutBatchNormNet()),
                                                                        DigitsDataModule())
    assert cb.active_backend == "accumulation"


def test_functorch_without_per_sample_losses_is_refused_before_step_0(tmp_path):
    class HandWritten(Classifier):
        per_sample_loss = None  # type: ignore[assignment]

        def training_step(self, batch, batch_idx):
            x, y = batch
            return -(torch.log_softmax(self(x), 1).gather(1, y[:, None])).mean()

    t = trainer(tmp_path, [GradientDispersion(backend="functorch")], max_steps=1)
    with pytest.raises(MisconfigurationException, match="per_sample_loss"):
        t.fit(HandWritten(MLP(64, 10, 8)), DigitsDataModule())
    assert t.global_step == 0


def test_a_sum_reduced_training_loss_is_rescaled(tmp_path):
    """per_sample_loss gives the unreduced losses, training_step sums them: the contract uses
    b × per_sample_loss (whose mean is the training loss) and the hooks stay exact."""
    class SumLoss(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="sum")

    torch.manual_seed(0)
    module = SumLoss(MLP(64, 10, 16), lr=0.0)
    data = DigitsDataModule(batch_size=32, shuffle=False)
    hooks = run_collect(tmp_path / "h", module, data, GradientDispersion(backend="hooks"), max_steps=1)
    exact = run_collect(tmp_path / "f", module, data, GradientDispersion(backend="functorch"), max_steps=1)
    assert hooks[0].values["grad/dispersion"] == pytest.approx(exact[0].values["grad/dispersion"], rel=1e-5)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    params = [p for p in module.parameters() if p.requires_grad]
    g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        32 * F.cross_entropy(module(x[i:i + 1]), y[i:i + 1]), params)]).double() for i in range(32)])
    s2 = float(((g - g.mean(0)) ** 2).sum() / 31)
    assert hooks[0].values["grad/trace_cov"] == pytest.approx(s2, rel=1e-5)


def test_bad_arguments_fail_in_init():
    with pytest.raises(MisconfigurationException):
        GradientDispersion(backend="magic")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException):
        GradientDispersion(num_chunks=1)
    with pytest.raises(MisconfigurationException):
        GradientDispersion(every_n_steps=0)


def test_half_precision_parameters_are_refused(tmp_path):
    t = trainer(tmp_path, [GradientDispersion()], max_steps=1, precision="bf16-true")
    with pytest.raises(MisconfigurationException, match="half-precision"):
        t.fit(Classifier(MLP(64, 10, 8)), DigitsDataModule())


# ---------------------------------------------------------------- NaN step
class NaNOnce(Classifier):
    """Returns a NaN loss at one step and skips that update, as a GradScaler would."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_step == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                p.grad.zero_()


@pytest.mark.parametrize("backend", ["hooks", "functorch", "microbatch"])
def test_nan_step_is_skipped_with_one_warning(tmp_path, backend):
    torch.manual_seed(0)
    module = NaNOnce(MLP(64, 10, 16))
    cb = GradientDispersion(backend=backend, loss_fn=_nan_aware_loss if backend != "hooks" else None)
    with pytest.warns(RuntimeWarning, match=r"non-finite statistics .* at step 2") as caught:
        records = run_collect(tmp_path, module, DigitsDataModule(), cb, max_steps=6, log_every_n_steps=3)
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    assert [r.step for r in records] == [0, 1, 3, 4, 5]
    assert all(math.isfinite(v) for r in records for v in r.values.values())
    assert cb.step_log.skipped_steps == [2]


def _nan_aware_loss(module, batch):
    """The contract's losses, NaN on the step where the module's training loss is NaN."""
    losses = module.per_sample_loss(batch)
    return losses * float("nan") if module.global_step == 2 else losses


# ---------------------------------------------------------------- state
def test_state_round_trips(tmp_path):
    torch.manual_seed(0)
    cb = GradientDispersion(backend="hooks")
    trainer(tmp_path, [cb], max_steps=5).fit(Classifier(MLP(64, 10, 16)), DigitsDataModule())
    restored = GradientDispersion(backend="hooks")
    restored.load_state_dict(cb.state_dict())
    assert restored.measured_steps == cb.measured_steps == 5


def test_a_resumed_run_measures_with_the_saved_backend_and_chunk_stream(tmp_path):
    """The checkpoint keeps the backend measured with (after ``auto`` fell back, the fallback) and
    the micro-batch generator's state: a run resumed from it continues with the same backend and
    the same random chunks as the uninterrupted run."""
    x, y = unit_sphere_regression(32, 5, seed=4)
    module = linear_regressor(5, lr=0.0)
    whole = GradientDispersion(backend="microbatch", seed=2)
    ref = run_collect(tmp_path / "whole", module, TensorData(x, y, 16), whole, max_steps=4)  # 2 batches an epoch
    first = GradientDispersion(backend="microbatch", seed=2)
    run_collect(tmp_path / "first", module, TensorData(x, y, 16), first, max_steps=2)
    state = first.state_dict()
    assert state["active_backend"] == "microbatch" and "generator_state" in state
    resumed = GradientDispersion(backend="auto", seed=2)  # auto would pick the hooks on this model
    resumed.load_state_dict(state)
    got = run_collect(tmp_path / "second", module, TensorData(x, y, 16), resumed, max_steps=2)
    assert resumed.active_backend == "microbatch"
    want = [r.values["grad/dispersion"] for r in ref[2:]]
    assert [r.values["grad/dispersion"] for r in got] == pytest.approx(want, rel=1e-12)
    assert want != pytest.approx([r.values["grad/dispersion"] for r in ref[:2]], rel=1e-6)  # (the chunks differ)


def test_automatic_optimization_under_fp16_amp_is_measured_on_the_hooks(tmp_path):
    """fp16 AMP with a GradScaler, automatic optimization: the hooks' per-step path carries the
    loss scale (a device tensor) from the backward to the optimizer step and divides it out; the
    values match the closed form to fp16 autocast's tolerance. Overflowing steps (the scaler's
    first scale) are skipped with a warning; every finite record is checked."""
    x, y = unit_sphere_regression(32, 6, seed=6)
    module = linear_regressor(6, lr=0.0)
    truth = exact_linear_stats(module, x, y)
    cb = GradientDispersion(backend="hooks")
    records = run_collect(tmp_path, module, TensorData(x, y, 32), cb, max_steps=4,
                          plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    assert cb.active_backend == "hooks" and records
    for rec in records:
        for name, value in truth.items():
            assert rec.values[name] == pytest.approx(value, rel=2e-2), name


@pytest.mark.parametrize("backend", ["hooks", "functorch", "microbatch"])
def test_a_last_batch_of_one_sample_is_skipped_not_fatal(tmp_path, caplog, backend):
    """A last batch of one sample has no spread: its step is left unmeasured, and one info line
    (not one per epoch, not a warning) says so and how to avoid it."""
    import logging

    x, y = unit_sphere_regression(17, 4)  # batches of 8, 8 and 1
    cb = GradientDispersion(backend=backend)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = run_collect(tmp_path, linear_regressor(4, lr=0.1), TensorData(x, y, 8), cb, max_epochs=2)
    assert [r.step for r in records] == [0, 1, 3, 4]
    said = [r.getMessage() for r in caplog.records if "batch holds one sample" in r.getMessage()]
    assert len(said) == 1 and "step 2's batch" in said[0] and "drop_last=True" in said[0], said
    assert not [w for w in caught if "one sample" in str(w.message)]


@pytest.mark.parametrize("backend", ["hooks", "functorch"])
@pytest.mark.parametrize("n,windows", [(40, [(0, 40)]), (70, [(0, 60), (60, 70)])])
def test_uneven_accumulation_windows_are_exact(tmp_path, backend, n, windows):
    """A = 2, batches of 30: n = 40 gives one window of micro-batches 30 + 10; n = 70 gives 30 + 30
    and then a lone micro-batch of 10 (a partial window). .grad = Σ_j h_j / A is not the mean
    gradient in either uneven case; the statistics must still be exact."""
    x, y = unit_sphere_regression(n, 5, seed=9)
    module = linear_regressor(5, lr=0.0)
    cb = GradientDispersion(backend=backend)
    records = run_collect(tmp_path, module, TensorData(x, y, 30), cb, max_steps=len(windows),
                          accumulate_grad_batches=2)
    assert len(records) == len(windows)
    for rec, (lo, hi) in zip(records, windows):
        truth = exact_linear_stats(module, x[lo:hi], y[lo:hi])
        for name, value in truth.items():
            assert rec.values[name] == pytest.approx(value, rel=1e-5), (name, lo, hi)


def test_a_failed_exactness_check_says_which_backend_measures(tmp_path, monkeypatch, caplog):
    """When the one-sample check refuses the hooks before step 0, the start-up line names the
    backend that measures (it named the refused one), and the values stay exact."""
    import logging

    from genbounds.callbacks.dispersion.norm_hooks import NormHooksBackend

    monkeypatch.setattr(NormHooksBackend, "verify", lambda *a, **k: "a test's reason")
    x, y = unit_sphere_regression(32, 6)
    module = linear_regressor(6, lr=0.0)
    truth = exact_linear_stats(module, x, y)
    cb = GradientDispersion()
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="a test's reason"):
        records = run_collect(tmp_path, module, TensorData(x, y, 32), cb, max_steps=2)
    said = [r.getMessage() for r in caplog.records if "GradientDispersion: backend=" in r.getMessage()]
    assert said == ["GradientDispersion: backend='functorch' — " + cb.impl.description + "."], said
    assert cb.active_backend == "functorch" and len(records) == 2
    assert records[0].values["grad/dispersion"] == pytest.approx(truth["grad/dispersion"], rel=1e-5)


def test_settings_changed_after_construction_are_the_ones_used(tmp_path):
    """The backend settings are read when the fit starts (as ``setup`` reads ``layer_groups``), not
    frozen at construction: a config system that sets attributes afterwards gets what it set."""
    x, y = unit_sphere_regression(32, 4)
    cb = GradientDispersion()
    cb.backend, cb.num_chunks = "microbatch", 2
    run_collect(tmp_path, linear_regressor(4, lr=0.0), TensorData(x, y, 16), cb, max_steps=1)
    assert cb.active_backend == "microbatch" and cb.impl.num_chunks == 2


_MASKS: list[torch.Tensor] = []
"""The dropout masks ``_RawOutputDropout`` drew, in order (module-level: outside the module's own
state, which the probes restore)."""


class _RawOutputDropout(pl.LightningModule):
    """Dropout (drawn by hand, its masks kept in ``_MASKS``) before an output weight used by
    ``F.linear`` (not a Linear: ``auto`` takes the extra per-sample pass, ``functorch``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(6, 16)
        self.p = p
        self.weight = torch.nn.Parameter(0.3 * torch.randn(3, 16))
        self.replay: torch.Tensor | None = None

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        mask = self.replay if self.replay is not None else torch.ones_like(h) if self.p == 0 else \
            (torch.rand_like(h) > self.p).to(h.dtype)
        _MASKS.append(mask)
        return F.linear(h * mask / (1 - self.p), self.weight)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _RngAtRead(pl.Callback):
    """How many masks were drawn at the optimizer step, after ``GradientDispersion``'s extra pass
    (at the backward's end): the last one is the pass's."""

    def __init__(self) -> None:
        self.drawn: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.drawn.append(len(_MASKS))


def test_a_stochastic_step_is_centred_on_the_extra_passs_own_mean(tmp_path):
    """``training_step`` draws dropout masks, which the extra pass draws anew: its per-sample terms
    are centred on their own mean — the sample variance of that draw, recomputed here from the
    pass's own masks (replayed from the RNG state it forked) — not on the training step's ``.grad``
    (the value was then a mix of two draws, negative at some steps). The loss contract's trial saw
    the step draw random numbers, and the backend says so."""
    from genbounds.callbacks.loss_contract import LossContract

    _MASKS.clear()
    pl.seed_everything(0, verbose=False)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    module = _RawOutputDropout(0.8)
    rng, cb = _RngAtRead(), GradientDispersion()
    records = []
    cb.add_listener(records.extend)
    trainer(tmp_path, [rng, cb], max_steps=12).fit(module, TensorData(x, y, 4))
    assert cb.active_backend == "functorch" and "draws random numbers" in cb.impl.description
    assert LossContract.shared(module).stochastic and not cb.impl.grad_is_mean
    params = [p for p in module.parameters()]
    drawn_at = list(rng.drawn)  # (the replays below draw no masks but are appended too)
    for record, drawn in zip(records, drawn_at):
        module.replay = _MASKS[drawn - 1]  # (the extra pass's masks)
        losses = F.cross_entropy(module(x), y, reduction="none")
        module.replay = None
        g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            losses[i], params, retain_graph=True)]) for i in range(4)]).double()
        own = float(((g - g.mean(0)) ** 2).sum() / 3)
        assert record.values["grad/trace_cov"] == pytest.approx(own, rel=1e-5)
    assert len(records) == 12


def test_a_deterministic_step_is_still_centred_on_the_training_gradient(tmp_path):
    """Without dropout the trial sees no random numbers drawn, and the pass keeps no running sum
    of its own (the training step's ``.grad`` is its mean)."""
    cb = GradientDispersion()
    trainer(tmp_path, [cb], max_steps=2).fit(_RawOutputDropout(0.0).train(), TensorData(
        torch.randn(4, 6), torch.tensor([0, 1, 2, 0]), 4))
    assert cb.active_backend == "functorch" and cb.impl.grad_is_mean


class _Contrastive(pl.LightningModule):
    """SimCLR's NT-Xent in miniature, without augmentation noise: two fixed views of each sample,
    each view's row of the similarity matrix contrasted with every other view in the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))

    def rows(self, x):
        b = len(x)
        z = F.normalize(self.enc(torch.cat([x, 0.8 * x.flip(1)])), dim=1)
        # [view, sample, 2b] viewed as 2b rows: the rows map to samples time-major (row r → r mod b)
        sim = (z.view(2, b, -1) @ z.t() / 0.5).masked_fill(torch.eye(2 * b, dtype=torch.bool).view(2, b, -1), -9e15)
        return sim.view(2 * b, 2 * b), torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])

    def training_step(self, batch, batch_idx):
        sim, labels = self.rows(batch[0])
        return F.cross_entropy(sim, labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_contrastive_loss_is_measured_through_the_whole_batch_not_by_rows(tmp_path):
    """In-batch negatives couple the per-sample losses: the trial finds ``ℓ_0`` depends on another
    sample's input, the norm hooks (whose rows are not per-sample gradients: a negative variance
    was logged) are not used, and the dispersion is that of ``∇ℓ_i`` through the whole batch,
    ``ℓ_i`` the mean of sample ``i``'s two rows (its two views) — recomputed here by autograd,
    sample by sample."""
    from genbounds.callbacks.loss_contract import LossContract

    pl.seed_everything(0, verbose=False)
    x = torch.randn(6, 5)
    module = _Contrastive()
    cb = GradientDispersion()
    records = []
    cb.add_listener(records.extend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=2).fit(module, TensorData(x, torch.zeros(6), 6))
    contract = LossContract.shared(module)
    assert contract.coupled and not contract.reads_training_backward and cb.active_backend == "functorch"
    assert sum("depend on the other samples of the batch" in str(w.message) for w in caught) == 1
    sim, labels = module.rows(x)
    rows = F.cross_entropy(sim, labels, reduction="none")
    losses = (rows[:6] + rows[6:]) / 2
    params = list(module.parameters())
    g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(losses[i], params, retain_graph=True)])
                     for i in range(6)]).double()
    assert torch.allclose(g.mean(0), torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        F.cross_entropy(sim, labels), params)]).double(), atol=1e-6)  # (a decomposition of the batch gradient)
    want = float(((g - g.mean(0)) ** 2).sum() / 5)
    assert records and all(r.values["grad/trace_cov"] == pytest.approx(want, rel=1e-5) for r in records)


def test_independent_samples_are_not_reported_coupled(tmp_path):
    """The check's control: a plain classifier's per-sample losses are independent (its hooks read
    the training backward as before)."""
    from genbounds.callbacks.loss_contract import LossContract

    module = Classifier(MLP(64, 10, 8))
    cb = GradientDispersion()
    trainer(tmp_path, [cb], max_steps=1).fit(module, DigitsDataModule())
    assert not LossContract.shared(module).coupled and cb.active_backend == "hooks"


class _TiedHead(pl.LightningModule):
    """A token model whose output projection reuses the embedding's weight by ``F.linear`` (the
    usual weight tying, written without a shared module attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(12, 8)
        self.mix = torch.nn.Linear(8, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.mix(self.emb(x).mean(1)))
        return F.cross_entropy(F.linear(h, self.emb.weight), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_weight_tied_by_f_linear_is_named_as_a_cause(tmp_path):
    """The hooks' one-sample check refuses a model whose embedding weight is also the output
    projection's (used outside the layer's call): the warning names that cause first (it blamed a
    positional embedding alone), and an extra-pass backend measures."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 12, (16, 5), generator=g), torch.randint(0, 12, (16,), generator=g))
    cb = GradientDispersion(backend="hooks")
    with pytest.warns(UserWarning, match=r"an output projection tied by F\.linear\?"):
        trainer(tmp_path, [cb], max_steps=2).fit(_TiedHead(), DataLoader(data, batch_size=8))
    assert cb.active_backend != "hooks" and cb.measured_steps == 2


class _TwoBackwards(pl.LightningModule):
    """Manual optimization with two losses, each given to its own ``manual_backward`` (on one
    batch; from ``second_from`` on, the second one only)."""

    def __init__(self, second_from: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.second_from = second_from
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        out = self.net(x)
        two = self.trainer.global_step >= self.second_from and not self.trainer.sanity_checking
        self.manual_backward(F.cross_entropy(out, y), retain_graph=two)
        if two:
            self.manual_backward(0.5 * F.mse_loss(out, torch.zeros_like(out)))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _two_backwards_truth(module, x, y):
    out = module.net(x)
    losses = F.cross_entropy(out, y, reduction="none") + 0.5 * F.mse_loss(out, torch.zeros_like(out),
                                                                           reduction="none").mean(1)
    g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        losses[i], list(module.parameters()), retain_graph=True)]) for i in range(len(x))]).double()
    return float(((g - g.mean(0)) ** 2).sum() / (len(x) - 1))


@pytest.mark.parametrize("second_from,backend", [(0, "auto"), (2, "auto"), (2, "functorch")])
def test_two_manual_backwards_on_one_batch_are_measured_as_one_gradient(tmp_path, second_from, backend):
    """Two ``manual_backward`` calls on one batch: the step's gradient is their sum, whose
    per-sample norms the backward's rows of each call cannot give (‖a‖² + ‖b‖² ≠ ‖a + b‖²; the
    hooks had read the first call's rows alone against the whole ``.grad``, 5.69 for 6.13,
    silently). Seen by the trial: an extra pass from step 0. Seen only later: that step is not
    measured, one warning, and the extra pass measures the next ones (centred on its own mean: an
    extra pass centred on ``.grad`` had dropped every later step, silently). Every value measured
    equals autograd's sample by sample."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
    module = _TwoBackwards(second_from)
    cb = GradientDispersion(backend=backend)
    records = []
    cb.add_listener(records.extend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=4).fit(module, TensorData(x, y, 8))
    said = [str(w.message) for w in caught if "manual_backward more than once" in str(w.message)]
    assert cb.active_backend == "functorch" and len(said) == (1 if second_from else 0)
    assert [r.step for r in records] == ([0, 1, 3] if second_from else [0, 1, 2, 3])
    truth = _two_backwards_truth(module, x, y)
    for r in records[-1:] if second_from else records:
        assert r.values["grad/trace_cov"] == pytest.approx(truth, rel=1e-5)
