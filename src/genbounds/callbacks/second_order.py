"""Whether second derivatives of the model's loss can be taken, checked before step 0.

``HessianTrace`` and ``HessianContractivity``'s exact form take Hessian-vector products (a double
backward, or forward-over-reverse). Not every model allows them:

* some of PyTorch's layers have no second derivative: ``nn.Hardsigmoid`` (the squeeze-excitation
  of torchvision's MobileNetV3) raised "derivative for aten::hardsigmoid_backward is not
  implemented" at the first probe, after training had run, and ended the fit; a custom
  ``autograd.Function`` without a ``jvp`` cannot take the forward-mode product;
* a custom ``autograd.Function`` whose backward is ``@once_differentiable`` (the usual form of
  C++/CUDA extension layers) raises nothing: the double backward leaves its part out, and the
  Hessian trace came out 11.0 against 18.0 (a review's script).

:func:`second_order_problem` takes one Hessian-vector product on (up to 64 samples of) the probe
set in an isolated pass before step 0 and looks for such nodes in the loss's graph; any failure
is the reason the probe cannot measure. :func:`~genbounds.estimators.collective.not_twice_differentiable`
tells a missing second derivative from other errors, for a probe that meets one later (a branch the
trial did not take) — in its own process or, under DDP, in another one (``estimators/collective.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.function as autograd_function
from lightning.pytorch import LightningModule

from genbounds.callbacks.isolation import isolated_pass
from genbounds.estimators.batching import batch_size, index_batch
from genbounds.estimators.functional import graph_nodes, per_sample_losses
from genbounds.estimators.hessian_vector_product import LossHessian

TRIAL_SAMPLES = 64


def second_order_problem(module: LightningModule, loss_fn: Any, batch: Any, mode: str,
                         method: str = "reverse") -> str | None:
    """Why Hessian-vector products of the loss cannot be taken by ``method`` (``None``: they can),
    from one on up to :data:`TRIAL_SAMPLES` samples of ``batch``. Weights, buffers, modes and the
    RNG are restored (:func:`~genbounds.callbacks.isolation.isolated_pass`)."""
    if batch is None:
        return None
    few = index_batch(batch, torch.arange(min(TRIAL_SAMPLES, batch_size(batch))))
    try:
        with isolated_pass(module, mode=mode):
            with torch.enable_grad():
                once = _once_differentiable(per_sample_losses(module, loss_fn, few).mean())
            if once is not None:
                return (f"{once} is a custom autograd.Function whose backward is @once_differentiable: a "
                        "Hessian-vector product would leave its second derivative out, silently")
            op = LossHessian(module, loss_fn, few, method=method)  # type: ignore[arg-type]
            op.hvp([torch.ones_like(p) for p in op.params])
            op.release()
    except Exception as err:  # noqa: BLE001 - the probe would meet it too: its reason
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def _once_differentiable(loss: torch.Tensor) -> str | None:
    """The name of a node in ``loss``'s graph whose backward (or ``vjp``) is ``@once_differentiable``
    — under other decorators too (``torch.amp.custom_bwd``, a user's ``functools.wraps``) — if any."""
    for node in graph_nodes(loss):
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and any(_marked_once(getattr(cls, name, None)) for name in ("backward", "vjp")):
            return type(node).__name__.removesuffix("Backward")
    return None


def _marked_once(fn: Any, depth: int = 16) -> bool:
    """Whether ``fn``, or a function it wraps (``__wrapped__``), is ``once_differentiable``'s wrapper."""
    for _ in range(depth):
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_name == "wrapper" and code.co_filename == autograd_function.__file__:
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False
