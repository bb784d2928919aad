"""The overhead budget's accounting, without training: per-step charges, the per-step share,
first-run prices and the reserve for the final evaluation (clock set by hand)."""

from __future__ import annotations

import time

import pytest

from genbounds.callbacks.overhead import OverheadBudget


def budget_after(train_seconds: float, fraction: float | None = 0.2) -> OverheadBudget:
    budget = OverheadBudget(fraction)
    budget.start = time.perf_counter() - train_seconds  # as if training had run this long
    return budget


def test_per_step_charges_count_as_measurement_time_and_set_an_even_stride():
    budget = budget_after(10.0)
    assert budget.step_stride("GradientDispersion", measured=0, steps=0) == 1
    budget.charge("GradientDispersion", 0.5)
    assert budget.probe_time == pytest.approx(0.5) and budget.by_owner["GradientDispersion"] == pytest.approx(0.5)
    # 100 measurements of 5 ms over 1000 steps of ~9.5 ms: the share is 0.5 × 0.2 × 9.5 ms ≈ 0.95 ms a step,
    # so every ceil(5 / 0.95) = 6th step
    assert budget.step_stride("GradientDispersion", measured=100, steps=1000) == 6
    # cheap enough: every step; unaffordable: never more than MAX_STRIDE apart
    assert budget.step_stride("GradientDispersion", measured=100_000, steps=1000) == 1
    # (each side reads the clock: 1e-4 of the 10 s is 1 ms between the two reads on a loaded machine)
    assert budget.overhead == pytest.approx(budget.probe_time / budget.train_time, rel=1e-4)
    budget.charge("GradientDispersion", 1e6)
    assert budget.step_stride("GradientDispersion", measured=1, steps=1000) == OverheadBudget.MAX_STRIDE


def test_a_probe_that_never_ran_is_priced_by_its_estimate_not_free():
    budget = budget_after(1.0)  # 0.2 s of room
    budget.pricers["Flatness"] = lambda: 0.5
    assert not budget.allows("Flatness") and budget.deferred == 1
    budget.pricers["Flatness"] = lambda: 0.1
    assert budget.allows("Flatness")
    with budget.timed("Flatness"):
        pass
    assert budget.expected("Flatness") == budget.last_cost["Flatness"] < 0.1  # measured beats estimated


def test_the_reserve_for_the_final_evaluation_is_kept_free():
    budget = budget_after(1.0)
    budget.reserve_estimate = lambda: 0.15
    assert budget.reserve == pytest.approx(0.15)
    assert not budget.allows("HeldoutGradient", expected=0.1)  # 0.1 + 0.15 > 0.2
    assert budget.allows("HeldoutGradient", expected=0.04)
    budget.reserve = 0.01  # a measured evaluation replaces the estimate
    assert budget.allows("HeldoutGradient", expected=0.1)


def test_a_required_probe_still_to_come_is_part_of_the_reserve():
    """Neu's midway Γ probe (``midway_gamma.py``): while it is to come its expected cost is held
    back with the final evaluation's; a measured evaluation replaces only the latter; once it ran
    (``required`` gives 0) the reserve is the evaluation's alone."""
    budget = budget_after(1.0)
    budget.reserve_estimate = lambda: 0.05
    to_come = [0.08]
    budget.required = lambda: to_come[0]
    assert budget.reserve == pytest.approx(0.13)
    assert not budget.allows("HeldoutGradient", expected=0.1)  # 0.1 + 0.13 > 0.2
    # Γ's own scheduled probe would stand in for the required one: it leaves the evaluation's only
    # (before, it had to leave a second Γ probe's cost as well: a review)
    budget.required_owner = "GradientSensitivity"
    assert budget.reserve_for("GradientSensitivity") == pytest.approx(0.05)
    assert budget.allows("GradientSensitivity", expected=0.1) and not budget.allows("HeldoutGradient", expected=0.1)
    budget.reserve = 0.02
    assert budget.reserve == pytest.approx(0.10)
    to_come[0] = 0.0
    assert budget.reserve == pytest.approx(0.02) and budget.allows("HeldoutGradient", expected=0.1)
    assert OverheadBudget(None).reserve == 0.0  # (no budget: nothing is held back)


