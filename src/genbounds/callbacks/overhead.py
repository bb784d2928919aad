"""A time budget for the whole measurement suite: ``overhead_budget=0.2`` keeps the wall time
spent measuring — probes, bound evaluations *and* the per-step statistics — within 20 % of the time
spent training.

One :class:`OverheadBudget` per ``Trainer`` is shared by every genbounds callback.

* **Probes** (every :class:`~genbounds.callbacks.probe.ProbeCallback`, ``HeldoutGradient``
  included) measure their own cost. A probe that its schedule calls for is *deferred* while running
  it would push the measurement time above ``fraction × training time − reserve`` and runs at the
  first step start where it fits (the bounds' block-filling rule handles irregular spacing). A
  probe that has not run yet is priced from one timed loss evaluation of its probe set times the
  number of loss evaluations it makes (:meth:`ProbeCallback.forward_equivalents`): its first run is
  no longer free. Due probes take turns (:meth:`OverheadBudget.allows` with ``queue``): one that
  began waiting later runs only when the budget also covers the ones waiting before it (except one
  that cannot fit even in the budget projected to the run's end: :meth:`OverheadBudget.ahead`).
* **The reserve** is what the final bound evaluation will cost (its last measured cost; before
  the first one, the bound's estimate from the probes it will ask for): intermediate probes only
  run when they leave that much of the budget. The final weights are always evaluated; a
  Monte-Carlo probe there uses as many draws as what is left affords (never fewer than its
  ``min_draws``), so it reports a larger standard error rather than overshooting.
* **Per-step statistics** (``GradientDispersion``) time their own work — their Lightning hooks
  and the norm hooks inside forward and backward — and are charged for it. They may use
  :attr:`STEP_SHARE` of what the final evaluation leaves of the budget projected to the end of
  training (from the steps done out of ``estimated_stepping_batches``; the rest is the probes');
  beyond it they measure every ``k``-th step, ``k`` their mean cost over their share of a step
  (:meth:`OverheadBudget.step_stride`, at most :attr:`MAX_STRIDE`; a skipped step's hooks are
  disarmed and cost nothing), and the bounds fill the gaps by the block rule, with its error in
  their standard errors (``docs/math.md`` §6.7).

``perf/overhead`` is the achieved ratio of measurement time to training time. Training time is
wall time since ``on_train_start`` minus the measurement time (validation included — it is part of
the user's run, not ours). Measurement time includes every Lightning hook of the measurement
callbacks, whole, and Lightning's dispatch of them (:mod:`genbounds.callbacks.hook_clock`). On a
GPU the clock is read on the host: a probe synchronizes anyway, while the per-step statistics'
device work runs asynchronously and only its launch time is counted (the CUDA benchmark gives the
true ratio). Not counted: the dispatch of validation-batch and epoch-level hooks a callback does
not override, autograd's bookkeeping of the norm hooks, and what measurement does to the speed of
the user's own kernels — ``benchmarks/overhead_suite.py`` measures the whole against plain
training.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from genbounds.callbacks.hook_clock import BUDGET_KEY


def horizon(trainer: Trainer) -> float | None:
    """The run's optimizer steps, ``estimated_stepping_batches`` (``None`` when unknown: no length,
    no ``max_steps``) — under a ``GradientAccumulationScheduler`` summed over the epochs, each at
    its own accumulation (:func:`scheduled_horizon`)."""
    scheduled = scheduled_horizon(trainer)
    if scheduled is not None:
        return scheduled
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - no length, no max_steps: the horizon is unknown
        return None
    return total if 0.0 < total < math.inf else None


def scheduled_horizon(trainer: Trainer) -> float | None:
    """Under a ``GradientAccumulationScheduler``: ``Σ_epochs ⌈batches / accumulation(epoch)⌉`` (a
    partial window steps at the epoch's end), at most ``max_steps``. ``estimated_stepping_batches``
    takes the accumulation of the moment for every epoch: with ``{0: 1, 1: 4}`` over 6 epochs of 4
    batches it read 24 steps of a run that takes 9 (a review, round 36). ``None`` without a
    scheduler, or where the epochs or the loader's length are unknown."""
    scheduler = next((cb for cb in getattr(trainer, "callbacks", ()) or ()
                      if isinstance(cb, GradientAccumulationScheduler)), None)
    if scheduler is None:
        return None
    batches, max_epochs, max_steps = trainer.num_training_batches, trainer.max_epochs, trainer.max_steps
    if not isinstance(batches, int) or batches <= 0 or max_epochs is None or max_epochs < 0:
        return float(max_steps) if max_steps is not None and max_steps > 0 else None
    total = sum(math.ceil(batches / scheduler.get_accumulate_grad_batches(epoch)) for epoch in range(max_epochs))
    if max_steps is not None and max_steps > 0:
        total = min(total, max_steps)
    return float(total) if total > 0 else None


class OverheadBudget:
    STEP_SHARE = 0.5
    """Fraction of what the final evaluation leaves of the budget that the per-step statistics may
    use before they skip steps (the rest is the intermediate probes'; see :meth:`step_share`)."""

    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction
        self.conflict_said = False
        self.start: float | None = None
        self.probe_time = 0.0
        """Seconds spent measuring: probes, evaluations and per-step statistics."""
        self.by_owner: dict[str, float] = {}
        self.last_cost: dict[str, float] = {}
        self.pricers: dict[str, Callable[[], float]] = {}
        """Cost estimates of probes that have not run yet (registered by the callbacks)."""
        self.deferred = 0
        self.skipped_steps = 0
        """Steps the per-step statistics left unmeasured to stay within their share."""
        self.reserve_estimate: Callable[[], float] | None = None
        self._reserve: float | None = None
        self.required: Callable[[], float] | None = None
        """What probes that must run before the final evaluation are expected to cost while they are
        still to come (Neu's midway Γ probe, :mod:`~genbounds.callbacks.midway_gamma`): part of the
        reserve — except for :attr:`required_owner`'s own probes, any of which would stand in for it."""
        self.required_owner: str | None = None
        self.elsewhere_time = 0.0
        """Part of :attr:`probe_time` charged for work done outside the hook that charged it."""
        self.hook_depth = 0
        """Clocked hooks running now (:mod:`genbounds.callbacks.hook_clock`; nested ones are not dispatched)."""
        self._dispatch_cost: float | None = None
        self.dispatch_measured = False
        """Whether :meth:`dispatch_cost` comes from gaps measured in training steps (else the replay)."""
        self.waker: Any = None
        """The measurement callback that wakes the sleeping batch starts (:mod:`~genbounds.callbacks.hook_clock`)."""
        self.sleepers: dict[int, tuple[Any, float]] = {}
        """Callbacks whose batch start sleeps until a global step, and the soonest of those steps."""
        self.next_wake = math.inf
        self.timed_sleepers: dict[int, tuple[Any, float]] = {}
        """Callbacks whose batch start sleeps until a ``time.perf_counter()`` reading (a probe
        waiting for the budget), and the soonest of those times."""
        self.next_wake_time = math.inf
        self._trainer: Any = None  # (a weak reference: the run's horizon, for ahead())
        self.waiting: dict[str, float] = {}
        """Probes due and waiting for the budget (owner → when it began waiting): one that began
        waiting later runs only when the budget also covers the earlier ones' (:meth:`allows`)."""
        self._positions: dict[int, int] = {}
        self._last_step_hook: tuple[int, float] | None = None
        self._gaps: list[float] = []

    @staticmethod
    def shared(trainer: Trainer, fraction: float | None) -> OverheadBudget:
        """The trainer's budget; the first callback that states a fraction sets it.

        Under more than one process the fraction is dropped (said once): every decision reads the
        rank's own clock, so ranks would decide differently and then wait for each other in the
        collectives of the probes and of the dispersion — a hang, not a slowdown."""
        if fraction is not None and getattr(trainer, "world_size", 1) > 1:
            if not trainer.__dict__.get("_genbounds_overhead_ddp_warned"):
                trainer.__dict__["_genbounds_overhead_ddp_warned"] = True
                rank_zero_warn("genbounds: overhead_budget is ignored with more than one process (each rank's "
                               "clock would make its own decisions); every probe runs on its schedule.")
            fraction = None
        budget = trainer.__dict__.get(BUDGET_KEY)
        if budget is None:
            budget = OverheadBudget(fraction)
            trainer.__dict__[BUDGET_KEY] = budget
        if budget._trainer is None:
            budget._trainer = weakref.ref(trainer)
        if budget.fraction is None and fraction is not None:
            budget.fraction = fraction
        elif fraction is not None and fraction != budget.fraction and not budget.conflict_said:
            budget.conflict_said = True  # (said once a Trainer; the first stated fraction stands)
            rank_zero_warn(f"genbounds: the callbacks of this Trainer state different overhead budgets "
                           f"({budget.fraction:g} first, then {fraction:g}); the budget is one for the whole suite, "
                           f"so {budget.fraction:g} applies. State it on one callback only.")
        return budget

    def __getstate__(self) -> dict:
        """Picklable after a fit too (a ``ddp_spawn`` launch, ``copy``, a user's own pickling of the
        callbacks that share it): the trainer is held by a weak reference, which does not pickle and
        would not point at anything in another process — dropped, the horizon then unknown until the
        next :meth:`shared` sets it."""
        state = self.__dict__.copy()
        state["_trainer"] = None
        return state

    def begin(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    @property
    def train_time(self) -> float:
        if self.start is None:
            return 0.0
        return max(time.perf_counter() - self.start - self.probe_time, 0.0)

    @property
    def overhead(self) -> float:
        train = self.train_time
        return self.probe_time / train if train > 0 else 0.0

    @property
    def reserve(self) -> float:
        """Seconds kept free for the final evaluation — its last measured cost, else the estimate —
        and for the :attr:`required` probes still to come."""
        return self.reserve_for(None)

    def reserve_for(self, owner: str | None) -> float:
        """:attr:`reserve` as ``owner``'s probe must leave it: without the :attr:`required` probe's
        cost when ``owner`` is the one whose probe would stand in for it (its scheduled Γ probe
        before the middle step leaves the final evaluation's reserve, not a second Γ probe's)."""
        if self._reserve is None and self.reserve_estimate is not None and self.fraction is not None:
            self._reserve = float(self.reserve_estimate())
        required = 0.0
        if self.required is not None and self.fraction is not None and (owner is None or owner != self.required_owner):
            required = float(self.required())
        return (self._reserve or 0.0) + required

    @reserve.setter
    def reserve(self, seconds: float) -> None:
        if self._reserve is not None and seconds < self._reserve:
            self.wake_waiting()  # (a smaller reserve may make a waiting probe affordable sooner)
        self._reserve = float(seconds)

    def wake_waiting(self) -> None:
        """Every probe sleeping until its cost fits checks again at the next step start (the
        reserve became smaller)."""
        if self.timed_sleepers:
            self.timed_sleepers = {k: (cb, -math.inf) for k, (cb, _) in self.timed_sleepers.items()}
            self.next_wake_time = -math.inf

    def ahead(self, owner: str) -> float:
        """What the probes waiting since before ``owner`` began waiting (all of them when it is not
        waiting yet) are expected to cost: its turn comes after theirs — but not after one that
        cannot fit even in the budget projected to the run's end (it would hold every probe behind
        it back for the whole run: a review, round 34)."""
        since = self.waiting.get(owner, math.inf)
        earlier = [other for other, began in self.waiting.items() if other != owner and began < since]
        if not earlier:
            return 0.0
        projected = self._projected_budget()
        return sum(cost for other in earlier
                   if (cost := self.expected(other)) + self.probe_time + self.reserve_for(other) <= projected)

    def _projected_budget(self) -> float:
        """:meth:`projected` at the trainer's progress now; ``inf`` when the horizon is unknown."""
        trainer = self._trainer() if self._trainer is not None else None
        total = horizon(trainer) if trainer is not None else None
        projected = self.projected(min(1.0, (trainer.global_step + 1) / total)) if total is not None else None
        return math.inf if projected is None else projected

    def projected(self, progress: float | None) -> float | None:
        """The budget, ``fraction`` × the training time, projected to the end of training from
        ``progress`` (fraction of the run's steps done); ``None`` without a fraction or a horizon."""
        if progress is None or not 0.0 < progress <= 1.0 or self.fraction is None:
            return None
        return self.fraction * self.train_time / progress

    def affordable_from(self, owner: str) -> float:
        """The earliest ``time.perf_counter()`` at which :meth:`allows` can hold for ``owner``'s
        probe: ``probe_time + cost + reserve ≤ fraction · (now − start − probe_time)`` solved for
        ``now`` with what is charged so far (anything charged later only moves it back; a smaller
        reserve wakes the waiting probes: see the setter). ``-inf`` without a running budget."""
        if self.fraction is None or self.start is None or self.fraction <= 0.0:
            return -math.inf
        cost = self.expected(owner) + self.ahead(owner)
        return self.start + self.probe_time + (self.probe_time + cost + self.reserve_for(owner)) / self.fraction

    def remaining(self) -> float:
        """Seconds the probes may still spend now (``inf`` without a budget; may be negative)."""
        if self.fraction is None:
            return float("inf")
        return self.fraction * self.train_time - self.probe_time

    def expected(self, owner: str) -> float:
        """What ``owner``'s next probe should cost: its last cost, else its registered estimate."""
        if owner in self.last_cost:
            return self.last_cost[owner]
        pricer = self.pricers.get(owner)
        return float(pricer()) if pricer is not None else 0.0

    def allows(self, owner: str, expected: float | None = None, queue: bool = False) -> bool:
        """Would running ``owner``'s probe now stay within budget (and leave the reserve)?

        ``queue``: a probe that waits for the budget step after step (a scheduled probe, due) takes
        its turn: it also leaves what the probes waiting since before it are expected to cost, so a
        cheap, frequent probe cannot keep an expensive one waiting for the whole run (before, the
        held-out gradient, due every 10 steps, took 369 probes of a 5,800-step run and Γ, due
        every 21, got 2 — Neu's bound filled from them)."""
        if self.fraction is None:
            return True
        cost = (self.expected(owner) if expected is None else expected) + (self.ahead(owner) if queue else 0.0)
        ok = self.probe_time + cost + self.reserve_for(owner) <= self.fraction * self.train_time
        if not ok:
            self.deferred += 1
            if queue:
                self.waiting.setdefault(owner, time.perf_counter())
        elif queue and self.waiting.pop(owner, None) is not None:
            self.wake_waiting()  # (the ones after it are one turn nearer)
        return ok

    def leave_queue(self, owner: str) -> None:
        """``owner`` no longer waits: it ran (a probe of the current weights, whoever asked for it),
        or its fit's training ended."""
        if self.waiting.pop(owner, None) is not None:
            self.wake_waiting()

    def step_share(self, progress: float | None) -> float:
        """The per-step statistics' share of the budget: :attr:`STEP_SHARE` of what the final
        evaluation (the reserve) leaves of the budget projected to the end of training — the other
        part is the intermediate probes' (``progress``: fraction of the run's steps done; ``None``:
        unknown horizon, then :attr:`STEP_SHARE` of the whole budget)."""
        projected = self.projected(progress)
        if projected is None or projected <= 0.0:
            return self.STEP_SHARE
        return self.STEP_SHARE * max(0.0, 1.0 - self.reserve / projected)

    MAX_STRIDE = 64
    """The per-step statistics measure at least every this many steps, whatever the budget: the
    block rule's filling error grows with the gaps, and a trend inside a long gap is a bias the
    filling SE does not see."""

    def step_stride(self, owner: str, measured: int, steps: int, progress: float | None = None) -> int:
        """Every how many steps a per-step statistic may measure so that its time stays within its
        share: its mean cost per measurement over the share of a training step's time, rounded up
        (``measured`` measurements so far over ``steps`` steps). Even spacing keeps the filled gaps
        short (skipping until the share allows again would leave one long gap after an expensive
        step). 1 without a budget; at most :attr:`MAX_STRIDE`."""
        if self.fraction is None or measured <= 0 or steps <= 0:
            return 1
        per_measurement = self.by_owner.get(owner, 0.0) / measured
        allowed = self.step_share(progress) * self.fraction * self.train_time / steps
        if per_measurement <= allowed:
            return 1
        if allowed <= 0.0:
            return self.MAX_STRIDE
        return min(self.MAX_STRIDE, math.ceil(per_measurement / allowed))

    def charge(self, owner: str, seconds: float, elsewhere: bool = False) -> None:
        """Count measurement time spent outside :meth:`timed` (per-step work, pricing).
        ``elsewhere``: time spent outside the hook that charges it (the norm hooks' time inside the
        user's forward and backward, charged at the end of the step): a clocked hook does not take
        it for its own and still charges its own wall time whole."""
        self.probe_time += seconds
        self.by_owner[owner] = self.by_owner.get(owner, 0.0) + seconds
        if elsewhere:
            self.elsewhere_time += seconds

    def charge_hook(self, callback: Any, trainer: Trainer, seconds: float, dispatches: int,
                    per_step: bool = True) -> None:
        """Charge a clocked hook: its own ``seconds`` and ``dispatches`` × Lightning's dispatch cost,
        to the callback's ``owner_name`` for a per-step hook, else to its ``run_owner_name`` (a
        per-step statistic keeps its set-up and epoch-end work out of its per-measurement cost)."""
        if dispatches:
            seconds += dispatches * self.dispatch_cost(trainer, callback)
        if seconds > 0.0:
            self.charge(callback.owner_name if per_step else callback.run_owner_name, seconds)

    DISPATCH_CALLS = 64
    DISPATCH_REPEATS = 5
    GAP_WINDOW = 64
    """Dispatch gaps per update of the measured dispatch cost (their median)."""

    def dispatch_started(self, callback: Any, trainer: Trainer, now: float) -> None:
        """A measurement callback's clocked ``on_train_batch_start`` begins: when the callback just
        before it in ``trainer.callbacks`` was also a measurement callback whose clocked call ended
        last, the time since is one dispatch (Lightning's loop body and the clock's entry and exit)."""
        index = self._positions.get(id(callback))
        if index is None:
            self._positions = {id(cb): i for i, cb in enumerate(getattr(trainer, "callbacks", ()) or ())}
            index = self._positions.setdefault(id(callback), -2)
        last = self._last_step_hook
        if last is not None and index >= 1 and last[0] == index - 1:
            self._gaps.append(now - last[1])
            if len(self._gaps) >= self.GAP_WINDOW:
                self._dispatch_cost = statistics.median(self._gaps)
                self.dispatch_measured = True
                self._gaps.clear()
        self._last_step_hook = None

    def dispatch_ended(self, callback: Any, now: float) -> None:
        self._last_step_hook = (self._positions.get(id(callback), -2), now)

    def dispatch_cost(self, trainer: Trainer, callback: Any) -> float:
        """Seconds Lightning spends dispatching one hook to one callback: the median of the last
        :attr:`GAP_WINDOW` gaps between neighbouring measurement callbacks' clocked
        ``on_train_batch_start`` calls in training steps (:meth:`dispatch_started`); until that
        many were seen, a replay of the body of Lightning's ``_call_callback_hooks`` loop
        (``getattr``, ``callable``, the callback's ``state_key`` in the profiler's action name, the
        profiler context, the call with ``trainer.lightning_module``) against a no-op method, timed
        once: the median of :attr:`DISPATCH_REPEATS` rounds of :attr:`DISPATCH_CALLS` calls (a warm
        loop: a lower bound). A user's own profiler is not touched by the replay (its report would
        list it): a pass-through one stands in."""
        if self._dispatch_cost is None:
            profiler = trainer.profiler if isinstance(trainer.profiler, PassThroughProfiler) else PassThroughProfiler()
            rounds = []
            for _ in range(self.DISPATCH_REPEATS):
                started = time.perf_counter()
                for _ in range(self.DISPATCH_CALLS):
                    fn = getattr(callback, "_dispatch_probe")
                    if callable(fn):
                        with profiler.profile(f"[Callback]{callback.state_key}._dispatch_probe"):
                            fn(trainer, trainer.lightning_module)
                rounds.append((time.perf_counter() - started) / self.DISPATCH_CALLS)
            self._dispatch_cost = statistics.median(rounds)
        return self._dispatch_cost

    @contextmanager
    def timed(self, owner: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            self.charge(owner, spent)
            self.last_cost[owner] = spent

    def state_dict(self) -> dict:
        return {"probe_time": self.probe_time, "by_owner": dict(self.by_owner), "train_time": self.train_time}

    def load_state_dict(self, state: dict) -> None:
        self.probe_time = float(state.get("probe_time", 0.0))
        self.by_owner = dict(state.get("by_owner", {}))
        elapsed = float(state.get("train_time", 0.0)) + self.probe_time
        self.start = time.perf_counter() - elapsed
