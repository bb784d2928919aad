"""Top Hessian eigenvalue by power iteration (SPEC §5).

Power iteration converges to the eigenvalue of largest *magnitude*; near a minimum that is the
top eigenvalue, but if a negative eigenvalue dominates it is returned (negative), which is
reported as is. The iteration stops when the Rayleigh quotient changes by less than ``tol``
relative, or after ``max_iter`` products; the residual ``‖Hv − λv‖`` is returned as the
accuracy of the result (power iteration is deterministic given its start, so it has no Monte
Carlo standard error). A warm start from the previous call's vector cuts the iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from genbounds.estimators.functional import dot, sq_norm, writable_in_place
from genbounds.estimators.hessian_vector_product import LossHessian, gaussian_like


@dataclass
class EigenEstimate:
    value: float
    """Rayleigh quotient ``vᵀHv`` of the final unit vector."""
    residual: float
    """``‖Hv − λv‖`` of the final vector (0 for an exact eigenvector)."""
    iterations: int
    converged: bool
    vector: list[Tensor] | None
    """The final unit vector (the next call's warm start); ``None`` when it is not finite."""


def top_eigenvalue(
    hessian: LossHessian,
    generator: torch.Generator,
    *,
    init: list[Tensor] | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> EigenEstimate:
    """Power iteration on ``hessian`` (one HVP and one host sync per iteration)."""
    usable = init is not None and all(bool(torch.isfinite(x).all()) for x in init) and float(sq_norm(init)) > 0
    v = init if usable else [t[0] for t in gaussian_like(hessian.params, 1, generator)]
    v = _normalized(v)  # type: ignore[arg-type]
    # (a caller that passes its only reference frees the warm start here, before any product, where
    # the interpreter does not hold the call's arguments in the caller's frame: CPython 3.11 on)
    init = None
    value = math.nan
    hv = hessian.hvp(v)
    for it in range(1, max_iter + 1):
        new_value = float(dot(v, hv))
        converged = it > 1 and abs(new_value - value) <= tol * (abs(value) + 1e-12)
        value = new_value
        norm = float(sq_norm(hv))
        if converged or not math.isfinite(norm) or norm == 0.0:
            # Hv = 0 (a zero Hessian) has no direction to follow: v is an eigenvector of 0
            converged = converged or norm == 0.0
            break
        # the next direction in the product's own storage: the last direction goes before the
        # next product, which runs beside one vector, not three
        v = _normalized(hv, in_place=True)
        hv = hessian.hvp(v)
    else:
        it, converged = max_iter, False
        value = float(dot(v, hv))
    # (one tensor's residual at a time: the same sums as the whole list's)
    residual = float(torch.stack([sq_norm([h - value * x]) for h, x in zip(hv, v)]).sum().sqrt())
    vector = [x.detach() for x in v]
    if not all(bool(torch.isfinite(x).all()) for x in vector):
        vector = None  # never carry a non-finite warm start into the next probe
    return EigenEstimate(value, residual, it, converged, vector)


def _normalized(v: list[Tensor], in_place: bool = False) -> list[Tensor]:
    """``v / ‖v‖``; with ``in_place``, in ``v``'s own storage where it may be written (a product
    autograd hands two parameters, or an expanded one, is divided out of place: the same bits)."""
    norm = sq_norm(v).sqrt().to(v[0].dtype)
    if not in_place:
        return [x / norm for x in v]
    return [x.div_(norm) if ok else x / norm for x, ok in zip(v, writable_in_place(v))]


__all__ = ["EigenEstimate", "top_eigenvalue"]
