"""Every Lightning hook of a genbounds measurement callback, charged whole to the overhead budget.

A probe times its measurement and the per-step statistics time their work, but a run pays for
more than that: the hooks' bookkeeping between measurements (schedule checks, the budget's own
decisions, flushing step logs, building a bound's inputs, writing to the loggers) and Lightning's
dispatch of every hook to every callback (``trainer/call.py::_call_callback_hooks``: a
``getattr``, the callback's ``state_key``, a profiler context and the call — six hooks a training
step, whether the callback overrides them or not). Measured on the main job before this module
(``docs/results/overhead.md``): the suite ran 0.24–0.34 s beyond plain training plus what the
budget had been charged, and its logged ``perf/overhead`` (0.19) was well under the measured
0.28–0.34.

:class:`MeasurementCallback` closes most of that gap by construction: every ``on_*`` hook a
subclass defines is wrapped once, at class creation, by a clock that charges the hook's wall
time — less what the hook already charged itself (a probe's ``budget.timed``), so nothing counts
twice — to the callback's budget owner, plus Lightning's dispatch: one per clocked call and, at
each training batch start, one for each per-step hook the class leaves to
:class:`~lightning.pytorch.Callback`'s no-op.

The dispatch cost is measured where it is paid: every measurement callback's
``on_train_batch_start`` is clocked, so when two of them are neighbours in ``trainer.callbacks``
the time from the end of the first one's clocked call to the start of the second one's is one
dispatch — Lightning's loop body and the clock's own entry and exit, at the cache temperature of a
training step (:meth:`OverheadBudget.dispatch_cost`: the median of the last window of such gaps,
about 4 µs on the main job here). Until a window is full, a replay of Lightning's loop body
against a no-op method stands in, timed once (a warm loop: about 1.3 µs here, a lower bound).

**Hooks left to Lightning's no-ops are not dispatched at all.** Lightning calls a callback's hook
only when ``getattr(callback, hook)`` is callable; at its first training batch a measurement
callback sets, on the instance, every per-batch hook its class leaves to
:class:`~lightning.pytorch.Callback`'s no-op to ``None`` (:func:`skip_inherited_hooks`), and its
``on_fit_end`` (or ``on_exception``, when the run fails) removes them again; a hook set on the
instance itself is left alone. Lightning's loop then spends a ``getattr`` on them instead of a
profiler context, the ``state_key`` and a call. On the main job's suite (eight measurement
callbacks) that is 33 of the 48 dispatches of a training step and all 16 of every validation
batch's; under cProfile, Lightning's dispatch was the largest cost of the suite that no hook of
ours timed (``docs/results/overhead.md``). A subclass that defines the hook keeps it (and
``super()`` from it still finds Lightning's no-op: only the instance attribute is ``None``). It is
not done when Lightning's dispatch loop would not skip a non-callable (checked once); the
skipped hooks' dispatch is then charged at each batch start as before.

**A batch start with nothing to do is not dispatched either.** A measurement callback whose
``on_train_batch_start`` has nothing to do until a known step or time sets it to ``None`` on the
instance until then: a probe until its schedule's next step (:func:`sleep_until`), a probe waiting
for the budget until its cost can fit (:func:`sleep_until_time`,
:meth:`OverheadBudget.affordable_from`), the aggregator and the gate for the run. The trainer's
first measurement callback never sleeps: its batch start, which Lightning reaches before any later
callback's in the same loop, gives the others theirs back when their step or time has come
(:func:`wake_due`: a comparison or two while none has). An epoch end that makes a probe due wakes
it, a smaller reserve for the final evaluation wakes the waiting probes, and ``on_train_start``,
``on_fit_end`` and ``on_exception`` wake every callback.

**Nor are the other per-step hooks on a step they have nothing to do in** (:class:`HooksAside`).
``GradientDispersion`` decides at its batch start whether the step is measured; on a step it is
not, its backward and optimizer-step hooks are set aside for that step, and its batch end too
unless that step is a logging step with measured values to write (decided at the batch start:
when ``trainer.should_stop`` turns true during such a step, its values are written at the epoch
or run end instead, with the same logged step — only a later callback reading
``trainer.callback_metrics`` in that step's batch end sees the previous value); on a measured step
of one backward whose norms it reads at the optimizer step, its after-backward hook. ``HeldoutGradient``'s
after-backward hook (work under manual optimization only) is set aside for the run under
automatic optimization, and its batch start sleeps between its scheduled steps like a probe's. On
the main job a step the dispersion skips was charged 126–221 µs (nine dispatches: the
dispersion's five, the held-out gradient's three, the aggregator's learning-rate record; medians
over a run's skipped steps, six runs) and is now charged 39–47 µs (three; four runs). Those idle
hooks were charged to the dispersion's own account, so its cost per measurement read larger than
it was; how many steps it measures under the budget is, on that two-second job, set mostly by
what the final evaluation leaves (11–140 of 630 steps over six runs of either code).

The budget's clock starts as the first measurement callback's ``on_train_start`` begins; nothing
before it is charged (``setup``, ``on_fit_start``, the sanity check: not training time either).
Not counted: the dispatch of the epoch-level hooks a class does not override (a few per epoch),
autograd's calls of the norm hooks, and what measurement does to the
speed of the user's own kernels — ``benchmarks/overhead_suite.py`` measures the whole against
plain training.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn

BUDGET_KEY = "_genbounds_overhead"
"""Where :meth:`OverheadBudget.shared` keeps the trainer's budget (``trainer.__dict__``)."""

STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")
"""The callback hooks Lightning calls at every training batch (automatic optimization)."""

BATCH_HOOKS = STEP_HOOKS + ("on_validation_batch_start", "on_validation_batch_end", "on_test_batch_start",
                            "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end")
"""The hooks Lightning calls at every batch: those a class leaves to the no-op are skipped."""

SKIPPED_KEY = "_genbounds_skipped_hooks"
"""Where an instance keeps the names of the hooks it set to ``None`` (its ``__dict__``)."""

_NOT_CLOCKED = frozenset({"on_exception", "on_save_checkpoint", "on_load_checkpoint"})


def lightning_skips_non_callable_hooks() -> bool:
    """Whether Lightning's ``_call_callback_hooks`` tests ``callable(fn)`` before calling a hook (it
    does since 1.x): then a hook set to ``None`` is passed over. Read once from the loop's code."""
    global _SKIPS
    if _SKIPS is None:
        try:
            from lightning.pytorch.trainer import call

            _SKIPS = "callable" in call._call_callback_hooks.__code__.co_names
        except (ImportError, AttributeError):
            _SKIPS = False
    return _SKIPS


_SKIPS: bool | None = None


def skip_inherited_hooks(callback: Callback) -> tuple[str, ...]:
    """Set every per-batch hook ``callback``'s class leaves to :class:`Callback`'s no-op to ``None``
    on the instance, so that Lightning does not dispatch it (see the module docstring); returns
    their names (empty when Lightning would not skip them)."""
    if SKIPPED_KEY in callback.__dict__:
        return callback.__dict__[SKIPPED_KEY]
    names: tuple[str, ...] = ()
    if lightning_skips_non_callable_hooks():
        cls = type(callback)
        # (a hook set on the instance itself — a patched method — is the instance's own)
        names = tuple(h for h in BATCH_HOOKS
                      if getattr(cls, h, None) is getattr(Callback, h) and h not in callback.__dict__)
        for name in names:
            callback.__dict__[name] = None
    callback.__dict__[SKIPPED_KEY] = names
    return names


def restore_inherited_hooks(callback: Callback) -> None:
    """Undo :func:`skip_inherited_hooks`: the instance's hooks are its class's again."""
    for name in callback.__dict__.pop(SKIPPED_KEY, ()):
        callback.__dict__.pop(name, None)


