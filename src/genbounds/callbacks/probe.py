"""Shared machinery of the probe callbacks (held-out gradient, sensitivity, flatness, curvature).

* **Schedule** — :class:`ProbeSchedule`: every ``n`` optimizer steps, every ``n`` epochs,
  log-spaced steps (``k`` per decade: dense early, sparse late), and/or once at the end of
  training. Nothing runs during Lightning's sanity check. With an ``overhead_budget`` (see
  :mod:`genbounds.callbacks.overhead`) a due probe waits until it fits in the budget (the
  final weights' probe too, unless the bound aggregator needs it: those always run).
* **Probe batches** — drawn once, at ``on_train_start``, and cached on the module's device (see
  :mod:`genbounds.callbacks.probe_data`): from the training set a seeded uniform subset, from
  the validation loader its first full batches; samples holding NaN/inf are left out. Without a
  validation loader only the held-out quantities are disabled, with one warning.
* **Losses** — the suite's :class:`~genbounds.callbacks.loss_contract.LossContract` (your
  ``per_sample_loss``, a ``loss_fn``, or captured from your own ``training_step``).
* **Isolation** — every probe runs inside :func:`genbounds.callbacks.isolation.isolated_pass`
  in eval mode by default (``probe_mode="train"`` keeps dropout and batch-statistics
  BatchNorm; running statistics are never updated by a probe).
* **DDP** — the estimators average every batch mean over the ranks with identical random draws,
  so all ranks compute the statistic of the union of the ranks' probe batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from genbounds.callbacks.checks import (
    check_bool,
    check_callable,
    check_choice,
    check_float,
    check_int,
    check_precision,
    check_strategy,
)
from genbounds.callbacks.distributed import mean_over_ranks, reason_from_every_process
from genbounds.callbacks.hook_clock import MeasurementCallback, sleep_until, sleep_until_time, wake
from genbounds.callbacks.isolation import isolated_pass
from genbounds.callbacks.loss_contract import LossContract
from genbounds.callbacks.overhead import OverheadBudget
from genbounds.callbacks.probe_budget import BudgetedProbe
from genbounds.callbacks.probe_data import (  # noqa: F401  (re-exported for callers)
    draw_probe_batch,
    draw_training_subset,
    first_loader,
    num_train_samples,
    screen_probe_set,
    training_loader,
    training_set_size,
    training_trial_batch,
    validation_loader,
    warn_if_short,
)
from genbounds.callbacks.probe_schedule import ProbeSchedule, probe_seed, sigma_tag  # noqa: F401  (re-exported)
from genbounds.callbacks.second_order import second_order_problem
from genbounds.callbacks.step_log import StepLog, mark_run_complete, weights_step
from genbounds.callbacks.trainable_set import TrainableSet
from genbounds.estimators.collective import FailedElsewhere, not_twice_differentiable
from genbounds.estimators.functional import LossFn, Reduce, num_trainable
from genbounds.estimators.per_sample_gradients import DEFAULT_MEMORY_BUDGET

ProbeMode = Literal["eval", "train"]


PROBE_MEMORY_BUDGET = DEFAULT_MEMORY_BUDGET
"""Bytes of parameter-sized tensors a vectorized probe pass may hold at once by default on an
accelerator (the functorch backend's per-sample budget, 64 MiB)."""


def vectorization_width(num_params: int, widest: int, budget: int = PROBE_MEMORY_BUDGET, copies: int = 4) -> int:
    """Items (draws, Hutchinson vectors, points) per vectorized probe pass on an accelerator: at
    most ``widest``, and only as many as fit ``copies`` float64 parameter-sized tensors each (the
    perturbed weights, a gradient or Hessian-vector product, its direction, a temporary) in
    ``budget`` bytes; at least one.  Measured on an H200 (docs/results/cuda_h200/suite_memory.md):
    the default suite on the 28.7 M-parameter CNN at the fixed widths 8–10 grew the device's peak
    by 6,342 MiB in the final evaluation (the whole run's peak growth was 15.8× plain training's);
    on the CPU with the same widths 6,543 MiB, with these 1,445 MiB.  The activations of a
    vectorized pass grow with the width too, but are not counted here."""
    return max(1, min(widest, int(budget // (copies * 8 * max(1, num_params)))))


def default_width(module: torch.nn.Module, widest: int, tier: str | None) -> int:
    """The vectorization width when none is requested: 1 on the CPU (looping is faster there, see
    ``benchmarks/probes.py``) and for losses from the user's own ``training_step`` (loss contract
    ``tier`` ``"captured"`` or ``"returned"``: not vectorizable); on an accelerator
    :func:`vectorization_width` of the module's trainable parameters, at most ``widest``."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "cpu" or tier in ("captured", "returned"):
        return 1
    return vectorization_width(num_trainable(module), widest)


class ProbeCallback(BudgetedProbe, MeasurementCallback):
    """Base class: schedule, probe batches, isolation, budget and logging. Subclasses set
    ``owner`` and implement :meth:`measure`, returning ``{tag: value}`` (values identical on every
    rank: pass :meth:`reducer` to the estimators)."""

    owner = "ProbeCallback"
    needs_train_probe = True
    needs_heldout_probe = False
    heldout_required = False
    per_sample_need: str | None = None
    """What this callback loses without per-sample losses (``None``: it needs only means)."""
    takes_gradients = True
    """Whether its passes take gradients (``torch.autograd.grad``): then it measures nothing where
    the loss runs through ``torch.utils.checkpoint(use_reentrant=True)`` (the loss contract says so)."""

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        log_spaced: int | None = None,
        at_train_end: bool = True,
        probe_batch_size: int | None = None,
        num_probe_batches: int = 1,
        probe_mode: ProbeMode = "eval",
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
        overhead_budget: float | None = None,
    ) -> None:
        super().__init__()
        o = self.owner
        self.schedule = ProbeSchedule(
            check_int(o, "every_n_steps", every_n_steps, optional=True),
            check_int(o, "every_n_epochs", every_n_epochs, optional=True),
            check_int(o, "log_spaced", log_spaced, optional=True),
            check_bool(o, "at_train_end", at_train_end),
        )
        self.probe_batch_size = check_int(o, "probe_batch_size", probe_batch_size, optional=True)
        self.num_probe_batches = check_int(o, "num_probe_batches", num_probe_batches)
        self.probe_mode = check_choice(o, "probe_mode", probe_mode, ("eval", "train"))
        self.loss_fn = check_callable(o, "loss_fn", loss_fn)
        self.seed = check_int(o, "seed", seed, minimum=None)
        self.overhead_budget = check_float(o, "overhead_budget", overhead_budget, low=0.0, low_open=True,
                                           optional=True)
        if self.overhead_budget is not None and self.overhead_budget > 1.0:  # (a percentage given?)
            b = self.overhead_budget
            rank_zero_warn(f"{o}(overhead_budget={b:g}): the budget is a fraction of the training time (0.2 = 20 %), "
                           f"so {b:g} lets the probes take {b:g}× as long as training itself. Was {b / 100:g} meant?")
        self.step_log = StepLog(self.owner)
        self.train_probe: Any = None
        self.heldout_probe: Any = None
        self.heldout_available = False
        self.num_probes_run = 0
        self.contract: LossContract | None = None
        self.budget: OverheadBudget | None = None
        self._loss_fn: LossFn | None = None
        self._generator: torch.Generator | None = None
        self._generator_key: tuple | None = None
        self._probe_step = 0
        self._last_probe_step: int | None = None
        self._pending = False
        self._module: LightningModule | None = None
        self._init_pricing()
        self._set_version = 0
        self._nothing_trained_said = False
        self.twice_differentiable_problem: str | None = None
        """Why Hessian-vector products of the loss cannot be taken in this fit (``second_order.py``), if so."""

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # (a fit's own: another fit of these callbacks probed other weights at its steps; a checkpoint
        # restores the value after this hook)
        self._last_probe_step = None
        check_strategy(self.owner, trainer)
        check_precision(self.owner, trainer)
        self.contract = LossContract.shared(pl_module)
        self._loss_fn = self.contract.register(self.owner, self.loss_fn, per_sample=self.per_sample_need is not None,
                                               what=self.per_sample_need or "", gradients=self.takes_gradients)
        self.budget = OverheadBudget.shared(trainer, self.overhead_budget)
        if self.schedule.empty and not self._requested_by_aggregator(trainer):
            rank_zero_warn(
                f"{self.owner} has no schedule (every_n_steps, every_n_epochs and log_spaced are None, "
                "at_train_end=False) and no GeneralizationBound in this Trainer asks it for measurements: it will "
                "never run. Give it a schedule, or add GeneralizationBound().")

    def _requested_by_aggregator(self, trainer: Trainer) -> bool:
        from genbounds.callbacks.generalization_bound import GeneralizationBound

        return any(isinstance(cb, GeneralizationBound) for cb in trainer.callbacks)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.budget is not None and self.contract is not None
        self.budget.begin()
        self._module = pl_module
        trained = TrainableSet.shared(pl_module)
        trained.take(pl_module, int(trainer.global_step))  # (after on_fit_start: a backbone BaseFinetuning froze)
        self._set_version = trained.version
        self.take_parameters(pl_module)
        self.budget.pricers[self.owner] = self.first_cost
        wanted = (self.probe_batch_size * self.num_probe_batches) if self.probe_batch_size else None
        if self.needs_train_probe:
            self.train_probe = draw_training_subset(trainer, training_loader(trainer),
                                                    self.probe_batch_size, self.num_probe_batches, self.seed)
        if self.needs_heldout_probe:
            loader = validation_loader(trainer)
            self.heldout_probe = draw_probe_batch(trainer, loader, self.probe_batch_size, self.num_probe_batches) \
                if loader is not None else None
        trial = self.train_probe if self.train_probe is not None else training_trial_batch(trainer, self.seed)
        self.contract.resolve(trainer, pl_module, trial)
        self.train_probe = screen_probe_set(trainer, pl_module, self.train_probe, "training probe set", self.contract,
                                            self.probe_mode)
        drawn = self.heldout_probe is not None
        self.heldout_probe = screen_probe_set(trainer, pl_module, self.heldout_probe, "held-out probe set", self.contract,
                                              self.probe_mode)
        if self.needs_train_probe:
            warn_if_short(self.owner, self.train_probe, wanted, "training probe set", trainer.world_size)
        if self.needs_heldout_probe:
            self.heldout_available = self.heldout_probe is not None
            if not self.heldout_available:
                message = f"{self.owner}: no validation dataloader, so the held-out quantities are disabled."
                if self.heldout_required:
                    message = f"{self.owner}: needs held-out data, but there is no validation dataloader; it is disabled."
                if drawn:  # (there is one: screen_probe_set left out every sample it gave)
                    message = (f"{self.owner}: every sample of the held-out probe set was left out (NaN/inf values or "
                               "losses), so the held-out quantities are disabled.")
                rank_zero_warn(message)
            else:
                warn_if_short(self.owner, self.heldout_probe, wanted, "held-out probe set", trainer.world_size)
        self._check_second_order(trainer, pl_module)

    @property
    def owner_name(self) -> str:
        return self.owner

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches != 0:
            return
        step = trainer.global_step
        if self.schedule.due_at_step(step):
            self._pending = True
        if self._pending and self._affordable():
            self._pending = False
            self._probe(trainer, pl_module, batch=batch, log=True)
        self._rest(trainer, step, hook_of=ProbeCallback)

    def _rest(self, trainer: Trainer, step: int, hook_of: type) -> None:
        """Nothing to do at a batch start before the schedule's next step (nothing pending) or, a
        due probe waiting for the budget, before the time its cost can fit: Lightning need not
        call ``hook_of``'s ``on_train_batch_start`` until then (:mod:`~genbounds.callbacks.hook_clock`)."""
        if not self._pending:
            sleep_until(self, trainer, self.schedule.next_due_step(step), hook_of=hook_of)
        elif self.budget is not None and self.budget.fraction is not None:
            sleep_until_time(self, trainer, self.budget.affordable_from(self.owner), hook_of=hook_of)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.due_at_epoch_end(trainer.current_epoch):
            if self._affordable():
                self._probe(trainer, pl_module, log=True, epoch_end=True)
            else:
                self._pending = True  # at the next step start that fits
                wake(self, trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.budget is not None:
            self.budget.leave_queue(self.owner)  # (a probe still due now never runs: it holds no one back)
        if self.schedule.at_train_end and self._affordable(queue=False):
            self._probe(trainer, pl_module, log=False)
        self.step_log.report_skipped(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        mark_run_complete(trainer)

    # ------------------------------------------------------------------ machinery
    @property
    def active(self) -> bool:
        blocked = self.takes_gradients and self.contract is not None and self.contract.reentrant_checkpoint
        needed = self.twice_differentiable_problem is not None and self.second_order_needed
        return not (self.heldout_required and not self.heldout_available) and not blocked and not needed

    second_order_needed = False
    """Whether this callback measures nothing without second derivatives (``HessianTrace``)."""

    def second_order_method(self) -> str | None:
        """The Hessian-vector product method its probes use (``None``: no second derivatives)."""
        return None

    def _check_second_order(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before step 0: one Hessian-vector product on (up to 64 samples of) the probe set, and the
        loss's graph searched for ``@once_differentiable`` nodes (``second_order.py``)."""
        self.twice_differentiable_problem = None
        method = self.second_order_method()
        batch = self.train_probe if self.train_probe is not None else self.heldout_probe
        if method is not None and self.active and batch is not None:
            problem = second_order_problem(pl_module, self._loss_fn, batch, self.probe_mode, method)
            # (every process decides alike: one without the probe would leave the others waiting in
            # its collectives)
            if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(problem is not None, all=False) \
                    and problem is None:
                problem = "the check failed in another process"
            if problem is not None:
                self._without_second_order(problem)

    def _without_second_order(self, problem: str) -> None:
        """Second derivatives cannot be taken (before step 0, or met by a probe): said once a fit."""
        first = self.twice_differentiable_problem is None
        self.twice_differentiable_problem = problem
        if first:
            hint = ("; PyTorch has no second derivative for some layers, e.g. nn.Hardsigmoid"
                    if not_twice_differentiable(RuntimeError(problem)) else "")
            rank_zero_warn(f"{self.owner}: Hessian-vector products of this model's loss cannot be taken "
                           f"({problem}{hint}): {self.without_second_order}")

    @staticmethod
    def second_order_reason(trainer: Trainer, err: BaseException) -> str:
        """The first line of a probe's missing-derivative error — under DDP the one of the process
        where it happened, in every process (``distributed.reason_from_every_process``)."""
        return reason_from_every_process(trainer, str(err).strip().splitlines()[0], isinstance(err, FailedElsewhere))

    without_second_order = "it measures nothing in this fit (NaN), nor do the bounds that need it."
    """What this callback leaves out without second derivatives, as the warning says it."""

    @staticmethod
    def reducer(trainer: Trainer) -> Reduce | None:
        """Mean over DDP ranks for the estimators (``None`` in a single process)."""
        return mean_over_ranks(trainer)

    def probe_now(self, trainer: Trainer, pl_module: LightningModule, *, log: bool = True,
                  epoch_end: bool = True) -> None:
        """Measure at the current weights now (the bound aggregator asks for the end-of-run
        quantities this way); skipped when this callback already measured these weights."""
        self._probe(trainer, pl_module, log=log, epoch_end=epoch_end)

    def generator(self, device: torch.device, stream: int = 0) -> torch.Generator:
        """The random stream of the current probe (never the global RNG): seeded from
        ``(seed, step, stream)``, so the draws of a probe at step ``t`` do not depend on which
        probes ran before it — a run resumed from a checkpoint (where Lightning may skip a
        validation, and with it a bound evaluation) draws exactly what the uninterrupted run draws."""
        key = (self._probe_step, stream, device)
        if self._generator is None or self._generator_key != key:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(probe_seed(self.seed, self._probe_step, stream))
            self._generator_key = key
        return self._generator

    def per_pass(self, requested: int | None, module: torch.nn.Module, gpu_default: int = 8) -> int:
        """Vectorization width: as requested, else :func:`default_width` (at most ``gpu_default``)."""
        if self.contract is not None and self.contract.reentrant_checkpoint:
            return 1  # (a torch.func transform cannot run the checkpoint's autograd.Function)
        if requested is not None:
            return requested
        return default_width(module, gpu_default, self.contract.tier if self.contract is not None else None)

    def _probe(self, trainer: Trainer, pl_module: LightningModule, *, log: bool, batch: Any = None,
               epoch_end: bool = False) -> None:
        if not self.active or trainer.sanity_checking:
            return
        step = weights_step(trainer)  # a probe measures the current weights
        if self._last_probe_step == trainer.global_step:
            return  # already probed at these weights (e.g. epoch end and the next step start)
        self._last_probe_step = trainer.global_step
        self._probe_step = int(trainer.global_step)
        self._follow_trained(pl_module, self._probe_step)
        if not TrainableSet.shared(pl_module).names:  # (every parameter frozen: nothing to perturb or differentiate)
            if not self._nothing_trained_said:
                self._nothing_trained_said = True
                rank_zero_info(f"{self.owner}: no parameter is trained at step {self._probe_step} (all frozen): its "
                               "probes are left out while so.")
            return
        self._start_final_share()
        try:
            with self.budget.timed(self.owner), isolated_pass(pl_module, mode=self.probe_mode):
                values = self.measure(trainer, pl_module, batch)
        except StopIteration as err:  # (escaping a hook, Lightning would take it for the end of the data)
            raise RuntimeError(f"{self.owner}: a probe raised StopIteration") from err
        except (RuntimeError, NotImplementedError) as err:  # (a branch the check before step 0 did not take)
            if not (self.second_order_needed and not_twice_differentiable(err)):
                raise
            self._without_second_order(self.second_order_reason(trainer, err))
            return
        finally:
            self._final_until = None
        if not values:
            return
        values = self.finalize(trainer, values)
        self.num_probes_run += 1
        # (a due probe waiting for its turn is done by any probe of these weights — the bound's
        # probe_now at a validation's end included: it neither runs again at the next step start
        # nor holds the others back in the budget's turns)
        self._pending = False
        self.budget.leave_queue(self.owner)
        device = pl_module.device
        self.step_log.record(step, {k: torch.as_tensor(v, dtype=torch.float64, device=device) for k, v in values.items()})
        records = self.step_log.flush(trainer, pl_module if log else None, epoch_end=epoch_end)
        if records:
            self.publish(step, values)

    def _follow_trained(self, pl_module: LightningModule, step: int) -> None:
        """The trained parameters as they are now (``trainable_set.py``): :meth:`take_parameters`
        again when they changed since this callback took them."""
        trained = TrainableSet.shared(pl_module)
        if trained.check(pl_module, step) != self._set_version:
            self._set_version = trained.version
            self.take_parameters(pl_module)

    def take_parameters(self, pl_module: LightningModule) -> None:
        """What a subclass keeps per trained parameter (groups, a warm start), taken at
        ``on_train_start`` and again when the trained parameters change (``trainable_set.py``)."""

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def finalize(self, trainer: Trainer, values: dict[str, float]) -> dict[str, float]:
        """Derived values computed from the rank-reduced ones (subclasses)."""
        return values

    def publish(self, step: int, values: dict[str, float]) -> None:
        """Send a typed record on the callback's channel (subclasses)."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"num_probes_run": self.num_probes_run, "last_probe_step": self._last_probe_step,
                "pending": self._pending, **self.step_log.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_probes_run = int(state_dict.get("num_probes_run", 0))
        self._last_probe_step = state_dict.get("last_probe_step")
        self._pending = bool(state_dict.get("pending", False))
        self.step_log.load_state_dict(state_dict)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.train_probe = None
        self.heldout_probe = None
        self._module = None
        if stage == "fit":
            TrainableSet.shared(pl_module).reset()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        TrainableSet.shared(pl_module).reset()  # (Lightning tears no callback down after a failure)
