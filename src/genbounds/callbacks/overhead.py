"""A time budget for the probes: ``overhead_budget=0.2`` keeps the wall time spent in probes and
bound evaluations within 20 % of the time spent training.

One :class:`OverheadBudget` per ``Trainer`` is shared by every probe callback. Each measures its
own cost; a probe that its schedule calls for is *deferred* while running it would push the
suite's probe time above ``fraction × training time`` and runs at the first step start where it
fits (the bounds' block-filling rule already handles irregular spacing). Probes of the final
weights (train end, the last bound evaluation) always run. The achieved ratio is logged as
``perf/overhead``.

Training time is wall time since ``on_train_start`` minus the probes' own time (validation
included — it is part of the user's run, not ours). On a GPU the clock is read at probe
boundaries, where the probes synchronize anyway.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch import Trainer


class OverheadBudget:
    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction
        self.start: float | None = None
        self.probe_time = 0.0
        self.by_owner: dict[str, float] = {}
        self.last_cost: dict[str, float] = {}
        self.deferred = 0
        self.reserve = 0.0
        """Seconds kept free for the final evaluation (the cost of the last bound evaluation):
        intermediate probes only run when they leave that much of the budget."""

    @staticmethod
    def shared(trainer: Trainer, fraction: float | None) -> OverheadBudget:
        """The trainer's budget; the first callback that states a fraction sets it."""
        budget = trainer.__dict__.get("_genbounds_overhead")
        if budget is None:
            budget = OverheadBudget(fraction)
            trainer.__dict__["_genbounds_overhead"] = budget
        elif budget.fraction is None and fraction is not None:
            budget.fraction = fraction
        return budget

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

    def remaining(self) -> float:
        """Seconds the probes may still spend now (``inf`` without a budget; may be negative)."""
        if self.fraction is None:
            return float("inf")
        return self.fraction * self.train_time - self.probe_time

    def allows(self, owner: str) -> bool:
        """Would running ``owner``'s probe now (at its last measured cost) stay within budget?"""
        if self.fraction is None:
            return True
        expected = self.last_cost.get(owner, 0.0)
        ok = self.probe_time + expected + self.reserve <= self.fraction * self.train_time
        if not ok:
            self.deferred += 1
        return ok

    @contextmanager
    def timed(self, owner: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            self.probe_time += spent
            self.by_owner[owner] = self.by_owner.get(owner, 0.0) + spent
            self.last_cost[owner] = spent

    def state_dict(self) -> dict:
        return {"probe_time": self.probe_time, "by_owner": dict(self.by_owner), "train_time": self.train_time}

    def load_state_dict(self, state: dict) -> None:
        self.probe_time = float(state.get("probe_time", 0.0))
        self.by_owner = dict(state.get("by_owner", {}))
        elapsed = float(state.get("train_time", 0.0)) + self.probe_time
        self.start = time.perf_counter() - elapsed