ASIDE_KEY = "_genbounds_hooks_aside"
"""Where an instance keeps its :class:`HooksAside` (its ``__dict__``)."""


class HooksAside:
    """Per-batch hooks of one callback that Lightning need not dispatch while the callback has
    nothing to do in them: ``GradientDispersion``'s backward and optimizer-step hooks on a step it
    does not measure, ``HeldoutGradient``'s after-backward hook under automatic optimization.

    :meth:`set_aside` sets them to ``None`` on the instance (Lightning's loop then spends a
    ``getattr`` on each instead of a dispatch — a profiler context, the ``state_key`` and the
    clocked call, about 14 µs a hook on the main job), :meth:`give_back` removes those entries
    again, and so does the callback's ``on_fit_end`` or ``on_exception`` (:func:`_restoring`).
    Only hooks whose class takes them from ``hook_of`` can be set aside (a subclass's override may
    have work at every batch), none set on the instance itself, and none when Lightning's loop
    would not skip a non-callable hook. Made at ``on_train_start``, before any is set aside."""

    def __init__(self, callback: Any, hook_of: type, names: tuple[str, ...]) -> None:
        cls = type(callback)
        self._dict = callback.__dict__
        previous = self._dict.get(ASIDE_KEY)
        if previous is not None:  # (a fit that reached neither on_fit_end nor on_exception)
            previous.give_back()
        self.names = tuple(n for n in names if getattr(cls, n) is getattr(hook_of, n) and n not in self._dict) \
            if lightning_skips_non_callable_hooks() else ()
        self.aside: tuple[str, ...] = ()
        self._dict[ASIDE_KEY] = self

    def set_aside(self, names: tuple[str, ...] | None = None) -> None:
        """Set ``names`` (default: all that can be) aside; the others are given back."""
        wanted = self.names if names is None else tuple(n for n in names if n in self.names)
        if wanted == self.aside:
            return
        for name in self.aside:
            if name not in wanted:
                self._dict.pop(name, None)
        for name in wanted:
            self._dict[name] = None
        self.aside = wanted

    def give_back(self) -> None:
        """Every hook set aside is the class's again."""
        if self.aside:
            for name in self.aside:
                self._dict.pop(name, None)
            self.aside = ()


SLEEP_KEY = "_genbounds_asleep_until"
"""The step until which an instance's ``on_train_batch_start`` is set aside (its ``__dict__``)."""


def sleep_until(callback: Any, trainer: Any, step: float, hook_of: type) -> None:
    """Until global step ``step`` (``inf``: until woken), Lightning does not dispatch ``callback``'s
    ``on_train_batch_start`` (see the module docstring), the one ``hook_of`` (the class calling
    this) defines. Nothing happens when the callback's batch start is another one (a subclass's
    override, or one set on the instance: it may have work at every step), for the trainer's waker,
    without a budget, or when Lightning's loop would not skip a non-callable hook."""
    _set_aside(callback, trainer, step, hook_of, timed=False)


def sleep_until_time(callback: Any, trainer: Any, when: float, hook_of: type) -> None:
    """As :func:`sleep_until`, until ``time.perf_counter()`` reaches ``when`` (a probe waiting for
    the overhead budget: :meth:`OverheadBudget.affordable_from`)."""
    _set_aside(callback, trainer, when, hook_of, timed=True)


def _set_aside(callback: Any, trainer: Any, until: float, hook_of: type, timed: bool) -> None:
    budget = trainer.__dict__.get(BUDGET_KEY)
    if (budget is None or budget.waker is None or budget.waker is callback
            or type(callback).on_train_batch_start is not hook_of.on_train_batch_start
            or "on_train_batch_start" in callback.__dict__ or not lightning_skips_non_callable_hooks()):
        return
    callback.__dict__["on_train_batch_start"] = None
    callback.__dict__[SLEEP_KEY] = until
    if timed:
        budget.timed_sleepers[id(callback)] = (callback, until)
        budget.next_wake_time = min(budget.next_wake_time, until)
    else:
        budget.sleepers[id(callback)] = (callback, until)
        budget.next_wake = min(budget.next_wake, until)


