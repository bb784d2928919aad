"""What the bounds of :class:`~genbounds.callbacks.generalization_bound.GeneralizationBound` are
stated over, kept out of the callback's hooks: one set of trained parameters, trained from step 0,
with every step of its history in the series (the bounds are sums over ``t = 1 … T``).

:class:`BoundScope` takes the parameter groups and ``d`` from the trained parameters and writes the
series' configuration (``BoundSeries.configure``), at ``on_train_start`` and again at the fit's first
optimizer step, after every epoch- and batch-start hook (where a freeze schedule acts:
``trainable_set.py`` takes the set again before the first step). Three histories make every bound
NaN, each said once with its reason (:meth:`BoundScope.nan_reason`, flagged ``bound/valid = 0``):

* the trained parameters changed after the first step (layers frozen or unfrozen during the fit);
* a resumed fit trains other parameters than those its checkpoint's history was measured on;
* a resumed fit's checkpoint holds fewer steps than the fit has taken (saved by a run without
  ``GeneralizationBound``).
"""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch import LightningModule, Trainer

from genbounds.callbacks.bound_series import BoundSeries
from genbounds.callbacks.trainable_set import TrainableSet
from genbounds.estimators.functional import num_trainable, parameter_groups, trainable_parameters

Warn = Callable[[str, str], None]
"""``warn(kind, message)``: said once per kind and run (``bound_evaluation.WarnOnce``)."""


class BoundScope:
    """The parameter groups and ``d`` the bounds are over, and whether the fit's history lets them
    be stated (:meth:`complete`)."""

    def __init__(self, owner: str, layer_groups: dict[str, str] | None) -> None:
        self.owner = owner
        self.layer_groups = layer_groups
        self.groups: dict[str, list[str]] = {}
        """Group name → the names of its trained parameters (``parameter_groups``)."""
        self.d: int | None = None
        """Trained parameters (elements), taken with the groups."""
        self.changed_at: int | None = None
        """The step at which the trained parameters first changed (``None``: never): NaN bounds from then."""
        self.unmeasured_steps: int | None = None
        """Steps before this fit's start that the series does not hold (a fit resumed from a
        checkpoint without its state): the bounds, sums from step 0, are then NaN."""
        self._version = 0  # (the TrainableSet version the groups were taken at)
        self._config_is_ours = True

    def take_groups(self, pl_module: LightningModule) -> dict[str, list[str]]:
        """The groups at ``setup``, before the trained set is known (for the bounds' first choice)."""
        self.groups = parameter_groups(pl_module, self.layer_groups)
        return self.groups

    def new_run(self) -> None:
        """A fit from step 0 that loaded no checkpoint: no flag of an earlier fit stands."""
        self.changed_at = self.unmeasured_steps = None

    def start(self, series: BoundSeries) -> None:
        """At ``on_train_start``: the groups are to be taken; the series' configuration is this
        fit's own unless a checkpoint (or an earlier fit) wrote it."""
        self._version = -1
        self._config_is_ours = not series.config

    def check_history(self, trainer: Trainer, series: BoundSeries, warn: Warn) -> None:
        """At ``on_train_start``, after a checkpoint's state was loaded: the steps the fit starts
        after must all be in the series."""
        held = len(series.lrs)
        if trainer.global_step > held:
            self.unmeasured_steps = int(trainer.global_step) - held
            warn("unmeasured-history",
                 f"{self.owner}: the fit resumes at step {trainer.global_step}, but the checkpoint holds the "
                 f"learning rates and measurements of {held} steps only (saved by a run without {self.owner} "
                 "in its Trainer?): the bounds sum over every step from 0, so this run's are NaN (flagged "
                 "bound_valid/… = 0). Resume from a checkpoint saved with the genbounds callbacks, or train from "
                 "step 0.")

    def settle(self, trainer: Trainer, pl_module: LightningModule, series: BoundSeries, sigmas: list[float],
               warn: Warn, taken: Callable[[], None], *, first_step: bool = False) -> bool:
        """Take the groups and ``d`` from the trained parameters and write the series' configuration:
        at ``on_train_start``, before an evaluation, and at the fit's first optimizer step
        (``first_step``). ``taken()`` runs once the groups are taken (the callback's choice of bounds
        follows them). A fit writes its own series' configuration again at its first step; a resumed
        fit compares there the set with the one its checkpoint's history was measured on: another
        gives NaN bounds, said once. Returns whether the series was configured now."""
        trained = TrainableSet.shared(pl_module)
        trained.check(pl_module, int(trainer.global_step))
        if trained.version == self._version and not first_step:
            return False
        self._version = trained.version
        if trained.changes or self.changed_at is not None:
            return False  # (a change after the first step: NaN bounds, changed())
        self.groups = parameter_groups(pl_module, self.layer_groups)
        self.d = num_trainable(pl_module)
        taken()
        names = list(trained.names or ())
        if self._config_is_ours:
            series.config.clear()  # (this fit's own, no step taken yet: written again)
        elif not first_step:
            return False  # (a resumed fit's set is compared at its first step, after the start hooks)
        else:
            saved = series.config.get("trained")
            if saved is not None and list(saved) != names:
                self.changed_at = int(trainer.global_step)
                warn("resumed-other-parameters", (
                    f"{self.owner}: this fit trains other parameters from step {self.changed_at} than those "
                    f"its checkpoint's history was measured on ({len(names)} tensors against {len(saved)}: layers "
                    "frozen or unfrozen on resuming?): the bounds are stated for one parameter set from step 0, so "
                    "they are NaN (flagged bound/valid = 0)."))
                return False
            # a resumed run's series were measured on its first run's groups (kept by configure)
            series.check_resumable(sigmas, list(self.groups))
        sizes = {n: p.numel() for n, p in trainable_parameters(pl_module).items()}
        series.configure(sigmas, self.groups, sizes, names)
        return True

    def note_change(self, pl_module: LightningModule) -> None:
        """A change of the trained set since the first step (``trainable_set.py``, which says so once)."""
        changes = TrainableSet.shared(pl_module).changes
        if changes and self.changed_at is None:
            self.changed_at = changes[0].step

    def complete(self) -> bool:
        """Whether the bounds can be stated: ``d`` known, every step held, one parameter set."""
        return self.d is not None and not self.unmeasured_steps and self.changed_at is None

    def nan_reason(self) -> str | None:
        """Why every bound is NaN, where that is known before the estimates (said once, before)."""
        if self.changed_at is not None:
            return (f"the trained parameters changed at step {self.changed_at}, and the bounds are stated for one "
                    "parameter set trained from step 0")
        if self.unmeasured_steps:
            return "the checkpoint this fit resumed from holds no measurements of its first steps"
        return None
