"""Estimators: pure functions of (model, per-sample loss function, batch). No Lightning here.

Each module computes one quantity of ``SPEC.md`` and returns its value together with what is
needed for a standard error.
"""

from genbounds.estimators.functional import LossFn, functional_loss, num_trainable, trainable_parameters
from genbounds.estimators.gradient_dispersion import DispersionEstimate, GradientMoments, dispersion_from_moments
from genbounds.estimators.microbatch_gradients import microbatch_gradient_moments
from genbounds.estimators.per_sample_gradients import per_sample_gradient_moments

__all__ = [
    "DispersionEstimate",
    "GradientMoments",
    "LossFn",
    "dispersion_from_moments",
    "functional_loss",
    "microbatch_gradient_moments",
    "num_trainable",
    "per_sample_gradient_moments",
    "trainable_parameters",
]
