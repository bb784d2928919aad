"""Configuration checks run at ``setup`` so that a bad combination fails before training, with a
message that names the callback, the offending setting and what to do instead."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

FULL_PRECISIONS = ("32-true", "64-true", "32", "64")
MIXED_PRECISIONS = ("16-mixed", "bf16-mixed")


def check_strategy(owner: str, trainer: Trainer) -> None:
    """Single-device and DDP only: sharded strategies split or flatten the parameters."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    sharded = any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel", "XLA"))
    if sharded or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MisconfigurationException(
            f"{owner} supports single-device and DDP training (strategy='ddp', 'ddp_spawn', …); "
            f"{name} shards or wraps the parameters, so per-parameter statistics would be "
            "computed on shards. Use a DDP strategy for runs you measure."
        )


def check_precision(owner: str, trainer: Trainer, allow_mixed: bool = True) -> str:
    """Refuse half-precision *parameters*: finite differences, HVPs and sums of squares are
    meaningless at 3 significant digits. Mixed precision keeps fp32 parameters and is fine for
    callbacks that run their own fp32 passes."""
    precision = str(trainer.precision)
    if precision in FULL_PRECISIONS:
        return precision
    if precision in MIXED_PRECISIONS and allow_mixed:
        return precision
    allowed = FULL_PRECISIONS[:2] + (MIXED_PRECISIONS if allow_mixed else ())
    raise MisconfigurationException(
        f"{owner} does not support Trainer(precision={precision!r}): with half-precision "
        "parameters its sums of squares and finite differences lose the digits they measure. "
        f"Use one of {', '.join(allowed)}."
    )


def check_automatic_optimization(owner: str, pl_module: LightningModule) -> None:
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{owner} reads the training step's gradients through Lightning's automatic "
            "optimization hooks; manual optimization (automatic_optimization=False) is not "
            "supported."
        )


def check_positive(owner: str, **values: int | float | None) -> None:
    """``__init__`` argument check: every given value is > 0 (``None`` is skipped)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise MisconfigurationException(f"{owner}({name}={value!r}) must be > 0")
