"""The probes' ``torch.func`` transforms run off the training thread (estimators/transform_thread.py):
the worker carries the caller's thread-local settings, and a fit whose probes vectorize runs no
transform in the training thread (where functorch's state would stay and every later backward
would copy it)."""

from __future__ import annotations

import threading

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer

from genbounds.callbacks import (
    Flatness,
    GradientSensitivity,
    HessianContractivity,
    HessianTrace,
)
from genbounds.data import DigitsDataModule
from genbounds.estimators.transform_thread import in_worker, off_training_thread
from genbounds.models import MLP, Classifier


def _settings() -> tuple:
    return (threading.get_ident(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), in_worker())


def test_the_worker_carries_the_callers_settings_and_raises_its_errors():
    main = threading.get_ident()
    ident, grad, inference, autocast, _, worker = off_training_thread(_settings)
    assert ident != main and worker and (grad, inference, autocast) == (True, False, False)
    with torch.no_grad():
        assert off_training_thread(_settings)[1:3] == (False, False)
    with torch.inference_mode():
        assert off_training_thread(_settings)[2] is True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert off_training_thread(_settings)[3:5] == (True, torch.bfloat16)
    assert not in_worker() and torch.is_grad_enabled()  # (the caller's own settings untouched)
    # a call from the worker runs inline; the worker's error reaches the caller
    assert off_training_thread(lambda: off_training_thread(threading.get_ident)) == ident

    def fails():
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        off_training_thread(fails)
    # a transform's values are those of the same call in the caller's thread
    x = torch.randn(5, 3)
    f = torch.func.vmap(lambda r: (r.sin() * r).sum())
    assert torch.equal(off_training_thread(f, x), f(x))


def _spy_transforms(monkeypatch) -> list[int]:
    """The thread of every functorch transform level pushed (vmap, grad, jvp)."""
    import torch._functorch.eager_transforms as eager
    import torch._functorch.vmap as vmap_mod

    threads: list[int] = []
    for module, name in ((vmap_mod, "_vmap_increment_nesting"), (eager, "_grad_increment_nesting"),
                         (eager, "_jvp_increment_nesting")):
        original = getattr(module, name)

        def spy(*args, _original=original, **kwargs):
            threads.append(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return threads


def _fit(tmp_path, callbacks):
    pl.seed_everything(0, verbose=False)
    module = Classifier(MLP(64, 10, 32), lr=0.05)
    trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=4).fit(module, DigitsDataModule(batch_size=32))
    return module


def test_a_fit_whose_probes_vectorize_runs_no_transform_in_the_training_thread(tmp_path, monkeypatch):
    threads = _spy_transforms(monkeypatch)
    probes = [Flatness(sigmas=[0.1], num_draws=4, draws_per_pass=2, every_n_steps=2),
              GradientSensitivity(sigmas=[0.1], num_draws=4, draws_per_pass=2, every_n_steps=2),
              HessianTrace(max_probes=4, min_probes=2, hvp_method="forward", every_n_steps=2),
              HessianContractivity(num_points=2, points_per_pass=2, every_n_steps=2)]
    observed = _fit(tmp_path / "observed", probes)
    main = threading.get_ident()
    assert threads and main not in threads, (len(threads), threads.count(main))
    assert all(cb.num_probes_run >= 1 for cb in probes)
    plain = _fit(tmp_path / "plain", [])  # and training is bit-identical to training without them
    for (name, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), name
