"""``GradientDispersion``: per-step gradient statistics of the training batch (SPEC §1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from genbounds.callbacks.channel import Channel, DispersionRecord
from genbounds.callbacks.checks import (
    check_batch_spread,
    check_bool,
    check_callable,
    check_choice,
    check_float,
    check_int,
    check_precision,
    check_single_optimizer,
    check_strategy,
    note_small_batches,
    warn_shared_tags,
)
from genbounds.callbacks.dispersion.accumulation import scheduled_accumulation
from genbounds.callbacks.dispersion.base import DispersionBackend
from genbounds.callbacks.dispersion.measured_step import KEPT, MeasuredStep
from genbounds.callbacks.dispersion.slot import BackendOptions, BackendSlot
from genbounds.callbacks.dispersion.step_sizes import StepSizes
from genbounds.callbacks.hook_clock import HooksAside, MeasurementCallback
from genbounds.callbacks.loss_contract import LossContract
from genbounds.callbacks.step_budget import StepBudget
from genbounds.callbacks.probe import training_trial_batch
from genbounds.callbacks.state_key import state_key_once
from genbounds.callbacks.step_log import Listener, StepLog, is_log_step, mark_run_complete, weights_step
from genbounds.callbacks.trainable_set import TrainableSet
from genbounds.estimators.per_sample_gradients import DEFAULT_MEMORY_BUDGET

OWNER = "GradientDispersion"
_MEASURED_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
"""Its per-step hooks with work only on a measured step (set aside on the others: hook_clock.HooksAside)."""
_READ_LATE = ("on_before_backward", "on_after_backward")
"""Set aside on a measured step whose backward's norms are read at the optimizer step instead
(ghost hooks alone: they count the backward themselves, ``SharedHooks.backward_count``)."""
_READ_LATE_QUIET = _READ_LATE + ("on_train_batch_end",)
"""… and on such a step that writes nothing to the loggers: its hook time is charged at the
optimizer step, where the forward hook also goes (``NormHooksBackend.end_batch``)."""

Backend = Literal["auto", "hooks", "backpack", "functorch", "microbatch"]
BACKENDS = ("auto", "hooks", "backpack", "functorch", "microbatch")


class GradientDispersion(MeasurementCallback):
    r"""Log the gradient statistics of every training batch (SPEC §1).

    Logged, each describing the batch ``B_t`` at the weights ``W_{t−1}`` the step's gradient is
    computed at: ``grad/norm_sq`` ``‖ḡ_B‖²``; ``grad/trace_cov`` ``s² = 1/(b−1) Σ_i ‖g_i − ḡ_B‖²``,
    unbiased for ``tr Σ`` (``grad/trace_cov_se`` where the backend affords it); ``grad/dispersion``
    ``s²/b = Tr Σ_B``, the gradient dispersion of Wang & Mao (2022, §5); and per parameter group
    (layer) ``grad/dispersion/layer/<name>``, which sum to ``grad/dispersion`` exactly.

    Caveats: batches drawn without replacement make ``s²/b`` too large by ``n/(n−b)``; once a model
    memorizes, ``s²`` measures the *training-set* covariance — :class:`HeldoutGradient` measures
    the difference. ``s²/b`` is the batch's own: a small last batch (``drop_last=False``) has a
    dispersion ``b/b_last`` times a full one's. Every step's batch size is recorded, measured or not,
    so the bounds fill the steps not measured at their own sizes (``docs/math.md`` §6.8), and the
    fit's first epoch end says once when a step's batch was at most a quarter of the largest.

    Backends (``backend``; ``"auto"`` picks the cheapest exact one and says which at the start):

    * ``"hooks"`` — per-sample squared norms inside the training step's own backward (ghost norms;
      BackPACK for RNN/LSTM): no extra pass. Needs every trainable parameter in a supported layer
      and a training loss that is the mean of per-sample losses (the loss contract checks it before
      step 0). Under train-mode BatchNorm: the per-sample terms of the batch gradient's exact
      decomposition (an approximation, see the README). ``"backpack"`` is an alias.
    * ``"functorch"`` — exact per-sample gradients by one extra pass, at most ``memory_budget_mb``
      MiB of per-sample gradients at a time, or one sample's when that is more (any layer but
      train-mode BatchNorm).
    * ``"microbatch"`` — SPEC §1's chunk estimator, ``num_chunks`` random chunks, one extra pass:
      any model; under ``accumulate_grad_batches ≥ 2`` (one process) the accumulation micro-steps
      are the chunks and nothing extra runs.

    Extra passes run in the module's own train/eval mode, in fp32, under a forked RNG, with buffers
    restored: training is bit-identical with or without this callback. Nothing is copied to the host
    except on Lightning's logging steps.

    Args:
        backend: how per-sample statistics are obtained (see above).
        every_n_steps: measure every this many optimizer steps. Under an ``overhead_budget`` (set
            on any probe callback of the Trainer) its own time is charged to the budget and, beyond
            its share, it measures every ``k``-th of those steps and the run's last step when the
            run's length is known (:mod:`genbounds.callbacks.overhead`).
        num_chunks: ``k`` for the micro-batch backend (≥ 2).
        use_accumulation_steps: with gradient accumulation, use the micro-steps as chunks for
            ``"microbatch"`` (and for ``"auto"`` under train-mode BatchNorm).
        chunk_size: samples per vectorized chunk of the functorch backend (default: from
            ``memory_budget_mb``).
        memory_budget_mb: MiB of per-sample gradients (and as much again in temporaries) the
            functorch backend holds at once; at least one sample is held. The default, 64 MiB,
            takes one sample at a time for models above about 4.2 M parameters: the pass then holds
            one per-sample gradient, as much as the step's own ``.grad``, from which it reads ``ḡ``
            (where ``.grad`` is not the batch mean — gradient accumulation, manual optimization,
            several processes, a loss scale, a training loss with other terms — it keeps a running
            sum instead: twice that) (:mod:`genbounds.estimators.per_sample_gradients`).
        loss_fn: ``loss_fn(pl_module, batch) -> per-sample losses``; default: the loss contract
            (``per_sample_loss`` method, else captured from ``training_step``).
        layer_groups: parameter-name prefix → group name for the per-layer split (default: one
            group per module that owns parameters).
        prog_bar: show ``grad/dispersion`` in the progress bar.
        log_every_step: write every measured step to the loggers. Default: the latest measured
            step at each of Lightning's logging steps (``log_every_n_steps``), as Lightning writes
            the user's ``self.log(on_step=True)`` values — writing all of them cost the main job
            0.26 s of its 3 s of training (TensorBoard, 630 steps × 7 values). The bounds and
            listeners use every measured step either way.
        seed: seed of this callback's own generator (random chunk assignment).
    """

    def __init__(
        self,
        backend: Backend = "auto",
        every_n_steps: int = 1,
        num_chunks: int = 4,
        use_accumulation_steps: bool = True,
        chunk_size: int | None = None,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET / 2**20,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        layer_groups: dict[str, str] | None = None,
        prog_bar: bool = False,
        log_every_step: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = OWNER
        self.backend = check_choice(owner, "backend", backend, BACKENDS)
        self.every_n_steps = check_int(owner, "every_n_steps", every_n_steps)
        self.num_chunks = check_int(owner, "num_chunks", num_chunks, minimum=2)
        self.use_accumulation_steps = check_bool(owner, "use_accumulation_steps", use_accumulation_steps)
        self.chunk_size = check_int(owner, "chunk_size", chunk_size, optional=True)
        self.memory_budget_mb = check_float(owner, "memory_budget_mb", memory_budget_mb, low=0.0, low_open=True)
        self.loss_fn = check_callable(owner, "loss_fn", loss_fn)
        self.layer_groups = dict(layer_groups) if layer_groups else None
        self.seed = check_int(owner, "seed", seed, minimum=None)
        self.log_every_step = check_bool(owner, "log_every_step", log_every_step)
        self.step_log = StepLog(owner, prog_bar=("grad/dispersion",) if check_bool(owner, "prog_bar", prog_bar) else (),
                                every_record=self.log_every_step)
        self.channel: Channel[DispersionRecord] = Channel()
        self.step_log.add_listener(self._publish)

        self.slot = BackendSlot()
        self.step_measurement = MeasuredStep(self.slot)
        """The step under measurement: parameters, window, values (``dispersion/measured_step.py``)."""
        self.step_sizes = StepSizes()
        """Every optimizer step's batch size, for the bounds' filling of the steps not measured
        (``dispersion/step_sizes.py``)."""
        self.contract: LossContract | None = None
        self.measured_steps = 0
        self._trainable = TrainableSet()
        self._set_version = 0
        self._checked_epoch = -1
        self.step_budget = StepBudget(OWNER)
        self._aside: HooksAside | None = None
        self._sizes_from, self._sizes_said = 0, True

    @property
    def impl(self) -> DispersionBackend | None:
        """The backend measuring now (:class:`~genbounds.callbacks.dispersion.slot.BackendSlot`)."""
        return self.slot.impl

    @property
    def active_backend(self) -> str | None:
        """Its name: ``"hooks"``, ``"functorch"``, ``"microbatch"`` or ``"accumulation"``."""
        return self.slot.name

    @property
    def group_names(self) -> list[str]:
        """The per-layer groups of ``grad/dispersion/layer/<name>``, in the logged row's order."""
        return self.step_measurement.group_names

    @property
    def state_key(self) -> str:
        return state_key_once(self, every_n_steps=self.every_n_steps)

    @property
    def owner_name(self) -> str:
        return OWNER  # a subclass keeps the account its step stride reads

    @property
    def run_owner_name(self) -> str:
        # set-up (backend choice, the loss contract's trial) and epoch-end flushes are not a
        # measurement's cost: kept out of the per-measurement cost the step stride divides
        return OWNER + " (set-up, epoch ends)"

    # ------------------------------------------------------------------ records
    def _publish(self, records: list) -> None:
        self.channel.publish([DispersionRecord.from_values(r.step, r.values, self.group_names) for r in records])

    def add_listener(self, listener: Listener) -> None:
        """Receive the finite step records (host floats) at every flush."""
        self.step_log.add_listener(listener)

    def flush(self, trainer: Trainer, pl_module: LightningModule | None = None, epoch_end: bool = False) -> None:
        """Log and dispatch the buffered records (all ranks call it)."""
        self.step_measurement.fail_together(trainer)
        self.step_log.flush(trainer, pl_module, epoch_end=epoch_end)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner, m = OWNER, self.step_measurement
        warn_shared_tags(owner, trainer, self, ("grad/norm_sq", "grad/trace_cov", "grad/dispersion"))
        check_strategy(owner, trainer)
        check_precision(owner, trainer)
        m.contract = self.contract = LossContract.shared(pl_module)
        m.loss_fn = self.contract.register(owner, self.loss_fn, per_sample=self.backend == "functorch",
                                           what="exact per-sample gradients (backend='functorch')")
        m.accumulate = int(trainer.accumulate_grad_batches)
        self.step_budget.setup(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        m = self.step_measurement
        assert m.contract is not None
        check_single_optimizer(OWNER, pl_module)  # (not at setup: Lightning makes the optimizers after it)
        self.step_budget.start()
        self.slot.batchnorm_said = set()
        m.accumulate = scheduled_accumulation(trainer)  # (a schedule sets it at each epoch start, after this)
        check_batch_spread(OWNER, trainer, m.accumulate)
        self._sizes_from, self._sizes_said = int(trainer.global_step), False
        trial_batch = training_trial_batch(trainer, self.seed)
        m.contract.resolve(trainer, pl_module, trial_batch)
        self._trainable = TrainableSet.shared(pl_module)
        self._trainable.take(pl_module, int(trainer.global_step))
        self._set_version = self._trainable.version
        self._checked_epoch = -1  # (the first batch checks: the epoch-start hooks run after this one)
        self.step_sizes.truncate(int(trainer.global_step))  # (a fit from step 0, or resumed: its steps from here)
        m.take_parameters(pl_module, self.layer_groups)
        m.take_scaler(trainer)
        options = BackendOptions(  # (the settings as they are now, as setup's groups)
            self.backend, self.num_chunks, self.use_accumulation_steps, self.chunk_size,
            int(self.memory_budget_mb * 2**20), self.layer_groups, self.seed, m.accumulate)
        self.slot.start(options, trainer, pl_module, m.contract, m.loss_fn, trial_batch)
        self.slot.check_reentrant(pl_module, m.contract)
        self._aside = HooksAside(self, GradientDispersion, _MEASURED_STEP_HOOKS + ("on_train_batch_end",))
        m.plan_late(trainer, pl_module, self.step_log, "on_after_backward" in self._aside.names)

    def _replan(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """The trained parameters changed (said once by ``TrainableSet``): the steps measured so far
        are written out under the old layers, and the backend is chosen and attached again for the
        new set, checked on this batch (``BackendSlot.restart``)."""
        m = self.step_measurement
        assert m.contract is not None and self._aside is not None
        self._set_version = self._trainable.version
        self.flush(trainer, pl_module)
        m.take_parameters(pl_module, self.layer_groups)
        self.slot.restart(trainer, pl_module, m.contract, m.loss_fn, batch)
        m.plan_late(trainer, pl_module, self.step_log, "on_after_backward" in self._aside.names)

    def _follow_accumulation(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """``accumulate_grad_batches`` changed at an epoch start (Lightning's
        ``GradientAccumulationScheduler`` sets it there, where windows start afresh): the statistics
        are of the new effective batch, so the backend is chosen again for it (the micro-steps as
        chunks, the late read, the loss's scale all depend on it)."""
        m = self.step_measurement
        before, m.accumulate = m.accumulate, int(trainer.accumulate_grad_batches)
        rank_zero_info(f"GradientDispersion: accumulate_grad_batches is {m.accumulate} from epoch "
                       f"{trainer.current_epoch} (was {before}); the backend is chosen again for it.")
        self.slot.options = replace(self.slot.options, accumulate=m.accumulate)
        self._replan(trainer, pl_module, batch)

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        m = self.step_measurement
        if self._checked_epoch != trainer.current_epoch:  # (an epoch's first batch start it sees)
            self._checked_epoch = trainer.current_epoch
            self._trainable.check(pl_module, int(trainer.global_step))
            if int(trainer.accumulate_grad_batches) != m.accumulate:  # (GradientAccumulationScheduler)
                self._follow_accumulation(trainer, pl_module, batch)
            self.slot.note_batchnorm_mode(pl_module, trainer.current_epoch)
        if self._trainable.version != self._set_version:  # (here, or at a probe since: layers (un)frozen)
            self._replan(trainer, pl_module, batch)
        first = batch_idx % m.accumulate == 0  # Lightning's first micro-batch of a window
        # (the optimizer steps taken, as the bounds index η_t: Lightning's logging index can run
        # ahead of it — BatchSizeFinder's trial fits left it one step ahead, and the series shifted)
        step = weights_step(trainer)
        micro_size = self.step_sizes.add(step, batch, first)
        if first:
            # on its schedule and, under an overhead budget, at the stride its share of the budget
            # affords (callbacks/step_budget.py); an unmeasured step disarms the hooks
            m.start_window(step, self.step_budget.measures(trainer, self.measured_steps, self.every_n_steps,
                                                           batch_idx, m.accumulate))
            # a step it does not measure: Lightning need not dispatch its hooks (the batch end only
            # where it writes measured values to the loggers; hook_clock.HooksAside); one it reads
            # at the optimizer step: not its after-backward hook
            if self._aside is not None:  # (None: every one that can be)
                log_step = is_log_step(trainer)
                self._aside.set_aside(((_READ_LATE if log_step else _READ_LATE_QUIET) if m.late else ())
                                      if m.measuring else
                                      _MEASURED_STEP_HOOKS if len(self.step_log) and log_step else None)
        if m.measuring:
            m.before_forward(trainer, pl_module, batch, batch_idx, micro_size)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self.step_measurement.before_backward(trainer, pl_module)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.step_measurement.after_backward(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        m = self.step_measurement
        if not m.measuring or self.impl is None:
            return
        if self._trainable.version != self._set_version or self._trainable.moved():
            # layers (un)frozen inside this step (a module's own batch-start hook): planned on the
            # old set, the step is left unmeasured; the next batch start chooses the backend again
            # (said there, once; a change at the first step's later micro-batch: a backward ran on the old set)
            self._trainable.check(pl_module, int(trainer.global_step), after_backward=m.accumulate > 1)
            m.drop()
            return
        if m.late:  # (its batch end may be set aside: _READ_LATE_QUIET)
            self.step_budget.charge(self.impl.hook_seconds())
        values = m.end(trainer, pl_module)
        if values is None:
            return
        if isinstance(values, Tensor):  # one copy into the step log
            self.step_log.record_row(m.step, m.row_names, values)
        elif values is not KEPT:  # (KEPT: recorded by the backend's row ring, dispersion/row_ring.py)
            self.step_log.record(m.step, values.tagged(m.group_names))
        self.measured_steps += 1
        self.step_budget.measured(trainer)

    def _end_batch(self, epoch: bool = False) -> None:
        if self.impl is not None:
            self.impl.end_batch()
            if epoch:
                self.impl.end_epoch()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._end_batch()
        if is_log_step(trainer):
            self.flush(trainer, pl_module)
        # the Lightning hooks are clocked whole (MeasurementCallback); the norm hooks run inside
        # the user's forward and backward and keep their own clock
        self.step_budget.charge(self.impl.hook_seconds() if self.impl is not None else 0.0)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_batch(epoch=True)  # (on_train_batch_start returning -1 skips on_train_batch_end)
        if not self._sizes_said:  # (the fit's first epoch's steps, as they were trained)
            self._sizes_said = True
            sizes = self.step_sizes.extremes(self._sizes_from, int(trainer.global_step))
            if sizes is not None:
                note_small_batches(OWNER, *sizes, trainer.current_epoch)
        self.flush(trainer, pl_module, epoch_end=True)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_batch(epoch=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_batch()
        self.flush(trainer)
        self.step_log.report_skipped(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        mark_run_complete(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._cleanup()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        self.slot.detach()
        self._trainable.reset()
        self.step_measurement.clear()
        self.step_log.clear()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"measured_steps": self.measured_steps, **self.slot.state(), **self.step_log.state_dict(),
                **self.step_sizes.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_steps = int(state_dict.get("measured_steps", 0))
        self.step_log.load_state_dict(state_dict)
        self.slot.load_state(state_dict)
        self.step_sizes.load_state_dict(state_dict)
