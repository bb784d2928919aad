"""The explicit channel between measurement callbacks and the bound aggregator.

Each measurement callback owns a :class:`Channel` and publishes **typed records** (host floats,
already reduced over DDP ranks, identical on every rank) whenever its values are flushed. The
aggregator subscribes at ``setup`` to the callbacks it finds in ``trainer.callbacks`` by type —
no string lookups in ``trainer.callback_metrics``, no dependence on logging cadence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")


class Channel(Generic[R]):
    """A list of subscribers called with each batch of published records."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[list[R]], None]] = []

    def subscribe(self, fn: Callable[[list[R]], None]) -> None:
        if fn not in self._subscribers:
            self._subscribers.append(fn)

    def unsubscribe(self, fn: Callable[[list[R]], None]) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def publish(self, records: list[R]) -> None:
        if records:
            for fn in list(self._subscribers):
                fn(records)


@dataclass
class DispersionRecord:
    """SPEC §1 statistics of the batch of optimizer step ``step`` (0-based)."""

    step: int
    norm_sq: float
    trace_cov: float
    dispersion: float
    trace_cov_se: float | None = None
    groups: list[float] | None = None
    """``Tr Σ_{B,k}`` per parameter group (layer), in the producer's ``group_names`` order."""

    @classmethod
    def from_values(cls, step: int, values: dict[str, float], group_names: list[str]) -> DispersionRecord:
        """From the logged ``grad/…`` values of one step (``grad/dispersion/layer/<group>`` if logged)."""
        layered = bool(group_names) and f"grad/dispersion/layer/{group_names[0]}" in values
        return cls(step=step, norm_sq=values["grad/norm_sq"], trace_cov=values["grad/trace_cov"],
                   dispersion=values["grad/dispersion"], trace_cov_se=values.get("grad/trace_cov_se"),
                   groups=[values[f"grad/dispersion/layer/{g}"] for g in group_names] if layered else None)


@dataclass
class HeldoutRecord:
    """SPEC §2 at optimizer step ``step``."""

    step: int
    lr: float
    heldout_dist_sq: float
    """``‖ḡ_B − ĝ_ref‖² − s²_ref/m``: unbiased for Neu's ``V_t``."""
    step_realized: float
    step_predicted: float
    predicted_cumulative: float
    groups: list[float] | None = None
    """The same per parameter group (layer) — the blocks of ``V_t`` for block-diagonal noise."""


@dataclass
class SensitivityRecord:
    """SPEC §3 at the weights of optimizer step ``step`` (before its update)."""

    step: int
    sigmas: list[float]
    value: list[float]
    standard_error: list[float]
    growing_value: list[float] = field(default_factory=list)
    """``Γ`` at ``σ√step`` for each grid ``σ`` (``step`` = steps already taken = ``t − 1``)."""
    growing_standard_error: list[float] = field(default_factory=list)
    shaped_value: list[float] = field(default_factory=list)
    """``Γ`` in the ``Σ⁻¹`` norm under block-shaped noise ``√step·λ·s`` per shaped scale ``λ``."""
    shaped_standard_error: list[float] = field(default_factory=list)


@dataclass
class FlatnessRecord:
    """SPEC §4 at the weights after ``step`` optimizer steps; perturbation std ``σ·scale``."""

    step: int
    sigmas: list[float]
    scale: float
    """``1``, or ``√step`` for ``scaling="sqrt_steps"`` (the bounds' ``Δ_T ~ N(0, Tσ²I)``)."""
    train: list[float]
    train_se: list[float]
    heldout: list[float] | None = None
    heldout_se: list[float] | None = None
    term: list[float] | None = None
    term_se: list[float] | None = None
    shape: list[float] | None = None
    """Per-group noise shape ``s`` when the perturbation is block-shaped (``σ_k = σ·s_k``)."""
    error_term: list[float] | None = None
    """``γ(S) − γ(S')`` of the 0-1 error (classifiers), per σ."""
    error_term_se: list[float] | None = None
    train_loss: float | None = None
    """The unperturbed training-probe loss (to flag perturbations that destroy the model)."""


@dataclass
class CurvatureRecord:
    """SPEC §5 at the weights after ``step`` optimizer steps (``None`` = not measured)."""

    step: int
    hessian_trace: float | None = None
    hessian_trace_se: float | None = None
    group_traces: list[float] | None = None
    """``Tr H_k`` per parameter group (``v_kᵀ(Hv)_k`` with the same probes); they sum to the trace."""
    group_samples: list[list[float]] | None = None
    """Per probe, the per-group samples (for the layer-wise bound's delta-method SE)."""
    top_eigenvalue: float | None = None
    contractivity_mean: float | None = None
    contractivity_min: float | None = None
    contractivity_exact: float | None = None
