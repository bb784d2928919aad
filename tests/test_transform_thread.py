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
from genbounds.estimators.transform_thread import _autocast, in_worker, off_training_thread
from genbounds.models import MLP, Classifier


def _settings() -> tuple:
    return (threading.get_ident(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *_autocast("cpu"), in_worker(), torch.get_num_threads())


def test_the_worker_carries_the_callers_settings_and_raises_its_errors():
    main = threading.get_ident()
    ident, grad, inference, autocast, _, worker, _ = off_training_thread(_settings)
    assert ident != main and worker and (grad, inference, autocast) == (True, False, False)
    with torch.no_grad():
        assert off_training_thread(_settings)[1:3] == (False, False)
    with torch.inference_mode():
        assert off_training_thread(_settings)[2] is True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert off_training_thread(_settings)[3:5] == (True, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # (per thread under OpenMP: carried to the worker)
        assert off_training_thread(_settings)[6] == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert off_training_thread(_settings)[6] == threads
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


def test_each_calling_thread_has_its_worker_and_a_forked_child_makes_its_own():
    import os

    mine = off_training_thread(threading.get_ident)
    other: list[int] = []
    caller = threading.Thread(target=lambda: other.append(off_training_thread(threading.get_ident)))
    caller.start()
    caller.join(30)
    assert other and other[0] != mine  # (a training in another thread keeps its own worker)
    if not hasattr(os, "fork"):
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's worker thread does not exist here
        done: list[float] = []
        t = threading.Thread(target=lambda: done.append(off_training_thread(
            lambda: float(torch.func.vmap(lambda x: x * 2)(torch.ones(2, 2)).sum()))), daemon=True)
        t.start()
        t.join(20)
        os.write(write, b"ok" if done == [8.0] else b"hung")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 8) == b"ok"


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
