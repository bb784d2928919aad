"""The probe sets: drawn once, before step 0, without touching the training run's random numbers.

* :func:`draw_training_subset` — a seeded uniform subset of the training set (not the loader's
  first batch, which is the first training batch ``B_1``), collated like the loader's batches;
* :func:`draw_probe_batch` — the first full batches of a loader (the held-out set);
* :func:`screen_probe_set` — samples with a NaN/inf in any floating tensor, or whose loss at the
  start weights is not finite, are dropped (one bad pixel would otherwise turn every probe of the
  run into NaN), counted, and reported once.

Every access to a dataset runs under a forked RNG (CPU and the module's CUDA device): datasets
that draw their augmentation from the global RNG in ``__getitem__`` — the usual way — and loaders
whose workers take their seed from it see exactly the random numbers they would without us. A
loader with ``persistent_workers=True`` is read through an iterator of our own (shut down after
use), never through the one it keeps: that one draws its workers' base seed from the global RNG
once, when the loader is first iterated, and that must stay Lightning's first iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from genbounds.estimators.batching import batch_size, concat_batches, index_batch, tensor_leaves

PROBE_STREAM = 0x5EED_0F_9B0BE
"""Offset that separates the probe subsets' random stream from samplers seeded with small integers."""


@contextmanager
def forked_rng(trainer: Trainer) -> Iterator[None]:
    """torch's generators (CPU and the module's CUDA device), Python's ``random`` and NumPy's as they
    were after the block (a dataset or batch hook drawing its augmentation from NumPy shifted the
    run's stream: a review, round 34)."""
    from genbounds.callbacks.isolation import forked_host_rngs

    device = trainer.strategy.root_device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type == "cuda" else "cuda"), \
            forked_host_rngs():
        yield


def step_batch(trainer: Trainer, batch: Any, stage: str = "train") -> Any:
    """A loader's batch as Lightning hands it to a step: the precision plugin's input conversion
    (``64-true`` casts floating tensors to float64), the module's (or data module's)
    ``on_before_batch_transfer``, then the move to the device through ``transfer_batch_to_device``
    and ``on_after_batch_transfer`` — the probe sets, the loss contract's trial and the gap's
    batches skipped the first two, so a module that turns a dict batch into ``(x, y)`` in
    ``on_before_batch_transfer`` crashed before step 0, and ``64-true`` met float32 inputs (an
    engineer's walk, round 34). The hooks run under a forked RNG (augmentation drawn there, from
    torch, NumPy or ``random``, draws from a copy), with the trainer's stage ``stage``: for
    ``"validate"`` (the held-out set) as in Lightning's validation, the module in eval mode too;
    for ``"train"`` training (the gap's pass over the training set at a validation's end
    included). Both restored after."""
    batch = trainer.precision_plugin.convert_input(batch)
    module = trainer.lightning_module
    if module is None:
        return trainer.strategy.batch_to_device(batch)
    with forked_rng(trainer), _as_stage(trainer, module, stage):
        batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


@contextmanager
def _as_stage(trainer: Trainer, module: Any, stage: str) -> Iterator[None]:
    """The trainer's stage as ``stage`` (a training-set batch prepared at a validation's end, for
    the gap, still sees training); for ``"validate"`` the module in eval mode too. Restored after."""
    from lightning.pytorch.trainer.states import RunningStage

    before = trainer.state.stage
    modes = [(m, m.training) for m in module.modules()] if stage == "validate" else []
    trainer.state.stage = RunningStage.VALIDATING if stage == "validate" else RunningStage.TRAINING
    if stage == "validate":
        module.eval()
    try:
        yield
    finally:
        trainer.state.stage = before
        for m, mode in modes:
            m.training = mode


