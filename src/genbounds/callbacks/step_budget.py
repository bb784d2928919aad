"""The overhead budget as a per-step statistic sees it: a clock for its own work, and the decision
which steps to measure (see :mod:`genbounds.callbacks.overhead`).

``GradientDispersion``'s Lightning hooks are charged whole by
:class:`~genbounds.callbacks.hook_clock.MeasurementCallback`; it adds the norm hooks' time (spent
inside the user's forward and backward) at the end of each step (:meth:`StepBudget.charge`) and
asks :meth:`StepBudget.measures` at every optimizer step. Without a budget fraction every step on
the callback's own schedule is measured and the time is still charged (``perf/overhead`` reports
it).
"""

from __future__ import annotations

from lightning.pytorch import Trainer

from genbounds.callbacks.overhead import OverheadBudget, horizon


class StepBudget:
    """One per-step statistic's account with the trainer's :class:`OverheadBudget`."""

    ALWAYS_FIRST = 2
    """The first steps are always measured: the error of filling the others (the bounds' SE,
    :func:`genbounds.bounds.series.fill_standard_error`) needs the spread of at least one pair."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.budget: OverheadBudget | None = None
        self._total_steps: float | None = None
        self._last_measured: int | None = None
        self._deciding: int | None = None

    def setup(self, trainer: Trainer) -> None:
        self.budget = OverheadBudget.shared(trainer, None)

    def start(self) -> None:
        assert self.budget is not None
        self.budget.begin()
        self._total_steps = None
        self._last_measured = None
        self._deciding = None

    def measures(self, trainer: Trainer, measured_steps: int, every_n_steps: int, batch_idx: int = 0,
                 accumulate: int = 1) -> bool:
        """Whether the optimizer step starting now (at the window of ``accumulate`` batches from
        ``batch_idx``) is measured: on the callback's schedule, and under a budget at most every
        :meth:`OverheadBudget.step_stride` steps, the run's last step always when it is known
        (:func:`last_step`)."""
        step = int(trainer.global_step)
        self._deciding = step  # (read again by measured(): the step does not change in between)
        if step % every_n_steps != 0:
            return False
        if self.budget is None or self.budget.fraction is None or measured_steps < self.ALWAYS_FIRST:
            return True
        stride = every_n_steps * self.budget.step_stride(self.owner, measured_steps, step + 1, self._progress(trainer))
        if self._last_measured is not None and step - self._last_measured < stride \
                and not last_step(trainer, batch_idx, accumulate):
            self.budget.skipped_steps += 1
            return False
        # (the run's last step is measured whatever the stride: a gate on the final value reads the
        # final batch's statistics, not ones from steps before — stale)
        return True

    def measured(self, trainer: Trainer) -> None:
        """The step :meth:`measures` decided last was measured (Lightning's ``global_step``, a
        chain of properties, read once a step: ~5 µs of a measured step's)."""
        self._last_measured = self._deciding if self._deciding is not None else int(trainer.global_step)

    def charge(self, seconds: float) -> None:
        """Charge work done outside the Lightning hooks (the norm hooks inside forward and backward)."""
        if self.budget is not None and seconds > 0.0:
            self.budget.charge(self.owner, seconds, elsewhere=True)

    def _progress(self, trainer: Trainer) -> float | None:
        """Fraction of the run's optimizer steps done (``None`` when the horizon is unknown)."""
        if self._total_steps is None:
            self._total_steps = horizon(trainer) or 0.0
        return (trainer.global_step + 1) / self._total_steps if self._total_steps else None


def last_step(trainer: Trainer, batch_idx: int, accumulate: int) -> bool:
    """Whether the optimizer step of the window starting at ``batch_idx`` is the fit's last as its
    stopping rules stand: ``max_steps`` reached by it, or the last window of the last epoch (of a
    loader whose length is known). Not ``estimated_stepping_batches``: it assumes the current
    ``accumulate_grad_batches`` for every epoch, so under a ``GradientAccumulationScheduler`` it
    named a step the run never took (a review, round 34). A run stopped otherwise (``max_time``,
    ``EarlyStopping``, ``should_stop``) is not foreseen."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step + 1 >= max_steps:
        return True
    batches = trainer.num_training_batches
    max_epochs = trainer.max_epochs
    return (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
            and batches != float("inf") and batch_idx + accumulate >= batches)
