"""The every-step path's building blocks against brute force: the CPU squared norms without a
float64 copy, the step log's run-long buffer, and the norm hooks kept armed between measured steps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from genbounds.callbacks import GradientDispersion
from genbounds.callbacks.step_log import StepLog
from genbounds.data import DigitsDataModule
from genbounds.estimators.functional import per_tensor_sq_norms, row_sq_norms, sq_norm
from genbounds.models import MLP, Classifier
from helpers import trainer


def _brute(tensors):
    return torch.stack([(t.double() ** 2).sum() for t in tensors])


@pytest.mark.parametrize("shapes", [[(512, 784), (512,), (512, 512), (10, 512), (10,)],
                                    [(3, 40000), (32768,), (50000,), (0,), (1,)],
                                    [(64, 3, 3, 3), (7, 1023), (2, 2049)]])
def test_cpu_squared_norms_match_float64_brute_force(shapes):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*s, generator=gen) * 10 ** torch.randint(-3, 3, (), generator=gen).item() for s in shapes]
    got, want = per_tensor_sq_norms(tensors), _brute(tensors)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=2e-7, atol=0)
    assert sq_norm(tensors).item() == pytest.approx(want.sum().item(), rel=2e-7)
    # float64 and half inputs take the fused path (no precision is lost for them)
    doubles = [t.double() for t in tensors]
    assert torch.allclose(per_tensor_sq_norms(doubles), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("width", [5, 32768, 32769, 70_000])
def test_row_squared_norms_match_float64_brute_force(width):
    rows = torch.randn(6, width, generator=torch.Generator().manual_seed(1)) * 3
    got = row_sq_norms(rows)
    assert got.dtype == torch.float64 and got.shape == (6,)
    assert torch.allclose(got, (rows.double() ** 2).sum(1), rtol=2e-7, atol=0)


class _Trainer:
    loggers: list = []


def test_step_log_buffer_keeps_every_record_across_growth_and_widths():
    log = StepLog("test")
    want = []
    for step in range(150):  # past the first buffer (64 rows) twice; records of 1 to 3 values
        values = {f"v{k}": torch.tensor(step + k / 10, dtype=torch.float32 if k else torch.float64)
                  for k in range(1 + step % 3)}
        if step % 7 == 0:
            values["plain"] = 0.5  # a number, not a tensor
        log.record(step, values)
        want.append((step, {k: float(v) for k, v in values.items()}))
    assert len(log) == 150
    got = log.flush(_Trainer())
    assert [(r.step, r.values) for r in got] == [(s, pytest.approx(v)) for s, v in want]
    assert len(log) == 0 and log.flush(_Trainer()) == []
    log.record(7, {"a": torch.tensor(1.0)})  # the buffer is reused after a flush
    assert [(r.step, r.values) for r in log.flush(_Trainer())] == [(7, {"a": 1.0})]


def test_step_log_buffer_skips_a_non_finite_record_only():
    log = StepLog("test")
    log.record(0, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    log.record(1, {"a": torch.tensor(float("nan")), "b": torch.tensor(2.0)})
    log.record(2, {"a": torch.tensor(3.0), "b": torch.tensor(4.0)})
    with pytest.warns(RuntimeWarning, match="step 1"):
        got = log.flush(_Trainer())
    assert [r.step for r in got] == [0, 2] and got[1].values == {"a": 3.0, "b": 4.0}


class _StrayForward(pl.Callback):
    """A grad-enabled forward of the model between steps that nothing differentiates (as some
    users' callbacks do): it must not disturb the next step's norms."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module(batch[0][:3])


def _records(tmp_path, callbacks, seed=0):
    pl.seed_everything(seed, verbose=False)
    module = Classifier(MLP(64, 10, 32), lr=0.0)
    disp = next(c for c in callbacks if isinstance(c, GradientDispersion))
    out = []
    disp.add_listener(out.extend)
    trainer(tmp_path, callbacks, max_steps=6).fit(module, DigitsDataModule(batch_size=32))
    return module, disp, out


def test_hooks_stay_armed_between_measured_steps_and_a_stray_forward_changes_nothing(tmp_path):
    _, disp, ref = _records(tmp_path / "a", [GradientDispersion(backend="hooks")])
    module, disp2, got = _records(tmp_path / "b", [GradientDispersion(backend="hooks"), _StrayForward()])
    assert disp2.active_backend == "hooks" and len(got) == len(ref) == 6
    for a, b in zip(got, ref):
        assert a.values["grad/dispersion"] == pytest.approx(b.values["grad/dispersion"], rel=1e-12)
    for m in module.modules():  # detached at the end of fit
        assert not m._forward_hooks


def test_hooks_disarm_on_unmeasured_steps(tmp_path):
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shared = pl_module.__dict__["_genbounds_norm_hooks"]
            seen.append((trainer.global_step - 1, shared.ghost.armed))

    _records(tmp_path, [GradientDispersion(backend="hooks", every_n_steps=3), Probe()])
    # measured at steps 0 and 3: armed after them; steps 1, 2, 4, 5 are not measured
    assert seen == [(0, True), (1, False), (2, False), (3, True), (4, False), (5, False)]


@pytest.mark.cuda
def test_cuda_norms_and_step_log_match_the_cpu():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(*s, generator=gen) for s in ((512, 784), (512,), (10, 512))]
    want = _brute(tensors)
    got = per_tensor_sq_norms([t.to(dev) for t in tensors])
    assert got.device.type == "cuda" and torch.allclose(got.cpu(), want, rtol=1e-6, atol=0)
    rows = torch.randn(4, 70_000, generator=gen)
    assert torch.allclose(row_sq_norms(rows.to(dev)).cpu(), (rows.double() ** 2).sum(1), rtol=2e-7, atol=0)
    log = StepLog("test")
    for step in range(70):  # past the first buffer, on the device
        log.record(step, {"a": torch.tensor(step, dtype=torch.float32, device=dev), "b": torch.tensor(0.5, device=dev)})
    got = log.flush(_Trainer())
    assert [(r.step, r.values) for r in got] == [(s, {"a": float(s), "b": 0.5}) for s in range(70)]
