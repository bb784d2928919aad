"""How a genbounds callback obtains per-sample losses without re-running ``training_step``.

Re-running the user's ``training_step`` from a callback overwrites what it logs (its
``self.log("train_loss", …)`` is attributed to the callback's hook and the probe value replaces
the real one) and updates its torchmetrics twice. So callbacks that need extra passes use, in
this order:

1. the ``loss_fn(pl_module, batch) -> per-sample losses`` argument given to the callback
   (an import path in YAML);
2. a ``per_sample_loss(batch)`` method on the LightningModule (genbounds' ``Classifier`` and
   ``Regressor`` implement it);

and otherwise fail at ``setup`` with a message naming both options.

The losses must be **per sample** (``reduction="none"``, shape ``[b]``), and — for the backends
that read the training step's own backward — the training loss must be their mean.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from genbounds.estimators.functional import LossFn


def _module_per_sample_loss(module: nn.Module, batch: Any) -> Tensor:
    return module.per_sample_loss(batch)  # type: ignore[operator]


def resolve_loss_fn(owner: str, pl_module: LightningModule, loss_fn: LossFn | None) -> LossFn:
    """The loss contract for ``owner`` (a callback's name, for the error message)."""
    if loss_fn is not None:
        if not callable(loss_fn):
            raise MisconfigurationException(f"{owner}(loss_fn=...) must be callable, got {loss_fn!r}")
        return loss_fn
    if callable(getattr(pl_module, "per_sample_loss", None)):
        return _module_per_sample_loss
    raise MisconfigurationException(
        f"{owner} needs per-sample losses for its extra passes and will not re-run "
        f"`training_step` (that would overwrite what your module logs). Either pass "
        f"`{owner}(loss_fn=...)`, a callable `loss_fn(pl_module, batch) -> Tensor[batch_size]` "
        f"(an import path in YAML), or add a method `per_sample_loss(self, batch)` to "
        f"{type(pl_module).__name__} returning the unreduced per-sample losses."
    )
