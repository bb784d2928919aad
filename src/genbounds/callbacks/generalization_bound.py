"""``GeneralizationBound``: the bound aggregator (SPEC §6)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from genbounds.bounds import (
    expand_blocks,
    growing_level_series,
    neu_theorem1,
    trajectory_comparison,
    wang_mao_eq2,
    wang_mao_eq3,
)
from genbounds.callbacks.channel import (
    CurvatureRecord,
    DispersionRecord,
    FlatnessRecord,
    HeldoutRecord,
    SensitivityRecord,
)
from genbounds.callbacks.checks import check_positive
from genbounds.callbacks.flatness import Flatness
from genbounds.callbacks.gradient_dispersion import GradientDispersion
from genbounds.callbacks.gradient_sensitivity import GradientSensitivity
from genbounds.callbacks.heldout_gradient import HeldoutGradient
from genbounds.callbacks.hessian_trace import HessianTrace
from genbounds.callbacks.probe import ProbeCallback, ProbeMode, sigma_tag, training_set_size
from genbounds.callbacks.step_log import weights_step
from genbounds.estimators.functional import num_trainable, per_sample_losses, reduce_all

BoundName = Literal["wang_mao_eq2", "wang_mao_eq3", "neu"]
ALL_BOUNDS: tuple[str, ...] = ("wang_mao_eq2", "wang_mao_eq3", "neu")


def describe_optimizer(optimizer: Optimizer) -> tuple[str, bool]:
    """A readable description and whether it is plain SGD (no momentum, no weight decay)."""
    name = type(optimizer).__name__
    extras = []
    plain = isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        for key in ("momentum", "weight_decay", "dampening", "betas", "eps", "nesterov"):
            if key in group and group[key] not in (0, 0.0, False, None) and f"{key}={group[key]}" not in extras:
                extras.append(f"{key}={group[key]}")
                if key in ("momentum", "weight_decay", "nesterov"):
                    plain = False
    return (f"{name}({', '.join(extras)})" if extras else name), plain


class GeneralizationBound(ProbeCallback):
    r"""Aggregate the measurements into the generalization bounds and log them next to the loss.

    At every validation epoch end (and at train end), from what the measurement callbacks in the
    same ``Trainer`` publish on their channels (found by type at ``setup``):

    * ``bound/wang_mao_eq2`` — Wang & Mao Theorem 2, Eq. 2 minimized over the σ grid
      (``bound/sigma_wang_mao``, ``bound/trajectory_wang_mao``, ``bound/flatness_wang_mao``,
      ``bound/wang_mao_eq2_se``): needs ``GradientDispersion`` and
      ``Flatness(scaling="sqrt_steps")``;
    * ``bound/wang_mao_eq3`` — the closed form Eq. 3 with its two multiplicative factors
      ``bound/trajectory_factor_wang_mao_eq3`` and ``bound/flatness_factor_wang_mao_eq3`` (+ ``_se``):
      needs ``GradientDispersion`` and ``HessianTrace``; skipped with a warning while ``Tr H ≤ 0``;
    * ``bound/neu`` — Neu et al. Theorem 1 minimized over σ (``bound/trajectory_neu``,
      ``bound/sigma_neu``, ``bound/neu_se``, and ``bound/neu_abs`` with ``|flatness|`` for ``|gen|``):
      needs ``GradientSensitivity(growing=True)`` and ``Flatness(scaling="sqrt_steps")`` on the same
      σ grid, and ``HeldoutGradient`` for ``V_t`` (without it, ``grad/dispersion`` stands in, with a
      warning);
    * the seed-001 Figure-1 comparison of the trajectory terms at each grid σ
      (``bound/fig1_trajectory_neu/sigma=…``, ``bound/fig1_trajectory_wang_mao/sigma=…``);
    * ``gap/measured`` — held-out minus training loss on probe sets of equal size, same weights,
      eval mode (also at step 0), and ``gap/measured_change`` ``= gap(t) − gap(0)``, what
      ``gap/predicted_cumulative`` predicts;
    * ``bound/R``, ``bound/n``, ``bound/d``, ``bound/T``.

    ``η_t`` is read from the optimizer at every step. A quantity measured every ``k`` steps stands
    for the ``k`` steps of its block, each with its own ``η_t``. The end-of-run quantities
    (flatness at ``σ√T``, ``Tr H(W_T)``) are requested from their callbacks at the moment the
    bound is evaluated. The σ grid is the ``Flatness`` callback's (fixed before the run and logged
    as a hyper-parameter); the grid minimum of noisy estimates is optimistic (same draws for every
    σ; the SE at the minimizer is logged).

    The theory is for plain SGD with a fixed schedule: any other optimizer gets one warning and
    its name is recorded. Values are logged with ``pl_module.log`` from the validation epoch end,
    so ``EarlyStopping``/``ModelCheckpoint``/``BoundGate`` can monitor them. On TensorBoard it adds
    a custom-scalars layout (bounds vs measured gap; trajectory vs flatness; dispersion with the
    loss) and, at train end, the final bounds as HPARAMS metrics (use
    ``TensorBoardLogger(default_hp_metric=False)``).

    Args:
        bounds: which bounds to compute (default: all three).
        R: the loss's sub-Gaussian constant; default: half the observed range of per-sample
            training losses (seed 001 E.1 — a heuristic for unbounded losses).
        num_train: ``n``; default: the training dataset's length.
        probe_batch_size: samples in each of the two probe sets for ``gap/measured``.
        num_probe_batches: loader batches concatenated into each probe set.
        probe_mode: ``"eval"`` (default) or ``"train"``.
        loss_fn: the loss contract (default: ``per_sample_loss``).
        tensorboard_layout: add the custom-scalars layout.
        hparams: write the final bounds as HPARAMS metrics at train end.
        sensitivity_fill: how a ``GradientSensitivity`` probe at step ``s`` fills the steps ``τ`` of
            its block in Neu's sum: ``"scaled"`` (default) ``(τ/s)·Γ_{σ√s}``, second order in the
            noise level (exact for a quadratic loss; ``Γ`` grows with ``τ``); ``"block"`` the probe's
            value as is (SPEC §3's rule, which under-counts, and zeroes the block of the ``s = 0``
            probe).
    """

    owner = "GeneralizationBound"
    needs_train_probe = True
    needs_heldout_probe = True

    def __init__(
        self,
        bounds: list[BoundName] | None = None,
        R: float | None = None,
        num_train: int | None = None,
        probe_batch_size: int | None = None,
        num_probe_batches: int = 1,
        probe_mode: ProbeMode = "eval",
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        tensorboard_layout: bool = True,
        hparams: bool = True,
        sensitivity_fill: Literal["scaled", "block"] = "scaled",
    ) -> None:
        super().__init__(every_n_steps=None, every_n_epochs=None, at_train_end=False,
                         probe_batch_size=probe_batch_size, num_probe_batches=num_probe_batches,
                         probe_mode=probe_mode, loss_fn=loss_fn)
        self.bounds = list(bounds) if bounds is not None else list(ALL_BOUNDS)
        unknown = [b for b in self.bounds if b not in ALL_BOUNDS]
        if unknown or not self.bounds:
            raise MisconfigurationException(
                f"GeneralizationBound(bounds={self.bounds}) must be a non-empty subset of {list(ALL_BOUNDS)}"
            )
        check_positive("GeneralizationBound", R=R)
        self.R = R
        self.num_train = num_train
        self.tensorboard_layout = tensorboard_layout
        self.write_hparams = hparams
        if sensitivity_fill not in ("scaled", "block"):
            raise MisconfigurationException(
                f"GeneralizationBound(sensitivity_fill={sensitivity_fill!r}) must be 'scaled' or 'block'")
        self.sensitivity_fill = sensitivity_fill
        # producers
        self._dispersion: GradientDispersion | None = None
        self._flatness: Flatness | None = None
        self._hessian: HessianTrace | None = None
        self._sensitivity: GradientSensitivity | None = None
        self._heldout: HeldoutGradient | None = None
        self._trainer: Trainer | None = None
        # accumulated series (all host floats; checkpointed)
        self.lrs: list[float] = []
        self.dispersion_steps: list[int] = []
        self.dispersion_values: list[float] = []
        self.heldout_steps: list[int] = []
        self.heldout_values: list[float] = []
        self.sensitivity_steps: list[int] = []
        self.sensitivity_values: list[list[float]] = []
        self.sensitivity_se: list[list[float]] = []
        self.flatness_record: dict[str, Any] | None = None
        self.curvature_record: dict[str, Any] | None = None
        self.latest: dict[str, float] = {}
        self.optimizer: str | None = None
        self._n: int | None = None
        self._d: int | None = None
        self._warned: set[str] = set()
        self._evaluated_step: int | None = None
        self.gap_at_start: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bounds=self.bounds)

    @property
    def sigmas(self) -> list[float]:
        return list(self._flatness.sigmas) if self._flatness is not None else []

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._trainer = trainer
        found: dict[type, list] = {}
        for cb in trainer.callbacks:
            for kind in (GradientDispersion, Flatness, HessianTrace, GradientSensitivity, HeldoutGradient):
                if isinstance(cb, kind):
                    found.setdefault(kind, []).append(cb)
        flats = [f for f in found.get(Flatness, []) if f.scaling == "sqrt_steps"]
        sens = [s for s in found.get(GradientSensitivity, []) if s.growing]
        self._dispersion = next(iter(found.get(GradientDispersion, [])), None)
        self._flatness = next(iter(flats), None)
        self._hessian = next(iter(found.get(HessianTrace, [])), None)
        self._sensitivity = next(iter(sens), None)
        self._heldout = next(iter(found.get(HeldoutGradient, [])), None)
        missing = []
        if self._dispersion is None:
            missing.append("GradientDispersion() — the trajectory terms (all bounds)")
        if self._flatness is None and {"wang_mao_eq2", "neu"} & set(self.bounds):
            missing.append('Flatness(scaling="sqrt_steps") — the flatness term γ(W_T, ·; σ√T) (wang_mao_eq2, neu)')
        if self._hessian is None and "wang_mao_eq3" in self.bounds:
            missing.append("HessianTrace() — Tr H(W_T) (wang_mao_eq3)")
        if self._sensitivity is None and "neu" in self.bounds:
            missing.append("GradientSensitivity(growing=True) — Γ at σ√(t−1) (neu)")
        if missing:
            raise MisconfigurationException(
                f"GeneralizationBound(bounds={self.bounds}) needs these callbacks in the same Trainer: "
                + "; ".join(missing)
                + ". Add them to `trainer.callbacks`, or restrict `bounds=`."
            )
        if self._sensitivity is not None and self._flatness is not None and "neu" in self.bounds:
            if [float(s) for s in self._sensitivity.sigmas] != [float(s) for s in self._flatness.sigmas]:
                raise MisconfigurationException(
                    "GeneralizationBound(neu): GradientSensitivity(sigmas=…) and Flatness(sigmas=…) must use "
                    f"the same σ grid; got {self._sensitivity.sigmas} and {self._flatness.sigmas}."
                )
        if self._heldout is None and "neu" in self.bounds:
            self._warn_once("no-heldout", "GeneralizationBound: no HeldoutGradient callback, so Neu's V_t is "
                            "replaced by grad/dispersion (which misses the train/test mismatch).")
        assert self._dispersion is not None
        self._dispersion.channel.subscribe(self._on_dispersion)
        if self._flatness is not None:
            self._flatness.channel.subscribe(self._on_flatness)
        if self._hessian is not None:
            self._hessian.channel.subscribe(self._on_curvature)
        if self._sensitivity is not None:
            self._sensitivity.channel.subscribe(self._on_sensitivity)
        if self._heldout is not None:
            self._heldout.channel.subscribe(self._on_heldout)
        self._d = num_trainable(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for producer, fn in ((self._dispersion, self._on_dispersion), (self._flatness, self._on_flatness),
                             (self._hessian, self._on_curvature), (self._sensitivity, self._on_sensitivity),
                             (self._heldout, self._on_heldout)):
            if producer is not None:
                producer.channel.unsubscribe(fn)

    # ------------------------------------------------------------------ channel handlers
    def _on_dispersion(self, records: list[DispersionRecord]) -> None:
        for r in records:
            self.dispersion_steps.append(r.step)
            self.dispersion_values.append(r.dispersion)

    def _on_heldout(self, records: list[HeldoutRecord]) -> None:
        for r in records:
            self.heldout_steps.append(r.step)
            self.heldout_values.append(r.heldout_dist_sq)

    def _on_sensitivity(self, records: list[SensitivityRecord]) -> None:
        for r in records:
            self.sensitivity_steps.append(r.step)
            self.sensitivity_values.append(list(r.growing_value))
            self.sensitivity_se.append(list(r.growing_standard_error))

    def _on_flatness(self, records: list[FlatnessRecord]) -> None:
        self.flatness_record = asdict(records[-1])

    def _on_curvature(self, records: list[CurvatureRecord]) -> None:
        self.curvature_record = asdict(records[-1])

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.tensorboard_layout and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars(self.tensorboard_layout_dict())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._n = self.num_train or training_set_size(trainer)
        if self._n is None:
            raise MisconfigurationException(
                "GeneralizationBound could not determine the number of training samples n; pass num_train=..."
            )
        if trainer.optimizers:
            self.optimizer, plain = describe_optimizer(trainer.optimizers[0])
            if not plain:
                self._warn_once("optimizer", f"GeneralizationBound: the optimizer is {self.optimizer}, not plain SGD; "
                                "the bounds take η_t·ḡ_B as the step, which is then a heuristic.")
            for config in getattr(trainer, "lr_scheduler_configs", []):
                if type(config.scheduler).__name__ == "ReduceLROnPlateau":
                    self._warn_once("plateau", "GeneralizationBound: ReduceLROnPlateau makes the learning-rate "
                                    "schedule data-dependent, which the bounds exclude.")
        skipped = [b for b in self.bounds if b in ("wang_mao_eq2", "neu")]
        if not self.heldout_available and skipped:
            self._warn_once("no-val", f"GeneralizationBound: without held-out data the flatness term γ(S) − γ(S') "
                            f"and gap/measured cannot be measured, so {skipped} are skipped.")
        if trainer.global_step == 0 and self.heldout_available:
            self.gap_at_start = self._measured_gap(trainer, pl_module)
            self._log_values(trainer, pl_module, {"gap/measured": self.gap_at_start, "gap/measured_change": 0.0},
                             log=True)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        pass  # evaluated at validation epoch end and train end only

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.enable_validation:  # no validation loop: evaluate at every epoch end instead
            self.evaluate(trainer, pl_module, log=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.evaluate(trainer, pl_module, log=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._evaluated_step != trainer.global_step:  # not already evaluated at these weights
            self.evaluate(trainer, pl_module, log=False)
        if self.write_hparams and trainer.is_global_zero:
            self._write_hparams(trainer, pl_module)

    # ------------------------------------------------------------------ evaluation
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _measured_gap(self, trainer: Trainer, pl_module: LightningModule) -> float:
        assert self._loss_fn is not None
        from genbounds.callbacks.isolation import isolated_pass

        with isolated_pass(pl_module, mode=self.probe_mode, grad=False):
            train = per_sample_losses(pl_module, self._loss_fn, self.train_probe).double().mean()
            held = per_sample_losses(pl_module, self._loss_fn, self.heldout_probe).double().mean()
            train, held = reduce_all([train, held], self.reducer(trainer))
        return float(held - train)

    def _loss_range_r(self, trainer: Trainer) -> float:
        if self.R is not None:
            return float(self.R)
        assert self._dispersion is not None
        rng = self._dispersion.loss_range  # folded over the ranks by the flush evaluate() starts with
        if rng is None or not math.isfinite(rng[1] - rng[0]):
            return math.nan
        return (rng[1] - rng[0]) / 2.0

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, *, log: bool) -> dict[str, float]:
        """Flush the producers, request the end-of-run measurements, compute and log the bounds."""
        if trainer.sanity_checking or self._dispersion is None:
            return {}
        self._evaluated_step = int(trainer.global_step)
        self._dispersion.flush(trainer, pl_module if log else None, epoch_end=True)
        for producer in (self._flatness, self._hessian):
            if producer is not None and producer.active:
                producer.probe_now(trainer, pl_module, log=log, epoch_end=True)
        values = self.compute(trainer.global_step, self._loss_range_r(trainer))
        if self.heldout_available:
            values["gap/measured"] = self._measured_gap(trainer, pl_module)
            if self.gap_at_start is not None:
                values["gap/measured_change"] = values["gap/measured"] - self.gap_at_start
        self._log_values(trainer, pl_module, values, log=log)
        return values

    def compute(self, total_steps: int, r: float) -> dict[str, float]:
        """The bounds from the accumulated series (pure: no model access)."""
        T = min(total_steps, len(self.lrs))
        if T == 0 or not self.dispersion_steps or self._n is None or self._d is None:
            return {}
        n, d = self._n, self._d
        eta = np.asarray(self.lrs[:T], dtype=np.float64)
        vhat = expand_blocks(self.dispersion_steps, self.dispersion_values, T)
        out: dict[str, float] = {"bound/R": r, "bound/n": float(n), "bound/d": float(d), "bound/T": float(T)}
        sigmas = self.sigmas
        flat = self._flatness_at(T)
        if "wang_mao_eq3" in self.bounds:
            rec = self.curvature_record
            if rec is not None and rec["step"] == T and rec["hessian_trace"] is not None:
                eq3 = wang_mao_eq3(r, T, rec["hessian_trace"], float(np.sum(eta**2 * np.maximum(vhat, 0.0))), n,
                                   rec["hessian_trace_se"])
                if eq3 is None:
                    self._warn_once("trace", "GeneralizationBound: Tr H ≤ 0 at the evaluated weights, so "
                                    "Wang–Mao Eq. 3 is undefined there and not logged.")
                else:
                    out.update({
                        "bound/wang_mao_eq3": eq3.value,
                        "bound/wang_mao_eq3_se": eq3.standard_error,
                        "bound/trajectory_factor_wang_mao_eq3": eq3.trajectory_factor,
                        "bound/flatness_factor_wang_mao_eq3": eq3.flatness_factor,
                        "bound/sigma_star_wang_mao_eq3": eq3.sigma_star,
                    })
        if "wang_mao_eq2" in self.bounds and flat is not None:
            eq2 = wang_mao_eq2(eta, vhat, r, n, d, sigmas, flat["term"], flat["term_se"])
            out.update({
                "bound/wang_mao_eq2": eq2.value,
                "bound/wang_mao_eq2_se": eq2.standard_error,
                "bound/sigma_wang_mao": eq2.sigma,
                "bound/trajectory_wang_mao": eq2.trajectory[eq2.best],
                "bound/flatness_wang_mao": eq2.flatness[eq2.best],
            })
        if "neu" in self.bounds and flat is not None and self.sensitivity_steps:
            gamma, fill_weights = growing_level_series(self.sensitivity_steps, self.sensitivity_values, T,
                                                       self.sensitivity_fill)
            v = (expand_blocks(self.heldout_steps, self.heldout_values, T) if self.heldout_steps else vhat)
            order = np.argsort(self.sensitivity_steps, kind="stable")
            se = np.asarray(self.sensitivity_se, dtype=np.float64)[order]
            gamma_sum_se = np.sqrt(np.sum(((fill_weights @ eta**2)[:, None] * se) ** 2, axis=0))
            neu = neu_theorem1(eta, gamma, v, r, n, sigmas, flat["term"], flat["term_se"], gamma_sum_se)
            out.update({
                "bound/neu": neu.value,
                "bound/neu_se": neu.standard_error,
                "bound/neu_abs": neu.bound_abs[neu.best_abs],
                "bound/sigma_neu": neu.sigma,
                "bound/trajectory_neu": neu.trajectory[neu.best],
                "bound/flatness_neu": neu.flatness[neu.best],
            })
            fig_neu, fig_wm = trajectory_comparison(eta, gamma, v, vhat, d, sigmas)
            for s, a, b in zip(sigmas, fig_neu, fig_wm):
                out[f"bound/fig1_trajectory_neu/{sigma_tag(s)}"] = a
                out[f"bound/fig1_trajectory_wang_mao/{sigma_tag(s)}"] = b
        return out

    def _flatness_at(self, T: int) -> dict[str, Any] | None:
        rec = self.flatness_record
        if rec is None or rec["step"] != T or rec["term"] is None:
            return None
        return rec

    def _log_values(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float], *, log: bool) -> None:
        finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        if not finite:
            return
        self.latest.update(finite)
        step = weights_step(trainer)
        self.step_log.record(step, {k: torch.tensor(v, dtype=torch.float64) for k, v in finite.items()})
        self.step_log.flush(trainer, pl_module if log else None, epoch_end=log)

    # ------------------------------------------------------------------ TensorBoard extras
    @staticmethod
    def tensorboard_layout_dict() -> dict:
        return {
            "genbounds": {
                "bounds vs measured gap": ["Multiline", [r"^bound/wang_mao_eq2$", r"^bound/wang_mao_eq3$",
                                                         r"^bound/neu$", r"^bound/neu_abs$", r"^gap/measured$"]],
                "trajectory vs flatness": ["Multiline", [r"^bound/trajectory_.*", r"^bound/flatness_.*"]],
                "dispersion and loss": ["Multiline", [r"^grad/dispersion$", r"^train_loss_step$", r"^val_loss$"]],
                "predicted vs measured change of the gap": ["Multiline", [r"^gap/predicted_cumulative$",
                                                                         r"^gap/measured_change$"]],
            }
        }

    def _write_hparams(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metrics = {k: v for k, v in self.latest.items()
                   if k.startswith(("bound/wang_mao_eq", "bound/neu", "gap/measured", "bound/R"))
                   and "/" not in k.split("/", 1)[1]}
        if not metrics:
            return
        params: dict[str, Any] = {"optimizer": self.optimizer or "", "bounds": ",".join(self.bounds),
                                  "sigma_grid": ",".join(f"{s:g}" for s in self.sigmas),
                                  "n": int(self._n or 0), "d": int(self._d or 0)}
        if trainer.optimizers:
            params["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        dm = trainer.datamodule
        if dm is not None and isinstance(getattr(dm, "batch_size", None), int):
            params["batch_size"] = dm.batch_size
        for key, value in dict(getattr(pl_module, "hparams", {})).items():
            if isinstance(value, (int, float, str, bool)):
                params[f"model/{key}"] = value
        exp, ssi, sei = hparams_summary(params, metrics)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment._get_file_writer()
                for summary in (exp, ssi, sei):
                    writer.add_summary(summary)
                logger.experiment.add_text("genbounds/optimizer", self.optimizer or "unknown")
                logger.experiment.flush()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self._trainer is not None and self._dispersion is not None:
            self._dispersion.flush(self._trainer)  # buffered statistics belong in the checkpoint
        state = super().state_dict()
        state.update(
            lrs=list(self.lrs),
            dispersion_steps=list(self.dispersion_steps), dispersion_values=list(self.dispersion_values),
            heldout_steps=list(self.heldout_steps), heldout_values=list(self.heldout_values),
            sensitivity_steps=list(self.sensitivity_steps),
            sensitivity_values=[list(v) for v in self.sensitivity_values],
            sensitivity_se=[list(v) for v in self.sensitivity_se],
            flatness_record=self.flatness_record, curvature_record=self.curvature_record,
            latest=dict(self.latest), optimizer=self.optimizer, warned=sorted(self._warned),
            evaluated_step=self._evaluated_step, gap_at_start=self.gap_at_start,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.lrs = list(state_dict.get("lrs", []))
        self.dispersion_steps = list(state_dict.get("dispersion_steps", []))
        self.dispersion_values = list(state_dict.get("dispersion_values", []))
        self.heldout_steps = list(state_dict.get("heldout_steps", []))
        self.heldout_values = list(state_dict.get("heldout_values", []))
        self.sensitivity_steps = list(state_dict.get("sensitivity_steps", []))
        self.sensitivity_values = [list(v) for v in state_dict.get("sensitivity_values", [])]
        self.sensitivity_se = [list(v) for v in state_dict.get("sensitivity_se", [])]
        self.flatness_record = state_dict.get("flatness_record")
        self.curvature_record = state_dict.get("curvature_record")
        self.latest = dict(state_dict.get("latest", {}))
        self.optimizer = state_dict.get("optimizer")
        self._warned = set(state_dict.get("warned", []))
        self._evaluated_step = state_dict.get("evaluated_step")
        self.gap_at_start = state_dict.get("gap_at_start")
