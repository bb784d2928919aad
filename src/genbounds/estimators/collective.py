"""Reductions over DDP processes that a failure in one process cannot leave hanging.

A probe's Hessian-vector products are each averaged over the processes (one collective a
product, :class:`~genbounds.estimators.hessian_vector_product.LossHessian`). When the product
fails in one process only — a layer without a second derivative in a branch that process alone
takes, met mid-fit — that process leaves the probe while the others wait in the collective for
it: the two processes' collectives no longer match, and the fit dies (a test's process 1 ended
with SIGABRT) or hangs. :func:`reduce_computed` runs the local part and reduces it *with a flag*; the
failing process reduces zeros of the result's shapes instead, so every process reaches the same
collective, reads the same flags and raises there: the error itself where it happened,
:class:`FailedElsewhere` in the others. Every process then takes the same decision: a missing
second derivative leaves the probe out in every process — only where no process failed
otherwise; any other failure in any process ends the fit in every process (a process whose own
failure was a missing derivative raises :class:`FailedElsewhere` then, its error as the cause).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from genbounds.estimators.functional import Reduce, reduce_all


def not_twice_differentiable(err: BaseException) -> bool:
    """Whether ``err`` says an op of the model has no second derivative (or no forward-mode one),
    here or in another process (:class:`FailedElsewhere`)."""
    if isinstance(err, FailedElsewhere):
        return err.second_order
    if not isinstance(err, (RuntimeError, NotImplementedError)):
        return False
    text = str(err).lower()
    return (("derivative for" in text and "not implemented" in text)
            or ("forward" in text and ("ad" in text.split() or "jvp" in text)
                and any(m in text for m in ("not implemented", "not support", "must implement")))
            or "double backward" in text or "differentiate twice" in text or "once_differentiable" in text)


class FailedElsewhere(RuntimeError):
    """The computation reduced over the processes failed in another one (``second_order``: its
    error said an op has no second derivative — :func:`not_twice_differentiable`)."""

    def __init__(self, second_order: bool) -> None:
        what = "an op of the model has no second derivative there" if second_order else "see that process's error"
        super().__init__(f"a computation averaged over the DDP processes failed in another process ({what})")
        self.second_order = second_order


def reduce_computed(compute: Callable[[], list[Tensor]], like: Callable[[], list[Tensor]],
                    reduce: Reduce | None) -> list[Tensor]:
    """``reduce_all(compute(), reduce)``, where ``compute`` failing in one process raises in every
    process at this collective (module docstring) instead of leaving the others waiting in it.

    ``like()``: zeros of the shapes and dtype ``compute()`` returns (what a failed process
    reduces). Two flags ride in the same collective, so it costs one reading of them on the host
    (``LossHessian``'s callers are probes; the per-step regularizer opts out: ``fail_together``)."""
    if reduce is None:
        return compute()
    failed: BaseException | None = None
    try:
        local = compute()
    except Exception as err:  # noqa: BLE001 - re-raised below, in every process alike
        failed, local = err, like()
    second = failed is not None and not_twice_differentiable(failed)
    ref = local[0]
    flags = torch.tensor([float(failed is not None and not second), float(second)], dtype=ref.dtype, device=ref.device)
    out = reduce_all([*local, flags], reduce)
    other, second_order = (float(v) for v in out[-1].tolist())
    if failed is not None:
        if second and other > 0.0:  # (another process failed otherwise: the fit ends everywhere)
            raise FailedElsewhere(second_order=False) from failed
        raise failed
    if other > 0.0 or second_order > 0.0:
        raise FailedElsewhere(second_order=other == 0.0)
    return out[:-1]


__all__ = ["FailedElsewhere", "not_twice_differentiable", "reduce_computed"]