def first_loader(loaders: Any) -> Any:
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def training_loader(trainer: Trainer) -> Any:
    """The fit's training loader. Several (a list or dict given to ``fit``, which Lightning
    combines into one batch of batches) are refused before step 0: the per-sample quantities are
    defined on one training set, and a combined batch is not one batch of samples."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, (list, tuple, dict)):
        names = list(loaders) if isinstance(loaders, dict) else list(range(len(loaders)))
        raise MisconfigurationException(
            f"genbounds: this fit has {len(names)} training dataloaders ({', '.join(map(repr, names))}), which "
            "Lightning combines into one batch of batches; the genbounds callbacks measure per-sample quantities of "
            "one training set. Give fit one DataLoader (e.g. over a torch.utils.data.ConcatDataset, or a Dataset "
            "that returns what the loaders returned together), or leave the genbounds callbacks out of this fit.")
    return loaders


@contextmanager
def own_iterator(loader: Any) -> Iterator[Any]:
    """An iterator over ``loader`` that leaves the loader's own state alone: a ``DataLoader`` with
    persistent workers keeps the iterator of its first ``iter()`` (whose creation draws the
    workers' base seed from the global RNG) for its whole life; reading probe batches through it
    would take that first iteration away from the training run. Such a loader is read through a
    separate iterator, shut down afterwards; any other loader through ``iter(loader)``."""
    persistent = isinstance(loader, torch.utils.data.DataLoader) and loader.persistent_workers \
        and loader.num_workers > 0 and hasattr(loader, "_get_iterator")
    if not persistent:
        yield iter(loader)
        return
    iterator = loader._get_iterator()
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


def _loader_batches(loader: Any, size: int | None, count: int) -> Any:
    with own_iterator(loader) as iterator:
        return _collect_batches(iterator, size, count)


def _collect_batches(iterator: Any, size: int | None, count: int) -> Any:
    collected: list[Any] = []
    want = None if size is None else size * count
    have = 0
    first_size = None
    for batch in iterator:
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


def share_of(wanted: int | None, world: int) -> int | None:
    """A process's share of a probe set of ``wanted`` samples in all: under DDP each process takes
    ``⌊wanted / world⌋`` of its own shard (at least one), so the processes' probe sets together are
    one process's (the union of the interleaved shards' first samples) — a 2-process run probed
    twice the samples of a 1-process one, and reported other values (a DDP matrix, round 29). The
    shares are equal, as the processes' values are averaged with equal weights: a size that the
    number of processes does not divide is rounded down to one that it does (said by
    :func:`warn_if_short`)."""
    return wanted if wanted is None or world <= 1 else max(1, wanted // world)


def _own_part(loader: Any, size: int | None, count: int, world: int) -> Any:
    """This process's part of ``count`` probe batches — the first full batches (``size=None``: each
    process's own, the global batch divided among them), or its :func:`share_of` the first
    ``size × count`` samples."""
    if size is None:
        return _loader_batches(loader, None, count)
    return _loader_batches(loader, share_of(size * count, world), 1)


def draw_probe_batch(trainer: Trainer, loader: Any, size: int | None, count: int, stage: str = "validate") -> Any:
    """``count`` probe batches of one dataloader concatenated — the first full batches
    (``size=None``: each process's own, the global batch divided among them) or the first
    ``size × count`` samples in all, each process taking its share (:func:`share_of`) — prepared
    as Lightning prepares a batch of ``stage`` (:func:`step_batch`), on the module's device."""
    with forked_rng(trainer):
        batch = _own_part(loader, size, count, trainer.world_size)
    if batch is None:
        return None
    return step_batch(trainer, batch, stage)


def loader_collate(loader: Any) -> Callable[[list], Any]:
    """The loader's ``collate_fn`` (PyTorch's ``default_collate`` when it has none)."""
    return getattr(loader, "collate_fn", None) or torch.utils.data.default_collate


def collated_items(trainer: Trainer, loader: Any, indices: list[int]) -> Any:
    """Items ``indices`` of ``loader``'s dataset, read under forked RNGs (a ``__getitem__`` drawing
    its augmentation from the global RNGs), collated as the loader collates a batch."""
    with forked_rng(trainer):
        items = [loader.dataset[i] for i in indices]
    return loader_collate(loader)(items)


def draw_training_subset(trainer: Trainer, loader: Any, size: int | None, count: int, seed: int) -> Any:
    """A uniform random subset of the training set (seeded): ``size × count`` samples in all
    (``size`` defaults to the global batch: the loader's batch size times the processes), collated
    like the loader's batches and moved to the device. Under DDP every process draws the same
    subset — the one a single process draws — and keeps its interleaved share (it drew a subset
    ``world_size ×`` as large: round 29). Falls back to the loader's first batches (each process's
    share of them) for datasets without random access."""
    dataset = getattr(loader, "dataset", None)
    world = trainer.world_size
    in_all = (size or (getattr(loader, "batch_size", None) or 1) * world) * count
    with forked_rng(trainer):
        try:
            n = len(dataset)  # type: ignore[arg-type]
            dataset[0]  # type: ignore[index]
            n = trained_prefix(trainer, loader) or n  # (the samples trained on)
        except Exception:  # noqa: BLE001 - iterable datasets have no random access
            n = None
        if n is None:
            batch = _own_part(loader, size, count, world)
        else:
            rank = trainer.global_rank
            total = min(in_all, n)
            total = max(world, total - total % world)  # (equal shares: share_of)
            # a stream of its own: randperm from a plain `seed` would replay a data module's epoch-0
            # order when the two seeds agree (both default to 0), and the probe would be B_1 again
            stream = (seed * 0x9E3779B1 + PROBE_STREAM) % (2**63 - 1)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(stream))[:total]
            batch = collated_items(trainer, loader, order[rank::world].tolist())
    if batch is None:
        return None
    return step_batch(trainer, batch)


def training_trial_batch(trainer: Trainer, seed: int = 0) -> Any:
    """One training batch's worth of samples for the loss contract's trial (before step 0)."""
    loader = training_loader(trainer)
    size = getattr(loader, "batch_size", None)
    return draw_training_subset(trainer, loader, min(size, 64) if isinstance(size, int) else None, 1, seed)


