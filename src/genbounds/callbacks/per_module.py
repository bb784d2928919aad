"""Objects the suite keeps on the user's LightningModule: one per module, shared by every
genbounds callback of its Trainer (the loss contract, the trained parameters), in the module's
``__dict__`` so that Lightning's and PyTorch's attribute machinery never sees them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

T = TypeVar("T")


class KeptOnModule:
    """Base of the objects kept on a user's module (:func:`kept_on`): a copy of the module —
    ``copy.deepcopy``, a pickle (``torch.save`` of the whole module) — carries ``None`` in their
    place, and the suite makes them again where the copy is fitted. They hold hooks and closures:
    ``torch.save`` of a module the suite had measured failed ("Can't pickle local object", a
    review), and a deep copy shared their hooks' closures with the original."""

    def __reduce__(self) -> tuple:
        return (type(None), ())  # (builtins only: loading the pickle needs nothing of genbounds)


def kept_on(module: nn.Module, name: str, make: Callable[[], T]) -> T:
    """The object kept on ``module`` under ``name``, made by ``make`` on first use."""
    found = module.__dict__.get(name)
    if found is None:
        found = make()
        module.__dict__[name] = found
    return found
