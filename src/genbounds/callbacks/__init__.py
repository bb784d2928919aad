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
from genbounds.callbacks.dispersion_phase import DispersionPhaseDetector, PhaseRecord
from genbounds.callbacks.dynamic_gradient_clipping import DynamicGradientClipping
from genbounds.callbacks.flatness import Flatness
from genbounds.callbacks.gaussian_model_perturbation import GaussianModelPerturbation
from genbounds.callbacks.generalization_bound import GeneralizationBound
from genbounds.callbacks.gradient_dispersion import GradientDispersion
from genbounds.callbacks.gradient_sensitivity import GradientSensitivity
from genbounds.callbacks.heldout_gradient import HeldoutGradient
from genbounds.callbacks.hessian_contractivity import HessianContractivity
from genbounds.callbacks.hessian_trace import HessianTrace
from genbounds.callbacks.intervention import GradientIntervention
from genbounds.callbacks.probe import ProbeCallback, ProbeSchedule
from genbounds.callbacks.twin_run_stability import TwinRunStability
from genbounds.callbacks.variability_regularizer import VariabilityRegularizer

__all__ = [
    "BoundGate",
    "BoundViolation",
    "Channel",
    "CurvatureRecord",
    "DispersionPhaseDetector",
    "DispersionRecord",
    "DynamicGradientClipping",
    "Flatness",
    "FlatnessRecord",
    "GaussianModelPerturbation",
    "GeneralizationBound",
    "GradientDispersion",
    "GradientIntervention",
    "GradientSensitivity",
    "HeldoutGradient",
    "HeldoutRecord",
    "HessianContractivity",
    "HessianTrace",
    "PhaseRecord",
    "ProbeCallback",
    "ProbeSchedule",
    "SensitivityRecord",
    "TwinRunStability",
    "VariabilityRegularizer",
]