def test_due_probes_take_their_turns_a_cheap_frequent_one_cannot_starve_an_expensive_one():
    """Two probes due and waiting: the one that began waiting later runs only when the budget also
    covers the earlier one's cost; the earlier one runs as soon as its own cost fits, and the later
    one's turn follows. Without the queue, the cheap one (0.05 s) ran whenever 0.05 s was free and
    the expensive one (0.15 s) never found 0.15 s (a 5,800-step run: 369 held-out probes, 2 of Γ)."""
    budget = budget_after(1.0)  # 0.2 s of room at 0.2
    budget.last_cost.update(GradientSensitivity=0.25, HeldoutGradient=0.05)
    assert not budget.allows("GradientSensitivity", queue=True)  # waits (0.25 > 0.2) …
    assert not budget.allows("HeldoutGradient", queue=True)  # … and the cheap one waits behind it
    assert budget.allows("HeldoutGradient")  # (a caller that does not queue: as before)
    assert list(budget.waiting) == ["GradientSensitivity", "HeldoutGradient"]
    # the later one's earliest time counts the earlier one's cost; the earlier one's does not count the later's
    assert budget.affordable_from("HeldoutGradient") > budget.affordable_from("GradientSensitivity")
    budget.start -= 0.3  # training went on: 1.3 s → 0.26 s of room
    assert not budget.allows("HeldoutGradient", queue=True)  # 0.05 + 0.25 > 0.26
    assert budget.allows("GradientSensitivity", queue=True) and list(budget.waiting) == ["HeldoutGradient"]
    budget.charge("GradientSensitivity", 0.25)
    budget.start -= 0.5  # 1.55 s of training → 0.31 s of room, 0.25 of it spent
    assert budget.allows("HeldoutGradient", queue=True) and not budget.waiting
    budget.allows("Flatness", queue=True, expected=1.0)
    budget.leave_queue("Flatness")  # (its fit's training ended: it holds no one back)
    assert not budget.waiting


def test_a_probe_that_cannot_fit_by_the_runs_end_holds_no_one_back():
    """The turn of a waiting probe that would not fit even in the budget projected to the end of the
    run never comes: the probes after it do not wait for it (a review: a Hessian trace of 1 s in a
    0.76 s budget held the held-out gradient back for the whole run, 129 probes → 2)."""
    import weakref

    class Horizon:  # (what the budget reads of the trainer)
        estimated_stepping_batches = 100
        global_step = 49  # half-way: the budget projected to the end is twice today's

    budget = budget_after(1.0)  # 0.2 s of room now, 0.4 s projected to the end
    horizon = Horizon()
    budget._trainer = weakref.ref(horizon)
    budget.last_cost.update(HessianTrace=0.5, HeldoutGradient=0.05)
    assert not budget.allows("HessianTrace", queue=True)  # waits, and never fits (0.5 > 0.4)
    assert budget.allows("HeldoutGradient", queue=True)  # not held back by it
    budget.last_cost["HessianTrace"] = 0.3  # fits by the end (0.3 + 0.05 ≤ 0.4): its turn comes first
    assert not budget.allows("HeldoutGradient", queue=True)
    horizon.estimated_stepping_batches = float("inf")  # (an unknown horizon: turns as they are)
    assert not budget.allows("HeldoutGradient", queue=True)


def test_a_probe_asked_for_while_it_waits_its_turn_is_done(tmp_path):
    """A due probe waiting for the budget that the bound aggregator (``probe_now``) runs at the
    current weights is done: not pending, out of the turns (a review, round 34: it kept its place
    and ran again at the next step start)."""
    import lightning.pytorch as pl

    from genbounds.callbacks import GradientSensitivity
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier
    from helpers import trainer

    sensitivity = GradientSensitivity(sigmas=[0.01], num_draws=4, every_n_steps=1, overhead_budget=1e-3)
    seen: list[tuple[bool, bool]] = []

    class AskWhileWaiting(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            budget = trainer.__dict__["_genbounds_overhead"]
            if sensitivity._pending and "GradientSensitivity" in budget.waiting and not seen:
                sensitivity.probe_now(trainer, pl_module)
                seen.append((sensitivity._pending, "GradientSensitivity" in budget.waiting))

    pl.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [sensitivity, AskWhileWaiting()], max_epochs=1, limit_train_batches=12, limit_val_batches=1)
    t.fit(Classifier(MLP(64, 10, 16), lr=0.05), DigitsDataModule(batch_size=64, seed=0))
    assert seen == [(False, False)]


def test_without_a_fraction_everything_runs_and_is_still_counted():
    budget = budget_after(1.0, fraction=None)
    budget.pricers["Flatness"] = lambda: 100.0
    assert budget.allows("Flatness") and budget.step_stride("GradientDispersion", measured=1, steps=1) == 1
    budget.charge("GradientDispersion", 0.3)
    assert budget.overhead > 0 and budget.remaining() == float("inf")


