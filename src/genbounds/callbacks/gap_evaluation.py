"""The measured gap: per-sample losses (and 0-1 errors) of the training set and the held-out set
at the current weights, eval mode, in batches (:mod:`genbounds.bounds.gap` for the estimate).

By default the *whole* training set and the whole validation set are evaluated, so the training
mean is ``L_S(w)`` itself; ``gap_samples`` evaluates a seeded subset of each instead (the SE then
includes the subset's error). Dataset access runs under a forked RNG (augmentations drawn from
the global RNG are not disturbed). Under DDP every rank evaluates its share and the per-sample
values are gathered, so every rank computes the same gap and the same ``R``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import TensorDataset

from genbounds.bounds.gap import measured_gap
from genbounds.callbacks.isolation import isolated_pass
from genbounds.callbacks.loss_contract import LossContract
from genbounds.callbacks.probe_data import (
    PROBE_STREAM,
    collated_items,
    forked_rng,
    loader_collate,
    own_iterator,
    step_batch,
    trained_prefix,
    training_loader,
    validation_loader,
)
from genbounds.estimators.batching import batch_size


@dataclass
class GapResult:
    values: dict[str, float] = field(default_factory=dict)
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Every per-sample loss evaluated (training and held-out), for ``R``."""
    dropped: int = 0
    heldout_short: str | None = None

    def notes(self) -> list[tuple[str, str]]:
        """``(kind, message)`` for what the user should hear once: dropped values, a short held-out set."""
        out = []
        if self.dropped:
            out.append(("gap-nonfinite", f"{self.dropped} per-sample losses were NaN/inf at an evaluation; they are "
                        "left out of gap/measured (and R) and counted."))
        if self.heldout_short:
            out.append(("gap-short", self.heldout_short))
        return out


