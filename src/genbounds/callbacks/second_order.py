"""Whether second derivatives of the model's loss can be taken, checked before step 0.

``HessianTrace`` and ``HessianContractivity``'s exact form take Hessian-vector products (a double
backward, or forward-over-reverse). Some of PyTorch's layers have no second derivative:
``nn.Hardsigmoid`` (the squeeze-excitation of torchvision's MobileNetV3) raised "derivative for
aten::hardsigmoid_backward is not implemented" at the first probe, after training had run, and
ended the fit. :func:`second_order_problem` tries one Hessian-vector product on two samples of the
probe set in an isolated pass before step 0; :func:`not_twice_differentiable` tells such an error
from others, for a probe that meets one later (a branch the trial's samples did not take).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from genbounds.callbacks.isolation import isolated_pass
from genbounds.estimators.batching import batch_size, index_batch
from genbounds.estimators.hessian_vector_product import LossHessian

_MARKS = ("is not implemented", "does not support", "forward AD", "double backward", "not differentiable twice")


def not_twice_differentiable(err: BaseException) -> bool:
    """Whether ``err`` says an op of the model has no second derivative (or no forward-mode one)."""
    text = str(err)
    return isinstance(err, (RuntimeError, NotImplementedError)) and any(mark in text for mark in _MARKS)


def second_order_problem(module: LightningModule, loss_fn: Any, batch: Any, mode: str, method: str = "reverse",
                         samples: int = 2) -> str | None:
    """The first line of the error when one Hessian-vector product of the loss on ``samples`` samples
    of ``batch`` by ``method`` meets an op without a second derivative, else ``None`` (any other
    failure is left to the probes themselves). Weights, buffers, modes and the RNG are restored
    (:func:`~genbounds.callbacks.isolation.isolated_pass`)."""
    if batch is None:
        return None
    few = index_batch(batch, torch.arange(min(samples, batch_size(batch))))
    try:
        with isolated_pass(module, mode=mode):
            op = LossHessian(module, loss_fn, few, method=method)  # type: ignore[arg-type]
            op.hvp([torch.ones_like(p) for p in op.params])
            op.release()
    except Exception as err:  # noqa: BLE001 - anything else (a loss that needs more samples?) is not this check's to say
        if not_twice_differentiable(err):
            return str(err).strip().splitlines()[0]
    return None
