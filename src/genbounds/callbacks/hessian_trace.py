"""``HessianTrace``: Hutchinson trace, top eigenvalue and Hessian-weighted dispersion (SPEC §5)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from genbounds.callbacks.channel import Channel, CurvatureRecord
from genbounds.callbacks.checks import check_bool, check_choice, check_float, check_int, warn_shared_tags
from genbounds.callbacks.probe import ProbeCallback, ProbeMode
from genbounds.callbacks.state_key import state_key_once
from genbounds.estimators.functional import LossFn, group_positions, per_sample_losses, trainable_parameters
from genbounds.estimators.hessian_eigenvalue import top_eigenvalue
from genbounds.estimators.hessian_trace import hutchinson_trace
from genbounds.estimators.hessian_vector_product import HVPMethod, LossHessian
from genbounds.estimators.weighted_dispersion import hessian_weighted_dispersion


class HessianTrace(ProbeCallback):
    r"""Log the trace of the training-loss Hessian at the current weights, on the training probe
    batch: ``curv/hessian_trace`` and ``curv/hessian_trace_se`` (Hutchinson with Rademacher probes
    and a standard-error stopping rule, SPEC §5), ``curv/hessian_trace_probes`` (samples used).

    Optional: ``curv/hessian_top_eig`` by warm-started power iteration (with
    ``curv/hessian_top_eig_residual`` ``= ‖Hv − λv‖``), and ``curv/weighted_dispersion``
    ``≈ Tr(H Σ_B)`` (+ ``_se``) from ``num_chunks`` chunks of the current training batch with ``H``
    on the probe batch — a local proxy of the first component of the algorithmic-variability
    bound (measured at step-start probes only, where a training batch exists).

    ``backend="pyhessian"`` runs PyHessian 0.1's ``trace()`` instead, for cross-checking. PyHessian
    forces eval mode, writes ``.grad`` with ``backward(create_graph=True)``, draws from the global
    RNG and, in its 0.1 release, stops after two samples when the first is negative; genbounds
    saves and restores ``.grad``, runs it under the probe isolation (modes, buffers, RNG restored)
    and passes ``tol=pyhessian_tol`` (default 0: always ``max_probes`` samples).

    Args:
        backend: ``"hutchinson"`` (ours) or ``"pyhessian"``.
        hvp_method: ``"auto"``/``"reverse"`` (double backward) or ``"forward"`` (forward-over-reverse).
        rel_tol: stop when the relative SE is below this.
        abs_tol: …or when the SE is below this absolute floor (so a trace near 0 does not always run
            to ``max_probes``; 0 disables it).
        min_probes: never stop before this many Rademacher samples.
        max_probes: never draw more (with an ``overhead_budget``: nor more than what is left of it
            affords, never fewer than ``min_probes``; the SE says how far the tolerance was reached).
        block_size: Rademacher vectors per HVP block (default 1 on CPU; on a GPU, where they are
            vectorized, up to 10, as many as fit the probes' memory budget,
            :func:`~genbounds.callbacks.probe.vectorization_width`).
        top_eigenvalue: also run power iteration.
        eig_max_iter: power-iteration cap (with an ``overhead_budget``, also capped by what is left,
            never below 10; ``curv/hessian_top_eig_residual`` says how converged it is).
        eig_tol: relative change of the Rayleigh quotient to stop at.
        weighted_dispersion: also estimate ``Tr(H Σ_B)`` (at step-start probes: needs ``every_n_steps``
            or ``log_spaced``; an error before step 0 otherwise).
        num_chunks: chunks of the training batch for ``Tr(H Σ_B)``.
        pyhessian_tol: PyHessian's own relative-change tolerance.
        every_n_steps: probe every this many optimizer steps.
        every_n_epochs: probe at the end of every this many epochs.
        log_spaced: probe at this many log-spaced steps per decade.
        at_train_end: probe the final weights.
        probe_batch_size: samples in the training probe batch, in all (under DDP divided among the
            processes).
        num_probe_batches: loader batches concatenated into the probe batch.
        probe_mode: ``"eval"`` (default) or ``"train"``.
        loss_fn: the loss contract (default: ``per_sample_loss``, else captured from ``training_step``).
        seed: seed of the callback's own generator.
        overhead_budget: fraction of training time the suite's probes may take (see README).
        layer_groups: parameter-name prefix → group name for the per-layer traces
            ``curv/hessian_trace/layer/<name>`` (default: one group per module with parameters).
    """

    owner = "HessianTrace"

    def __init__(
        self,
        backend: Literal["hutchinson", "pyhessian"] = "hutchinson",
        hvp_method: HVPMethod = "auto",
        rel_tol: float = 0.05,
        abs_tol: float = 1e-3,
        min_probes: int = 10,
        max_probes: int = 200,
        block_size: int | None = None,
        top_eigenvalue: bool = False,
        eig_max_iter: int = 100,
        eig_tol: float = 1e-3,
        weighted_dispersion: bool = False,
        num_chunks: int = 8,
        pyhessian_tol: float = 0.0,
        layer_groups: dict[str, str] | None = None,
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
        self.backend = check_choice(o, "backend", backend, ("hutchinson", "pyhessian"))
        self.hvp_method = check_choice(o, "hvp_method", hvp_method, ("auto", "reverse", "forward"))
        self.rel_tol = check_float(o, "rel_tol", rel_tol, low=0.0)
        self.abs_tol = check_float(o, "abs_tol", abs_tol, low=0.0)
        self.min_probes = check_int(o, "min_probes", min_probes, minimum=2)
        self.max_probes = check_int(o, "max_probes", max_probes, minimum=self.min_probes)
        self.block_size = check_int(o, "block_size", block_size, optional=True)
        self.top_eigenvalue = check_bool(o, "top_eigenvalue", top_eigenvalue)
        self.eig_max_iter = check_int(o, "eig_max_iter", eig_max_iter, minimum=2)
        self.eig_tol = check_float(o, "eig_tol", eig_tol, low=0.0, low_open=True)
        self.weighted_dispersion = check_bool(o, "weighted_dispersion", weighted_dispersion)
        self.num_chunks = check_int(o, "num_chunks", num_chunks, minimum=2)
        self.pyhessian_tol = check_float(o, "pyhessian_tol", pyhessian_tol, low=0.0)
        self.layer_groups = dict(layer_groups) if layer_groups else None
        self.channel: Channel[CurvatureRecord] = Channel()
        self.group_names: list[str] = []
        self._groups: list[list[int]] = []
        self._eigvec: list[Tensor] | None = None
        self._step = 0
        self._group_samples: Tensor | None = None

    @property
    def state_key(self) -> str:
        return state_key_once(self, backend=self.backend)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        warn_shared_tags(self.owner, trainer, self, ("curv/hessian_trace", "curv/hessian_trace_se"))
        if self.weighted_dispersion and not (self.schedule.every_n_steps or self.schedule.log_spaced):
            # (an epoch-end, train-end or bound-requested probe has no training batch to chunk)
            raise MisconfigurationException(
                "HessianTrace(weighted_dispersion=True) estimates Tr(H Σ_B) on the training batch of a step-start "
                f"probe, and this schedule has none (every_n_steps={self.schedule.every_n_steps}, "
                f"log_spaced={self.schedule.log_spaced}): curv/weighted_dispersion would never be logged. Set "
                "every_n_steps (or log_spaced).")
        if self.backend == "pyhessian" and trainer.world_size > 1:
            raise MisconfigurationException(
                "HessianTrace(backend='pyhessian') is a single-process cross-check; use the default "
                "backend='hutchinson' under DDP."
            )

    @property
    def _eig_min_iter(self) -> int:
        """The fewest power-iteration products a budgeted probe takes."""
        return min(10, self.eig_max_iter)

    second_order_needed = True

    def second_order_method(self) -> str | None:
        return "forward" if self.hvp_method == "forward" else "reverse"  # (PyHessian: a double backward)

    def forward_equivalents(self) -> float:
        # an HVP is about four forwards; Hutchinson stops at min_probes at the earliest, and power
        # iteration is counted at 20 products (it is warm-started from the previous vector)
        return 4.0 * self.min_probes + (80.0 if self.top_eigenvalue else 0.0)

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, float]:
        assert self._loss_fn is not None
        self._step = int(trainer.global_step)
        gen = self.generator(pl_module.device)
        out: dict[str, float] = {}
        self._group_samples = None
        op = LossHessian(pl_module, self._loss_fn, self.train_probe, method=self.hvp_method, reduce=self.reducer(trainer))
        if self.backend == "pyhessian":
            samples = pyhessian_trace(pl_module, self._loss_fn, self.train_probe, self.max_probes, self.pyhessian_tol)
            n = len(samples)
            mean = sum(samples) / n
            sd = math.sqrt(sum((x - mean) ** 2 for x in samples) / (n - 1)) if n > 1 else math.inf
            out["curv/hessian_trace"], out["curv/hessian_trace_se"] = mean, sd / math.sqrt(n)
            out["curv/hessian_trace_probes"] = float(n)
        else:
            # under an overhead budget the tolerance may stop short of what is left: never past
            # what the budget affords (an HVP ≈ 4 loss evaluations), never before min_probes
            # (leaving the power iteration its fewest products)
            eig_floor = 4.0 * self._eig_min_iter * self.unit_cost() if self.top_eigenvalue else 0.0
            est = hutchinson_trace(op, gen, rel_tol=self.rel_tol, abs_tol=self.abs_tol, min_probes=self.min_probes,
                                   max_probes=self.draws_within_budget(self.max_probes, self.min_probes, 4.0,
                                                                       keep=eig_floor),
                                   block_size=self.per_pass(self.block_size, pl_module, gpu_default=10),
                                   groups=self._groups)
            out["curv/hessian_trace"], out["curv/hessian_trace_se"] = est.value, est.standard_error
            out["curv/hessian_trace_probes"] = float(est.num_probes)
            if est.group_samples is not None and len(self.group_names) > 1:
                self._group_samples = est.group_samples
                n = est.group_samples.shape[0]
                means = est.group_samples.mean(0)
                ses = est.group_samples.std(0, unbiased=True) / math.sqrt(n)
                for name, m, se in zip(self.group_names, means.tolist(), ses.tolist()):
                    out[f"curv/hessian_trace/layer/{name}"] = m
                    out[f"curv/hessian_trace_se/layer/{name}"] = se
        if self.top_eigenvalue:
            # its start vectors come from a stream of their own: a (re)start never shifts the Hutchinson probes
            # the warm start is handed over, not kept beside the iteration's vectors (one parameter
            # set less at its peak; an iteration that raises leaves the next probe a cold start)
            eig = top_eigenvalue(op, self.generator(pl_module.device, stream=1), init=self._take_eigvec(),
                                 max_iter=self.draws_within_budget(self.eig_max_iter, self._eig_min_iter, 4.0),
                                 tol=self.eig_tol)
            self._eigvec = eig.vector
            out["curv/hessian_top_eig"] = eig.value
            out["curv/hessian_top_eig_residual"] = eig.residual
        if self.weighted_dispersion and batch is not None:
            wd = hessian_weighted_dispersion(pl_module, self._loss_fn, batch, op, self.num_chunks,
                                             reduce=self.reducer(trainer))
            out["curv/weighted_dispersion"], out["curv/weighted_dispersion_se"] = wd.value, wd.standard_error
        op.release()
        return out

    def _take_eigvec(self) -> list[Tensor] | None:
        vector, self._eigvec = self._eigvec, None
        return vector

    def publish(self, step: int, values: dict[str, float]) -> None:
        groups = [values[f"curv/hessian_trace/layer/{g}"] for g in self.group_names] \
            if self.group_names and f"curv/hessian_trace/layer/{self.group_names[0]}" in values else None
        samples = self._group_samples.cpu().tolist() if self._group_samples is not None else None
        self.channel.publish([CurvatureRecord(
            step=self._step, hessian_trace=values["curv/hessian_trace"],
            hessian_trace_se=values["curv/hessian_trace_se"], top_eigenvalue=values.get("curv/hessian_top_eig"),
            group_traces=groups, group_samples=samples,
        )])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._eigvec is not None:
            state["eigvec"] = [v.detach().cpu() for v in self._eigvec]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("eigvec")
        self._eigvec = None if saved is None else list(saved)

    def take_parameters(self, pl_module: LightningModule) -> None:
        self.group_names, self._groups = group_positions(pl_module, self.layer_groups)
        params = list(trainable_parameters(pl_module).values())
        if self._eigvec is not None:
            if len(self._eigvec) == len(params) and all(v.shape == p.shape for v, p in zip(self._eigvec, params)):
                self._eigvec = [v.to(p.device, p.dtype) for v, p in zip(self._eigvec, params)]
            else:
                self._eigvec = None  # (other parameters trained: the power iteration starts afresh)


class _LossAsModel(nn.Module):
    """PyHessian calls ``criterion(model(inputs), targets)`` and moves ``inputs`` with ``.cuda()``;
    this model ignores its (dummy tensor) input and returns the per-sample losses of a batch it
    holds, so any batch structure and device work."""

    def __init__(self, module: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.inner = module
        self._loss_fn = loss_fn
        self._batch = batch

    def forward(self, _dummy: Tensor) -> Tensor:
        return per_sample_losses(self.inner, self._loss_fn, self._batch)


def pyhessian_trace(module: nn.Module, loss_fn: LossFn, batch: Any, max_probes: int, tol: float) -> list[float]:
    """PyHessian 0.1's Hutchinson samples on ``batch``; ``.grad`` is saved and restored around it."""
    from pyhessian import hessian as PyHessian

    params = list(module.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        device = next(iter(params)).device
        dummy = torch.zeros(1, device=device)
        model = _LossAsModel(module, loss_fn, batch)
        engine = PyHessian(model, lambda losses, _t: losses.mean(), data=(dummy, dummy), cuda=device.type == "cuda")
        samples = engine.trace(maxIter=max_probes, tol=tol)
        del engine
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return [float(x) for x in samples]
