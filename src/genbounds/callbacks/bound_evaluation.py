"""What one evaluation of :class:`~genbounds.callbacks.generalization_bound.GeneralizationBound`
needs besides the bound formulas, kept out of the callback's hooks:

* :class:`LossRange` — the loss's sub-Gaussian constant ``R`` from the per-sample losses the gap
  evaluations see (a number, half the central 98 % range now, or half the range ever seen);
* :func:`evaluation_floor` — what an evaluation costs at its probes' fewest draws, the budget's
  price for it before one was timed (and the reserve intermediate probes leave for it);
* :func:`over_budget_notes` — what a run whose measurement took well over its budget is told;
* :func:`final_floors`, :func:`final_shares` — the final evaluation's probes share what is left of
  the budget: each takes ``1/k`` of it at its turn (``k`` the probes still to run), less the later
  probes' floors;
* :func:`bound_values`, :func:`finish_values` — one evaluation's bound values from the series'
  inputs, then, with the gap in, the validity flags and the test-error bound;
* :func:`bound_notes` and :class:`WarnOnce` — the warnings a set of bound values calls for, each
  kind said once per run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from genbounds.bounds.aggregate import BoundInputs, compute_bounds, upper_test_error, validity
from genbounds.bounds.loss_range import DEFAULT_ALPHA, observed_range_r, quantile_range_r


class LossRange:
    """``R`` as ``GeneralizationBound(R=…)`` asks for it: a float as given, ``"quantile"`` (half the
    central 98 % range of the per-sample losses of the latest evaluation) or ``"observed_range"``
    (half the range of every finite per-sample loss of every evaluation so far)."""

    def __init__(self, R: float | str) -> None:
        self.lo, self.hi = math.inf, -math.inf
        self.value = math.nan
        """``R`` now: a given one from the start (a run without held-out data still has it)."""
        self.R = R

    @property
    def R(self) -> float | str:
        return self._R

    @R.setter
    def R(self, R: float | str) -> None:
        self._R: float | str = R if isinstance(R, str) else float(R)
        if not isinstance(R, str):
            self.value = float(R)

    def update(self, losses: np.ndarray) -> float:
        """Take one evaluation's per-sample losses (NaN/inf ignored for the range); the new ``R``."""
        if losses.size:
            finite = losses[np.isfinite(losses)]
            if finite.size:
                self.lo = min(self.lo, float(finite.min()))
                self.hi = max(self.hi, float(finite.max()))
        if self.R == "observed_range":
            self.value = observed_range_r(self.lo, self.hi)
        elif self.R == "quantile":
            self.value = quantile_range_r(losses, DEFAULT_ALPHA)  # a given R stays as set
        return self.value

    def unknown(self) -> None:
        """No held-out data to evaluate: a data-dependent ``R`` is unknown (NaN), a given one stays."""
        if isinstance(self.R, str):
            self.value = math.nan

    def state_dict(self) -> dict[str, float]:
        return {"loss_lo": self.lo, "loss_hi": self.hi}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lo = float(state.get("loss_lo", math.inf))
        self.hi = float(state.get("loss_hi", -math.inf))


def evaluation_floor(budget: Any, probes: Sequence[Any], flatness: Any, series: Any) -> float:
    """Seconds of an evaluation before one was timed: the ``probes`` it asks for
    (``Producers.evaluation_probes``), priced by the budget — the flatness probe at its fewest draws
    with the layer-wise shapes it will be asked for, the others at their expected cost."""
    if budget is None:
        return 0.0
    return sum(flatness_floor(p, series) if p is flatness else budget.expected(p.owner) for p in probes)


def flatness_floor(flatness: Any, series: Any) -> float:
    """The flatness probe at its fewest draws, with the layer-wise shapes it will be asked for."""
    shapes = 1 + int(series.config.get("neu_shape") is not None)
    return flatness.forward_equivalents(num_shapes=shapes) * flatness.unit_cost()


