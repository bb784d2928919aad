"""Shared machinery of the probe callbacks (held-out gradient, sensitivity, flatness, curvature).

* **Schedule** — :class:`ProbeSchedule`: every ``n`` optimizer steps, every ``n`` epochs,
  log-spaced steps (``k`` per decade: dense early, sparse late), and/or once at the end of
  training. Nothing runs during Lightning's sanity check (probes only use training hooks).
* **Probe batches** — drawn once, at ``on_train_start``, and cached on the module's device:
  from the training set a seeded uniform subset (one loader batch's worth by default; not the
  first training batch, which the step's gradient would otherwise be compared with), from the
  validation loader its first full batch; ``probe_batch_size`` / ``num_probe_batches`` change the
  size. Both are collated and passed through the module's own batch-transfer hooks (the same
  transforms as the training batches); nothing touches the training run's RNG. Without a
  validation loader only the held-out quantities are disabled, with one warning.
* **Isolation** — every probe runs inside :func:`genbounds.callbacks.isolation.isolated_pass`
  in eval mode by default (``probe_mode="train"`` keeps train mode: dropout active, BatchNorm on
  batch statistics — its running statistics are restored afterwards either way).
* **DDP** — each rank holds its share of the probe batches (Lightning's distributed sampler);
  the estimators average every batch mean (loss, gradient, Hessian-vector product) over the ranks
  and every rank seeds its generator alike, so all ranks compute the statistic of the union of
  the probe batches — with equal per-rank batches, exactly what one process computes on the
  whole probe batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from genbounds.callbacks.checks import check_positive, check_precision, check_strategy
from genbounds.callbacks.distributed import mean_over_ranks
from genbounds.callbacks.isolation import isolated_pass
from genbounds.callbacks.loss_contract import resolve_loss_fn
from genbounds.callbacks.step_log import StepLog, weights_step
from genbounds.estimators.batching import batch_size, concat_batches, index_batch
from genbounds.estimators.functional import LossFn, Reduce

ProbeMode = Literal["eval", "train"]


class ProbeSchedule:
    """When a probe runs. ``step`` is the number of optimizer steps already taken."""

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced: int | None = None,
        at_train_end: bool = True,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.log_spaced = log_spaced
        self.at_train_end = at_train_end

    def due_at_step(self, step: int) -> bool:
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        if self.log_spaced:
            # k points per decade: step s is due when ⌊k·log10(s+1)⌋ advances past ⌊k·log10(s)⌋
            k = self.log_spaced
            return step == 0 or math.floor(k * math.log10(step + 1)) > math.floor(k * math.log10(step))
        return False

    def due_at_epoch_end(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0


def _loader_batches(loader: Any, size: int | None, count: int) -> Any:
    """``count`` probe batches concatenated: each the first full batch (``size=None``) or the
    first ``size`` samples, consecutive along the loader."""
    collected: list[Any] = []
    it = iter(loader)
    want = None if size is None else size * count
    have = 0
    first_size = None
    for batch in it:
        b = batch_size(batch)
        if size is None:
            first_size = first_size or b
            if b < first_size:
                continue  # a partial last batch is not a "full" batch
            collected.append(batch)
            if len(collected) == count:
                break
        else:
            collected.append(batch)
            have += b
            if have >= want:
                break
    if not collected:
        return None
    merged = concat_batches(collected) if len(collected) > 1 else collected[0]
    if want is not None:
        merged = index_batch(merged, slice(0, min(want, batch_size(merged))))
    return merged


def draw_probe_batch(trainer: Trainer, loader: Any, size: int | None, count: int) -> Any:
    """The probe set of one dataloader, on the module's device, without touching the run's RNG."""
    device = trainer.strategy.root_device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        batch = _loader_batches(loader, size, count)
    if batch is None:
        return None
    return trainer.strategy.batch_to_device(batch)


PROBE_STREAM = 0x5EED_0F_9B0BE
"""Offset that separates the probe subsets' random stream from samplers seeded with small integers."""


