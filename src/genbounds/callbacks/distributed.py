"""Reductions over DDP ranks for the callbacks (every rank must call them on the same steps)."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from genbounds.estimators.functional import Reduce
from genbounds.estimators.gradient_dispersion import GradientMoments


def mean_over_ranks(trainer: Trainer) -> Reduce | None:
    """The estimators' ``reduce``: a mean over ranks, or ``None`` in a single process."""
    if trainer.world_size <= 1:
        return None
    strategy = trainer.strategy

    def reduce(t: Tensor) -> Tensor:
        return strategy.reduce(t, reduce_op="mean")

    return reduce


def reason_from_every_process(trainer: Trainer, reason: str, elsewhere: bool) -> str:
    """The reason a computation failed, where it failed: under DDP, every process being here at
    once (all raised at the same collective, ``estimators/collective.py``), one gathering of the
    processes' reasons — a process told it failed elsewhere (``elsewhere``) gets the first real
    one, named by its process (only process 0 warns; the op's name was in another's error).
    ``reason`` itself in one process."""
    if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return reason
    reasons: list[str | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(reasons, None if elsewhere else reason)
    if not elsewhere:
        return reason
    for rank, their in enumerate(reasons):
        if their is not None:
            return f"{their} (in process {rank})"
    return reason


def reason_anywhere(trainer: Trainer, reason: str | None) -> str | None:
    """:func:`reason_from_every_process` for a reason a process may not have (``None``): this
    process's own, else the first other process's (named), else ``None`` — the same decision in
    every process."""
    return reason_from_every_process(trainer, reason or "", elsewhere=reason is None) or None


def reduce_moments(trainer: Trainer, moments: GradientMoments) -> GradientMoments:
    """Sum the moments over DDP ranks (every rank calls this on the same steps)."""
    strategy = trainer.strategy
    device = moments.weighted_sq_norm_sum.device
    # (the failure count rides in the same collective: estimators.gradient_dispersion.GradientMoments.failed)
    scalars = [moments.weighted_sq_norm_sum.double(),
               torch.tensor(float(moments.num_samples), dtype=torch.float64, device=device),
               torch.tensor(float(moments.num_units), dtype=torch.float64, device=device),
               torch.as_tensor(moments.failed, dtype=torch.float64, device=device).reshape(())]
    if moments.centered_sums is not None:
        s, s2, c = moments.centered_sums
        scalars += [s.to(device), s2.to(device), torch.tensor(float(c), dtype=torch.float64, device=device)]
    head = len(scalars)
    # the per-group sums ride in the same collective (they were dropped: no per-layer values under DDP)
    groups = [] if moments.group_sq is None else [moments.group_sq.double().to(device).reshape(-1)]
    packed = strategy.reduce(torch.cat([torch.stack(scalars), *groups]), reduce_op="sum")
    summed = None
    if moments.weighted_sum is not None:
        flat = torch.cat([w.reshape(-1) for w in moments.weighted_sum])
        flat = strategy.reduce(flat, reduce_op="sum")
        summed, start = [], 0
        for w in moments.weighted_sum:
            summed.append(flat[start : start + w.numel()].view_as(w))
            start += w.numel()
    centered = (packed[4], packed[5], packed[6]) if moments.centered_sums is not None else None
    return GradientMoments(
        weighted_sq_norm_sum=packed[0],
        num_samples=packed[1],
        num_units=packed[2],
        weighted_sum=summed,
        centered_sums=centered,
        group_sq=packed[head:] if moments.group_sq is not None else None,
        failed=packed[3],
    )
