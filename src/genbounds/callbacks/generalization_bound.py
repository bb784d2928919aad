"""``GeneralizationBound``: the bound aggregator (SPEC §6, §9)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from genbounds.bounds.aggregate import ALL_BOUNDS, ERROR, BoundInputs
from genbounds.callbacks.bound_evaluation import (
    LossRange,
    WarnOnce,
    bound_values,
    evaluation_floor,
    finish_values,
    one_gamma_probe_note,
    over_budget_notes,
)
from genbounds.callbacks.bound_producers import Producers
from genbounds.callbacks.bound_scope import BoundScope
from genbounds.callbacks.bound_series import BoundSeries
from genbounds.callbacks.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_monitors_see_every_value,
    check_name_list,
)
from genbounds.callbacks.gap_evaluation import GapEvaluation
from genbounds.callbacks.hook_clock import sleep_until
from genbounds.callbacks.midway_gamma import MidwayGamma
from genbounds.callbacks.probe import ProbeCallback, ProbeMode, num_train_samples
from genbounds.callbacks.probe_data import training_loader
from genbounds.callbacks.run_summary import RunSummary, margin_values, optimizer_notes, progress_status
from genbounds.callbacks.step_log import StepLog, weights_step

BoundName = Literal["wang_mao_eq2", "wang_mao_eq3", "neu", "wang_mao_eq2_error", "neu_error",
                    "wang_mao_eq2_layerwise", "wang_mao_eq3_layerwise", "neu_layerwise"]


class GeneralizationBound(ProbeCallback):
    r"""Aggregate the measurements into the generalization bounds and log them next to the loss.

    At every validation epoch end (and at train end), from what the measurement callbacks in the
    same ``Trainer`` publish on their channels (found by type at ``setup``):

    * ``bound/wang_mao_eq2`` — Wang & Mao Theorem 2, Eq. 2 over the σ grid (``GradientDispersion``,
      ``Flatness(scaling="sqrt_steps")``);
    * ``bound/wang_mao_eq3`` — the closed form Eq. 3 (``GradientDispersion``, ``HessianTrace``);
    * ``bound/neu`` and ``bound/neu_abs`` — Neu et al. Theorem 1 (``GradientSensitivity(growing=True)``,
      ``Flatness``, and ``HeldoutGradient`` for ``V_t``);
    * for classifiers ``bound/wang_mao_eq2_error`` and ``bound/neu_error``: the same trajectory terms
      with the 0-1 loss's exact ``R = ½`` and the 0-1 error's flatness, and
      ``bound/test_error_upper`` = training error + the tightest of them;
    * with several parameter groups, the block-diagonal (layer-wise) noise versions
      ``bound/wang_mao_eq2_layerwise``, ``bound/wang_mao_eq3_layerwise``, ``bound/neu_layerwise``;
    * ``gap/measured`` (+ ``_se``): held-out minus training loss on the whole training and held-out
      sets (or ``gap_samples`` of each), eval mode; ``gap/error`` (+ ``_se``) for classifiers;
    * ``bound_valid/<name>`` (a finite bound not below the gap it bounds) and ``bound/valid``;
      ``bound/heuristic`` = 1 when the optimizer is not plain SGD;
    * terms and choices under ``bound_terms/``, the constants under ``setting/`` (``R``, ``n``, ``d``, ``T``).

    A bound that cannot be computed is logged as NaN (never left out): a gate reads it as a
    failure. Each σ grid is searched for the minimizer of ``value + z·SE`` (``selection_z``), with
    flags when it sits at the grid's edge or when its perturbation destroys the model
    (``…_degenerate``); ``max_loss_increase`` restricts the grid to perturbations that raise the
    training loss by at most that many ``R``.

    One per Trainer: its state key is the class name, so Lightning refuses a second one at the
    Trainer's construction ("Found more than one stateful callback of type `GeneralizationBound`");
    compute another selection of bounds with ``bounds=`` on the one (its tags are per bound).

    Args:
        bounds: the bounds to compute (default: every one the suite's producers allow).
        R: the loss's sub-Gaussian constant: a number, ``"quantile"`` (default: half the central 98 %
            range of the per-sample losses at the current weights) or ``"observed_range"`` (half the
            range of every per-sample loss seen at an evaluation; one extreme sample decides it).
        num_train: ``n``; default: the training dataset's length.
        gap_samples: samples of each set for the measured gap (default: the whole sets).
        gap_batch_size: batch size of the gap evaluation (default: the loaders').
        probe_mode: ``"eval"`` (default) or ``"train"``.
        loss_fn: the loss contract (default: ``per_sample_loss``, else captured from ``training_step``).
        selection_z: the σ selection minimizes ``value + z·SE``.
        max_loss_increase: exclude σ whose perturbation raises the training-probe loss by more than
            this many ``R`` (default: all σ allowed, flagged).
        sensitivity_fill: how a Γ probe at step ``s`` fills its block: ``"scaled"`` (``(τ/s)·Γ``,
            second order) or ``"block"`` (as is).
        layer_groups: parameter-name prefix → group name for the layer-wise bounds.
        tensorboard_layout: add the custom-scalars layout.
        hparams: write the settings and final bounds as TensorBoard HParams (and ``hparams.yaml``).
        summary: print the results table at the end of ``fit`` (and write it to the Text tab).
        prog_bar: show ``headline`` and ``gap/measured`` in the progress bar.
        headline: the bound shown in the progress bar and first in the tables.
        overhead_budget: fraction of training time the suite's probes may take (see README).
    """

    owner = "GeneralizationBound"
    takes_gradients = False  # (the gap: loss values only; the probes it asks for say their own)
    needs_train_probe = False
    needs_heldout_probe = False

    def __init__(
        self,
        bounds: list[BoundName] | None = None,
        R: float | Literal["quantile", "observed_range"] = "quantile",
        num_train: int | None = None,
        gap_samples: int | None = None,
        gap_batch_size: int | None = None,
        probe_mode: ProbeMode = "eval",
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        selection_z: float = 1.0,
        max_loss_increase: float | None = None,
        sensitivity_fill: Literal["scaled", "block"] = "scaled",
        layer_groups: dict[str, str] | None = None,
        tensorboard_layout: bool = True,
        hparams: bool = True,
        summary: bool = True,
        prog_bar: bool = False,
        headline: BoundName = "wang_mao_eq3",
        overhead_budget: float | None = None,
        probe_batch_size: int | None = None,
        num_probe_batches: int = 1,
    ) -> None:
        super().__init__(every_n_steps=None, every_n_epochs=None, at_train_end=False,
                         probe_batch_size=probe_batch_size, num_probe_batches=num_probe_batches,
                         probe_mode=probe_mode, loss_fn=loss_fn, overhead_budget=overhead_budget)
        o = self.owner
        self.bounds = None if bounds is None else check_name_list(o, "bounds", bounds, ALL_BOUNDS)
        self.loss_range = LossRange(check_choice(o, "R", R, ("quantile", "observed_range")) if isinstance(R, str)
                                    else check_float(o, "R", R, low=0.0, low_open=True))
        if isinstance(R, str):  # (named by the loss contract's one warning when only a batch-mean loss exists)
            self.per_sample_need = (f"R={R!r}, the loss range every bound is scaled by, read from per-sample "
                                    "losses (without them every bound is NaN; or give R as a number)")
        self.num_train = check_int(o, "num_train", num_train, optional=True)
        self.gap_samples = check_int(o, "gap_samples", gap_samples, minimum=2, optional=True)
        self.gap_batch_size = check_int(o, "gap_batch_size", gap_batch_size, optional=True)
        self.selection_z = check_float(o, "selection_z", selection_z, low=0.0)
        self.max_loss_increase = check_float(o, "max_loss_increase", max_loss_increase, low=0.0, low_open=True,
                                             optional=True)
        self.sensitivity_fill = check_choice(o, "sensitivity_fill", sensitivity_fill, ("scaled", "block"))
        self.scope = BoundScope(o, dict(layer_groups) if layer_groups else None)
        """The parameter set and history the bounds are stated over (``bound_scope.py``)."""
        self.tensorboard_layout = check_bool(o, "tensorboard_layout", tensorboard_layout)
        self.write_hparams = check_bool(o, "hparams", hparams)
        self.print_summary = check_bool(o, "summary", summary)
        self.headline = check_choice(o, "headline", headline, ALL_BOUNDS)
        self.step_log = StepLog(o, prog_bar=(f"bound/{self.headline}", "gap/measured") if check_bool(
            o, "prog_bar", prog_bar) else (), log_nonfinite=True)
        self.series = BoundSeries()
        self._evaluated_weights: Tensor | None = None
        self._first_step_settled = False
        self._layout_due = False
        self._state_loaded = False
        self.wanted: tuple[str, ...] = ()
        self.latest: dict[str, float] = {}
        self.optimizer: str | None = None
        self.plain_sgd = True
        self.gap_at_start: float | None = None
        self.evaluations = 0
        self._gap: GapEvaluation | None = None
        self.producers = Producers()
        self._summary = RunSummary()
        self._n: int | None = None
        self._warn_once = WarnOnce()
        self._evaluated_step: int | None = None
        self._evaluated_final = False
        self._trainer: Trainer | None = None
        self._budget_state: dict | None = None
        self._eval_cost: float | None = None
        self.midway = MidwayGamma()
        """Neu's second Γ probe, at the run's middle step where the schedule gave none (``midway_gamma.py``)."""

    @property
    def state_key(self) -> str:
        return "GeneralizationBound"  # one per Trainer; stable across argument changes

    @property
    def R(self) -> float | str:
        """The loss's sub-Gaussian constant as asked for: a number, ``"quantile"`` or ``"observed_range"``."""
        return self.loss_range.R

    @R.setter
    def R(self, value: float | str) -> None:
        self.loss_range.R = value

    @property
    def changed_at(self) -> int | None:
        """The step at which the trained parameters first changed (``None``: never): NaN bounds from then."""
        return self.scope.changed_at

    @changed_at.setter
    def changed_at(self, step: int | None) -> None:
        self.scope.changed_at = step

    @property
    def layer_groups(self) -> dict[str, str] | None:
        """Parameter-name prefix → group name for the layer-wise bounds (read at each fit's set-up)."""
        return self.scope.layer_groups

    @layer_groups.setter
    def layer_groups(self, groups: dict[str, str] | None) -> None:
        self.scope.layer_groups = dict(groups) if groups else None

    @property
    def sigmas(self) -> list[float]:
        flatness = self.producers.flatness
        return list(flatness.sigmas) if flatness is not None else []

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if sum(isinstance(cb, GeneralizationBound) for cb in trainer.callbacks) > 1:
            raise MisconfigurationException("Only one GeneralizationBound per Trainer: it aggregates the whole suite.")
        self.producers = Producers.find(trainer, self)
        # each kind of note once a fit (a checkpoint's kinds, said in its run, replace these where
        # the fit resumes); cleared here, not at the run's start, where the setup's were said twice
        self._warn_once.said.clear()
        self.wanted = self.producers.resolve(self.bounds, len(self.scope.take_groups(pl_module)))
        left = self.producers.left_out(self.wanted) if self.bounds is None else None
        if left is not None:
            rank_zero_info(left)
        self._warn_once.all(self.producers.notes(self.wanted))
        self.producers.connect(self.series)
        self._trainer = trainer
        self._gap = GapEvaluation(self.owner, self.gap_samples, self.gap_batch_size, self.probe_mode)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.producers.connect(self.series, on=False)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_monitors_see_every_value(self.owner, trainer, self.budget)  # (its fraction: set by any callback's setup)
        # the layout's charts follow the bounds computed and the groups trained, settled at the first
        # step (a freeze at the fit's start dropped the layer-wise bounds the setup's groups had charted)
        self._layout_due = self.tensorboard_layout

    def _write_layout(self, trainer: Trainer) -> None:
        if self._layout_due:
            self._layout_due = False
            self._summary.add_layout(trainer, self.wanted, list(self.scope.groups))

    def _settle_trained(self, trainer: Trainer, pl_module: LightningModule, *, first_step: bool = False) -> None:
        """What the bounds are over, from the trained parameters (``BoundScope.settle``), and the
        bounds computed and Neu's block shape for its groups."""
        if self.scope.settle(trainer, pl_module, self.series, self.sigmas, self._warn_once, self._resolve_wanted,
                             first_step=first_step) and "neu_layerwise" in self.wanted and len(self.scope.groups) >= 2:
            self.producers.set_neu_shape(self.series, self.scope.groups, pl_module)

    def _new_run(self) -> None:
        """A fit from step 0 that loaded no checkpoint: the series, values and flags of an earlier
        fit of these callbacks (another Trainer) are dropped — its series had held both runs'
        steps, and a layer frozen in the second model read as a change."""
        self.series.load_state_dict({})
        self.latest = {}
        self.evaluations = 0
        self._evaluated_step = self.gap_at_start = self._evaluated_weights = None
        self.scope.new_run()
        self.loss_range = LossRange(self.loss_range.R)

    def _resolve_wanted(self) -> None:
        """The bounds computed, for the groups as they are (layer-wise ones need two) and the
        errors the loss contract gives."""
        self.wanted = self.producers.resolve(self.bounds, len(self.scope.groups))
        self._warn_once.all(self.producers.notes(self.wanted))
        if self.contract is not None and self.contract.tier is not None and not self.contract.errors_available:
            self.wanted = tuple(b for b in self.wanted if b not in ERROR)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        assert self.contract is not None and self._gap is not None
        if trainer.global_step == 0 and not self._state_loaded:
            self._new_run()  # (these callbacks reused by another Trainer: nothing of its run carries over)
        self._state_loaded = False
        self.scope.start(self.series)
        self._first_step_settled = False
        self._settle_trained(trainer, pl_module)
        self._n = num_train_samples("GeneralizationBound", self.num_train, trainer)
        if self._budget_state and self.budget is not None:
            self.budget.load_state_dict(self._budget_state)
        self.midway.arm(trainer, self.producers.sensitivity, self.series, self._computes_neu)
        if self.budget is not None:
            self.budget.reserve_estimate = self._final_cost
            self.budget.required = self.midway.required_cost
            self.budget.required_owner = self.producers.sensitivity.owner if self.producers.sensitivity else None
        self._gap.prepare(trainer, self.contract)
        if self._gap.prefix is not None:
            total = len(training_loader(trainer).dataset)
            n = f"n = {self._n}" + ("" if self._n == self._gap.prefix else " as num_train gives it")
            self._warn_once("prefix", (
                f"GeneralizationBound: this fit trains on the first {self._gap.prefix} of the {total} training "
                "samples, the same ones every epoch (a loader that does not shuffle, limited to fewer batches than "
                "it holds or dropping its last: overfit_batches, limit_train_batches, drop_last): the bounds take "
                f"{n}, and gap/measured's training loss is that of those samples."))
        self.heldout_available = self._gap.heldout_available
        if not self.contract.errors_available:
            self.wanted = tuple(b for b in self.wanted if b not in ERROR)  # (as _resolve_wanted)
        if trainer.optimizers:
            self.optimizer, self.plain_sgd, notes = optimizer_notes(trainer)
            self._warn_once.all(notes)
        if not self.heldout_available:
            self._warn_once("no-val", "GeneralizationBound: without a validation loader the held-out terms and "
                            "gap/measured cannot be measured; the bounds that need them are logged as NaN.")
        self.scope.check_history(trainer, self.series, self._warn_once)
        if trainer.global_step == 0 and self.heldout_available:
            gap = self._measure_gap(trainer, pl_module)
            self.gap_at_start = gap.get("gap/measured")
            self._log(trainer, pl_module, {**gap, "gap/measured_change": 0.0}, log=True)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if not self._first_step_settled:  # (the fit's first step: after every epoch- and batch-start hook)
            self._first_step_settled = True
            self._settle_trained(trainer, pl_module, first_step=True)
            self._write_layout(trainer)
        # (groups at different rates: the largest, whatever their order — and the step is not η_t·ḡ_B then)
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        lr = max(lrs)
        if self.plain_sgd and lr != min(lrs):  # (groups whose rates part during the fit: a scheduler's own factors)
            self.optimizer, self.plain_sgd, notes = optimizer_notes(trainer)
            self._warn_once.all(notes)
        self.series.lrs.append(lr)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.midway.maybe_probe(trainer, pl_module)
        # evaluated at validation epoch end and train end only: until Neu's midway Γ probe (if still
        # to come), Lightning need not call this again
        sleep_until(self, trainer, self.midway.wake_step(), hook_of=GeneralizationBound)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.enable_validation and self._affordable():  # no validation loop: every epoch end instead
            self.evaluate(trainer, pl_module, log=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._affordable():
            self.evaluate(trainer, pl_module, log=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_layout(trainer)  # (a fit without a step)
        if self._evaluated_step != trainer.global_step or (  # the final weights are always evaluated
                not self._evaluated_final and self._neu_short_of_gamma()):
            # (… and again where the last validation had them but not as the final ones: Γ is asked there)
            self.evaluate(trainer, pl_module, log=False)
        elif not trainer.sanity_checking:  # (evaluated at the last validation: the other final-weight probes)
            self.producers.measure_at_end(trainer, pl_module, self.series, fewest=False)
        self._warn_once.all(over_budget_notes(self.owner, self.budget, self._eval_cost))
        self.step_log.report_skipped(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if self._evaluated_weights is not None and not torch.equal(self._evaluated_weights, _fingerprint(pl_module)):
            self._warn_once(
                "weights-replaced",
                f"GeneralizationBound: the weights fit() returns are not those of its final evaluation (step "
                f"{self._evaluated_step}): a callback replaced them at the end of training (StochasticWeightAveraging, "
                "an EMA, ModelPruning, a best-checkpoint reload?). The final bounds and gap/measured describe the "
                "weights SGD reached at that step, for which the bounds are stated, not the weights returned.")
        if self.write_hparams:
            self._summary.write_hparams(trainer, pl_module, self)
        if self.print_summary:
            self._summary.print_table(trainer, self)

    # ------------------------------------------------------------------ budget
    def first_cost(self, final: bool = False) -> float:
        """An intermediate evaluation's cost before one was timed (:func:`evaluation_floor`)."""
        p = self.producers
        return evaluation_floor(self.budget, p.evaluation_probes(self.series, final), p.flatness, self.series)

    def _final_cost(self) -> float:
        """The final evaluation's, before one was timed: with the other final-weight probes it runs first."""
        return self.first_cost(final=True) + self.producers.end_cost(self.series)

    def _affordable(self) -> bool:
        if self.budget is None:
            return True
        return self.budget.allows(self.owner, self._eval_cost if self._eval_cost is not None else self.first_cost())

    # ------------------------------------------------------------------ evaluation
    def _measure_gap(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        assert self._gap is not None and self.budget is not None
        with self.budget.timed(self.owner):
            result = self._gap.measure(trainer, pl_module)
        self._warn_once.all((kind, "GeneralizationBound: " + message) for kind, message in result.notes())
        self.loss_range.update(result.losses)
        return result.values

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, *, log: bool) -> dict[str, float]:
        """Flush the producers, request the end-of-run measurements, compute and log the bounds."""
        dispersion = self.producers.dispersion
        if trainer.sanity_checking or dispersion is None:
            return {}
        assert self.budget is not None
        self._evaluated_step = int(trainer.global_step)
        started = time.perf_counter()
        with progress_status(trainer, "GeneralizationBound: computing the bounds…"):
            dispersion.flush(trainer, pl_module if log else None, epoch_end=True)
            # the gap first: what the probes below share is then what is left after it
            values: dict[str, float] = {}
            if self.heldout_available:
                values.update(self._measure_gap(trainer, pl_module))
            else:
                self.loss_range.unknown()
            if not log:  # (the Trainer's other final-weight probes, at their fewest draws)
                self.producers.measure_at_end(trainer, pl_module, self.series, fewest=True)
            # (the trained parameters changed: NaN bounds, and no probe is asked for them)
            self._evaluated_final = final = not log or _final_weights(trainer)
            inputs = None if self._trained_changed(trainer, pl_module) else self.producers.measure(
                trainer, pl_module, self.series, self.scope.groups, lambda: self._inputs(trainer), log=log,
                final=final)
            with self.budget.timed(self.owner):
                bounds, notes = bound_values(inputs, self.wanted)
                values.update(bounds)
            if inputs is None:  # (NaN bounds: no term or setting of an earlier evaluation stands beside them)
                for key in [k for k in self.latest if k.startswith(("bound_terms/", "setting/"))]:
                    del self.latest[key]
            self._warn_once.all(notes)
            if final and self._neu_short_of_gamma():
                self._warn_once(*one_gamma_probe_note(self.series.gamma_level_steps(), self._evaluated_step,
                                                         self.midway.step))
        if "gap/measured" in values and self.gap_at_start is not None:
            values["gap/measured_change"] = values["gap/measured"] - self.gap_at_start
        if trainer.global_step > 0:
            # what the next evaluation will cost — the whole of it (gap, the flatness and Hessian
            # probes it asks for, the bound math), not the last block timed under this owner — and
            # the room intermediate probes leave for the final one
            self._eval_cost = time.perf_counter() - started
            # (+ the other at-train-end probes the final evaluation runs first, at their fewest draws)
            self.budget.reserve = self._eval_cost + (self.producers.end_cost(self.series) if log else 0.0)
        self._warn_once.all(finish_values(values, self.wanted, self._evaluated_step, plain_sgd=self.plain_sgd,
                                          overhead=self.budget.overhead, reason=self.scope.nan_reason()))
        self.evaluations += 1
        self._evaluated_weights = _fingerprint(pl_module)  # (compared at the fit's end)
        self._log(trainer, pl_module, values, log=log)
        return values

    def _computes_neu(self) -> bool:
        """Whether a Neu bound is among the bounds computed."""
        return any(b.startswith("neu") for b in self.wanted)

    def _neu_short_of_gamma(self) -> bool:
        """Whether a Neu bound is computed and fewer than two Γ probes after step 0 stand for the run
        (``Producers.gamma_short``; ``docs/math.md`` §6.9)."""
        return self.producers.gamma_short(self.series) and self._computes_neu()

    def _trained_changed(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether the trained parameters changed since step 0 (``trainable_set.py``, which says so
        once): the bounds are stated for one parameter set trained from step 0."""
        self._settle_trained(trainer, pl_module)
        self.scope.note_change(pl_module)
        return self.scope.changed_at is not None

    def _inputs(self, trainer: Trainer) -> BoundInputs | None:
        T = min(int(trainer.global_step), len(self.series.lrs))
        if self._n is None or not self.scope.complete():
            return None  # (a history that misses steps, or another parameter set: NaN bounds)
        assert self.scope.d is not None
        dispersion = self.producers.dispersion
        return self.series.inputs(T, self._n, self.scope.d, self.loss_range.value, self.sigmas, self.wanted,
                                  z=self.selection_z, max_loss_increase=self.max_loss_increase,
                                  fill=self.sensitivity_fill, grouped=len(self.scope.groups) >= 2,
                                  sizes=dispersion.step_sizes.array(T) if dispersion is not None else None)

    def _log(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float], *, log: bool) -> None:
        values = {**values, **margin_values(values)}
        self.latest.update(values)
        step = weights_step(trainer)
        record = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
        self.step_log.record(step, record)
        self.step_log.flush(trainer, pl_module if log else None, epoch_end=log)
        if not log:  # (written to the loggers directly, where pl_module.log cannot run — the train end under
            # a budget: the final bounds were missing from callback_metrics after fit, a new user's walk, round 32)
            trainer.callback_metrics.update(record)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.producers.dispersion is not None and self._trainer is not None:
            self.producers.dispersion.flush(self._trainer)  # buffered statistics belong in the checkpoint
        if self._module is not None:
            self.scope.note_change(self._module)  # (a change seen since the last evaluation: in the checkpoint)
        state = super().state_dict()
        state.update(series=self.series.state_dict(), latest=dict(self.latest), optimizer=self.optimizer,
                     warned=sorted(self._warn_once.said), evaluated_step=self._evaluated_step,
                     gap_at_start=self.gap_at_start, changed_at=self.changed_at,
                     **self.loss_range.state_dict(), evaluations=self.evaluations,
                     budget=self.budget.state_dict() if self.budget is not None else None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.series.load_state_dict(state_dict.get("series", {}))  # (checked at the fit's first step)
        self._state_loaded = True
        self.latest = dict(state_dict.get("latest", {}))
        self.optimizer = state_dict.get("optimizer")
        self._warn_once.said = set(state_dict.get("warned", []))
        self._evaluated_step = state_dict.get("evaluated_step")
        self.gap_at_start = state_dict.get("gap_at_start")
        self.scope.changed_at = state_dict.get("changed_at")
        self.loss_range.load_state_dict(state_dict)
        self.evaluations = int(state_dict.get("evaluations", 0))
        self._budget_state = state_dict.get("budget")


def _fingerprint(module: nn.Module) -> Tensor:
    """Each parameter's float64 sum and sum of squares (on the host): weights replaced or averaged
    after an evaluation change them; the probes restore the weights they perturb exactly."""
    with torch.no_grad():
        parts = [torch.stack([p.double().sum(), p.double().square().sum()]) for p in module.parameters()]
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


def _final_weights(trainer: Trainer) -> bool:
    """At a validation's end: whether the fit takes no step after it (``max_steps`` reached, or the
    last epoch's batches done; ``False`` where Lightning's loop does not say: the train end's
    evaluation then asks what the final one does)."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    done = getattr(trainer.fit_loop.epoch_loop, "_is_training_done", False)
    return bool(done) and max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
