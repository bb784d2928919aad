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

The budget's clock starts as the first measurement callback's ``on_train_start`` begins; nothing
before it is charged (``setup``, ``on_fit_start``, the sanity check: not training time either).
Not counted: the dispatch of validation-batch and epoch-level hooks a class does not override (a
few milliseconds a run), autograd's calls of the norm hooks, and what measurement does to the
speed of the user's own kernels — ``benchmarks/overhead_suite.py`` measures the whole against
plain training.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback

BUDGET_KEY = "_genbounds_overhead"
"""Where :meth:`OverheadBudget.shared` keeps the trainer's budget (``trainer.__dict__``)."""

STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")
"""The callback hooks Lightning calls at every training batch (automatic optimization)."""

_NOT_CLOCKED = frozenset({"on_exception", "on_save_checkpoint", "on_load_checkpoint"})


def _clock(hook: Callable, step_start: bool, begins: bool = False, per_step: bool = True) -> Callable:
    @functools.wraps(hook)
    def clocked(self: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        budget = trainer.__dict__.get(BUDGET_KEY)
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
            dispatches = 0 if depth else 1 + (type(self)._unclocked_step_hooks if step_start else 0)
            budget.charge_hook(self, trainer, spent, dispatches, per_step)
            if step_start and not depth:
                budget.dispatch_ended(self, time.perf_counter())

    clocked.__genbounds_clocked__ = True  # type: ignore[attr-defined]
    return clocked


class MeasurementCallback(Callback):
    """Base of the measurement callbacks: their hooks are charged whole to the overhead budget
    (see the module docstring), under :attr:`owner_name` (default: the class name)."""

    _unclocked_step_hooks = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _clock_hooks(cls)

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
        """No work of its own: clocked so that every step charges this callback's dispatch."""

    def _dispatch_probe(self, trainer: Any, pl_module: Any) -> None:
        """A no-op Lightning would call like any hook (:meth:`OverheadBudget.dispatch_cost`)."""


def _clock_hooks(cls: type) -> None:
    """Wrap every ``on_*`` hook ``cls`` itself defines, and count the per-step hooks it leaves to
    Lightning's no-ops (their dispatch is charged at each training batch start)."""
    for name, fn in list(vars(cls).items()):
        if (name.startswith("on_") and name not in _NOT_CLOCKED and callable(fn)
                and not getattr(fn, "__genbounds_clocked__", False)):
            setattr(cls, name, _clock(fn, step_start=name == "on_train_batch_start", begins=name == "on_train_start",
                                      per_step=name in STEP_HOOKS))
    cls._unclocked_step_hooks = sum(1 for h in STEP_HOOKS if getattr(cls, h) is getattr(Callback, h))


_clock_hooks(MeasurementCallback)