def test_a_tight_budget_thins_the_dispersion_and_the_bounds_still_come_out(tmp_path):
    """End to end: with a budget far below what every-step dispersion costs, GradientDispersion
    skips steps (charged, within its share), the skipped steps cost no measurement, and the final
    evaluation still produces every bound from the steps that were measured (block filling)."""
    import math

    import lightning.pytorch as pl

    from genbounds.callbacks import GeneralizationBound
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier
    from helpers import bound_suite, trainer

    pl.seed_everything(0, verbose=False)
    suite = bound_suite(overhead_budget=1e-3)
    records: list[int] = []
    suite[0].add_listener(lambda recs: records.extend(r.step for r in recs))
    t = trainer(tmp_path, suite, max_epochs=3, limit_train_batches=8, limit_val_batches=2)
    t.fit(Classifier(MLP(64, 10, 32), lr=0.05), DigitsDataModule(batch_size=64, seed=0))
    budget = t.__dict__["_genbounds_overhead"]
    dispersion, agg = suite[0], next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))
    assert budget.skipped_steps > 0 and 2 <= dispersion.measured_steps < 24
    assert len(records) == dispersion.measured_steps and records[:2] == [0, 1]  # the first two are measured
    assert budget.by_owner["GradientDispersion"] > 0
    for name in ("bound/wang_mao_eq2", "bound/wang_mao_eq3"):
        assert math.isfinite(agg.latest[name]) and math.isfinite(agg.latest[name + "_se"]), name
    # Neu: no scheduled Γ probe fits during training; the bound's midway probe (step 12 of 24) runs
    # whatever the budget and the final weights' probe is the second: Neu is computed (§6.9)
    assert sorted({s for s in agg.series.sensitivity_steps if s >= 1}) == [12, 24]
    assert math.isfinite(agg.latest["bound/neu"]) and math.isfinite(agg.latest["bound/neu_se"])
    # the filled steps' error is in the SE (0 when every step is measured)
    assert agg.latest["bound_terms/sum_eta2_dispersion_se"] > 0


def test_the_callbacks_pickle_after_a_budgeted_fit(tmp_path):
    """After a fit under a budget every callback pickles (before, each failed on the budget's weak
    reference to its Trainer: ``TypeError: cannot pickle 'weakref.ReferenceType'``), and the copy
    keeps its results; the copy's budget holds no trainer until a fit's set-up names one."""
    import pickle

    import lightning.pytorch as pl

    from genbounds.callbacks import GeneralizationBound
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier
    from helpers import bound_suite, trainer

    pl.seed_everything(0, verbose=False)
    suite = bound_suite(overhead_budget=0.2)
    t = trainer(tmp_path, suite, max_epochs=1, limit_train_batches=4, limit_val_batches=1)
    t.fit(Classifier(MLP(64, 10, 16), lr=0.05), DigitsDataModule(batch_size=64, seed=0))
    agg = next(cb for cb in t.callbacks if isinstance(cb, GeneralizationBound))
    assert agg.budget is not None and agg.budget._trainer is not None and agg.budget._trainer() is t
    copies = pickle.loads(pickle.dumps(suite))
    bound = next(cb for cb in copies if isinstance(cb, GeneralizationBound))
    assert repr(bound.latest) == repr(agg.latest) and bound.budget is not None and bound.budget._trainer is None
    assert bound.budget.by_owner == agg.budget.by_owner
    assert OverheadBudget.shared(t, 0.2) is agg.budget and agg.budget._trainer() is t  # (the original's is kept)


