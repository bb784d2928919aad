"""Reductions over DDP processes that a failure in one process cannot leave hanging.

A probe's reductions — each Hessian-vector product (:class:`~genbounds.estimators.hessian_vector_product.LossHessian`),
each loss and gradient at perturbed weights (:class:`~genbounds.estimators.perturbation.PerturbedLoss`:
``Flatness``, ``GradientSensitivity``, ``HessianContractivity``), the weighted dispersion's chunk
gradients, ``HeldoutGradient``'s moments — are collectives over the processes. When the local part
fails in one process only — a layer without a second derivative in a branch that process alone
takes, met mid-fit — that process leaves the probe while the others wait in the collective for
it: the two processes' collectives no longer match, and the fit dies (a test's process 1 ended
with SIGABRT) or hangs. :func:`fail_together` runs the local part and then reduces two flags in
every process — failed or not — so every process reaches the same small collective, reads the
same flags and raises there: the error itself where it happened, :class:`FailedElsewhere` in
the others. The values are reduced only after it (:func:`reduce_computed`): a failed process
needs no stand-in of their shapes and dtypes. Every process then takes the same decision: a missing
second derivative leaves the probe out in every process — only where no process failed
otherwise; any other failure in any process ends the fit in every process (a process whose own
failure was a missing derivative raises :class:`FailedElsewhere` then, its error as the cause).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def fail_together(compute: Callable[[], Any], reduce: Reduce | None, device: torch.device) -> Any:
    """``compute()`` — where, under DDP (``reduce`` given), its failure in any process raises in
    every process here (module docstring): each process reduces two flags (``[failed otherwise,
    failed for a missing second derivative]``, one small collective on ``device`` and one read of
    it on the host) before anything else. Then a process that failed raises its error (a missing
    derivative here and another failure elsewhere: :class:`FailedElsewhere`, the fit ends), the
    others :class:`FailedElsewhere`. One process: ``compute()``."""
    if reduce is None:
        return compute()
    failed: BaseException | None = None
    try:
        local = compute()
    except Exception as err:  # noqa: BLE001 - re-raised below, in every process alike
        failed, local = err, None
    second = failed is not None and not_twice_differentiable(failed)
    flags = torch.tensor([float(failed is not None and not second), float(second)], device=device)
    other, second_order = (float(v) for v in reduce(flags).tolist())
    if failed is not None:
        if second and other > 0.0:  # (another process failed otherwise: the fit ends everywhere)
            raise FailedElsewhere(second_order=False) from failed
        raise failed
    if other > 0.0 or second_order > 0.0:
        raise FailedElsewhere(second_order=other == 0.0)
    return local


def reduce_computed(compute: Callable[[], list[Tensor]], reduce: Reduce | None, device: torch.device) -> list[Tensor]:
    """``reduce_all(compute(), reduce)``, where ``compute`` failing in one process raises in every
    process (:func:`fail_together`) instead of leaving the others waiting in the collective. A
    probe's price: one more small collective and one host read a reduction (``LossHessian`` and
    ``PerturbedLoss`` take ``fail_together=False`` for the interventions that run every step)."""
    return reduce_all(fail_together(compute, reduce, device), reduce)


__all__ = ["FailedElsewhere", "fail_together", "not_twice_differentiable", "reduce_computed"]
