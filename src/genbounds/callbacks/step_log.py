"""Logging per-step statistics without a host sync per step.

Measurement callbacks compute their statistics as 0-d device tensors and :meth:`StepLog.record`
them. Nothing is copied to the host until :meth:`StepLog.flush`, which callbacks call on
Lightning's own logging cadence (``Trainer(log_every_n_steps=...)``) and at epoch and train end:
one device→host copy for all buffered values, then

* every finite record (``every_record=False``: the latest of the flush) is written to every logger
  **at the step it was measured** (so the curve is exact even when ``every_n_steps`` and
  ``log_every_n_steps`` differ). Steps: a statistic of
  a training batch is logged at that batch's index (next to ``train_loss_step``), a quantity of the
  weights at the number of optimizer steps taken (:func:`weights_step`), an aggregate over an epoch
  where Lightning logs epoch metrics (:func:`epoch_end_step`);
* a record with any non-finite value (NaN loss, inf gradient) is dropped — contained to its own
  step: the first one gets a warning naming its step, later ones are only counted (the count is
  reported once at train end and kept in the checkpoint). ``log_nonfinite=True`` (the bounds)
  logs NaN instead: a bound that cannot be computed is a result, not a gap;
* the latest value of each metric is also put in ``trainer.callback_metrics`` (as
  ``pl_module.log(..., logger=False)`` would, without its cost), so ``EarlyStopping`` and
  ``ModelCheckpoint`` can use it; progress-bar values go through ``pl_module.log``;
* listeners (the bound aggregator) receive the finite records as plain floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from genbounds.estimators.functional import nograd


@dataclass
class StepRecord:
    """One measurement: the optimizer-step index it describes and its values."""

    step: int
    values: dict[str, float]


Listener = Callable[[list[StepRecord]], None]


def logger_step(trainer: Trainer) -> int:
    """The step index Lightning uses for the training metrics logged in this batch (the batch's
    0-based index: per-batch statistics are logged here, next to ``train_loss_step``)."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return int(stepped) if stepped is not None else int(trainer.global_step)


def epoch_end_step(trainer: Trainer) -> int:
    """The step Lightning logs epoch-end metrics at (``train_acc``, ``train_loss_epoch``): the
    epoch's last batch index. For aggregates over an epoch, logged from ``on_train_epoch_end``."""
    return max(logger_step(trainer) - 1, 0)


def weights_step(trainer: Trainer) -> int:
    """Label of a quantity of the *weights* (probes, bounds, twin divergence): the number of
    optimizer steps taken — the same weights get the same label in every hook."""
    return int(trainer.global_step)


def is_log_step(trainer: Trainer) -> bool:
    """Whether Lightning writes training metrics to the loggers at the end of this batch."""
    every = trainer.log_every_n_steps
    return bool(every) and ((logger_step(trainer) + 1) % every == 0 or trainer.should_stop)


class PendingRows(Protocol):
    """Records kept unmade on the device (the dispersion's row ring, ``dispersion/row_ring.py``)."""

    def pending_count(self) -> int: ...

    def drain(self) -> None:
        """Make the pending records and hand them to the log (:meth:`StepLog.record_rows`)."""