@pytest.mark.parametrize("case", ["epochs", "accumulation_schedule", "accumulate_2", "max_steps"])
def test_under_a_budget_the_last_step_is_measured_so_a_gate_on_the_dispersion_is_not_stale(tmp_path, case):
    """A budget that thins the dispersion still measures the run's last step when its length is
    known (here ``max_epochs`` × the epoch's batches): the value a gate reads at the end is the final
    batch's, and ``genbounds gate`` (one step of slack) does not call it stale. Before, the last
    measured step of the main job was 577 of 630 and the gate failed it. Also under a
    ``GradientAccumulationScheduler`` (``estimated_stepping_batches`` named a step the run never
    took: a review), with a partial last window and with ``max_steps`` before the epochs' end."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from genbounds.callbacks import GradientDispersion
    from genbounds.data import DigitsDataModule
    from genbounds.models import MLP, Classifier
    from genbounds.reporting import load_run
    from genbounds.reporting.gate import Threshold, check_run
    from helpers import bound_suite, trainer

    pl.seed_everything(0, verbose=False)
    suite = bound_suite(overhead_budget=1e-3)
    dispersion = next(cb for cb in suite if isinstance(cb, GradientDispersion))
    records: list[int] = []
    dispersion.add_listener(lambda recs: records.extend(r.step for r in recs))
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    settings, steps = {
        "epochs": ({}, 27),
        "accumulation_schedule": ({"callbacks_extra": [GradientAccumulationScheduler({1: 2})]}, 9 + 5 + 5),
        "accumulate_2": ({"accumulate_grad_batches": 2, "limit_train_batches": 10}, 15),
        "max_steps": ({"max_steps": 20, "max_epochs": 5}, 20),
    }[case]
    extra = settings.pop("callbacks_extra", [])
    kwargs = {"max_epochs": 3, "limit_train_batches": 9, **settings}
    t = trainer(tmp_path, [*suite, *extra], limit_val_batches=2, logger=logger, log_every_n_steps=4, **kwargs)
    t.fit(Classifier(MLP(64, 10, 32), lr=0.05), DigitsDataModule(batch_size=64, seed=0))
    assert t.__dict__["_genbounds_overhead"].skipped_steps > 0  # (thinned: the stride is above one)
    assert t.global_step == steps and records[-1] == steps - 1, records  # the last step, whatever the stride
    checks = check_run(load_run(logger.log_dir), [Threshold("grad/dispersion", "max", 1e9)])
    assert [c.status for c in checks] == ["pass"], [c.reason for c in checks]


def test_the_per_step_share_leaves_room_for_the_final_evaluation():
    """Projected to the end of training, the per-step statistics leave the final evaluation what it
    needs and share the rest with the probes: 1 s of training at 10 % progress → 2 s of budget at
    0.2; a 1.5 s final evaluation leaves a quarter of it, half of which (STEP_SHARE) is theirs; an
    unknown horizon keeps STEP_SHARE of the whole."""
    budget = budget_after(1.0)
    budget.reserve = 1.5
    assert budget.step_share(0.1) == pytest.approx(0.125, rel=1e-3)
    assert budget.step_share(None) == OverheadBudget.STEP_SHARE
    budget.reserve = 3.0  # more than the whole projected budget: nothing left for per-step work
    assert budget.step_share(0.1) == 0.0


def test_the_budget_is_dropped_under_several_processes_with_one_warning():
    """Each rank's clock would make its own decisions and the ranks would then wait for each other in
    the collectives: with world_size > 1 the fraction is dropped, said once."""

    class FakeTrainer:
        world_size = 2

    t = FakeTrainer()
    with pytest.warns(UserWarning, match="overhead_budget is ignored"):
        budget = OverheadBudget.shared(t, 0.2)
    assert budget.fraction is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OverheadBudget.shared(t, 0.2) is budget and budget.fraction is None
    single = FakeTrainer()
    single.world_size = 1
    assert OverheadBudget.shared(single, 0.2).fraction == 0.2


def test_a_final_probe_leaves_the_later_probes_their_fewest_draws():
    """In the final evaluation each probe takes its share of what is left *after* the fewest draws
    of the probes still to run: the last one is no longer squeezed below its floor (which made it
    overshoot: the main job logged perf/overhead 0.24 with a 0.2 budget before this rule)."""
    from genbounds.callbacks.probe import ProbeCallback

    probe = ProbeCallback()
    probe.budget = budget_after(10.0)  # 2 s of room
    probe._unit_cost = 0.01  # one loss evaluation: 10 ms
    probe.final_share = 1.0 / 3.0  # the first of three probes
    # 100 ms a draw: a third of 2 s affords 6 draws
    assert probe.draws_within_budget(wanted=64, minimum=2, units_per_draw=10.0) == 6
    probe.final_floor_after = 0.5  # the two later probes need 0.5 s at their fewest draws
    # (2 − 0.5)/3 = 0.5 s: 5 draws (taking a third of everything, then subtracting, would give 1 → 2)
    assert probe.draws_within_budget(wanted=64, minimum=2, units_per_draw=10.0) == 5
    probe.final_floor_after = 1.4
    assert probe.draws_within_budget(wanted=64, minimum=2, units_per_draw=10.0) == 2  # (2 − 1.4)/3 = 0.2 s
    probe.final_floor_after = 5.0  # not even the floors fit: never below the minimum
    assert probe.draws_within_budget(wanted=64, minimum=2, units_per_draw=10.0) == 2


def test_two_estimators_in_one_final_probe_share_its_part_not_twice_it():
    """HessianTrace runs Hutchinson then power iteration in one probe: the first leaves the second
    its fewest products, and the second takes what is left of the probe's share, not a share of
    the pool again."""
    from genbounds.callbacks.probe import ProbeCallback

    probe = ProbeCallback()
    probe.budget = budget_after(10.0)  # 2 s of room
    probe._unit_cost = 0.01
    probe.final_share = 0.5  # this probe's part: 1 s
    remaining = probe.budget.remaining()
    probe._final_until = remaining - probe.final_share * (remaining - probe.final_floor_after)  # as _probe sets it
    # first estimator: 100 ms a draw, leaving 0.4 s for the second → 6 draws
    assert probe.draws_within_budget(wanted=64, minimum=2, units_per_draw=10.0, keep=0.4) == 6
    probe.budget.charge("ProbeCallback", 0.6)  # it spent 0.6 s (of wall time too)
    probe.budget.start -= 0.6
    # the second: what is left of the 1 s part (0.4 s), not half of the 1.4 s pool (0.7 s)
    assert probe.draws_within_budget(wanted=64, minimum=2, units_per_draw=10.0) == 4


def test_affordable_from_is_the_first_time_allows_holds_and_a_smaller_reserve_wakes_the_waiting():
    """A probe waiting for the budget sleeps until affordable_from (callbacks/hook_clock.py): before
    it, allows is false; from it on (with nothing more charged), true."""
    import math
    import time

    from genbounds.callbacks.overhead import OverheadBudget

    budget = OverheadBudget(0.2)
    budget.start = time.perf_counter() - 1.0
    budget.probe_time = 0.1
    budget.last_cost["P"] = 0.2
    budget.reserve = 0.05
    when = budget.affordable_from("P")
    assert when == pytest.approx(budget.start + 0.1 + (0.1 + 0.2 + 0.05) / 0.2)
    for shift, expected in ((-0.01, False), (+0.01, True)):
        now = time.perf_counter()
        budget.start -= (when + shift) - now  # as if the clock read when + shift now
        assert budget.allows("P") is expected
        when = budget.affordable_from("P")
    assert OverheadBudget(None).affordable_from("P") == -math.inf
    budget.timed_sleepers = {1: (object(), when)}
    budget.next_wake_time = when
    budget.reserve = 0.01  # smaller: the waiting probes are woken at the next step
    assert budget.next_wake_time == -math.inf and budget.timed_sleepers[1][1] == -math.inf


def test_different_budgets_on_one_trainers_callbacks_are_said_once():
    """The budget is one for the suite: the first stated fraction stands, and a different one on
    another callback is said once (it was silent: a new user's walk, round 31); the same one, or
    none, says nothing."""
    import warnings

    class FakeTrainer:
        world_size = 1

    t = FakeTrainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget = OverheadBudget.shared(t, 0.5)
        assert OverheadBudget.shared(t, None) is budget and OverheadBudget.shared(t, 0.5) is budget
    with pytest.warns(UserWarning, match=r"different overhead budgets \(0.5 first, then 0.2\)"):
        OverheadBudget.shared(t, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OverheadBudget.shared(t, 0.1)
    assert budget.fraction == 0.5


def test_the_horizon_under_an_accumulation_schedule_sums_each_epoch_at_its_own_accumulation():
    """``estimated_stepping_batches`` takes the accumulation of the moment for every epoch; under
    ``GradientAccumulationScheduler({0: 1, 1: 4})`` with 6 epochs of 10 batches the run takes
    10 + 5·⌈10/4⌉ = 25 steps (a partial window steps at the epoch's end), at most ``max_steps``."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    from genbounds.callbacks.overhead import horizon, scheduled_horizon

    scheduler = GradientAccumulationScheduler({0: 1, 1: 4})
    run = SimpleNamespace(callbacks=[scheduler], num_training_batches=10, max_epochs=6, max_steps=-1,
                          estimated_stepping_batches=60)
    assert scheduled_horizon(run) == horizon(run) == 25.0
    run.max_steps = 20
    assert horizon(run) == 20.0
    run.num_training_batches = float("inf")  # (no length: max_steps alone)
    assert horizon(run) == 20.0
    assert scheduled_horizon(SimpleNamespace(callbacks=[], num_training_batches=10, max_epochs=6, max_steps=-1)) is None

