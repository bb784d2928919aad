"""The measurement callbacks' Lightning hooks are charged whole to the overhead budget
(``genbounds.callbacks.hook_clock``): their own time, not twice what they charged themselves, and
Lightning's dispatch of every per-step hook."""

from __future__ import annotations

import time

import pytest
from lightning.pytorch import Callback

from genbounds.callbacks import hook_clock
from genbounds.callbacks.hook_clock import (
    BATCH_HOOKS,
    SKIPPED_KEY,
    STEP_HOOKS,
    MeasurementCallback,
)
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


def test_hooks_left_to_lightning_are_set_aside_at_the_first_batch_and_cost_no_dispatch():
    trainer = _Trainer()
    budget = _budget(trainer)
    # Sleeper overrides on_train_batch_end and inherits the clocked on_train_batch_start: the other
    # four per-step hooks (and the validation/test/predict batch hooks) are Lightning's no-ops
    assert Sleeper._unclocked_step_hooks == len(STEP_HOOKS) - 2
    cb = Sleeper()
    cb.on_train_batch_start(trainer, None, None, 0)
    skipped = cb.__dict__[SKIPPED_KEY]
    assert set(skipped) == set(BATCH_HOOKS) - {"on_train_batch_start", "on_train_batch_end"}
    assert all(getattr(cb, h) is None for h in skipped) and callable(cb.on_train_batch_end)
    # Lightning passes over a None hook, so the batch start charges its own dispatch only
    assert 1e-3 <= budget.by_owner["Sleeper"] < 1e-3 + 0.005
    cb.on_fit_end(trainer, None)
    assert SKIPPED_KEY not in cb.__dict__ and all(callable(getattr(cb, h)) for h in BATCH_HOOKS)


def test_without_lightnings_skip_the_inherited_hooks_stay_and_their_dispatch_is_charged(monkeypatch):
    monkeypatch.setattr(hook_clock, "_SKIPS", False)
    trainer = _Trainer()
    budget = _budget(trainer)
    cb = Sleeper()
    cb.on_train_batch_start(trainer, None, None, 0)
    assert cb.__dict__[SKIPPED_KEY] == () and callable(cb.on_before_zero_grad)
    # its own dispatch and the four no-ops': five dispatches of 1 ms, and a few µs of its own
    assert (len(STEP_HOOKS) - 1) * 1e-3 <= budget.by_owner["Sleeper"] < (len(STEP_HOOKS) - 1) * 1e-3 + 0.005


def test_lightning_passes_over_a_hook_set_to_none():
    # the behaviour the skipping rests on, read from the installed Lightning's dispatch loop
    assert hook_clock.lightning_skips_non_callable_hooks()


class _Counting(MeasurementCallback):
    def __init__(self) -> None:
        self.after_backward = 0

    def on_after_backward(self, trainer, pl_module):
        self.after_backward += 1