def draw_training_subset(trainer: Trainer, loader: Any, size: int | None, count: int, seed: int) -> Any:
    """A uniform random subset of the training set (seeded), collated like the loader's batches
    and moved to the device: ``size × count`` samples per rank (``size`` defaults to the loader's
    batch size). Unlike the loader's first batch, it is not the first training batch ``B_1``, so
    ``ĝ_tr`` is independent of the batches it is compared with (SPEC §2) and ``H`` comes from other
    data than the training chunks (§5). Under DDP every rank draws the same global subset of
    ``world_size ×`` that size and keeps its interleaved share. Falls back to the loader's first
    batches for datasets without random access."""
    dataset = getattr(loader, "dataset", None)
    per_rank = (size or getattr(loader, "batch_size", None) or 1) * count
    try:
        n = len(dataset)  # type: ignore[arg-type]
        dataset[0]  # type: ignore[index]
    except Exception:  # noqa: BLE001 - iterable datasets have no random access
        return draw_probe_batch(trainer, loader, size, count)
    world, rank = trainer.world_size, trainer.global_rank
    total = min(per_rank * world, n)
    # a stream of its own: randperm from a plain `seed` would replay the data module's epoch-0
    # order when the two seeds agree (both default to 0), and the probe would be B_1 again
    stream = (seed * 0x9E3779B1 + PROBE_STREAM) % (2**63 - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(stream))[:total]
    items = [dataset[i] for i in order[rank::world].tolist()]
    collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
    return trainer.strategy.batch_to_device(collate(items))


def _first_loader(loaders: Any) -> Any:
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def validation_loader(trainer: Trainer) -> Any:
    """The first validation dataloader, set up now if Lightning has not done so yet."""
    if trainer.val_dataloaders is None:
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        except Exception:  # noqa: BLE001 - no validation data is a legitimate configuration
            return None
    return _first_loader(trainer.val_dataloaders)


def training_set_size(trainer: Trainer) -> int | None:
    """``n``: the number of training samples (all ranks), when the loader has a sized dataset."""
    dm = trainer.datamodule
    if dm is not None and isinstance(getattr(dm, "num_train", None), int):
        return int(dm.num_train)
    loader = _first_loader(trainer.train_dataloader)
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


