"""Lightning callbacks: thin adapters that schedule the estimators, keep state and log."""

from genbounds.callbacks.channel import (
    Channel,
    CurvatureRecord,
    DispersionRecord,
    FlatnessRecord,
    HeldoutRecord,
    SensitivityRecord,
)
from genbounds.callbacks.bound_gate import BoundGate, BoundViolation
from genbounds.callbacks.flatness import Flatness
from genbounds.callbacks.generalization_bound import GeneralizationBound
from genbounds.callbacks.gradient_dispersion import GradientDispersion
from genbounds.callbacks.gradient_sensitivity import GradientSensitivity
from genbounds.callbacks.heldout_gradient import HeldoutGradient
from genbounds.callbacks.hessian_contractivity import HessianContractivity
from genbounds.callbacks.hessian_trace import HessianTrace
from genbounds.callbacks.probe import ProbeCallback, ProbeSchedule

__all__ = [
    "BoundGate",
    "BoundViolation",
    "Channel",
    "CurvatureRecord",
    "DispersionRecord",
    "Flatness",
    "FlatnessRecord",
    "GeneralizationBound",
    "GradientDispersion",
    "GradientSensitivity",
    "HeldoutGradient",
    "HeldoutRecord",
    "HessianContractivity",
    "HessianTrace",
    "ProbeCallback",
    "ProbeSchedule",
    "SensitivityRecord",
]
