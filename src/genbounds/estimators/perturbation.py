"""Evaluating the loss and its gradient at many perturbed copies of the weights at once.

The real parameters are never written: each perturbed point ``w + Δ`` is a separate set of
tensors passed to ``torch.func.functional_call``, and ``torch.func.vmap`` evaluates ``m`` of
them in one pass (memory ``m × d`` for the points plus ``m ×`` the activations). ``m = 1`` runs
the same code without ``vmap`` — the sequential reference that ``benchmarks/probes.py`` compares
against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad as func_grad
from torch.func import vmap

from genbounds.estimators.batching import map_tensors
from genbounds.estimators.collective import fail_together
from genbounds.estimators.functional import (
    LossFn,
    ParamDict,
    Reduce,
    detached,
    functional_loss,
    reduce_all,
    row_dot64,
    trainable_parameters,
)
from genbounds.estimators.transform_thread import off_training_thread

Stacked = dict[str, Tensor]
"""Parameter dict whose tensors carry a leading dimension ``m`` (one row per point)."""


class PerturbedLoss:
    """Mean loss on ``batch`` as a function of the trainable parameters, evaluable at stacks of
    points. ``dtype`` (e.g. ``torch.float64``) evaluates in that precision: parameters, floating
    buffers and floating batch tensors are cast (the module itself is untouched). ``reduce``
    averages every loss and gradient over DDP ranks (see ``functional.Reduce``); a failure in one
    process raises in every process at that reduction (``estimators/collective.py``), unless
    ``fail_together`` is false — the plain reduction, for an intervention that runs every step (no
    host read a step; a failure in one process then leaves the others waiting until the process
    group's timeout)."""

    def __init__(self, module: nn.Module, loss_fn: LossFn, dtype: torch.dtype | None = None,
                 reduce: Reduce | None = None, rows: bool = False, fail_together: bool = True) -> None:
        self.module = module
        self.reduce = reduce
        self.fail_together = fail_together
        self.named = trainable_parameters(module)
        self.names = list(self.named)
        self.dtype = dtype
        self._f = functional_loss(module, loss_fn, rows=rows)
        self.base: ParamDict = {k: _cast(v, dtype) for k, v in detached(self.named).items()}
        self._extra: dict[str, Tensor] = {}
        if dtype is not None:  # (the frozen parameters too: a float32 one beside float64 ones raised)
            self._extra = {
                k: _cast(b.detach(), dtype)
                for k, b in [*module.named_buffers(), *module.named_parameters()]
                if b.is_floating_point() and k not in self.named
            }

    def prepare(self, batch: Any) -> Any:
        return map_tensors(batch, lambda t: _cast(t, self.dtype)) if self.dtype is not None else batch

    def _mean(self, params: ParamDict, batch: Any) -> Tensor:
        """The batch mean (``[k]`` means for a ``rows`` loss function)."""
        return self._f({**self._extra, **params}, batch).mean(-1)

    def _together(self, compute: Callable[[], Any]) -> Any:
        """``compute()``; under DDP its failure in any process raises in every process here (unless
        ``fail_together`` is false)."""
        first = next(iter(self.base.values()), None)
        return fail_together(compute, self.reduce if self.fail_together else None,
                             first.device if first is not None else torch.device("cpu"))

    def _reduced(self, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        tensors = self._together(compute)
        names = list(tensors)
        return dict(zip(names, reduce_all([tensors[k] for k in names], self.reduce)))

    def loss(self, params: ParamDict, batch: Any) -> Tensor:
        with torch.no_grad():
            return reduce_all([self._together(lambda: self._mean(params, batch))], self.reduce)[0]

    def _local_gradient(self, params: ParamDict, batch: Any) -> ParamDict:
        """The gradient at one point by plain reverse-mode autograd: the same numbers as
        ``torch.func.grad`` (which the stacked path needs inside ``vmap``) at about 70 % of its time
        on a small model, where its per-call transform overhead is what a probe pays (MLP
        64-512-10 on 128 samples, one thread: 420-450 µs against 590-630 µs per gradient)."""
        if torch.is_inference_mode_enabled() or any(v.is_inference() for v in params.values()):
            return self._transformed_gradient(params, batch)  # autograd records nothing there
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = self._mean(leaves, batch)
        if not loss.requires_grad:  # a loss cut from the weights (as torch.func.grad: zeros)
            return {k: torch.zeros_like(v) for k, v in leaves.items()}
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
        return dict(zip(leaves, grads))

    def _transformed_gradient(self, params: ParamDict, batch: Any) -> ParamDict:
        # (a transform: off the training thread, transform_thread.py; inline inside gradients_at's vmap)
        return off_training_thread(func_grad(lambda p: self._mean(p, batch)), params)

    def gradient(self, params: ParamDict, batch: Any) -> ParamDict:
        return self._reduced(lambda: self._local_gradient(params, batch))

    def losses_at(self, points: Stacked, batch: Any) -> Tensor:
        """``[m]`` mean losses at ``m`` stacked points."""
        m = next(iter(points.values())).shape[0]

        def local() -> Tensor:
            with torch.no_grad():
                if m == 1:
                    return self._mean({k: v[0] for k, v in points.items()}, batch).unsqueeze(0)
                return off_training_thread(vmap(lambda p: self._mean(p, batch), randomness="same"), points)

        return reduce_all([self._together(local)], self.reduce)[0]

    def gradients_at(self, points: Stacked, batch: Any) -> Stacked:
        """Stacked gradients at ``m`` stacked points."""
        m = next(iter(points.values())).shape[0]

        def local() -> Stacked:
            if m == 1:
                g = self._local_gradient({k: v[0] for k, v in points.items()}, batch)
                return {k: v.unsqueeze(0) for k, v in g.items()}
            return off_training_thread(vmap(lambda p: self._transformed_gradient(p, batch), randomness="same"), points)

        return self._reduced(local)

    def shifted(self, directions: Stacked, scale: float | Tensor, base: ParamDict | None = None,
                shape: dict[str, float] | None = None, out: Stacked | None = None) -> Stacked:
        """Stacked points ``base + scale · directionⱼ`` (``scale · shape[name]`` per parameter for
        block-shaped noise). ``out``: points of the same shapes to overwrite (a caller that
        evaluates one set of points after another holds one set, not two); the same values."""
        base = self.base if base is None else base
        points = {} if out is None else out
        for k in self.names:
            s = scale if shape is None else scale * shape.get(k, 1.0)
            d = directions[k]
            if torch.promote_types(base[k].dtype, d.dtype) != d.dtype:
                points[k] = base[k].unsqueeze(0) + s * d
                continue
            # s · direction, then + base, in the points' own storage: the bits of the expression
            # above without its temporary (one set of parameters less at the peak). The operands
            # in the expression's order: a tensor scale first, as ``s * d`` calls it (a number
            # is its second operand), which half-precision directions round differently
            target = out[k] if out is not None else None
            product = torch.mul(s, d, out=target) if isinstance(s, Tensor) else torch.mul(d, s, out=target)
            points[k] = product.add_(base[k].unsqueeze(0))
        return points


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def standard_normal(base: ParamDict, n: int, generator: torch.Generator) -> Stacked:
    """``n`` standard-normal directions shaped like ``base`` (drawn on the generator's device)."""
    return {
        k: torch.randn((n, *v.shape), generator=generator, device=generator.device, dtype=v.dtype).to(v.device)
        for k, v in base.items()
    }


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, count)`` blocks covering ``range(total)``."""
    start = 0
    while start < total:
        count = min(size, total - start)
        yield start, count
        start += count


def flat_dot(a: Stacked, b: Stacked, weights: dict[str, float] | None = None) -> Tensor:
    """Row-wise ``⟨aⱼ, bⱼ⟩`` over all parameters → ``[m]`` in float64 (``Σ_p w_p ⟨a_p, b_p⟩`` with
    per-parameter ``weights``: an inner product in a block-diagonal norm)."""
    rows = [row_dot64(a[k], b[k]) * (1.0 if weights is None else weights.get(k, 1.0)) for k in a]
    return torch.stack(rows).sum(0)


def flat_sq_norm(a: Stacked) -> Tensor:
    return flat_dot(a, a)

