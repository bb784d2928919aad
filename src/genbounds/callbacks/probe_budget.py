"""What a probe costs and how many draws it may take under the overhead budget
(:mod:`genbounds.callbacks.overhead`): the pricing half of every
:class:`~genbounds.callbacks.probe.ProbeCallback`, kept apart from its schedule and hooks.

* A probe that has not run yet is priced as :meth:`BudgetedProbe.forward_equivalents` loss
  evaluations of its probe set, each costing :meth:`BudgetedProbe.unit_cost` (timed once, charged).
* An intermediate probe runs only when it leaves the reserve for the final evaluation
  (:meth:`BudgetedProbe._affordable`), and its Monte-Carlo draws fit in what is left above it.
* In the final evaluation the bound gives each probe it asks for a share of what is left
  (:attr:`BudgetedProbe.final_share`), less what the probes after it need at their fewest draws
  (:attr:`BudgetedProbe.final_floor_after`). The share is fixed when the probe starts, so a second
  estimator inside one probe (HessianTrace's power iteration after Hutchinson) takes what the
  first one left.

Never below a probe's ``min_draws``: a budget that is too small gives a larger standard error
(or, at the floors, an overshoot that ``perf/overhead`` reports), never a missing value.
"""

from __future__ import annotations

import time
from typing import Any

from genbounds.callbacks.isolation import isolated_pass
from genbounds.callbacks.overhead import OverheadBudget


class BudgetedProbe:
    """Mixin of :class:`~genbounds.callbacks.probe.ProbeCallback`: pricing and draw counts.

    The host provides ``owner``, ``budget`` (the trainer's :class:`OverheadBudget` or ``None``),
    ``train_probe`` / ``heldout_probe``, ``_module``, ``_loss_fn``, ``probe_mode`` and ``active``."""

    owner: str
    budget: OverheadBudget | None
    train_probe: Any
    heldout_probe: Any
    probe_mode: str
    _module: Any
    _loss_fn: Any
    active: bool

    def _init_pricing(self) -> None:
        self._unit_cost: float | None = None
        self.final_share: float | None = None
        """Set by the bound around its final evaluation's requests: the share of what is left of the
        budget this probe's draws may spend (``None``: an intermediate probe, which leaves the reserve)."""
        self.final_floor_after = 0.0
        """Set with :attr:`final_share`: what the final evaluation's later probes cost at their fewest
        draws, kept out of this probe's share (so the last one is not squeezed below its floor)."""
        self._final_until: float | None = None
        """While a final probe runs: the budget's ``remaining()`` to leave when it ends."""

    def forward_equivalents(self) -> float:
        """Loss evaluations of a probe set (a forward) one probe costs, roughly (a backward counts
        as two forwards): what prices a probe before its first run. ``0``: not priced."""
        return 0.0

    def unit_cost(self) -> float:
        """Seconds of one gradient-free loss evaluation of this callback's probe set, timed once
        (in isolation, charged to the budget)."""
        if self._unit_cost is None:
            batch = self.train_probe if self.train_probe is not None else self.heldout_probe
            if batch is None or self._module is None or self._loss_fn is None or self.budget is None:
                return 0.0
            started = time.perf_counter()
            with isolated_pass(self._module, mode=self.probe_mode, grad=False):
                self._loss_fn(self._module, batch)
            self._unit_cost = time.perf_counter() - started
            self.budget.charge(self.owner, self._unit_cost)
        return self._unit_cost

    def first_cost(self) -> float:
        """Estimated seconds of this callback's first probe (the budget uses it until one ran)."""
        units = self.forward_equivalents()
        return units * self.unit_cost() if units > 0 and self.active else 0.0

    def draws_within_budget(self, wanted: int, minimum: int, units_per_draw: float, keep: float = 0.0) -> int:
        """``wanted`` Monte-Carlo draws, or fewer (never below ``minimum``) when the overhead budget
        has less time left — less the reserve for the final evaluation; in the final evaluation,
        this probe's share of what is left — than they would take at ``units_per_draw`` loss
        evaluations each (in the final evaluation, less what the probes after it need at their
        fewest draws). ``keep``: seconds this probe still needs afterwards (a second estimator at its
        fewest draws), left out of what this one may spend. The standard error the probe reports
        grows accordingly."""
        if self.budget is None or self.budget.fraction is None:
            return wanted
        per_draw = self.unit_cost() * units_per_draw
        if self.final_share is not None:
            # this probe's share of the pool (what is left less the later probes' floors), fixed
            # when the probe starts, so that a second estimator in it takes what the first one left
            until = self._final_until if self._final_until is not None else self._final_pool_end()
            left = self.budget.remaining() - until - keep
        else:
            left = self.budget.remaining() - self.budget.reserve_for(self.owner) - keep
        return max(minimum, min(wanted, int(left // max(per_draw, 1e-12))))

    def _final_pool_end(self) -> float:
        """What ``budget.remaining()`` should read when this final probe ends: its
        :attr:`final_share` of what is left less the later probes' floors, spent."""
        assert self.budget is not None and self.final_share is not None
        remaining = self.budget.remaining()
        return remaining - self.final_share * (remaining - self.final_floor_after)

    def _affordable(self, queue: bool = True) -> bool:
        """Whether a probe now fits the budget; ``queue``: a due one that does not waits its turn
        (:meth:`OverheadBudget.allows`)."""
        return self.budget is None or self.budget.allows(self.owner, queue=queue)

    def _start_final_share(self) -> None:
        """At a probe's start: fix the end of its final share (``None`` for an intermediate probe)."""
        assert self.budget is not None
        self._final_until = (self._final_pool_end()
                             if self.final_share is not None and self.budget.fraction is not None else None)
