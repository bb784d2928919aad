"""``genbounds fit|validate|test …``: Lightning's own ``LightningCLI`` over any LightningModule
and LightningDataModule given by ``class_path`` (configs in ``configs/``)."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def train_cli(args: list[str] | None) -> None:
    """LightningCLI with any LightningModule / LightningDataModule given by ``class_path``."""
    import genbounds.callbacks  # noqa: F401  (short class names resolve once imported)
    import genbounds.data  # noqa: F401
    import genbounds.models  # noqa: F401

    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
