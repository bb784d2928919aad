"""Neu's second Γ probe: the one :class:`~genbounds.callbacks.GeneralizationBound` asks for at the
run's middle step when the schedule has given none after step 0 by then (``docs/math.md`` §6.9).

Neu's trajectory sums Γ over every step, filled between the probes of ``GradientSensitivity``;
with fewer than two probes after step 0 the filling error is unknown and Neu's bounds are NaN.
The final evaluation probes the final weights where Γ is short, but one probe during training is
still needed, and a schedule can give none: ``every_n_steps`` longer than the run, or an overhead
budget that never affords a Γ probe while training (the main job: its 0.2 budget of a 3-second
training run is mostly the final evaluation's).

So at the run's middle step (:func:`~genbounds.callbacks.overhead.horizon` halved, rounded up) the
bound has Γ probe the current weights when no probe after step 0 stands yet (a probe Γ's own
schedule takes at that step is the same probe: whichever asks first measures, the other finds the
weights measured). Under a budget the probe is *required*: its expected cost is part of the reserve
the other probes and the per-step statistics leave free until it ran (:attr:`OverheadBudget.required`;
Γ's own scheduled probes, any of which would stand in for it, leave only the final evaluation's), it
takes the draws what is left affords (never fewer than its ``min_draws``), and it runs whether or
not the budget affords it then — an overshoot, if any, is in ``perf/overhead``, as for the final
evaluation.

Not asked for: with an unknown horizon (no length, no ``max_steps``), a run of one step, or where
Neu is not computed. A fit that stops before its middle step (early stopping, ``max_time``) keeps
NaN Neu bounds, with the note that says why.

The decision reads only the step, the horizon and the Γ probes in the bound's series (part of
its checkpoint), so a resumed fit asks at the same step as the uninterrupted one, and every DDP
process alike."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer

from genbounds.callbacks.overhead import horizon


class MidwayGamma:
    """When and whether the bound asks ``GradientSensitivity`` for its midway probe."""

    def __init__(self) -> None:
        self.step: int | None = None
        """The step at whose batch start the probe is asked for (``None``: not asked in this fit)."""
        self.sensitivity: Any = None
        self._series: Any = None
        self._neu: Callable[[], bool] | None = None
        self._asked = False

    def arm(self, trainer: Trainer, sensitivity: Any, series: Any, neu: Callable[[], bool]) -> None:
        """At the fit's start: ``sensitivity`` the Γ producer (``None``: none), ``series`` the bound's
        :class:`~genbounds.callbacks.bound_series.BoundSeries` (its Γ probe steps are read when
        asked), ``neu`` whether a Neu bound is computed (asked then too: the bounds computed may
        change at the first step)."""
        total = horizon(trainer)
        middle = math.ceil(total / 2) if total is not None else None
        self.step = middle if sensitivity is not None and middle is not None and middle < total else None
        self.sensitivity, self._series, self._neu = sensitivity, series, neu
        self._asked = False

    def pending(self) -> bool:
        """Whether the probe is still to come: armed, a Neu bound computed, Γ's callback active, and
        no Γ probe after step 0 in the series."""
        return (self.step is not None and not self._asked and self._neu is not None and self._neu()
                and self.sensitivity.active and not self._series.has_gamma_level())

    def wake_step(self) -> float:
        """The step until which the bound's batch start has nothing to do for it (``inf``: never)."""
        return float(self.step) if self.pending() else math.inf

    def required_cost(self) -> float:
        """What the probe is expected to cost while it is still to come (the budget's ``required``)."""
        if not self.pending():
            return 0.0
        budget = self.sensitivity.budget
        return budget.expected(self.sensitivity.owner) if budget is not None else 0.0

    def maybe_probe(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """At a batch start (the first of an accumulation window): probe when due, once a fit (a
        probe that records nothing — every parameter frozen — is not asked again at every step).
        ``True`` if it asked."""
        step = int(trainer.global_step)
        if self.step is None or step < self.step or not self.pending():
            return False
        self._asked = True
        self.sensitivity.probe_now(trainer, pl_module, log=True, epoch_end=False)
        budget = self.sensitivity.budget
        if budget is not None:
            budget.wake_waiting()  # (the reserve no longer holds its cost)
        return True
