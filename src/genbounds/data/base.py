"""Shared pieces of genbounds' data modules: a reproducible shuffling sampler, label noise and a
base ``LightningDataModule`` with a training split and a held-out split."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset


class EpochSeededSampler(Sampler[int]):
    """Random permutation per epoch from ``seed + epoch`` — independent of the global RNG.

    Lightning calls ``set_epoch`` at every epoch, so the data order of epoch ``e`` is the same in
    an uninterrupted run and in a run resumed from a checkpoint, and no callback that consumes
    global random numbers could ever change it. It is the permutation ``DistributedSampler``
    draws (``randperm(n)`` from a generator seeded with ``seed + epoch``), so under DDP, where
    :class:`SupervisedDataModule` shards with ``DistributedSampler(seed=seed)``, the ranks'
    interleaved shares make up the same global batches as one process (per-rank batch size
    ``b / world_size``).
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.n = len(data_source)
        self.seed = seed
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None
        """``(epoch, samples)``: on a mid-epoch resume, skip that many samples of that epoch's
        permutation (once; an epoch that was already complete starts at 0)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        start = 0
        if self.resume_at is not None:
            if self.resume_at[0] == self.epoch:
                start = self.resume_at[1]
            self.resume_at = None
        return iter(order[start:])

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can resume mid-epoch (``state_dict``/``load_state_dict``):
    the state is the epoch and the number of batches the trainer has completed in it; on resume
    the epoch's permutation (:class:`EpochSeededSampler`) continues where it stopped, so a run
    killed mid-epoch and resumed sees exactly the batches of an uninterrupted run."""

    def __init__(self, *args: object, progress: object = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        completed = int(self._progress()) if callable(self._progress) else 0
        epoch = int(getattr(self.sampler, "epoch", 0))
        return {"epoch": epoch, "batches": completed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if isinstance(sampler, (EpochSeededSampler, DistributedSampler)):
            sampler.set_epoch(int(state.get("epoch", 0)))
        skip = int(state.get("batches", 0)) * int(self.batch_size or 1)
        if isinstance(sampler, EpochSeededSampler):
            sampler.resume_at = (int(state.get("epoch", 0)), skip)


def corrupt_labels(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Replace the labels of a ``fraction`` of the samples (chosen at random) by labels drawn
    uniformly from all classes — seed 001 §5's label noise (a replaced label may coincide with
    the true one, as in the paper's protocol)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {fraction}")
    labels = labels.clone()
    n = labels.shape[0]
    count = int(round(fraction * n))
    if count == 0:
        return labels
    idx = torch.randperm(n, generator=generator)[:count]
    labels[idx] = torch.randint(0, num_classes, (count,), generator=generator, dtype=labels.dtype)
    return labels


def seeded_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A uniformly random subset of ``size`` samples (the whole dataset for ``None``)."""
    n = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= n:
        return dataset
    gen = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(n, generator=gen)[:size].tolist())


class SupervisedDataModule(LightningDataModule):
    """A training split and a held-out split (the validation loader, which genbounds uses as
    the population stand-in ``S'``). Subclasses fill ``self.train_set`` / ``self.val_set`` in
    :meth:`build`.

    Args:
        batch_size: training and validation batch size.
        seed: seeds the split, the label noise and the per-epoch shuffling.
        shuffle: shuffle the training set (reproducibly, see :class:`EpochSeededSampler`).
        num_workers: dataloader worker processes.
        drop_last: drop the last incomplete training batch.
    """

    def __init__(self, batch_size: int = 60, seed: int = 0, shuffle: bool = True, num_workers: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def build(self) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.build()

    @property
    def num_train(self) -> int:
        """``n``: the number of training samples."""
        if self.train_set is None:
            self.build()
        return len(self.train_set)  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        trainer = self.trainer
        sampler: Sampler[int] | None
        if trainer is not None and trainer.world_size > 1:
            # shard explicitly (Lightning leaves a DistributedSampler alone): the ranks' interleaved
            # shares of the same permutation EpochSeededSampler draws
            sampler = DistributedSampler(self.train_set, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                         shuffle=self.shuffle, seed=self.seed)
        else:
            sampler = EpochSeededSampler(self.train_set, self.seed) if self.shuffle else None  # type: ignore[arg-type]
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
            progress=self._completed_batches,
        )

    def _completed_batches(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        # batches whose step is done: at on_train_batch_end (where checkpoints are saved) the current
        # batch is "processed" but not yet "completed"
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set, batch_size=self.batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