OVER_BUDGET = 1.5
"""A run whose measurement took more than this many times its budget is told so (once)."""


def over_budget_notes(owner: str, budget: Any, last_cost: float | None) -> list[tuple[str, str]]:
    """The final evaluation runs whatever is left, each probe at its fewest draws: on a run too
    short for those (few, slow steps) measurement can take many times the budget. Said at the
    train end, with what the last evaluation cost (``last_cost`` s), rather than left to
    ``perf/overhead``."""
    if budget is None or budget.fraction is None or budget.overhead <= OVER_BUDGET * budget.fraction:
        return []
    final = f"; the last evaluation alone {last_cost:.3g} s" if last_cost is not None else ""
    return [("over-budget", (
        f"{owner}: measurement took {budget.overhead:.2f} of the training time ({budget.probe_time:.3g} s "
        f"against {budget.train_time:.3g} s{final}), above overhead_budget={budget.fraction:g}: the final weights "
        "are always evaluated, each probe at its fewest draws, and this run was too short for them. Lower the "
        "probes' min_draws / min_probes / probe_batch_size, or leave the final evaluation's probes out of short "
        "runs."))]


def final_floors(probes: Sequence[Any], flatness: Any, series: Any) -> list[float]:
    """What each of ``probes`` costs at its fewest draws (the flatness with its layer-wise shapes)."""
    return [flatness_floor(p, series) if p is flatness else p.first_cost() for p in probes]


@contextmanager
def final_shares(probes: Sequence[Any], floors: Sequence[float], enabled: bool = True) -> Iterator[None]:
    """While the final evaluation runs, probe ``i`` of ``probes`` (in the order they run) may spend
    ``1/(k − i)`` of what is left of the budget less ``floors[i+1:]`` (what the later ones cost at
    their fewest draws); reset afterwards, so a later intermediate probe keeps the reserve again.
    ``enabled=False``: an intermediate evaluation, nothing is set."""
    if enabled:
        for i, probe in enumerate(probes):
            probe.final_share = 1.0 / (len(probes) - i)
            probe.final_floor_after = sum(floors[i + 1:])
    try:
        yield
    finally:
        for probe in probes:
            probe.final_share = None
            probe.final_floor_after = 0.0


def bound_notes(values: dict[str, float], wanted: Sequence[str], step: int | None,
                reason: str | None = None) -> list[tuple[str, str]]:
    """``(kind, message)`` for each problem these bound values show — bounds that could not be
    computed (one note for all of them, with ``reason`` when the caller knows it), a bound below
    the gap, a σ choice at the grid's edge, a σ that destroys the model — to be said once per kind."""
    notes: list[tuple[str, str]] = []
    failed = [name for name in wanted if values.get(f"bound_valid/{name}") == 0.0
              and not math.isfinite(values.get(f"bound/{name}", math.nan))]
    if failed:
        why = reason or ("no finite value from its inputs — a measurement it needs not taken yet (a probe on a "
                         "sparser schedule than the evaluations, early in the run) or a non-finite estimate")
        if reason is None and not math.isfinite(values.get("setting/R", 0.0)):
            why = ("R is NaN (no per-sample losses to read the loss range from, or no held-out data; "
                   "GeneralizationBound(R=…) takes a number)")
        named = ", ".join(f"bound/{name}" for name in failed)
        notes.append((f"invalid-{'+'.join(failed)}", f"GeneralizationBound: {named} could not be computed (NaN) at "
                      f"step {step}: {why}; flagged bound_valid/… = 0."))
    for name in wanted:
        if values.get(f"bound_valid/{name}") == 0.0 and name not in failed:
            notes.append((f"invalid-{name}", f"GeneralizationBound: bound/{name} is below the measured gap at step "
                          f"{step}: a failed estimate, flagged bound_valid/{name} = 0."))
        if values.get(f"bound_terms/{name}_sigma_at_edge") == 1.0:
            notes.append((f"edge-{name}", f"GeneralizationBound: bound/{name} is minimized at the edge of the σ "
                          "grid (bound_terms/…_sigma_at_edge); extend the grid."))
        if values.get(f"bound_terms/{name}_degenerate") == 1.0:
            notes.append((f"degenerate-{name}", f"GeneralizationBound: at the σ chosen for bound/{name} the "
                          "perturbation raises the training loss by more than R: its flatness term compares "
                          "destroyed models and the bound is then close to a held-out estimate of the gap "
                          "itself. Restrict σ with max_loss_increase=…."))
    return notes


