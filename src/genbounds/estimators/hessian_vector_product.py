"""Hessian-vector products of the mean loss ``L(w) = mean_i ℓ(w, z_i)`` on one batch.

Two exact methods, both writing nothing into ``.grad`` or the parameters:

* ``"reverse"`` (double backward): ``g = ∇L`` is built once with ``create_graph=True``; each
  product is one more backward through that graph (``torch.autograd.grad``). Several vectors at
  once go through ``is_grads_batched=True`` (vmap over the backward). Best operator coverage:
  works for train-mode BatchNorm and everything autograd differentiates twice.
* ``"forward"`` (forward-over-reverse): ``torch.func.jvp`` of ``torch.func.grad`` on a
  functional copy of the model; several vectors at once by ``vmap``. Needs forward-mode AD for
  every op (not train-mode BatchNorm, not flash/efficient attention kernels).

``method="auto"`` picks ``"reverse"``; ``benchmarks/probes.py`` measures both. Whether a block of
vectors is vectorized (``vmap``) or looped is a separate choice, ``vectorize``: on CPU the loop is
faster (measured ×1.7–2 per product), on a GPU vectorizing fills the device with small models.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad as func_grad
from torch.func import jvp, vmap

from genbounds.estimators.collective import fail_together
from genbounds.estimators.functional import (
    LossFn,
    Reduce,
    detached,
    functional_loss,
    per_sample_losses,
    reduce_all,
    row_dot64,
    trainable_parameters,
)
from genbounds.estimators.transform_thread import off_training_thread

HVPMethod = Literal["auto", "reverse", "forward"]

Vector = list[Tensor]
"""A vector in parameter space: one tensor per trainable parameter, in module order."""


class LossHessian:
    """The Hessian of the mean loss on ``batch`` at the module's current weights, as an operator.

    Args:
        module: the model (its trainable parameters define the space).
        loss_fn: the loss contract.
        batch: the batch the Hessian is taken on.
        method: ``"reverse"``, ``"forward"`` or ``"auto"`` (reverse).
        vectorize: ``vmap`` blocks of vectors (default: on accelerators only).
        reduce: DDP mean over ranks of every product and gradient (see ``functional.Reduce``); a
            product that fails in one process raises in every process at its collective
            (:func:`~genbounds.estimators.collective.reduce_computed`), never leaving the others
            waiting in it.
        fail_together: with ``reduce``, reduce failure flags before each product's values (one
            small collective and one host read of them a product). ``False``: the plain
            reduction, for a caller that runs every training step (the variability regularizer):
            no host read a step, but a failure in one process then leaves the others waiting in
            the collective until the process group's timeout, as before round 29.
    """

    def __init__(self, module: nn.Module, loss_fn: LossFn, batch: Any, method: HVPMethod = "auto",
                 vectorize: bool | None = None, reduce: Reduce | None = None, fail_together: bool = True) -> None:
        if method not in ("auto", "reverse", "forward"):
            raise ValueError(f"unknown HVP method {method!r}")
        self.module = module
        self.loss_fn = loss_fn
        self.batch = batch
        self.method = "reverse" if method == "auto" else method
        self.named = trainable_parameters(module)
        self.params = list(self.named.values())
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.vectorize = (self.device.type != "cpu") if vectorize is None else vectorize
        self.reduce = reduce
        self.fail_together = fail_together
        self._grad: tuple[Tensor, ...] | None = None
        self._loss: Tensor | None = None
        self._grad_fn = None

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    # -------------------------------------------------------------- reverse-over-reverse
    def _graph(self) -> tuple[Tensor, ...]:
        if self._grad is None:
            loss = per_sample_losses(self.module, self.loss_fn, self.batch).mean()
            self._loss = loss.detach()
            self._grad = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            self._grad = tuple(
                torch.zeros_like(p, requires_grad=True) * 0 if g is None else g for g, p in zip(self._grad, self.params)
            )
        return self._grad

    def _reduced(self, compute: Any) -> Vector:
        """``compute()`` averaged over the processes (its failure decided together unless
        ``fail_together`` is false)."""
        return reduce_all(fail_together(compute, self.reduce if self.fail_together else None, self.device), self.reduce)

    def gradient(self) -> Vector:
        """``∇L`` at the current weights (detached)."""
        if self.method == "reverse":
            return self._reduced(lambda: [g.detach() for g in self._graph()])
        base = detached(self.named)
        f = functional_loss(self.module, self.loss_fn)

        def local() -> Vector:
            g = off_training_thread(func_grad(lambda p: f(p, self.batch).mean()), base)  # (transform_thread.py)
            return [g[n] for n in self.named]

        return self._reduced(local)

    def loss(self) -> Tensor:
        """``L`` at the current weights (detached)."""
        def local() -> Vector:
            if self._loss is None:
                if self.method == "reverse":
                    self._graph()
                else:
                    with torch.no_grad():
                        self._loss = per_sample_losses(self.module, self.loss_fn, self.batch).mean()
            assert self._loss is not None
            return [self._loss]

        return self._reduced(local)[0]

    def _live(self) -> list[int]:
        """Indices of gradient components that still depend on the weights (a component that is
        constant — a loss linear in those weights — has a zero Hessian row)."""
        return [i for i, g in enumerate(self._graph()) if g.requires_grad]

    def hvp(self, v: Vector) -> Vector:
        """``H v`` for one vector."""
        if self.method == "reverse":
            def local() -> Vector:
                live = self._live()
                if not live:
                    return [torch.zeros_like(x) for x in v]
                grads = self._graph()
                out = torch.autograd.grad([grads[i] for i in live], self.params, grad_outputs=[v[i] for i in live],
                                          retain_graph=True, allow_unused=True)
                return [torch.zeros_like(x) if h is None else h.detach() for h, x in zip(out, v)]

            return self._reduced(local)
        return [h[0] for h in self._hvp_stacked([t.unsqueeze(0) for t in v])]

    def hvp_batched(self, vs: Vector) -> Vector:
        """``H v_j`` for ``n`` vectors stacked along a leading dimension (each tensor ``[n, *shape]``);
        vectorized or looped according to ``self.vectorize``."""
        n = vs[0].shape[0] if vs else 0
        if self.vectorize or n == 1 and self.method == "forward":
            return self._hvp_stacked(vs)
        if n == 1:  # (a view of the one product: no stacked copy beside it)
            return [h.unsqueeze(0) for h in self.hvp([t[0] for t in vs])]
        # each product written into the stack as it comes: the block's products and one more at
        # the peak, not the products and their stacked copy
        out: Vector = []
        for j in range(n):
            row = self.hvp([t[j] for t in vs])
            if not out:
                out = [h.new_empty((n, *h.shape)) for h in row]
            for o, h in zip(out, row):
                o[j].copy_(h)
            del row
        return out

    def _hvp_stacked(self, vs: Vector) -> Vector:
        if self.method == "reverse":
            def local() -> Vector:
                grads = self._graph()
                live = self._live()
                if not live:
                    return [torch.zeros_like(v) for v in vs]
                out = torch.autograd.grad(
                    [grads[i] for i in live], self.params, grad_outputs=[vs[i] for i in live], retain_graph=True,
                    is_grads_batched=True, allow_unused=True
                )
                return [torch.zeros_like(v) if h is None else h.detach() for h, v in zip(out, vs)]

            return self._reduced(local)
        # (functorch transforms: off the training thread, transform_thread.py; the collective on it)
        return self._reduced(lambda: off_training_thread(self._hvp_transformed, vs))

    def _hvp_transformed(self, vs: Vector) -> Vector:
        base = detached(self.named)
        names = list(self.named)
        f = functional_loss(self.module, self.loss_fn)

        def grad_of(p: dict[str, Tensor]) -> dict[str, Tensor]:
            return func_grad(lambda q: f(q, self.batch).mean())(p)

        def one(*tangent: Tensor) -> tuple[Tensor, ...]:
            _, hv = jvp(grad_of, (base,), (dict(zip(names, tangent)),))
            return tuple(hv[n] for n in names)

        return list(vmap(one, randomness="same")(*vs))

    def release(self) -> None:
        """Free the retained gradient graph."""
        self._grad = None


def rademacher_like(params: list[Tensor], n: int, generator: torch.Generator) -> Vector:
    """``n`` Rademacher (±1) vectors stacked along a leading dimension, from ``generator``.

    The bits are drawn in the parameter's dtype and mapped to ±1 in place, without the two int64
    temporaries of drawing int64 bits and converting them (16 bytes an element: 0.34 GiB beside a
    4096×4096 fp32 weight's 64 MiB vector). On the CPU the values and the generator's state are
    those of the int64 draw (tested); on CUDA too, by PyTorch's kernels, except for draws past
    2³¹ bytes as int64, which CUDA splits at other points (other signs, as random)."""
    out = []
    for p in params:
        signs = torch.randint(0, 2, (n, *p.shape), generator=generator, device=generator.device, dtype=p.dtype)
        out.append(signs.mul_(2).sub_(1).to(p.device))
    return out


def gaussian_like(params: list[Tensor], n: int, generator: torch.Generator) -> Vector:
    """``n`` standard-normal vectors stacked along a leading dimension, from ``generator``."""
    return [
        torch.randn((n, *p.shape), generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
        for p in params
    ]


def batched_dot(a: Vector, b: Vector) -> Tensor:
    """Row-wise inner products of two stacked vector lists → ``[n]`` in float64."""
    return torch.stack([row_dot64(x, y) for x, y in zip(a, b)]).sum(0)