def validation_loader(trainer: Trainer) -> Any:
    """The first validation dataloader, set up now if Lightning has not done so yet. With several,
    said once a fit: the held-out set of the gap and of every held-out probe is the first (the
    others' order decided which, silently, until round 32)."""
    if trainer.val_dataloaders is None:
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        except Exception:  # noqa: BLE001 - no validation data is a legitimate configuration
            return None
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple, dict)) and len(loaders) > 1 and not trainer.__dict__.get(_SAID_LOADERS):
        trainer.__dict__[_SAID_LOADERS] = True
        first = next(iter(loaders)) if isinstance(loaders, dict) else 0
        rank_zero_warn(f"genbounds: the Trainer has {len(loaders)} validation dataloaders; the held-out set of "
                       f"gap/measured and of every held-out probe is the first one ({first!r}), the others are not "
                       "used by genbounds. Put the held-out set the bounds should be compared with first.")
    return first_loader(loaders)


_SAID_LOADERS = "_genbounds_said_validation_loaders"


def num_train_samples(owner: str, num_train: int | None, trainer: Trainer) -> int:
    """``n`` as given (``num_train``), else :func:`training_set_size`; an error before step 0 when
    neither says it."""
    n = num_train or training_set_size(trainer)
    if n is None:
        raise MisconfigurationException(f"{owner} could not determine the number of training samples n from the "
                                        f"dataloader; pass {owner}(num_train=...).")
    return n


def trained_prefix(trainer: Trainer, loader: Any) -> int | None:
    """How many samples the fit trains on when that is a prefix of the training set: a loader that
    does not shuffle (``SequentialSampler``) limited to fewer batches than it has —
    ``overfit_batches`` (which turns shuffling off) or ``limit_train_batches`` — or dropping its
    last, short batch (``drop_last``) takes the same first samples every epoch; ``None`` otherwise
    (one process)."""
    batches = getattr(trainer, "num_training_batches", None)
    sampler = getattr(loader, "sampler", None)
    size = getattr(loader, "batch_size", None)
    if getattr(trainer, "world_size", 1) > 1 or not isinstance(sampler, torch.utils.data.SequentialSampler) \
            or not isinstance(size, int) or not isinstance(batches, int):
        return None
    try:
        n = len(loader.dataset)
    except TypeError:
        return None
    used = min(n, batches * size)
    return used if used < n else None


def training_set_size(trainer: Trainer) -> int | None:
    """``n``: the number of training samples (all ranks), when the loader has a sized dataset
    (the samples trained on, when that is a prefix of it: :func:`trained_prefix`)."""
    loader = training_loader(trainer)
    prefix = trained_prefix(trainer, loader)
    if prefix is not None:
        return prefix
    dm = trainer.datamodule
    if dm is not None and isinstance(getattr(dm, "num_train", None), int):
        return int(dm.num_train)
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


def screen_probe_set(trainer: Trainer, pl_module: Any, batch: Any, what: str, contract: Any, mode: str) -> Any:
    """The probe set without the samples that hold a NaN/inf input or whose loss at the start
    weights (the sets are drawn at ``on_train_start``) is not finite (``contract``: the suite's loss
    contract, evaluated in an isolated pass in ``mode``): one such sample would turn every probe
    mean into NaN. Said once per run and kind of set (the suite's callbacks draw the same sets);
    ``None`` when no sample is left."""
    from genbounds.callbacks.isolation import isolated_pass

    if batch is None:
        return None
    n = batch_size(batch)
    keep = torch.ones(n, dtype=torch.bool)
    for t in tensor_leaves(batch):
        if t.is_floating_point() and t.dim() > 0:
            keep &= torch.isfinite(t.reshape(n, -1)).all(1).cpu()
    if contract is not None and contract.per_sample and bool(keep.all()):
        with isolated_pass(pl_module, mode=mode, grad=False):
            losses = contract(pl_module, batch).reshape(-1)
        if losses.numel() == n:
            keep &= torch.isfinite(losses).cpu()
    dropped = int((~keep).sum())
    if not dropped:
        return batch
    warned = trainer.__dict__.setdefault("_genbounds_screened", set())
    if what not in warned:
        warned.add(what)
        rank_zero_warn(f"genbounds: {dropped} of {n} samples of the {what} hold NaN/inf values (or have a "
                       "non-finite loss); they are left out of every probe of this run.")
    return None if dropped == n else index_batch(batch, keep.nonzero().squeeze(1).to(tensor_leaves(batch)[0].device))


def warn_if_short(owner: str, batch: Any, wanted: int | None, what: str, world: int = 1) -> None:
    """Warn when a probe set has fewer samples than ``probe_batch_size × num_probe_batches`` — in
    all: under DDP each of the ``world`` processes holds its share (:func:`share_of`)."""
    if batch is None or wanted is None:
        return
    got, share = batch_size(batch), share_of(wanted, world)
    assert share is not None
    if got < share:
        rank_zero_warn(f"{owner}: the {what} has {got * world} samples, fewer than the {wanted} asked for "
                       f"(probe_batch_size × num_probe_batches); using all {got * world}.")
    elif world > 1 and wanted % world:
        rank_zero_warn(f"{owner}: the {what} holds {share * world} samples, not the {wanted} asked for: under DDP "
                       f"each of the {world} processes takes an equal share ({share}).")