class ProbeCallback(Callback):
    """Base class: schedule, probe batches, isolation and logging. Subclasses set ``owner`` and
    implement :meth:`measure`, returning ``{tag: value}`` (values identical on every rank: pass
    :meth:`reducer` to the estimators)."""

    owner = "ProbeCallback"
    needs_train_probe = True
    needs_heldout_probe = False
    heldout_required = False

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
    ) -> None:
        super().__init__()
        check_positive(self.owner, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
                       log_spaced=log_spaced, probe_batch_size=probe_batch_size,
                       num_probe_batches=num_probe_batches)
        if probe_mode not in ("eval", "train"):
            raise MisconfigurationException(f"{self.owner}(probe_mode={probe_mode!r}) must be 'eval' or 'train'")
        self.schedule = ProbeSchedule(every_n_steps, every_n_epochs, log_spaced, at_train_end)
        self.probe_batch_size = probe_batch_size
        self.num_probe_batches = num_probe_batches
        self.probe_mode = probe_mode
        self.loss_fn = loss_fn
        self.seed = seed
        self.step_log = StepLog(self.owner)
        self.train_probe: Any = None
        self.heldout_probe: Any = None
        self.heldout_available = False
        self.num_probes_run = 0
        self._loss_fn: LossFn | None = None
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._last_probe_step: int | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(self.owner, trainer)
        check_precision(self.owner, trainer)
        self._loss_fn = resolve_loss_fn(self.owner, pl_module, self.loss_fn)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.needs_train_probe:
            self.train_probe = draw_training_subset(
                trainer, _first_loader(trainer.train_dataloader), self.probe_batch_size, self.num_probe_batches,
                self.seed,
            )
        if self.needs_heldout_probe:
            loader = validation_loader(trainer)
            self.heldout_probe = (
                draw_probe_batch(trainer, loader, self.probe_batch_size, self.num_probe_batches)
                if loader is not None else None
            )
            self.heldout_available = self.heldout_probe is not None
            if not self.heldout_available:
                message = f"{self.owner}: no validation dataloader, so the held-out quantities are disabled."
                if self.heldout_required:
                    message = f"{self.owner}: needs held-out data, but there is no validation dataloader; it is disabled."
                rank_zero_warn(message)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches != 0:
            return
        if self.schedule.due_at_step(trainer.global_step):
            self._probe(trainer, pl_module, batch=batch, log=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.due_at_epoch_end(trainer.current_epoch):
            self._probe(trainer, pl_module, log=True, epoch_end=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.at_train_end:
            self._probe(trainer, pl_module, log=False)

    # ------------------------------------------------------------------ machinery
    @property
    def active(self) -> bool:
        return not (self.heldout_required and not self.heldout_available)

    @staticmethod
    def reducer(trainer: Trainer) -> Reduce | None:
        """Mean over DDP ranks for the estimators (``None`` in a single process)."""
        return mean_over_ranks(trainer)

    def probe_now(self, trainer: Trainer, pl_module: LightningModule, *, log: bool = True,
                  epoch_end: bool = True) -> None:
        """Measure at the current weights now (the bound aggregator asks for the end-of-run
        quantities this way); skipped when this callback already measured these weights."""
        self._probe(trainer, pl_module, log=log, epoch_end=epoch_end)

    def generator(self, device: torch.device) -> torch.Generator:
        """This callback's own random stream (never the global RNG), resumable."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._generator_state is not None:
                try:
                    self._generator.set_state(self._generator_state)
                except RuntimeError:
                    pass  # saved on another device type: restart the stream from the seed
        return self._generator

    def _probe(self, trainer: Trainer, pl_module: LightningModule, *, log: bool, batch: Any = None,
               epoch_end: bool = False) -> None:
        if not self.active or trainer.sanity_checking:
            return
        step = weights_step(trainer)  # a probe measures the current weights
        if self._last_probe_step == trainer.global_step:
            return  # already probed at these weights (e.g. epoch end and the next step start)
        self._last_probe_step = trainer.global_step
        with isolated_pass(pl_module, mode=self.probe_mode):
            values = self.measure(trainer, pl_module, batch)
        if not values:
            return
        values = self.finalize(trainer, values)
        self.num_probes_run += 1
        device = pl_module.device
        self.step_log.record(step, {k: torch.as_tensor(v, dtype=torch.float64, device=device) for k, v in values.items()})
        self.step_log.flush(trainer, pl_module if log else None, epoch_end=epoch_end)
        self.publish(step, values)

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def finalize(self, trainer: Trainer, values: dict[str, float]) -> dict[str, float]:
        """Derived values computed from the rank-reduced ones (subclasses)."""
        return values

    def publish(self, step: int, values: dict[str, float]) -> None:
        """Send a typed record on the callback's channel (subclasses)."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_probes_run": self.num_probes_run, "last_probe_step": self._last_probe_step}
        if self._generator is not None:
            state["generator_state"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_probes_run = int(state_dict.get("num_probes_run", 0))
        self._last_probe_step = state_dict.get("last_probe_step")
        self._generator_state = state_dict.get("generator_state")
        self._generator = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.train_probe = None
        self.heldout_probe = None


def per_pass(requested: int | None, device: torch.device, gpu_default: int = 8) -> int:
    """Vectorization width: as requested, else 1 on CPU (looping is faster there, see
    ``benchmarks/probes.py``) and ``gpu_default`` on an accelerator."""
    if requested is not None:
        return requested
    return 1 if device.type == "cpu" else gpu_default


def sigma_tag(sigma: float) -> str:
    return f"sigma={sigma:g}"
