"""Objects the suite keeps on the user's LightningModule: one per module, shared by every
genbounds callback of its Trainer (the loss contract, the trained parameters), in the module's
``__dict__`` so that Lightning's and PyTorch's attribute machinery never sees them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

T = TypeVar("T")


def kept_on(module: nn.Module, name: str, make: Callable[[], T]) -> T:
    """The object kept on ``module`` under ``name``, made by ``make`` on first use."""
    found = module.__dict__.get(name)
    if found is None:
        found = make()
        module.__dict__[name] = found
    return found