class _UserSubclass(_Counting):
    """A user's subclass overriding a hook its base leaves to Lightning, calling ``super()``."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_ends = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.batch_ends += 1


def test_a_real_fit_calls_every_overridden_hook_and_restores_the_rest(tmp_path):
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    counting, sub = _Counting(), _UserSubclass()
    trainer = Trainer(max_steps=5, limit_val_batches=2, val_check_interval=2, callbacks=[counting, sub],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    torch.manual_seed(0)
    trainer.fit(BoringModel())
    assert counting.after_backward == sub.after_backward == 5 and sub.batch_ends == 5
    for cb in (counting, sub):
        assert SKIPPED_KEY not in cb.__dict__ and all(callable(getattr(cb, h)) for h in BATCH_HOOKS)


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
                 "HessianContractivity", "GeneralizationBound", "BoundGate", "DispersionPhaseDetector"):
        cls = getattr(C, name)
        assert issubclass(cls, MeasurementCallback), name
        hooks = [h for klass in cls.__mro__ if klass is not Callback and issubclass(klass, Callback)
                 for h, fn in vars(klass).items() if h.startswith("on_") and callable(fn)
                 and h not in ("on_exception", "on_save_checkpoint", "on_load_checkpoint")]
        assert "on_train_batch_start" in hooks and "on_train_start" in hooks
        for hook in hooks:
            assert getattr(getattr(cls, hook), "__genbounds_clocked__", False), (name, hook)
    assert not issubclass(C.DynamicGradientClipping, MeasurementCallback)


def test_time_charged_for_work_done_elsewhere_does_not_hide_the_hooks_own_time():
    """GradientDispersion charges the norm hooks' time (spent inside the user's forward and
    backward) from its on_train_batch_end: the clock must still charge that hook's own time."""

    class EndOfStep(MeasurementCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(0.01)
            trainer.__dict__["_genbounds_overhead"].charge("EndOfStep", 0.5, elsewhere=True)

    trainer = _Trainer()
    budget = _budget(trainer)
    EndOfStep().on_train_batch_end(trainer, None, None, None, 0)
    assert budget.by_owner["EndOfStep"] >= 0.5 + 0.01 + 1e-3


def test_a_per_step_statistic_keeps_its_set_up_out_of_its_per_measurement_account():
    from genbounds.callbacks import GradientDispersion

    class Setup(MeasurementCallback):
        @property
        def run_owner_name(self):
            return "Setup (run)"

        def on_train_start(self, trainer, pl_module):
            time.sleep(0.01)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pass

    trainer = _Trainer()
    budget = _budget(trainer)
    Setup().on_train_start(trainer, None)
    Setup().on_train_batch_end(trainer, None, None, None, 0)
    assert budget.by_owner["Setup (run)"] >= 0.01 and budget.by_owner["Setup"] < 0.005
    dispersion = GradientDispersion()
    assert dispersion.owner_name == "GradientDispersion" and dispersion.run_owner_name != dispersion.owner_name

    class MyDispersion(GradientDispersion):
        pass

    assert MyDispersion().owner_name == "GradientDispersion"  # the account its step stride reads


class First(MeasurementCallback):
    pass


class Second(MeasurementCallback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pass  # work of its own at every batch start: it never sleeps


def test_the_dispatch_is_measured_between_neighbouring_callbacks_in_training_steps():
    trainer = _Trainer()
    first, second, foreign = First(), Second(), Callback()
    trainer.callbacks = [first, second]
    budget = OverheadBudget.shared(trainer, 0.5)  # type: ignore[arg-type]
    budget.begin()
    budget.GAP_WINDOW = 8
    replay = budget.dispatch_cost(trainer, first)  # type: ignore[arg-type]
    assert not budget.dispatch_measured
    for _ in range(8):
        first.on_train_batch_start(trainer, None, None, 0)
        time.sleep(0.002)  # what Lightning spends between the two calls
        second.on_train_batch_start(trainer, None, None, 0)
    assert budget.dispatch_measured
    assert 0.002 <= budget.dispatch_cost(trainer, first) < 0.05 and budget.dispatch_cost(trainer, first) > replay
    # a foreign callback in between: that gap is two dispatches and a hook, not a sample
    trainer2 = _Trainer()
    a, b = First(), Second()
    trainer2.callbacks = [a, foreign, b]
    budget2 = OverheadBudget.shared(trainer2, 0.5)  # type: ignore[arg-type]
    budget2.begin()
    budget2.GAP_WINDOW = 2
    for _ in range(4):
        a.on_train_batch_start(trainer2, None, None, 0)
        b.on_train_batch_start(trainer2, None, None, 0)
    assert not budget2.dispatch_measured and budget2._gaps == []


class _Probe(MeasurementCallback):
    """Asleep between the steps of a schedule (every third step), like a probe."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        hook_clock.sleep_until(self, trainer, (trainer.global_step // 3 + 1) * 3, hook_of=_Probe)


def test_sleeping_batch_starts_are_woken_by_the_first_callback_at_their_step(tmp_path):
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Waker(MeasurementCallback):
        def setup(self, trainer, pl_module, stage):
            OverheadBudget.shared(trainer, None)  # as every genbounds callback does (no fraction)

    waker, idle, probe = Waker(), Sleeper(), _Probe()
    seen = []
    waker_calls = []
    waker.on_train_batch_end = lambda trainer, *a: waker_calls.append(callable(waker.on_train_batch_start))

    class Spy(Callback):  # after them in the list: what Lightning dispatches each step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, callable(probe.on_train_batch_start), callable(idle.on_train_batch_start)))

    trainer = Trainer(max_steps=10, limit_val_batches=0, callbacks=[waker, idle, probe, Spy()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    torch.manual_seed(0)
    trainer.fit(BoringModel())
    assert probe.steps == [0, 3, 6, 9]  # due every third step: called then, not in between
    assert waker_calls == [True] * 10  # the first measurement callback never sleeps
    # the base class's empty batch start sleeps from its first call on (the spy comes after it)
    assert len(seen) == 10 and not any(idle_awake for _, _, idle_awake in seen)
    budget = trainer.__dict__[hook_clock.BUDGET_KEY]
    # at fit end every hook is back and the budget forgets the waker
    assert budget.waker is None and not budget.sleepers
    for cb in (waker, idle, probe):
        assert callable(cb.on_train_batch_start) and hook_clock.SLEEP_KEY not in cb.__dict__


def test_a_probe_asleep_between_its_steps_still_runs_every_scheduled_probe(tmp_path):
    """Flatness every 4 steps and at every epoch end, after a GradientDispersion (the waker):
    between its steps its batch start is not dispatched, and every step and epoch end of the
    schedule is probed."""
    import lightning.pytorch as pl

    from genbounds.callbacks import Flatness, GradientDispersion
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier

    pl.seed_everything(0, verbose=False)
    flat = Flatness(sigmas=[0.01], num_draws=2, every_n_steps=4, every_n_epochs=1, at_train_end=False,
                    probe_batch_size=16)
    probed: list[int] = []
    measure = flat.measure

    def counting(trainer, pl_module, batch):
        probed.append(trainer.global_step)
        return measure(trainer, pl_module, batch)

    flat.measure = counting
    asleep: list[int] = []

    class Spy(pl.Callback):  # between the waker and the probe: what Lightning will dispatch to it
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if flat.__dict__.get("on_train_batch_start", 0) is None:
                asleep.append(trainer.global_step)

    trainer = pl.Trainer(max_epochs=2, limit_train_batches=6, limit_val_batches=1,
                         callbacks=[GradientDispersion(), Spy(), flat], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(MLP(64, 10, 8), lr=0.05), DigitsDataModule(batch_size=32))
    # steps 0, 4, 8 and the two epoch ends (after steps 6 and 12)
    assert probed == [0, 4, 6, 8, 12]
    assert asleep == [1, 2, 3, 5, 6, 7, 9, 10, 11]  # dispatched only at steps 0, 4 and 8


def test_a_failed_run_gives_the_hooks_back(tmp_path):
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Failing(BoringModel):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    class Waker(MeasurementCallback):
        def setup(self, trainer, pl_module, stage):
            OverheadBudget.shared(trainer, None)

    waker, idle = Waker(), Sleeper()
    trainer = Trainer(max_steps=10, limit_val_batches=0, callbacks=[waker, idle], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing())
    for cb in (waker, idle):
        assert all(callable(getattr(cb, h)) for h in BATCH_HOOKS)
        assert SKIPPED_KEY not in cb.__dict__ and hook_clock.SLEEP_KEY not in cb.__dict__


def test_a_batch_start_of_a_subclass_or_of_the_instance_is_never_set_aside():
    """sleep_until puts to sleep only the batch start of the class that asks (hook_of): a subclass's
    override, or a hook set on the instance, may have work at every step."""
    trainer = _Trainer()
    budget = _budget(trainer)

    class Override(_Probe):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    trainer.global_step = 0
    waker, asleep, overridden, patched = First(), _Probe(), Override(), _Probe()
    patched.on_train_batch_start = lambda *args: _Probe.on_train_batch_start(patched, *args)
    waker.on_train_batch_start(trainer, None, None, 0)
    assert budget.waker is waker
    asleep.on_train_batch_start(trainer, None, None, 0)
    overridden.on_train_batch_start(trainer, None, None, 0)
    patched.on_train_batch_start(trainer, None, None, 0)
    assert asleep.__dict__["on_train_batch_start"] is None and id(asleep) in budget.sleepers
    assert callable(overridden.on_train_batch_start) and id(overridden) not in budget.sleepers
    assert callable(patched.on_train_batch_start) and id(patched) not in budget.sleepers


class _StepWork(MeasurementCallback):
    def on_before_backward(self, trainer, pl_module, loss):
        pass

    def on_after_backward(self, trainer, pl_module):
        pass


class _OwnAfterBackward(_StepWork):
    def on_after_backward(self, trainer, pl_module):
        pass


def test_hooks_set_aside_are_only_the_asking_class_s_and_come_back(monkeypatch):
    """HooksAside: a subclass's override or a hook set on the instance is never set aside; the
    others are None on the instance until given back (a narrower set gives the rest back)."""
    names = ("on_before_backward", "on_after_backward")
    own, sub, patched = _StepWork(), _OwnAfterBackward(), _StepWork()
    patched.on_after_backward = lambda trainer, pl_module: None
    assert hook_clock.HooksAside(own, _StepWork, names).names == names
    assert hook_clock.HooksAside(sub, _StepWork, names).names == ("on_before_backward",)
    assert hook_clock.HooksAside(patched, _StepWork, names).names == ("on_before_backward",)
    aside = own.__dict__[hook_clock.ASIDE_KEY]
    aside.set_aside()
    assert own.on_before_backward is None and own.on_after_backward is None
    aside.set_aside(("on_after_backward",))
    assert callable(own.on_before_backward) and own.on_after_backward is None
    aside.give_back()
    assert callable(own.on_before_backward) and callable(own.on_after_backward)
    assert "on_before_backward" not in own.__dict__ and "on_after_backward" not in own.__dict__
    # a new one (the next fit's) gives back what the old one set aside
    aside.set_aside()
    assert hook_clock.HooksAside(own, _StepWork, names).names == names  # (and can set them aside again)
    assert callable(own.on_before_backward) and callable(own.on_after_backward)
    # where Lightning's loop would call a None, nothing is set aside
    monkeypatch.setattr(hook_clock, "_SKIPS", False)
    assert hook_clock.HooksAside(_StepWork(), _StepWork, names).names == ()


def test_unmeasured_steps_dispatch_no_dispersion_hooks_and_every_measured_step_is_logged(tmp_path):
    """GradientDispersion every third step: its optimizer-step hook is dispatched on the measured
    steps only (its before- and after-backward hooks never: the ghost hooks count the backward
    themselves and the norms are read at the optimizer step), its batch end only at a logging step
    with values to write — a measured step's own included — (so each measured step still reaches
    the logger at the next logging step); HeldoutGradient's
    after-backward hook (manual optimization only) is never dispatched, and it still measures at
    every scheduled step. At fit end every hook is back."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

    from genbounds.callbacks import GradientDispersion, HeldoutGradient
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier

    class Capture(Logger):
        def __init__(self):
            super().__init__()
            self.steps: list[int] = []

        name = "capture"
        version = 0

        def log_metrics(self, metrics, step=None):
            if "grad/dispersion" in metrics:
                self.steps.append(step)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    pl.seed_everything(0, verbose=False)
    gd = GradientDispersion(every_n_steps=3)
    hg = HeldoutGradient(every_n_steps=5)
    seen: dict[str, list[int]] = {h: [] for h in ("bb", "ab", "bos", "be", "hg_ab")}

    class Spy(pl.Callback):  # after them: what Lightning dispatched to them at this step
        def on_before_backward(self, trainer, pl_module, loss):
            if callable(gd.on_before_backward):
                seen["bb"].append(trainer.global_step)

        def on_after_backward(self, trainer, pl_module):
            for key, cb in (("ab", gd), ("hg_ab", hg)):
                if callable(cb.on_after_backward):
                    seen[key].append(trainer.global_step)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if callable(gd.on_before_optimizer_step):
                seen["bos"].append(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if callable(gd.on_train_batch_end):
                seen["be"].append(trainer.global_step - 1)  # (the step just taken)

    logger = Capture()
    trainer = pl.Trainer(max_steps=12, limit_val_batches=1, callbacks=[gd, hg, Spy()], logger=logger,
                         log_every_n_steps=2, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(MLP(64, 10, 8), lr=0.05), DigitsDataModule(batch_size=32))
    measured = [0, 3, 6, 9]
    assert seen["bos"] == measured and seen["bb"] == seen["ab"] == []
    # logging steps (logger step + 1 even): 1, 3, 5, 7, 9, 11; values pending at 1 and 7
    assert seen["be"] == [1, 3, 7, 9]
    assert logger.steps == measured
    assert seen["hg_ab"] == [] and hg.num_probes_run == 3  # steps 0, 5, 10
    for cb in (gd, hg):
        assert all(callable(getattr(cb, h)) for h in BATCH_HOOKS)
        assert hook_clock.ASIDE_KEY in cb.__dict__ and not cb.__dict__[hook_clock.ASIDE_KEY].aside


def test_a_run_that_fails_on_a_skipped_step_gives_the_dispersion_its_hooks_back(tmp_path):
    """The training step raises on a step GradientDispersion does not measure (its hooks set
    aside then): on_exception gives every hook back."""
    import lightning.pytorch as pl

    from genbounds.callbacks import GradientDispersion
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier

    class Failing(Classifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 4:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    pl.seed_everything(0, verbose=False)
    gd = GradientDispersion(every_n_steps=3)
    aside_at_failure = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            aside_at_failure[:] = [h for h in ("on_before_backward", "on_after_backward") if gd.__dict__.get(h, 0) is None]

    trainer = pl.Trainer(max_steps=12, limit_val_batches=0, callbacks=[gd, Spy()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing(MLP(64, 10, 8), lr=0.05), DigitsDataModule(batch_size=32))
    assert aside_at_failure == ["on_before_backward", "on_after_backward"]  # step 4: not measured
    assert all(callable(getattr(gd, h)) for h in BATCH_HOOKS)
    assert not gd.__dict__[hook_clock.ASIDE_KEY].aside