def _give_back(callback: Any) -> None:
    """The instance's ``on_train_batch_start`` is its class's again."""
    if callback.__dict__.pop(SLEEP_KEY, None) is not None:
        callback.__dict__.pop("on_train_batch_start", None)


def wake(callback: Any, trainer: Any = None) -> None:
    """Give ``callback`` its ``on_train_batch_start`` back (and drop it from the budget's sleepers)."""
    _give_back(callback)
    budget = trainer.__dict__.get(BUDGET_KEY) if trainer is not None else None
    if budget is not None:
        budget.sleepers.pop(id(callback), None)
        budget.timed_sleepers.pop(id(callback), None)


def _wake_all(sleepers: dict[int, tuple[Any, float]], now: float) -> float:
    """Wake those of ``sleepers`` whose time (or step) ``now`` has reached; the soonest left."""
    for key, (callback, at) in list(sleepers.items()):
        if at <= now:
            _give_back(callback)
            del sleepers[key]
    return min((at for _, at in sleepers.values()), default=math.inf)


def wake_due(budget: Any, trainer: Any) -> None:
    """The waker's part: wake every sleeper whose step or time has come."""
    if budget.next_wake < math.inf:
        step = trainer.global_step
        if step >= budget.next_wake:
            budget.next_wake = _wake_all(budget.sleepers, step)
    if budget.next_wake_time < math.inf:
        now = time.perf_counter()
        if now >= budget.next_wake_time:
            budget.next_wake_time = _wake_all(budget.timed_sleepers, now)


