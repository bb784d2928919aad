"""``HessianContractivity``: seed 004's contractivity along the gradient (SPEC §5)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from genbounds.callbacks.channel import Channel, CurvatureRecord
from genbounds.callbacks.checks import check_bool, check_choice, check_float, check_int
from genbounds.callbacks.gradient_sensitivity import PRECISIONS, Precision, probe_dtype
from genbounds.callbacks.probe import ProbeCallback, ProbeMode
from genbounds.estimators.collective import not_twice_differentiable
from genbounds.estimators.contractivity import contractivity, contractivity_exact
from genbounds.estimators.hessian_vector_product import LossHessian


class HessianContractivity(ProbeCallback):
    r"""Log how Hessian-contractive the loss is along its gradient near the current weights.

    ``curv/contractivity_mean`` (+ ``_se``) and ``curv/contractivity_min`` over ``num_points``
    (``curv/contractivity_points``) points ``w̃ = w + r·u`` on the sphere of radius ``r`` around the
    weights, with the finite difference ``c(w̃) = [∇f(w̃) − ∇f(w̃ − η∇f(w̃))]ᵀ∇f(w̃) / (η‖∇f(w̃)‖²)``
    on one probe minibatch shared by all points (seed 004 Eq. 4; paper: ``r = 1``, ``η = 1e−3``, ``K = 100``, batch
    128). ``curv/contractivity_exact = ∇fᵀH∇f/‖∇f‖²`` at the weights themselves, by one HVP.
    Positive values mean the gradient step contracts.

    Args:
        radius: ``r``.
        eta: ``η`` of the finite difference.
        num_points: ``K``; under an overhead budget a probe takes fewer points (never below
            ``min_points``) when ``K`` would not fit in what is left of it. The minimum is over the points
            taken (``curv/contractivity_points``): fewer points, a higher minimum.
        min_points: the fewest points a budgeted probe takes.
        points_per_pass: points evaluated in one vectorized pass (default 1 on CPU; on a GPU up to 8,
            as many as fit the probes' memory budget, :func:`~genbounds.callbacks.probe.vectorization_width`).
        exact: also log the exact HVP form.
        precision: ``"float32"``, ``"float64"``, or ``"auto"`` (float64 when ``eta`` is below 1e−3,
            where the finite difference of gradients approaches float32's resolution).
        every_n_steps: probe every this many optimizer steps.
        every_n_epochs: probe at the end of every this many epochs.
        log_spaced: probe at this many log-spaced steps per decade.
        at_train_end: probe the final weights.
        probe_batch_size: samples in the probe minibatch, in all (under DDP divided among the
            processes; paper: 128).
        num_probe_batches: loader batches concatenated into the probe minibatch.
        probe_mode: ``"eval"`` (default) or ``"train"``.
        loss_fn: the loss contract (default: ``per_sample_loss``).
        seed: seed of the callback's own generator.
    """

    owner = "HessianContractivity"

    def __init__(
        self,
        radius: float = 1.0,
        eta: float = 1e-3,
        num_points: int = 100,
        min_points: int = 8,
        points_per_pass: int | None = None,
        exact: bool = True,
        precision: Precision = "auto",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        log_spaced: int | None = None,
        at_train_end: bool = True,
        probe_batch_size: int | None = None,
        num_probe_batches: int = 1,
        probe_mode: ProbeMode = "eval",
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
        overhead_budget: float | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs, log_spaced, at_train_end, probe_batch_size,
                         num_probe_batches, probe_mode, loss_fn, seed, overhead_budget)
        o = self.owner
        self.radius = check_float(o, "radius", radius, low=0.0)
        self.eta = check_float(o, "eta", eta, low=0.0, low_open=True)
        self.num_points = check_int(o, "num_points", num_points, minimum=2)
        self.min_points = min(check_int(o, "min_points", min_points, minimum=2), self.num_points)
        self.points_per_pass = check_int(o, "points_per_pass", points_per_pass, optional=True)
        self.exact = check_bool(o, "exact", exact)
        self.precision = check_choice(o, "precision", precision, PRECISIONS)
        self.channel: Channel[CurvatureRecord] = Channel()
        self._step = 0

    without_second_order = ("curv/contractivity_exact (one Hessian-vector product) is left out in this fit; the "
                            "finite-difference contractivity, which takes first derivatives only, is measured.")

    def second_order_method(self) -> str | None:
        return "reverse" if self.exact else None  # (the exact form's one HVP)

    def forward_equivalents(self) -> float:
        # two gradients (a forward and a backward each) per point, one HVP for the exact form, at
        # the fewest points a budgeted probe takes
        return 6.0 * self.min_points + (4.0 if self.exact else 0.0)

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, float]:
        assert self._loss_fn is not None
        self._step = int(trainer.global_step)
        # (the exact form's HVP, about four loss evaluations, is left out of what the points may spend)
        points = self.draws_within_budget(self.num_points, self.min_points, 6.0,
                                          keep=4.0 * self.unit_cost() if self.exact else 0.0)
        est = contractivity(pl_module, self._loss_fn, self.train_probe, self.generator(pl_module.device),
                            radius=self.radius, eta=self.eta, num_points=points,
                            points_per_pass=self.per_pass(self.points_per_pass, pl_module),
                            dtype=probe_dtype(self.precision, self.eta),
                            reduce=self.reducer(trainer))
        out = {"curv/contractivity_mean": est.mean, "curv/contractivity_mean_se": est.standard_error,
               "curv/contractivity_min": est.minimum,
               "curv/contractivity_points": float(points)}
        if self.exact and self.twice_differentiable_problem is None:
            op = LossHessian(pl_module, self._loss_fn, self.train_probe, reduce=self.reducer(trainer))
            try:
                out["curv/contractivity_exact"] = contractivity_exact(op)
            except (RuntimeError, NotImplementedError) as err:  # (a branch the check before step 0 did not take)
                if not not_twice_differentiable(err):
                    raise
                self._without_second_order(self.second_order_reason(trainer, err))  # (the other values stand)
            op.release()
        return out

    def publish(self, step: int, values: dict[str, float]) -> None:
        self.channel.publish([CurvatureRecord(
            step=self._step, contractivity_mean=values["curv/contractivity_mean"],
            contractivity_min=values["curv/contractivity_min"], contractivity_exact=values.get("curv/contractivity_exact"),
        )])