def bound_values(inputs: BoundInputs | None, wanted: Sequence[str]) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """The ``wanted`` bounds and their SEs from the series' ``inputs`` (each NaN when there are
    none: never left out), with ``(kind, message)`` for each note the inputs carry."""
    if inputs is None:  # (Neu's |gap| bound with Neu's: a value from an earlier evaluation must not stand)
        names = list(wanted) + (["neu_abs"] if "neu" in wanted else [])
        return {f"bound/{name}{tail}": math.nan for tail in ("", "_se") for name in names}, []
    values = compute_bounds(inputs)  # (first: it adds notes of its own, e.g. a Hessian trace ≤ 0)
    parts = [note.split(":", 1) for note in inputs.notes]  # "kind: message"
    return values, [(part[0], "GeneralizationBound: " + part[-1].strip()) for part in parts]


def finish_values(values: dict[str, float], wanted: Sequence[str], step: int | None, *, plain_sgd: bool,
                  overhead: float, reason: str | None = None) -> list[tuple[str, str]]:
    """Complete an evaluation's ``values`` once the gap is in them: ``bound_valid/…``,
    ``bound/heuristic`` (the optimizer is not plain SGD), ``perf/overhead`` and
    ``bound/test_error_upper``; the notes they call for (:func:`bound_notes`)."""
    values.update(validity(values, wanted))
    values["bound/heuristic"] = float(not plain_sgd)
    values["perf/overhead"] = overhead
    values.update(upper_test_error(values, wanted))
    return bound_notes(values, wanted, step, reason)


def one_gamma_probe_note(probed: Sequence[int], step: int, midway: int | None) -> tuple[str, str]:
    """Said at the final weights where fewer than two Γ probes after step 0 stand for the run:
    Neu's bounds are NaN (``docs/math.md`` §6.9). ``probed``: those probes' steps
    (``BoundSeries.gamma_level_steps``); ``midway``: the step at which the bound asked for Γ's
    midway probe (``None``: not asked, the run's length being unknown or too short)."""
    where = f"one step ({probed[0]})" if probed else "no step after step 0"
    if midway is None:
        why = ("this fit's length is unknown (a loader without a length and no max_steps) or one step, so no "
               "midway probe was asked for: set max_steps, or give GradientSensitivity an every_n_steps below the "
               "run's length")
    else:
        why = (f"the midway probe at step {midway} was not taken (the fit ended before it, or the probe measured "
               "nothing there)")
    return ("neu-one-gamma-probe",
            f"GeneralizationBound: Neu's bounds are NaN at step {step}: Γ (GradientSensitivity) was probed at {where} "
            "and would stand for the whole run, with an error nothing measured tells (docs/math.md §6.9; in a sweep "
            "run, Neu from one probe was 3.8 of its SEs from the run with every probe). The bound asks for a Γ probe "
            "at the run's middle step when the schedule gave none after step 0 by then, and the final evaluation "
            f"probes the final weights; here {why}.")


class WarnOnce:
    """``rank_zero_warn`` each kind of note once per run; the kinds said are resumable state."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def __call__(self, kind: str, message: str) -> None:
        if kind not in self.said:
            self.said.add(kind)
            rank_zero_warn(message)

    def all(self, notes: Iterable[tuple[str, str]]) -> None:
        for kind, message in notes:
            self(kind, message)