def _clock(hook: Callable, step_start: bool, begins: bool = False, per_step: bool = True,
           ends: bool = False) -> Callable:
    @functools.wraps(hook)
    def clocked(self: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        budget = trainer.__dict__.get(BUDGET_KEY)
        if step_start:
            if SKIPPED_KEY not in self.__dict__:
                skip_inherited_hooks(self)
            if budget is not None:
                if budget.waker is None:
                    budget.waker = self  # the first measurement callback Lightning reaches
                elif budget.waker is self and (budget.next_wake < math.inf or budget.next_wake_time < math.inf):
                    wake_due(budget, trainer)
        elif begins:
            wake(self, trainer)  # a run starts with every batch start in place
        if budget is not None and budget.start is None and begins:
            budget.begin()  # the run's clock starts with the first measurement callback's on_train_start
        if budget is None or budget.start is None:
            return hook(self, trainer, *args, **kwargs)
        depth, budget.hook_depth = budget.hook_depth, budget.hook_depth + 1
        charged_before = budget.probe_time - budget.elsewhere_time
        started = time.perf_counter()
        if step_start and not depth:
            budget.dispatch_started(self, trainer, started)
        try:
            return hook(self, trainer, *args, **kwargs)
        finally:
            # less what the hook charged for its own work (a probe's timed block), not for work
            # done elsewhere (the norm hooks' time, charged here at the end of the step)
            spent = time.perf_counter() - started - (budget.probe_time - budget.elsewhere_time - charged_before)
            budget.hook_depth = depth
            # a hook reached through super() from another clocked hook was dispatched by nobody
            # (and, at a batch start, the per-step no-ops Lightning still dispatches, if any)
            dispatches = 0 if depth else 1 + (
                type(self)._unclocked_step_hooks if step_start and not self.__dict__.get(SKIPPED_KEY) else 0)
            budget.charge_hook(self, trainer, spent, dispatches, per_step)
            if step_start and not depth:
                budget.dispatch_ended(self, time.perf_counter())

    if ends:
        clocked = _restoring(clocked)

    clocked.__genbounds_clocked__ = True  # type: ignore[attr-defined]
    return clocked


def _fit_only(load_state_dict: Callable) -> Callable:
    """``load_state_dict`` that does nothing where :meth:`MeasurementCallback.on_load_checkpoint`
    found the trainer not fitting."""

    @functools.wraps(load_state_dict)
    def load(self: Any, state_dict: dict[str, Any]) -> None:
        if getattr(self, "_takes_state", True):
            load_state_dict(self, state_dict)
        else:
            self._takes_state = True  # (this load only: a later call of the user's own takes its state)

    return load


class MeasurementCallback(Callback):
    """Base of the measurement callbacks: their hooks are charged whole to the overhead budget
    (see the module docstring), under :attr:`owner_name` (default: the class name)."""

    _unclocked_step_hooks = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _clock_hooks(cls)
        own = cls.__dict__.get("load_state_dict")
        if own is not None:
            cls.load_state_dict = _fit_only(own)  # type: ignore[method-assign]

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Lightning restores callbacks' state in every stage, ``trainer.validate(ckpt_path=…)``
        after a fit included, which put an older state back (a bound's final values gone): only a
        resumed fit takes it (``load_state_dict`` comes next)."""
        self._takes_state = trainer.state.fn == TrainerFn.FITTING

    @property
    def owner_name(self) -> str:
        """The budget account its per-step hooks are charged to."""
        return type(self).__name__

    @property
    def run_owner_name(self) -> str:
        """The account of its other hooks (set-up, epoch and run ends): the same by default."""
        return self.owner_name

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """No work of its own: clocked so that any measurement callback starts the budget's clock."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """No work of its own: clocked so that the first batch sets aside the hooks its class leaves
        to Lightning's no-ops, and so that the trainer's first measurement callback wakes the
        others; any other then sleeps for the rest of the run (unless a subclass has work here)."""
        sleep_until(self, trainer, math.inf, hook_of=MeasurementCallback)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """No work of its own: clocked so that the hooks set aside at the first batch come back."""

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """No work of its own: the hooks set aside come back when a run fails."""

    def _dispatch_probe(self, trainer: Any, pl_module: Any) -> None:
        """A no-op Lightning would call like any hook (:meth:`OverheadBudget.dispatch_cost`)."""


def _restoring(hook: Callable) -> Callable:
    """``on_fit_end`` and ``on_exception`` (a run that fails never reaches ``on_fit_end``): the
    hooks set aside come back, and the budget forgets its waker."""
    @functools.wraps(hook)
    def restoring(self: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, trainer, *args, **kwargs)
        finally:
            restore_inherited_hooks(self)
            aside = self.__dict__.get(ASIDE_KEY)
            if aside is not None:
                aside.give_back()
            wake(self, trainer)
            budget = trainer.__dict__.get(BUDGET_KEY)
            if budget is not None and budget.waker is self:
                budget.waker = None

    restoring.__genbounds_clocked__ = True  # type: ignore[attr-defined]
    return restoring


def _clock_hooks(cls: type) -> None:
    """Wrap every ``on_*`` hook ``cls`` itself defines, and count the per-step hooks it leaves to
    Lightning's no-ops (their dispatch is charged at each training batch start)."""
    fn = vars(cls).get("on_exception")
    if callable(fn) and not getattr(fn, "__genbounds_clocked__", False):
        setattr(cls, "on_exception", _restoring(fn))
    for name, fn in list(vars(cls).items()):
        if (name.startswith("on_") and name not in _NOT_CLOCKED and callable(fn)
                and not getattr(fn, "__genbounds_clocked__", False)):
            setattr(cls, name, _clock(fn, step_start=name == "on_train_batch_start", begins=name == "on_train_start",
                                      per_step=name in STEP_HOOKS, ends=name == "on_fit_end"))
    cls._unclocked_step_hooks = sum(1 for h in STEP_HOOKS if getattr(cls, h) is getattr(Callback, h))


_clock_hooks(MeasurementCallback)
