"""Which measurement callbacks feed ``GeneralizationBound``, and which bounds they allow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from genbounds.bounds.aggregate import ALL_BOUNDS, LAYERWISE
from genbounds.callbacks.bound_series import BoundSeries
from genbounds.callbacks.flatness import Flatness
from genbounds.callbacks.gradient_dispersion import GradientDispersion
from genbounds.callbacks.gradient_sensitivity import GradientSensitivity
from genbounds.callbacks.heldout_gradient import HeldoutGradient
from genbounds.callbacks.hessian_trace import HessianTrace

FLATNESS = 'Flatness(scaling="sqrt_steps")'


@dataclass
class Producers:
    """The first callback of each kind in ``trainer.callbacks`` (found by type, not by name)."""

    dispersion: GradientDispersion | None = None
    flatness: Flatness | None = None
    hessian: HessianTrace | None = None
    sensitivity: GradientSensitivity | None = None
    heldout: HeldoutGradient | None = None

    @staticmethod
    def find(trainer: Trainer) -> Producers:
        def pick(kind: type, accept: Callable[[Any], bool] = lambda _: True) -> Any:
            return next((cb for cb in trainer.callbacks if isinstance(cb, kind) and accept(cb)), None)

        return Producers(pick(GradientDispersion), pick(Flatness, lambda f: f.scaling == "sqrt_steps"),
                         pick(HessianTrace), pick(GradientSensitivity, lambda s: s.growing), pick(HeldoutGradient))

    def needs(self) -> dict[str, list[tuple[str, Any]]]:
        dispersion = ("GradientDispersion()", self.dispersion)
        need = {
            "wang_mao_eq2": [dispersion, (FLATNESS, self.flatness)],
            "wang_mao_eq3": [dispersion, ("HessianTrace()", self.hessian)],
            "neu": [dispersion, (FLATNESS, self.flatness), ("GradientSensitivity(growing=True)", self.sensitivity)],
        }
        need.update({"wang_mao_eq2_error": need["wang_mao_eq2"], "neu_error": need["neu"],
                     "wang_mao_eq2_layerwise": need["wang_mao_eq2"], "wang_mao_eq3_layerwise": need["wang_mao_eq3"],
                     "neu_layerwise": need["neu"]})
        return need

    def resolve(self, requested: list[str] | None, num_groups: int) -> tuple[str, ...]:
        """The bounds to compute: ``requested`` (every producer they need must be present: an error
        names the missing ones), else every bound the producers allow."""
        need = self.needs()
        if requested is not None:
            missing = sorted({f"{what} (for {name})" for name in requested for what, cb in need[name] if cb is None})
            if missing:
                raise MisconfigurationException(
                    f"GeneralizationBound(bounds={requested}) needs these callbacks in the same Trainer: "
                    + "; ".join(missing) + ". Add them to `trainer.callbacks`, or restrict `bounds=`.")
            wanted = tuple(requested)
        else:
            wanted = tuple(name for name in ALL_BOUNDS if all(cb is not None for _, cb in need[name])
                           and not (name in LAYERWISE and num_groups < 2))
            if not wanted:
                raise MisconfigurationException(
                    "GeneralizationBound needs GradientDispersion() and at least one of "
                    f"{FLATNESS} (wang_mao_eq2; with GradientSensitivity(growing=True) also neu) or HessianTrace() "
                    "(wang_mao_eq3) in the same Trainer (see configs/digits_mlp.yaml for the whole suite).")
        if self.sensitivity is not None and self.flatness is not None and "neu" in wanted:
            if [float(s) for s in self.sensitivity.sigmas] != [float(s) for s in self.flatness.sigmas]:
                raise MisconfigurationException(
                    "GeneralizationBound(neu): GradientSensitivity(sigmas=…) and Flatness(sigmas=…) must use "
                    f"the same σ grid; got {self.sensitivity.sigmas} and {self.flatness.sigmas}.")
        return wanted

    def subscriptions(self, series: BoundSeries) -> list[tuple[Any, Callable]]:
        pairs = [(self.dispersion, series.on_dispersion), (self.flatness, series.on_flatness),
                 (self.hessian, series.on_curvature), (self.sensitivity, series.on_sensitivity),
                 (self.heldout, series.on_heldout)]
        return [(p, h) for p, h in pairs if p is not None]
