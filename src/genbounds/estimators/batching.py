"""Helpers that treat a batch (a tensor, or a tuple / list / dict of tensors) as one object.

Every estimator takes the batch exactly as the dataloader yields it and hands it to the user's
loss function; these helpers only slice it along the leading (sample) dimension. Non-tensor leaves
(strings, ints) are passed through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def map_tensors(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor leaf of ``batch``, keeping the container structure."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_tensors(v, fn) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def tensor_leaves(batch: Any) -> list[Tensor]:
    """All tensor leaves of ``batch`` in a fixed order (that of :func:`map_tensors`)."""
    leaves: list[Tensor] = []
    _collect(batch, leaves)
    return leaves


def _collect(batch: Any, leaves: list[Tensor]) -> None:
    # map_tensors' traversal without rebuilding the containers (batch_size runs on every
    # measured step)
    if isinstance(batch, Tensor):
        leaves.append(batch)
    elif isinstance(batch, Mapping):
        for v in batch.values():
            _collect(v, leaves)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            _collect(v, leaves)


def batch_size(batch: Any) -> int:
    """Number of samples: the leading dimension shared by every tensor leaf.

    Raises:
        ValueError: when the batch has no tensor, a 0-d tensor, or leaves of different lengths.
    """
    if type(batch) in (tuple, list) and all(type(t) is Tensor for t in batch):
        leaves = batch  # (the common (x, y): no walk, on every measured step)
    else:
        leaves = tensor_leaves(batch)
    sizes = {t.shape[0] if t.dim() > 0 else None for t in leaves}
    if not sizes or None in sizes or len(sizes) != 1:
        raise ValueError(
            "genbounds needs a batch whose tensor leaves share one leading (sample) dimension; "
            f"got leading sizes {sorted(s for s in sizes if s is not None)}"
            + (" and 0-d tensors" if None in sizes else "")
        )
    return sizes.pop()


def index_batch(batch: Any, index: Tensor | slice) -> Any:
    """The sub-batch ``batch[index]`` taken on every tensor leaf."""
    return map_tensors(batch, lambda t: t[index])


def split_sizes(total: int, parts: int) -> list[int]:
    """``parts`` sizes as equal as possible that add up to ``total`` (larger ones first)."""
    if parts < 1 or parts > total:
        raise ValueError(f"cannot split {total} samples into {parts} non-empty parts")
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def split_batch(batch: Any, sizes: Sequence[int], order: Tensor | None = None) -> list[Any]:
    """Split ``batch`` into consecutive chunks of the given sizes, after reordering by ``order``."""
    chunks = []
    start = 0
    for size in sizes:
        if order is None:
            chunks.append(index_batch(batch, slice(start, start + size)))
        else:
            chunks.append(index_batch(batch, order[start : start + size]))
        start += size
    return chunks


def batch_device(batch: Any) -> torch.device:
    """Device of the first tensor leaf (CPU when there is none)."""
    leaves = tensor_leaves(batch)
    return leaves[0].device if leaves else torch.device("cpu")


def move_batch(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor leaf moved to ``device`` (a no-op for leaves already there)."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the sample dimension."""
    first = batches[0]
    leaves_per_batch = [tensor_leaves(b) for b in batches]
    merged = iter([torch.cat(parts, dim=0) for parts in zip(*leaves_per_batch)])
    return map_tensors(first, lambda _t: next(merged))
