"""``DispersionPhaseDetector``: where memorization begins, from the gradient dispersion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from genbounds.bounds.phases import find_valley
from genbounds.callbacks.channel import Channel, DispersionRecord
from genbounds.callbacks.checks import check_float, check_int
from genbounds.callbacks.gradient_dispersion import GradientDispersion
from genbounds.callbacks.hook_clock import MeasurementCallback
from genbounds.callbacks.step_log import epoch_end_step


@dataclass
class PhaseRecord:
    valley_epoch: int
    """The epoch of the dispersion valley: where the memorization regime begins."""
    detected_epoch: int
    """The epoch at whose end the valley was confirmed."""
    valley_dispersion: float


class DispersionPhaseDetector(MeasurementCallback):
    r"""Find the epoch-wise double-descent valley of ``grad/dispersion`` (seed 001 §5, Fig. 3).

    Averages the ``GradientDispersion`` records of each epoch (logged as
    ``phase/dispersion_epoch_mean``) and runs :func:`genbounds.bounds.phases.find_valley` at every
    epoch end: the valley is the running minimum of the smoothed series, confirmed when the series
    has risen by more than ``rise`` above it for ``patience`` epochs. Once confirmed it logs
    ``phase/memorization_start_epoch`` (the valley's epoch) and publishes it on ``channel`` —
    ``DynamicGradientClipping(auto_start="dispersion")`` starts clipping there.

    Args:
        smooth: trailing moving-average window (epochs).
        rise: relative rise above the minimum that confirms the valley.
        patience: epochs the rise must last.
    """

    def __init__(self, smooth: int = 3, rise: float = 0.1, patience: int = 2) -> None:
        super().__init__()
        o = "DispersionPhaseDetector"
        self.smooth = check_int(o, "smooth", smooth)
        self.rise = check_float(o, "rise", rise, low=0.0, low_open=True)
        self.patience = check_int(o, "patience", patience)
        self.channel: Channel[PhaseRecord] = Channel()
        self.epoch_means: list[float] = []
        self.valley_epoch: int | None = None
        self.detected_epoch: int | None = None
        self._current: list[float] = []
        self._dispersion: GradientDispersion | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        producers = [cb for cb in trainer.callbacks if isinstance(cb, GradientDispersion)]
        if not producers:
            raise MisconfigurationException("DispersionPhaseDetector needs a GradientDispersion callback in the same Trainer")
        self._dispersion = producers[0]
        self._dispersion.channel.subscribe(self._on_dispersion)

    def _on_dispersion(self, records: list[DispersionRecord]) -> None:
        self._current.extend(r.dispersion for r in records)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._dispersion is not None
        self._dispersion.flush(trainer, pl_module, epoch_end=True)  # this epoch's last records
        if not self._current:
            return
        mean = sum(self._current) / len(self._current)
        self._current = []
        self.epoch_means.append(mean)
        metrics = {"phase/dispersion_epoch_mean": mean}
        if self.valley_epoch is None:
            valley = find_valley(self.epoch_means, smooth=self.smooth, rise=self.rise, patience=self.patience)
            if valley is not None:
                self.valley_epoch = valley
                self.detected_epoch = trainer.current_epoch
                record = PhaseRecord(valley, trainer.current_epoch, self.epoch_means[valley])
                rank_zero_info(f"DispersionPhaseDetector: the gradient dispersion's valley is at epoch {valley} "
                               f"(confirmed at epoch {trainer.current_epoch}): memorization begins.")
                self.channel.publish([record])
        if self.valley_epoch is not None:
            metrics["phase/memorization_start_epoch"] = float(self.valley_epoch)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=epoch_end_step(trainer))
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, logger=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._dispersion is not None:
            self._dispersion.channel.unsubscribe(self._on_dispersion)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_means": list(self.epoch_means), "valley_epoch": self.valley_epoch,
                "detected_epoch": self.detected_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_means = list(state_dict.get("epoch_means", []))
        self.valley_epoch = state_dict.get("valley_epoch")
        self.detected_epoch = state_dict.get("detected_epoch")