class GapEvaluation:
    def __init__(self, owner: str, samples: int | None, chunk: int | None, mode: str) -> None:
        self.owner = owner
        self.samples = samples
        self.chunk = chunk
        self.mode = mode
        self.contract: LossContract | None = None
        self.heldout_available = False
        self._train_loader: Any = None
        self._val_loader: Any = None
        self._train_indices: list[int] | None = None
        self._val_indices: list[int] | None = None
        self._short_reported = False
        self.prefix: int | None = None

    def prepare(self, trainer: Trainer, contract: LossContract) -> None:
        self.contract = contract
        self._train_loader = training_loader(trainer)
        self._val_loader = validation_loader(trainer)
        self.heldout_available = self._val_loader is not None
        # (the samples the fit trains on, when they are a prefix of the training set)
        self.prefix = prefix = trained_prefix(trainer, self._train_loader)
        self._train_indices = self._indices(trainer, self._train_loader, seeded=True, prefix=prefix)
        self._val_indices = self._indices(trainer, self._val_loader, seeded=False)

    def _indices(self, trainer: Trainer, loader: Any, seeded: bool, prefix: int | None = None) -> list[int] | None:
        """This rank's share of the samples to evaluate (every sample once over the ranks; the
        first ``prefix`` only, when given), or ``None`` for a dataset without random access (then
        the loader is iterated)."""
        dataset = getattr(loader, "dataset", None)
        with forked_rng(trainer):  # __getitem__ may draw an augmentation from the global RNG
            try:
                n = len(dataset)  # type: ignore[arg-type]
                dataset[0]  # type: ignore[index]
            except Exception:  # noqa: BLE001 - iterable datasets
                return None
        n = prefix or n
        if self.samples is None or self.samples >= n:
            order = torch.arange(n)
        elif seeded:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(PROBE_STREAM))[: self.samples]
        else:
            order = torch.arange(self.samples)
        return order[trainer.global_rank::trainer.world_size].tolist()

    def _chunks_from_dataset(self, trainer: Trainer, loader: Any, indices: list[int], stage: str) -> Any:
        size = self.chunk or getattr(loader, "batch_size", None) or 64
        collate = loader_collate(loader)
        dataset = loader.dataset
        if type(dataset) is TensorDataset and collate is torch.utils.data.default_collate:
            # what default_collate makes of its items, by one index per tensor: no per-sample
            # __getitem__ and stack (one gap evaluation of the main job: 8.9-9.4 -> 4.7-5.1 ms)
            order = torch.as_tensor(indices)
            for start in range(0, len(indices), size):
                rows = order[start:start + size]
                # (contiguous, as torch.stack makes it: a channels_last dataset keeps its strides)
                yield step_batch(trainer, [t[rows].contiguous() for t in dataset.tensors], stage)
            return
        for start in range(0, len(indices), size):
            yield step_batch(trainer, collated_items(trainer, loader, indices[start:start + size]), stage)

    def _chunks_from_loader(self, trainer: Trainer, loader: Any, limit: int | None, stage: str) -> Any:
        seen = 0
        with forked_rng(trainer), own_iterator(loader) as iterator:
            while limit is None or seen < limit:
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                seen += batch_size(batch)
                yield step_batch(trainer, batch, stage)

    def _evaluate(self, module: LightningModule, chunks: Any, rows: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
        assert self.contract is not None
        losses, errors, unit = [], [], 1
        for batch in chunks:  # a sample with NaN/inf inputs gives a NaN loss: dropped and counted later
            if rows:
                both = self.contract.losses_and_errors(module, batch).detach().double()
                losses.append(both[0].cpu())
                errors.append(both[1].cpu())
            else:
                out = self.contract(module, batch).detach().double().reshape(-1)
                if out.numel() == 1 and batch_size(batch) > 1:
                    unit = batch_size(batch)
                losses.append(out.cpu())
        loss = torch.cat(losses).numpy() if losses else np.zeros(0)
        err = torch.cat(errors).numpy() if errors else None
        return loss, err, unit

    def measure(self, trainer: Trainer, module: LightningModule) -> GapResult:
        assert self.contract is not None
        rows = self.contract.per_sample and self.contract.errors_available
        result = GapResult()
        with isolated_pass(module, mode=self.mode, grad=False):  # type: ignore[arg-type]
            train_chunks = self._chunks_from_dataset(trainer, self._train_loader, self._train_indices, "train") \
                if self._train_indices is not None else \
                self._chunks_from_loader(trainer, self._train_loader, self.samples or 10_000, "train")
            val_chunks = self._chunks_from_dataset(trainer, self._val_loader, self._val_indices, "validate") \
                if self._val_indices is not None else \
                self._chunks_from_loader(trainer, self._val_loader, self.samples, "validate")
            tr_loss, tr_err, unit = self._evaluate(module, train_chunks, rows)
            he_loss, he_err, _ = self._evaluate(module, val_chunks, rows)
        tr_loss, he_loss = _gather(trainer, tr_loss), _gather(trainer, he_loss)
        n = None if self._train_indices is None else (
            len(self._train_indices) * trainer.world_size if self.samples is None else _dataset_len(self._train_loader))
        gap = measured_gap(tr_loss, he_loss, n, train_is_means_of=None if unit == 1 else unit)
        result.values = {"gap/measured": gap.gap, "gap/measured_se": gap.standard_error,
                         "gap/train_loss": gap.train, "gap/heldout_loss": gap.heldout}
        if tr_err is not None and he_err is not None:
            tr_err, he_err = _gather(trainer, tr_err), _gather(trainer, he_err)
            eg = measured_gap(tr_err, he_err, n)
            result.values.update({"gap/error": eg.gap, "gap/error_se": eg.standard_error,
                                  "gap/train_error": eg.train, "gap/heldout_error": eg.heldout})
        result.losses = np.concatenate([tr_loss, he_loss]) if unit == 1 else np.zeros(0)
        result.dropped = gap.dropped
        if self.samples is not None and gap.heldout_count < self.samples and not self._short_reported:
            self._short_reported = True
            result.heldout_short = (f"the held-out set has {gap.heldout_count} samples, fewer than gap_samples="
                                    f"{self.samples}; gap/measured uses all {gap.heldout_count}.")
        return result


def _dataset_len(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (TypeError, AttributeError):
        return None


def _gather(trainer: Trainer, values: np.ndarray) -> np.ndarray:
    """All ranks' per-sample values (padded with NaN to equal length, padding removed)."""
    if trainer.world_size <= 1:
        return values
    device = trainer.strategy.root_device
    local = torch.as_tensor(values, dtype=torch.float64, device=device)
    count = torch.tensor([local.numel()], device=device)
    counts = trainer.strategy.all_gather(count).reshape(-1)
    width = int(counts.max())
    padded = torch.full((width,), float("nan"), dtype=torch.float64, device=device)
    padded[: local.numel()] = local
    gathered = trainer.strategy.all_gather(padded).reshape(-1, width)
    return torch.cat([row[: int(c)] for row, c in zip(gathered, counts)]).cpu().numpy()