class StepLog:
    """Device-side buffer of per-step scalar records (see the module docstring)."""

    def __init__(self, owner: str, prog_bar: tuple[str, ...] = (), log_nonfinite: bool = False,
                 every_record: bool = True) -> None:
        self.owner = owner
        self.every_record = every_record
        """Write every record to the loggers (else the latest of each flush, as Lightning writes a
        ``self.log(on_step=True)`` value once per ``log_every_n_steps``); listeners get all."""
        self.prog_bar = prog_bar
        self.log_nonfinite = log_nonfinite
        # records of the steps since the last flush: (step, names, row of _buffer); each record's
        # values are copied into one float64 device buffer kept for the run (grown by doubling),
        # so that nothing allocated during a step outlives it (the step's 0-d tensors were kept
        # until a flush; with the norm hooks kept armed as well, the MLP benchmark's peak growth
        # went from 80 to 35 MiB, docs/results/overhead.md — the two were measured together)
        self._pending: list[tuple[int, tuple[str, ...], int]] = []
        self._buffer: Tensor | None = None
        self._rows: tuple[Tensor, ...] = ()  # the buffer's rows as views, made once per buffer
        self._listeners: list[Listener] = []
        self._sources: list[PendingRows] = []
        self.skipped_steps: list[int] = []
        self.skipped_count = 0
        self._warned = False
        self._reported = 0
        self.latest: dict[str, float] = {}
        self.latest_step: dict[str, int] = {}
        """The step each of :attr:`latest`'s values was logged at (``BoundGate`` reads it for staleness)."""

    def state_dict(self) -> dict:
        return {"skipped_steps": list(self.skipped_steps), "skipped_count": self.skipped_count,
                "skip_warned": self._warned}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = list(state.get("skipped_steps", []))
        self.skipped_count = int(state.get("skipped_count", len(self.skipped_steps)))
        self._warned = bool(state.get("skip_warned", False))
        self._reported = self.skipped_count

    def report_skipped(self, trainer: Trainer) -> None:
        """Once, at train end: how many records were skipped since the warning."""
        extra = self.skipped_count - self._reported
        if self._warned and extra > 1:
            rank_zero_info(f"{self.owner}: {self.skipped_count} step(s) with non-finite statistics were skipped in "
                           f"all (first ones: {self.skipped_steps[:10]}).")
        self._reported = self.skipped_count

    def add_listener(self, listener: Listener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def add_source(self, source: PendingRows) -> None:
        """Records that ``source`` keeps unmade (:class:`PendingRows`): counted as pending, and
        made into this log's records before any later record and before each flush."""
        if source not in self._sources:
            self._sources.append(source)

    def remove_source(self, source: PendingRows) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def _take_sources(self) -> None:
        for source in self._sources:
            if source.pending_count():
                source.drain()

    def record(self, step: int, values: dict[str, Tensor | float]) -> None:
        """Buffer one record (0-d tensors on the module's device, or numbers); no host sync."""
        if not values:
            return
        if self._sources:
            self._take_sources()
        names = tuple(values)
        buf, used = self._buffer, len(self._pending)
        if buf is not None and used:
            device = buf.device  # the rows since the last flush stay together
        else:
            device = next((v.device for v in values.values() if isinstance(v, Tensor)), torch.device("cpu"))
        vals = list(values.values())
        first = vals[0]
        if isinstance(first, Tensor) and all(isinstance(v, Tensor) and v.dim() == 0 and v.dtype == first.dtype
                                             and v.device == device for v in vals):
            row = torch.stack(vals).detach()  # the usual case: one kernel; copy_ below converts to float64
        else:
            row = torch.stack([v.detach().reshape(()).to(device=device, dtype=torch.float64) if isinstance(v, Tensor)
                               else torch.tensor(float(v), dtype=torch.float64, device=device) for v in vals])
        self._store(step, names, row, used)

    def record_row(self, step: int, names: tuple[str, ...], row: Tensor) -> None:
        """Buffer one record given as a 1-d tensor of ``len(names)`` values (one copy; the
        per-step path of :class:`GradientDispersion`, which computes its values as one vector)."""
        if self._sources:
            self._take_sources()
        used = len(self._pending)
        if self._buffer is not None and used and row.device != self._buffer.device:
            row = row.to(self._buffer.device)
        self._store(step, names, row, used)

    def record_rows(self, steps: list[int], names: tuple[str, ...], rows: Tensor) -> None:
        """Buffer ``len(steps)`` records given as the rows of ``rows`` (``[k, len(names)]``; one
        copy for all: a :class:`PendingRows` source's)."""
        used = len(self._pending)
        if self._buffer is not None and used and rows.device != self._buffer.device:
            rows = rows.to(self._buffer.device)
        buf = self._room(used, len(steps), len(names), rows.device)
        buf[used:used + len(steps), :len(names)].copy_(nograd(rows))
        self._pending.extend((step, names, used + j) for j, step in enumerate(steps))

    def _room(self, used: int, more: int, width: int, device: torch.device) -> Tensor:
        """The buffer, grown (by doubling, the ``used`` rows kept) when it cannot take ``more``
        records of ``width`` values on ``device``."""
        buf = self._buffer
        if buf is None or buf.device != device or buf.shape[1] < width or used + more > buf.shape[0]:
            width = max(width, buf.shape[1] if buf is not None else 0)
            grown = torch.full((max(64, 2 * (used + more)), width), math.nan, dtype=torch.float64, device=device)
            if used:
                grown[:used, :buf.shape[1]].copy_(buf[:used])
            self._buffer = buf = grown
            # its rows as views, made in one op: a record then costs one copy (a row taken by
            # indexing, and a detach, were two more ops a measured step: ~10 µs each in a step)
            self._rows = grown.unbind(0)
        return buf

    def _store(self, step: int, names: tuple[str, ...], row: Tensor, used: int) -> None:
        buf = self._room(used, 1, len(names), row.device)
        dest = self._rows[used] if buf.shape[1] == len(names) else buf[used, :len(names)]
        dest.copy_(nograd(row))
        self._pending.append((step, names, used))

    def __len__(self) -> int:
        return len(self._pending) + sum(source.pending_count() for source in self._sources)

    def clear(self) -> None:
        self._pending.clear()
        self._buffer = None
        self._rows = ()

    def flush(
        self, trainer: Trainer, pl_module: LightningModule | None = None, epoch_end: bool = False
    ) -> list[StepRecord]:
        """Copy the buffer to the host once, log and dispatch it; returns the finite records.

        ``pl_module`` is given from hooks where ``pl_module.log`` is allowed (``epoch_end`` for
        the epoch-level hooks, which Lightning lets log only ``on_epoch``); from others
        (``on_train_end``) only the loggers are written.
        """
        if self._sources:
            self._take_sources()
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        assert self._buffer is not None
        rows = self._buffer[: len(pending)].cpu().tolist()  # the one device→host copy
        records: list[StepRecord] = []
        bad: list[int] = []
        for step, names, i in pending:
            host = dict(zip(names, rows[i]))
            if self.log_nonfinite or all(math.isfinite(x) for x in host.values()):
                records.append(StepRecord(step, host))
            else:
                bad.append(step)
        if bad:
            if len(self.skipped_steps) < 100:
                self.skipped_steps.extend(bad[: 100 - len(self.skipped_steps)])
            self.skipped_count += len(bad)
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"{self.owner}: non-finite statistics (NaN/inf loss or gradients, or a measurement said to have "
                    f"failed) at step {bad[0]}; that step is skipped (later ones are counted and reported at the end "
                    "of training).",
                    category=RuntimeWarning,
                )
        written = records if self.every_record else records[-1:]
        for logger in trainer.loggers:
            for rec in written:
                logger.log_metrics(rec.values, step=rec.step)
        if records:
            self.latest.update(records[-1].values)
            self.latest_step.update(dict.fromkeys(records[-1].values, records[-1].step))
            if pl_module is not None:
                self._expose(trainer, pl_module, records[-1].values, epoch_end)
            for listener in self._listeners:
                listener(records)
        return records

    def _expose(self, trainer: Trainer, pl_module: LightningModule, latest: dict[str, float], epoch_end: bool) -> None:
        """Make the latest values visible to ``EarlyStopping``/``ModelCheckpoint`` (``trainer.callback_metrics``)
        and the progress bar.

        ``pl_module.log`` costs about 0.8 ms per call on the CPU (Lightning's result collection
        walks its arguments several times): with seven dispersion values at every logging step it
        was half of ``GradientDispersion``'s cost on the main job (0.5 of 0.94 s over 630 steps,
        cProfile). A value that is not shown in the progress bar goes straight into the dict behind
        ``trainer.callback_metrics`` — what ``self.log(..., logger=False)`` would leave there — and
        only progress-bar values take ``pl_module.log``.
        """
        store = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
        for name, value in latest.items():
            if store is None or name in self.prog_bar:
                pl_module.log(name, value, logger=False, prog_bar=name in self.prog_bar, on_step=not epoch_end,
                              on_epoch=epoch_end, batch_size=1)
            else:
                store[name] = torch.tensor(value, dtype=torch.float32)


def mark_run_complete(trainer: Trainer) -> None:
    """Write ``run/complete = 1`` at the final optimizer step to every logger, once per run (any
    genbounds callback calls it from ``on_fit_end``): ``genbounds gate|report|compare`` treat a run
    without it as ended before ``Trainer.fit`` finished."""
    step = int(trainer.global_step)
    if trainer.__dict__.get("_genbounds_run_complete") == step:
        return
    trainer.__dict__["_genbounds_run_complete"] = step
    for logger in trainer.loggers:
        logger.log_metrics({"run/complete": 1.0}, step=int(trainer.global_step))
        logger.save()


class FlushesStepLog:
    """Mixin for callbacks owning a ``step_log``: flush it on Lightning's logging steps, at every
    epoch end and at train end (subclasses extending a hook call ``super()``)."""

    step_log: StepLog

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if is_log_step(trainer):
            self.step_log.flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.step_log.flush(trainer, pl_module, epoch_end=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.step_log.flush(trainer)
