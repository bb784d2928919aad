"""Zero observer effect for extra forward/backward passes run from a callback.

:func:`isolated_pass` wraps a probe so that, afterwards, the model is exactly as before:

* the global RNG streams (CPU and the module's CUDA device) are forked — dropout masks or any
  sampling inside the probe do not shift the training run's random numbers;
* every buffer (BatchNorm running statistics, ``num_batches_tracked``, user buffers) is restored
  bit-exactly from a snapshot;
* every submodule's ``training`` flag is restored individually (never a blanket ``.train()``,
  which would un-freeze layers a user keeps in eval mode);
* autocast is switched off: probes run in the parameters' own precision (fp32) on purpose;
* a ``torch.compile``\\ d LightningModule is probed through its original forward (compiled
  graphs do not support double backward, and probe shapes would trigger recompilation);
* BackPACK hooks attached for the training step's own backward are suspended.

Parameters are never written by the estimators (they use ``torch.func.functional_call`` or
``torch.autograd.grad``); :func:`assert_unchanged` exists for tests and debugging.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from torch import nn

from genbounds.estimators.backpack_norms import suspended_hooks

ProbeMode = Literal["keep", "eval", "train"]


@contextmanager
def original_forward(module: nn.Module) -> Iterator[None]:
    """Temporarily restore the uncompiled ``forward`` of a module compiled by Lightning."""
    ctx = getattr(module, "_compiler_ctx", None)
    original = ctx.get("original_forward") if isinstance(ctx, dict) else None
    if original is None:
        yield
        return
    compiled = module.forward
    module.forward = original  # type: ignore[method-assign]
    try:
        yield
    finally:
        module.forward = compiled  # type: ignore[method-assign]


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@contextmanager
def isolated_pass(module: nn.Module, mode: ProbeMode = "keep", grad: bool = True) -> Iterator[None]:
    """Run the body as a side-effect-free probe of ``module`` (see the module docstring).

    Args:
        module: the model being probed.
        mode: ``"keep"`` the current train/eval flags, or force ``"eval"`` / ``"train"`` for the
            duration of the probe.
        grad: enable autograd inside the body (probes often run from hooks under ``no_grad``).
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    modes = [(m, m.training) for m in module.modules()]
    snapshot = [(b, b.detach().clone()) for b in module.buffers()]
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_rng_devices(device), device_type=device.type))
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        if device.type in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        stack.enter_context(original_forward(module))
        stack.enter_context(suspended_hooks())
        if mode == "eval":
            module.eval()
        elif mode == "train":
            module.train()
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, saved in snapshot:
                    buf.copy_(saved)
            for m, flag in modes:
                m.training = flag


def parameter_snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_unchanged(module: nn.Module, snapshot: list[torch.Tensor]) -> None:
    """Raise if any parameter differs bit-wise from ``snapshot``."""
    for p, saved in zip(module.parameters(), snapshot):
        if not torch.equal(p.detach(), saved):
            raise AssertionError("a probe modified the model's parameters")
