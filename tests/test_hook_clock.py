"""The measurement callbacks' Lightning hooks are charged whole to the overhead budget
(``genbounds.callbacks.hook_clock``): their own time, not twice what they charged themselves, and
Lightning's dispatch of every per-step hook."""

from __future__ import annotations

import time

import pytest
from lightning.pytorch import Callback

from genbounds.callbacks.hook_clock import STEP_HOOKS, MeasurementCallback
from genbounds.callbacks.overhead import OverheadBudget


class _Trainer:
    """What the clock reads from a trainer: its ``__dict__`` (the budget), the profiler, the module."""

    def __init__(self) -> None:
        from lightning.pytorch.profilers import PassThroughProfiler

        self.profiler = PassThroughProfiler()
        self.lightning_module = None


def _budget(trainer: _Trainer, started: bool = True) -> OverheadBudget:
    budget = OverheadBudget.shared(trainer, 0.5)  # type: ignore[arg-type]
    if started:
        budget.begin()
    budget._dispatch_cost = 1e-3  # a round number to count dispatches by
    return budget


class Sleeper(MeasurementCallback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.02)


class SelfTimed(MeasurementCallback):
    def on_validation_epoch_end(self, trainer, pl_module):
        budget = trainer.__dict__["_genbounds_overhead"]
        with budget.timed("Probe"):
            time.sleep(0.03)


class Parent(MeasurementCallback):
    def on_train_epoch_end(self, trainer, pl_module):
        pass


class Child(Parent):
    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)


def test_a_hook_is_charged_whole_with_one_dispatch():
    trainer = _Trainer()
    budget = _budget(trainer)
    Sleeper().on_train_batch_end(trainer, None, None, None, 0)
    spent = budget.by_owner["Sleeper"]
    assert 0.02 + 1e-3 <= spent < 0.2
    assert budget.probe_time == pytest.approx(spent)


def test_what_a_hook_charged_itself_is_not_charged_twice():
    trainer = _Trainer()
    budget = _budget(trainer)
    SelfTimed().on_validation_epoch_end(trainer, None)
    assert budget.by_owner["Probe"] >= 0.03
    # the hook's own account holds its dispatch and its bookkeeping, not the probe's 30 ms again
    assert 1e-3 <= budget.by_owner["SelfTimed"] < 1e-3 + 0.01
    assert budget.probe_time == pytest.approx(budget.by_owner["Probe"] + budget.by_owner["SelfTimed"])


def test_a_hook_reached_through_super_is_dispatched_once():
    trainer = _Trainer()
    budget = _budget(trainer)
    Child().on_train_epoch_end(trainer, None)
    assert 1e-3 <= budget.by_owner["Child"] < 2e-3  # one dispatch, not two
    assert budget.hook_depth == 0


def test_each_step_charges_the_dispatch_of_the_hooks_a_class_leaves_to_lightning():
    trainer = _Trainer()
    budget = _budget(trainer)
    # Sleeper overrides on_train_batch_end and inherits the clocked on_train_batch_start: the other
    # four per-step hooks are Lightning's no-ops, still dispatched every step
    assert Sleeper._unclocked_step_hooks == len(STEP_HOOKS) - 2
    Sleeper().on_train_batch_start(trainer, None, None, 0)
    # its own dispatch and those four: five dispatches of 1 ms, and a few µs of its own
    assert (len(STEP_HOOKS) - 1) * 1e-3 <= budget.by_owner["Sleeper"] < (len(STEP_HOOKS) - 1) * 1e-3 + 0.005


def test_nothing_is_charged_before_the_clock_starts_and_on_train_start_starts_it():
    trainer = _Trainer()
    budget = _budget(trainer, started=False)
    Sleeper().on_train_batch_end(trainer, None, None, None, 0)
    assert budget.probe_time == 0.0 and budget.start is None
    Sleeper().on_train_start(trainer, None)
    assert budget.start is not None and budget.by_owner["Sleeper"] >= 1e-3


def test_an_exception_in_a_hook_still_charges_it_and_restores_the_depth():
    class Raiser(MeasurementCallback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise RuntimeError("boom")

    trainer = _Trainer()
    budget = _budget(trainer)
    with pytest.raises(RuntimeError, match="boom"):
        Raiser().on_train_epoch_end(trainer, None)
    assert budget.hook_depth == 0 and budget.by_owner["Raiser"] >= 1e-3


def test_the_dispatch_estimate_replays_lightnings_loop_and_is_microseconds():
    trainer = _Trainer()
    budget = OverheadBudget.shared(trainer, 0.5)  # type: ignore[arg-type]
    cost = budget.dispatch_cost(trainer, Sleeper())  # type: ignore[arg-type]
    assert 0.0 < cost < 1e-3
    assert budget.dispatch_cost(trainer, Sleeper()) == cost  # timed once per run  # type: ignore[arg-type]


def test_every_measurement_callback_is_clocked_and_interventions_are_not():
    import genbounds.callbacks as C

    for name in ("GradientDispersion", "HeldoutGradient", "GradientSensitivity", "Flatness", "HessianTrace",
                 "HessianContractivity", "GeneralizationBound", "BoundGate"):
        cls = getattr(C, name)
        assert issubclass(cls, MeasurementCallback), name
        for hook in ("on_train_batch_start", "on_train_end"):
            fn = getattr(cls, hook)
            assert fn is getattr(Callback, hook) or getattr(fn, "__genbounds_clocked__", False), (name, hook)
    assert not issubclass(C.DynamicGradientClipping, MeasurementCallback)
