"""LightningModules that train a network with plain SGD and expose the loss contract.

Both implement ``per_sample_loss(batch)`` (the unreduced losses genbounds' callbacks use for
their extra passes) and return ``{"loss": mean, "per_sample_loss": losses}`` from
``training_step`` so that callbacks reading the training backward also get the losses for free.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


class _SGDModule(LightningModule):
    """Shared optimizer set-up: SGD without momentum or weight decay unless asked (the theory's
    update ``W_t = W_{t−1} − η_t ḡ_B``), optional exponential learning-rate decay per epoch."""

    network: nn.Module

    def __init__(self, lr: float, momentum: float, weight_decay: float, lr_decay: float) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.lr_decay = lr_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        if self.lr_decay == 1.0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class Classifier(_SGDModule):
    """Cross-entropy classifier.

    Logs ``train_loss`` (per step and epoch), ``train_acc``, ``val_loss`` and ``val_acc``.

    Args:
        network: the ``nn.Module`` mapping inputs to logits.
        num_classes: number of classes (for the accuracy metrics).
        lr: SGD learning rate (seed 001 E.1: 0.01 for the MLP, 0.001 for AlexNet).
        momentum: SGD momentum (0 = plain SGD, what the bounds assume).
        weight_decay: SGD weight decay (0 = none, what the bounds assume).
        lr_decay: multiply the learning rate by this after every epoch (1 = constant).
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int = 10,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_decay: float = 1.0,
    ) -> None:
        super().__init__(lr, momentum, weight_decay, lr_decay)
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def per_sample_error(self, batch: Any) -> Tensor:
        """The 0-1 error of each sample (for the test-error bounds)."""
        x, y = batch
        return (self(x).argmax(1) != y).to(torch.get_default_dtype())

    def per_sample_loss_and_error(self, batch: Any) -> Tensor:
        """``[2, b]``: the per-sample loss and 0-1 error from one forward (two, when a subclass
        overrides ``per_sample_loss`` or ``per_sample_error``: those stay authoritative)."""
        cls = type(self)
        if cls.per_sample_loss is not Classifier.per_sample_loss or cls.per_sample_error is not Classifier.per_sample_error:
            losses = self.per_sample_loss(batch)
            return torch.stack([losses, self.per_sample_error(batch).to(losses.dtype)])
        x, y = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        return torch.stack([losses, (logits.argmax(1) != y).to(losses.dtype)])

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = losses.mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.train_acc(logits.detach(), y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return {"loss": loss, "per_sample_loss": losses.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)


class Regressor(_SGDModule):
    """Squared-error regressor; per-sample loss ``½‖f(x) − y‖²`` (``loss="half_mse"``, seed 001's
    ``ℓ = ½(Y − f(W, X))²``) or ``‖f(x) − y‖²/k`` (``loss="mse"``, mean over the ``k`` outputs).

    Logs ``train_loss`` and ``val_loss``.
    """

    def __init__(
        self,
        network: nn.Module,
        lr: float = 0.5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_decay: float = 1.0,
        loss: str = "half_mse",
    ) -> None:
        super().__init__(lr, momentum, weight_decay, lr_decay)
        if loss not in ("half_mse", "mse"):
            raise ValueError(f"Regressor(loss={loss!r}) must be 'half_mse' or 'mse'")
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.loss = loss

    def _losses(self, pred: Tensor, y: Tensor) -> Tensor:
        pred = pred.reshape(pred.shape[0], -1)
        y = y.reshape(y.shape[0], -1).to(pred.dtype)
        sq = (pred - y) ** 2
        return 0.5 * sq.sum(1) if self.loss == "half_mse" else sq.mean(1)

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return self._losses(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        losses = self.per_sample_loss(batch)
        loss = losses.mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return {"loss": loss, "per_sample_loss": losses.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.per_sample_loss(batch).mean(), on_epoch=True, prog_bar=True)
