"""Which measurement callbacks feed ``GeneralizationBound``, which bounds they allow, and what an
evaluation asks of them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from genbounds.bounds.aggregate import ALL_BOUNDS, LAYERWISE, BoundInputs, wang_mao_shape
from genbounds.bounds.layerwise import init_rms_shape
from genbounds.callbacks.bound_evaluation import final_floors, final_shares
from genbounds.callbacks.bound_series import BoundSeries
from genbounds.callbacks.flatness import Flatness
from genbounds.callbacks.gradient_dispersion import GradientDispersion
from genbounds.callbacks.gradient_sensitivity import GradientSensitivity
from genbounds.callbacks.heldout_gradient import HeldoutGradient
from genbounds.callbacks.hessian_trace import HessianTrace
from genbounds.callbacks.probe import ProbeCallback
from genbounds.estimators.functional import group_index, trainable_parameters

FLATNESS = 'Flatness(scaling="sqrt_steps")'


@dataclass
class Producers:
    """The first callback of each kind in ``trainer.callbacks`` (found by type, not by name)."""

    dispersion: GradientDispersion | None = None
    flatness: Flatness | None = None
    hessian: HessianTrace | None = None
    sensitivity: GradientSensitivity | None = None
    heldout: HeldoutGradient | None = None
    at_end: list[Any] = field(default_factory=list)
    """Every other probe callback of the Trainer that measures the final weights (``at_train_end``):
    the final evaluation runs them first, at their fewest draws (:meth:`end_probes`)."""

    @staticmethod
    def find(trainer: Trainer, bound: Any = None) -> Producers:
        def pick(kind: type, accept: Callable[[Any], bool] = lambda _: True) -> Any:
            return next((cb for cb in trainer.callbacks if isinstance(cb, kind) and accept(cb)), None)

        at_end = [cb for cb in trainer.callbacks
                  if isinstance(cb, ProbeCallback) and cb is not bound and cb.schedule.at_train_end]
        return Producers(pick(GradientDispersion), pick(Flatness, lambda f: f.scaling == "sqrt_steps"),
                         pick(HessianTrace), pick(GradientSensitivity, lambda s: s.growing), pick(HeldoutGradient),
                         at_end)

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

    def left_out(self, wanted: tuple[str, ...]) -> str | None:
        """With ``bounds=`` at its default: the bounds not computed for want of a producer, each
        with the callbacks it needs (``None`` when none is)."""
        need = self.needs()
        left = [f"{name} ({', '.join(what for what, cb in need[name] if cb is None)})" for name in ALL_BOUNDS
                if name not in wanted and name not in LAYERWISE and any(cb is None for _, cb in need[name])]
        if not left:
            return None
        return (f"GeneralizationBound: computing {', '.join(wanted)}; not computed, their callbacks not being in this "
                f"Trainer: {'; '.join(left)}. With bounds=[...] a bound whose callbacks are missing is an error "
                "before step 0.")

    def notes(self, wanted: tuple[str, ...]) -> list[tuple[str, str]]:
        """``(kind, message)`` for each stand-in the ``wanted`` bounds take for a missing producer."""
        if self.heldout is None and "neu" in wanted:
            return [("no-heldout", "GeneralizationBound: no HeldoutGradient callback, so Neu's V_t is replaced by "
                     "grad/dispersion (which misses the train/test mismatch).")]
        return []

    def subscriptions(self, series: BoundSeries) -> list[tuple[Any, Callable]]:
        pairs = [(self.dispersion, series.on_dispersion), (self.flatness, series.on_flatness),
                 (self.hessian, series.on_curvature), (self.sensitivity, series.on_sensitivity),
                 (self.heldout, series.on_heldout)]
        return [(p, h) for p, h in pairs if p is not None]

    def connect(self, series: BoundSeries, on: bool = True) -> None:
        """Subscribe ``series`` to every producer's channel (``on=False``: unsubscribe)."""
        for producer, handler in self.subscriptions(series):
            (producer.channel.subscribe if on else producer.channel.unsubscribe)(handler)

    def set_neu_shape(self, series: BoundSeries, groups: dict[str, list[str]], pl_module: LightningModule) -> None:
        """Neu's block shape: the per-group RMS of the initial weights (data-independent, §9.4),
        noted in the series (a resumed run keeps the one it started with) and given to Γ."""
        if self.sensitivity is None:
            return
        shape = series.config.get("neu_shape")
        params = trainable_parameters(pl_module)
        if shape is None:
            sq = [sum(float(params[n].detach().double().square().sum()) for n in members) for members in groups.values()]
            d_blocks = [sum(params[n].numel() for n in members) for members in groups.values()]
            shape = init_rms_shape(sq, d_blocks).tolist()
            series.config["neu_shape"] = shape
        self.sensitivity.set_shape(list(shape), group_index(groups, list(params)))

    def evaluation_probes(self, series: BoundSeries, final: bool = False) -> list[Any]:
        """The probes an evaluation asks for, in the order they run: the Hessian; Γ at the final
        weights (``final``) where fewer than two Γ probes after step 0 stand for the run (one alone
        leaves Neu's bounds NaN: ``docs/math.md`` §6.9) — not at an intermediate evaluation, whose
        probe would enter the series and which a resumed fit can skip (Lightning does not repeat the
        validation of a checkpoint saved at an epoch's last batch): resumes stay exact; the flatness
        with the layer-wise shapes."""
        sensitivity = self.sensitivity if final and self.gamma_short(series) else None
        return [p for p in (self.hessian, sensitivity, self.flatness) if p is not None and p.active]

    def gamma_short(self, series: BoundSeries) -> bool:
        """Whether fewer than two Γ probes after step 0 stand for the run."""
        return self.sensitivity is not None and len(series.gamma_level_steps()) < 2

    def end_probes(self, series: BoundSeries) -> list[Any]:
        """The Trainer's other ``at_train_end`` probes (e.g. ``HessianContractivity``), which the final
        evaluation runs first at their fewest draws: on their own, at train end, they would find the
        budget spent by the bound's final probes, which take all that is left."""
        asked = self.evaluation_probes(series, final=True)
        return [p for p in self.at_end if p.active and p not in asked]

    def measure_at_end(self, trainer: Trainer, pl_module: LightningModule, series: BoundSeries, *,
                       fewest: bool) -> None:
        """Have :meth:`end_probes` measure the final weights: at their fewest draws before the final
        evaluation's own probes (``fewest``), else — no final evaluation to follow, the last one
        already had these weights — sharing what is left of the budget (:func:`final_shares`)."""
        probes = self.end_probes(series)
        shares = _fewest_draws(probes) if fewest else final_shares(probes, [p.first_cost() for p in probes])
        with shares:
            for probe in probes:
                probe.probe_now(trainer, pl_module, log=False, epoch_end=True)

    def end_cost(self, series: BoundSeries) -> float:
        """What :meth:`end_probes` cost at their fewest draws (a part of the final evaluation's reserve)."""
        return sum(p.first_cost() for p in self.end_probes(series))

    def measure(self, trainer: Trainer, pl_module: LightningModule, series: BoundSeries,
                groups: dict[str, list[str]], inputs: Callable[[], BoundInputs | None], *, log: bool,
                final: bool) -> BoundInputs | None:
        """Have the probes measure the current weights for an evaluation (see
        :meth:`evaluation_probes`; ``final``: at the fit's final weights); the train end's
        (``log=False``) shares what is left of the budget among them (:func:`final_shares`). The
        bounds' inputs after it."""
        probes = self.evaluation_probes(series, final=final)
        with final_shares(probes, final_floors(probes, self.flatness, series) if not log else [], enabled=not log):
            for probe in probes:
                if probe is not self.flatness:
                    probe.probe_now(trainer, pl_module, log=log, epoch_end=True)
            current = inputs()
            if self.flatness in probes and current is not None:
                shapes = [s for s in (wang_mao_shape(current), series.config.get("neu_shape")) if s is not None]
                self.flatness.measure_shapes(trainer, pl_module, [list(map(float, s)) for s in shapes],
                                             group_index(groups, list(trainable_parameters(pl_module))), log=log)
                current = inputs()
        return current


@contextmanager
def _fewest_draws(probes: list[Any]) -> Iterator[None]:
    """``probes`` take their fewest draws under a budget while inside (a final share of nothing)."""
    for probe in probes:
        probe.final_share, probe.final_floor_after = 0.0, 0.0
    try:
        yield
    finally:
        for probe in probes:
            probe.final_share, probe.final_floor_after = None, 0.0
