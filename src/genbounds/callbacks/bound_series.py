"""The series the bounds are computed from, as the measurement callbacks publish them.

``GeneralizationBound`` subscribes :class:`BoundSeries` to its producers' channels; everything is
host floats, checkpointed (as tensors, so checkpoints load with ``weights_only=True``). The
configuration the series depend on (σ grid, parameter groups, producers) is kept with them, so a
resume with a different configuration is refused instead of mixing incompatible values.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from genbounds.bounds import expand_blocks, expand_blocks_scaled, growing_level_series, size_scaling
from genbounds.bounds.aggregate import BoundInputs
from genbounds.bounds.series import growing_level_fill_se
from genbounds.callbacks.channel import (
    CurvatureRecord,
    DispersionRecord,
    FlatnessRecord,
    HeldoutRecord,
    SensitivityRecord,
)


def _tensor(rows: list[list[float]] | list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


class BoundSeries:
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.dispersion_steps: list[int] = []
        self.dispersion_values: list[float] = []
        self.dispersion_groups: list[list[float]] = []
        self.heldout_steps: list[int] = []
        self.heldout_values: list[float] = []
        self.heldout_groups: list[list[float]] = []
        self.sensitivity_steps: list[int] = []
        self.sensitivity_values: list[list[float]] = []
        self.sensitivity_se: list[list[float]] = []
        self.sensitivity_shaped: list[list[float]] = []
        self.sensitivity_shaped_se: list[list[float]] = []
        self.flatness: list[dict[str, Any]] = []
        """The latest flatness records: the isotropic grid first, then one per block shape."""
        self.curvature: dict[str, Any] | None = None
        self.config: dict[str, Any] = {}

    # ------------------------------------------------------------------ channel handlers
    def on_dispersion(self, records: list[DispersionRecord]) -> None:
        for r in records:
            self.dispersion_steps.append(r.step)
            self.dispersion_values.append(r.dispersion)
            if r.groups is not None and _same_width(r.groups, self.dispersion_groups):
                self.dispersion_groups.append(list(r.groups))

    def on_heldout(self, records: list[HeldoutRecord]) -> None:
        for r in records:
            self.heldout_steps.append(r.step)
            self.heldout_values.append(r.heldout_dist_sq)
            if r.groups is not None and _same_width(r.groups, self.heldout_groups):
                self.heldout_groups.append(list(r.groups))

    def on_sensitivity(self, records: list[SensitivityRecord]) -> None:
        for r in records:
            self.sensitivity_steps.append(r.step)
            self.sensitivity_values.append(list(r.growing_value))
            self.sensitivity_se.append(list(r.growing_standard_error))
            if r.shaped_value:
                self.sensitivity_shaped.append(list(r.shaped_value))
                self.sensitivity_shaped_se.append(list(r.shaped_standard_error))

    def on_flatness(self, records: list[FlatnessRecord]) -> None:
        self.flatness = [asdict(r) for r in records]

    def on_curvature(self, records: list[CurvatureRecord]) -> None:
        self.curvature = asdict(records[-1])

    # ------------------------------------------------------------------ views
    def flatness_at(self, step: int, shaped: bool = False) -> dict[str, Any] | None:
        """The isotropic (or first block-shaped) flatness record measured at ``step``."""
        for rec in self.flatness:
            if rec["step"] == step and (rec.get("shape") is not None) == shaped and rec["term"] is not None:
                return rec
        return None

    def curvature_at(self, step: int) -> dict[str, Any] | None:
        rec = self.curvature
        if rec is None or rec["step"] != step or rec["hessian_trace"] is None:
            return None
        return rec

    def inputs(self, T: int, n: int, d: int, r: float, sigmas: list[float], wanted: tuple[str, ...], *,
               z: float = 1.0, max_loss_increase: float | None = None, fill: str = "scaled",
               grouped: bool = False, sizes: np.ndarray | None = None) -> BoundInputs | None:
        """The bounds' inputs at step ``T`` (every quantity measured at step ``s`` standing for the
        steps of its block, each with its own ``η_t``; the dispersion, ``Tr Σ/b``, also at its own
        batch size ``b_t`` where ``sizes`` gives them and they differ: ``docs/math.md`` §6.8);
        ``None`` before the first step."""
        if T == 0 or not self.dispersion_steps:
            return None
        eta = np.asarray(self.lrs[:T], dtype=np.float64)
        scaling = size_scaling(self.dispersion_steps, sizes, T)
        vhat = expand_blocks_scaled(self.dispersion_steps, self.dispersion_values, T, scaling)
        measured = np.asarray(self.dispersion_values, dtype=np.float64)
        inp = BoundInputs(T=T, n=n, d=d, r=r, eta=eta, vhat=vhat, sigmas=list(sigmas), wanted=wanted, z=z,
                          max_loss_increase=max_loss_increase, vhat_steps=np.asarray(self.dispersion_steps),
                          vhat_measured=measured if scaling is None else measured * scaling[0],
                          fill_scale=None if scaling is None else 1.0 / scaling[1])
        flats = [rec for rec in self.flatness if rec["step"] == T and rec["term"] is not None]
        inp.flat = next((rec for rec in flats if rec.get("shape") is None), None)
        shaped = [rec for rec in flats if rec.get("shape") is not None]
        neu_shape = self.config.get("neu_shape")
        inp.flat_neu_shaped = next((rec for rec in shaped if neu_shape is not None and
                                    np.allclose(rec["shape"], neu_shape)), None)
        inp.flat_shaped = next((rec for rec in shaped if rec is not inp.flat_neu_shaped), None)
        inp.curvature = self.curvature_at(T)
        if self.heldout_steps:
            inp.v = expand_blocks(self.heldout_steps, self.heldout_values, T)
            inp.v_steps, inp.v_measured = np.asarray(self.heldout_steps), np.asarray(self.heldout_values)
        if self.sensitivity_steps:
            inp.gamma, inp.gamma_sum_se = self._gamma(self.sensitivity_values, self.sensitivity_se, T, eta, fill)
            # (NaN from one probe: said by the bound at the final weights, bound_evaluation.one_gamma_probe_note)
            if self.sensitivity_shaped and len(self.sensitivity_shaped) == len(self.sensitivity_steps):
                inp.gamma_shaped, inp.gamma_shaped_sum_se = self._gamma(
                    self.sensitivity_shaped, self.sensitivity_shaped_se, T, eta, fill)
                inp.neu_shape = None if neu_shape is None else np.asarray(neu_shape, dtype=np.float64)
        if grouped and self.dispersion_groups and len(self.dispersion_groups) == len(self.dispersion_steps):
            inp.vhat_blocks = expand_blocks_scaled(self.dispersion_steps, self.dispersion_groups, T, scaling)
            blocks = np.asarray(self.dispersion_groups, dtype=np.float64)
            inp.vhat_measured_blocks = blocks if scaling is None else blocks * scaling[0][:, None]
            inp.d_blocks = list(self.config.get("group_sizes") or []) or None
            if self.heldout_groups and len(self.heldout_groups) == len(self.heldout_steps):
                inp.v_blocks = expand_blocks(self.heldout_steps, self.heldout_groups, T)
                inp.v_measured_blocks = np.asarray(self.heldout_groups, dtype=np.float64)
        return inp

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "lrs": _tensor(self.lrs),
            "dispersion_steps": torch.tensor(self.dispersion_steps, dtype=torch.int64),
            "dispersion_values": _tensor(self.dispersion_values),
            "dispersion_groups": _tensor(self.dispersion_groups) if self.dispersion_groups else None,
            "heldout_steps": torch.tensor(self.heldout_steps, dtype=torch.int64),
            "heldout_values": _tensor(self.heldout_values),
            "heldout_groups": _tensor(self.heldout_groups) if self.heldout_groups else None,
            "sensitivity_steps": torch.tensor(self.sensitivity_steps, dtype=torch.int64),
            "sensitivity_values": _tensor(self.sensitivity_values) if self.sensitivity_values else None,
            "sensitivity_se": _tensor(self.sensitivity_se) if self.sensitivity_se else None,
            "sensitivity_shaped": _tensor(self.sensitivity_shaped) if self.sensitivity_shaped else None,
            "sensitivity_shaped_se": _tensor(self.sensitivity_shaped_se) if self.sensitivity_shaped_se else None,
            "flatness": list(self.flatness),
            "curvature": self.curvature,
            "config": dict(self.config),
        }

    def _gamma(self, values: list[list[float]], se: list[list[float]], T: int, eta: np.ndarray,
               fill: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-step Γ filled from the probes' ``values`` (isotropic or block-shaped), and the SE of
        ``Σ η² Γ``: the probes' Monte-Carlo ``se`` through the fill's weights and the error of filling
        the steps between them, in quadrature (``docs/math.md`` §6.9)."""
        gamma, weights = growing_level_series(self.sensitivity_steps, values, T, fill)
        se = np.asarray(se, dtype=np.float64)[np.argsort(self.sensitivity_steps, kind="stable")]
        monte_carlo = np.sqrt(np.sum(((weights @ eta**2)[:, None] * se) ** 2, axis=0))
        return gamma, np.hypot(monte_carlo, growing_level_fill_se(self.sensitivity_steps, values, eta**2, fill))

    def has_gamma_level(self) -> bool:
        """Whether a Γ probe that carries a level stands (one after step 0): :meth:`gamma_level_steps`
        not empty, without building it (asked at every step start under a budget while Neu's midway
        probe is still to come)."""
        return any(s >= 1 for s in self.sensitivity_steps)

    def gamma_level_steps(self) -> list[int]:
        """The steps of the Γ probes that carry a level (after step 0, where ``Γ_0 = 0``), sorted, once
        each: two at least for Neu's bounds (``docs/math.md`` §6.9)."""
        return sorted({s for s in self.sensitivity_steps if s >= 1})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def floats(key: str) -> list:
            value = state.get(key)
            return [] if value is None else value.tolist() if isinstance(value, torch.Tensor) else list(value)

        self.lrs = floats("lrs")
        self.dispersion_steps = [int(s) for s in floats("dispersion_steps")]
        self.dispersion_values = floats("dispersion_values")
        self.dispersion_groups = floats("dispersion_groups")
        self.heldout_steps = [int(s) for s in floats("heldout_steps")]
        self.heldout_values = floats("heldout_values")
        self.heldout_groups = floats("heldout_groups")
        self.sensitivity_steps = [int(s) for s in floats("sensitivity_steps")]
        self.sensitivity_values = floats("sensitivity_values")
        self.sensitivity_se = floats("sensitivity_se")
        self.sensitivity_shaped = floats("sensitivity_shaped")
        self.sensitivity_shaped_se = floats("sensitivity_shaped_se")
        self.flatness = list(state.get("flatness", []))
        self.curvature = state.get("curvature")
        self.config = dict(state.get("config", {}))

    def configure(self, sigmas: list[float], groups: dict[str, list[str]], sizes: dict[str, int],
                  trained: list[str] | None = None) -> None:
        """Note what the series are measured on — the σ grid, the parameter groups and their sizes
        (``sizes``: elements per parameter name), the trained parameters' names — unless a
        checkpoint already did."""
        self.config.setdefault("sigmas", list(sigmas))
        self.config.setdefault("groups", list(groups))
        self.config.setdefault("group_sizes", [sum(sizes[n] for n in members) for members in groups.values()])
        if trained is not None:
            self.config.setdefault("trained", list(trained))

    def check_resumable(self, sigmas: list[float], groups: list[str]) -> None:
        """Raise when these series (from a checkpoint) were measured on another σ grid or other
        parameter groups than the run resuming them has: the two cannot be mixed."""
        saved = self.config.get("sigmas")
        if saved is not None and sigmas and [float(s) for s in saved] != list(sigmas):
            raise MisconfigurationException(
                f"GeneralizationBound: this checkpoint's series were measured on the σ grid {saved}, but the "
                f"Flatness/GradientSensitivity grid is now {list(sigmas)}. Γ and the flatness terms of the two grids "
                "cannot be mixed: resume with the original grid, or start a new run.")
        saved_groups = self.config.get("groups")
        if saved_groups is not None and groups and list(saved_groups) != list(groups):
            raise MisconfigurationException(
                "GeneralizationBound: this checkpoint's per-layer series use the parameter groups "
                f"{saved_groups}, not {list(groups)}: resume with the same model and layer_groups.")


def _same_width(groups: list[float], rows: list[list[float]]) -> bool:
    """A record's per-group values as wide as the rows kept: after the trained parameters changed
    (other layers: trainable_set.py) the per-layer series stop, the bounds being NaN from then."""
    return not rows or len(groups) == len(rows[0])
