"""``HeldoutGradient``: the training batch's gradient against a held-out reference (SPEC §2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from genbounds.callbacks.channel import Channel, HeldoutRecord
from genbounds.callbacks.checks import check_choice, check_int, check_single_optimizer, warn_shared_tags
from genbounds.callbacks.distributed import reason_anywhere, reduce_moments
from genbounds.callbacks.hook_clock import HooksAside
from genbounds.callbacks.probe import ProbeCallback, ProbeMode, num_train_samples
from genbounds.callbacks.state_key import state_key_once
from genbounds.estimators.backpack_norms import has_batchnorm
from genbounds.estimators.collective import FailedElsewhere, fail_together
from genbounds.estimators.functional import against_mean, dot, group_positions, trainable_parameters
from genbounds.estimators.gradient_dispersion import GradientMoments, dispersion_from_moments, group_sums
from genbounds.estimators.microbatch_gradients import microbatch_gradient_moments
from genbounds.estimators.per_sample_gradients import HooksUnavailable, hooks_cover, per_sample_gradient_moments


class HeldoutGradient(ProbeCallback):
    r"""Compare the training batch's gradient with held-out and training reference gradients.

    At every ``every_n_steps``-th optimizer step, at the weights ``W_{t−1}`` its gradient ``ḡ_B``
    was computed at (read from ``.grad`` in ``on_before_optimizer_step``: unscaled, accumulated
    and DDP-averaged, before clipping):

    * ``grad/heldout_dist_sq = ‖ḡ_B − ĝ_ref‖² − s²_ref/m`` — unbiased for ``‖g(w,B_t) − g(w)‖²``,
      whose mean is Neu et al.'s ``V_t`` (train/test mismatch included); ``ĝ_ref`` and
      ``s²_ref`` are the mean gradient and per-sample covariance trace of ``m`` held-out samples.
      It can be negative: keep it signed in sums. The held-out probe set is reused at every step,
      so its errors are correlated over ``t``.
    * ``gap/step_realized = η_t ḡ_B·(ĝ_tr − ĝ_ref)`` — first-order change of the train/held-out
      gap caused by this step (Roberts, generalized to a step on a batch of ``S``), with ``ĝ_tr``
      the gradient of a fixed training probe batch independent of ``B_t``.
    * ``gap/step_predicted = η_t s²/n`` — its expectation ``η tr Σ / n`` while train and test
      gradients agree (``s²`` of the training probe batch, ``n`` training samples).
    * ``gap/predicted_cumulative = Σ_t η_t s²_t/n`` over every step up to and including this one
      (each measurement standing for the steps until the next one, each with its own ``η_t``): the
      predicted change of the gap up to the weights after this step; compare it with
      ``gap/measured_change = gap(t) − gap(0)`` logged by ``GeneralizationBound``.

    With an optimizer other than plain SGD the step is not ``η_t ḡ_B``; the quantities are then
    heuristics (``GeneralizationBound`` warns about it).

    Args:
        every_n_steps: measure every this many optimizer steps.
        backend: per-sample gradients of the probe sets by ``"functorch"`` (exact), by
            ``"microbatch"`` chunks, or ``"auto"`` (functorch unless train-mode BatchNorm).
        num_chunks: chunks for the micro-batch backend.
        num_train: ``n``; default: the training dataset's length.
        probe_batch_size: samples per probe batch, in all (under DDP divided among the processes;
            default: one loader batch, the global batch).
        num_probe_batches: loader batches concatenated into each probe set.
        probe_mode: ``"eval"`` (default) or ``"train"`` mode for the probe passes.
        loss_fn: ``loss_fn(pl_module, batch) -> per-sample losses`` (default: the module's
            ``per_sample_loss``).
        seed: seed of the callback's own generator.
    """

    owner = "HeldoutGradient"
    needs_heldout_probe = True
    heldout_required = True

    def __init__(
        self,
        every_n_steps: int = 10,
        backend: Literal["auto", "functorch", "microbatch"] = "auto",
        num_chunks: int = 8,
        num_train: int | None = None,
        probe_batch_size: int | None = None,
        num_probe_batches: int = 1,
        probe_mode: ProbeMode = "eval",
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
        overhead_budget: float | None = None,
        layer_groups: dict[str, str] | None = None,
    ) -> None:
        super().__init__(every_n_steps=check_int(self.owner, "every_n_steps", every_n_steps), every_n_epochs=None,
                         at_train_end=False, probe_batch_size=probe_batch_size, num_probe_batches=num_probe_batches,
                         probe_mode=probe_mode, loss_fn=loss_fn, seed=seed, overhead_budget=overhead_budget)
        o = self.owner
        self.backend = check_choice(o, "backend", backend, ("auto", "functorch", "microbatch"))
        self.num_chunks = check_int(o, "num_chunks", num_chunks, minimum=2)
        self.num_train = check_int(o, "num_train", num_train, optional=True)
        self.layer_groups = dict(layer_groups) if layer_groups else None
        self.group_names: list[str] = []
        self._groups: list[list[int]] = []
        self.channel: Channel[HeldoutRecord] = Channel()
        self.predicted_cumulative = 0.0
        self._s2_over_n: float | None = None
        self._n: int | None = None
        self._due = False
        self._lr = 0.0
        self._per_sample = True
        self._hooks_ok = False
        self._hooks_refused = False  # (the hooks failed on a probe set: not again this fit, _moments)
        self._manual_grad: list[Tensor] | None = None

    @property
    def state_key(self) -> str:
        return state_key_once(self, every_n_steps=self.schedule.every_n_steps)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        warn_shared_tags(self.owner, trainer, self, ("grad/heldout_dist_sq", "gap/step_realized"))
        self._hooks_refused = False  # (a fit of its own: an earlier fit's model is not this one)
        bn_train = has_batchnorm(pl_module) and self.probe_mode == "train"
        if self.backend == "functorch" and bn_train:
            raise MisconfigurationException(
                "HeldoutGradient(backend='functorch', probe_mode='train') cannot take per-sample "
                "gradients through train-mode BatchNorm; use backend='microbatch' or probe_mode='eval'."
            )
        self._per_sample = self.backend == "functorch" or (self.backend == "auto" and not bn_train)

    def take_parameters(self, pl_module: LightningModule) -> None:
        self.group_names, self._groups = group_positions(pl_module, self.layer_groups)
        # (again when the trained parameters change: a layer pruned mid-fit trains weight_orig,
        # which the norm hooks do not cover)
        self._hooks_ok = self.backend == "auto" and not self._hooks_refused and hooks_cover(pl_module) and not (
            has_batchnorm(pl_module) and self.probe_mode == "train")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_single_optimizer(self.owner, pl_module)  # (not at setup: Lightning makes the optimizers after it)
        super().on_train_start(trainer, pl_module)
        assert self.contract is not None
        if self._per_sample and not self.contract.per_sample:
            if self.backend == "functorch":
                raise MisconfigurationException(
                    "HeldoutGradient(backend='functorch') needs per-sample losses: " + "; ".join(self.contract.notes)
                    + ". Add `per_sample_loss(self, batch)` or pass `loss_fn=...`, or use backend='microbatch'.")
            self._per_sample = False  # chunk means are all the contract gives
        if trainer.optimizers:
            _warn_lr_groups(trainer.optimizers[0])
        if pl_module.automatic_optimization:  # on_after_backward has work under manual optimization only
            HooksAside(self, HeldoutGradient, ("on_after_backward",)).set_aside()
        self._n = num_train_samples("HeldoutGradient", self.num_train, trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            # a measurement the schedule asked for waits (step after step) until the overhead
            # budget affords it: it needs this step's batch gradient, so it cannot run later
            # (the first two are always taken: the first cannot be made up at the end of the run
            # and defines gap/predicted_cumulative; with a second one the bounds can judge the
            # error of filling the steps between measurements — docs/math.md §6.7 — where one
            # measurement standing for the whole run would leave Neu's bound without an SE)
            self._pending = self._pending or self.schedule.due_at_step(trainer.global_step)
            self._due = self._pending and (self.num_probes_run < 2 or self._affordable())
            if not self._due:  # (a due one is measured at this step's optimizer step)
                self._rest(trainer, trainer.global_step, hook_of=HeldoutGradient)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # measured only at optimizer steps, where ḡ_B exists

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # the prediction accrues every step (with the last measured s²/n): write its value at the final weights
        if self._s2_over_n is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"gap/predicted_cumulative": self.predicted_cumulative}, step=int(trainer.global_step))

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due and not pl_module.automatic_optimization:
            # under manual optimization the user's step may clip .grad (self.clip_gradients) before
            # on_before_optimizer_step: keep the batch gradient as the backward left it (unscaled)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            scale = scaler._scale if scaler is not None and getattr(scaler, "_scale", None) is not None else None
            self._manual_grad = [torch.zeros_like(p) if p.grad is None else
                                 (p.grad.detach().clone() if scale is None else p.grad.detach() / scale)
                                 for p in trainable_parameters(pl_module).values()]

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self._lr = float(optimizer.param_groups[0]["lr"])
        if self._due:
            self._due = self._pending = False
            self._probe(trainer, pl_module, log=True)
        elif self._s2_over_n is not None:
            self.predicted_cumulative += self._lr * self._s2_over_n

    def forward_equivalents(self) -> float:
        return 8.0  # per-sample gradients of two probe sets (a forward and a backward each, plus norms)

    def _moments(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> GradientMoments:
        """Moments of a probe set, summed over DDP ranks (the union of the ranks' shares)."""
        assert self._loss_fn is not None

        def local() -> GradientMoments:
            assert self._loss_fn is not None
            if self._per_sample:
                method = "hooks" if self._hooks_ok else (self.contract.per_sample_method if self.contract else "vmap")
                return per_sample_gradient_moments(pl_module, self._loss_fn, batch, method=method, groups=self._groups)
            return microbatch_gradient_moments(
                pl_module, self._loss_fn, batch, self.num_chunks, generator=self.generator(pl_module.device),
                groups=self._groups,
            )

        def moments() -> GradientMoments:
            if trainer.world_size <= 1:
                return local()
            # (a failure in one process raises in every process before the moments' collectives:
            # estimators/collective.py)
            reduce = self.reducer(trainer)
            try:
                part = fail_together(local, reduce, pl_module.device)
            except Exception as err:
                if not (self._per_sample and self._hooks_ok):
                    raise
                # every process raised here: the hooks' fallback only where no process failed
                # otherwise, decided alike in all of them (one more small collective)
                assert reduce is not None
                other = torch.tensor([float(not isinstance(err, (HooksUnavailable, FailedElsewhere)))],
                                     device=pl_module.device)
                if float(reduce(other)[0]) > 0.0:
                    raise
                raise HooksUnavailable(str(err) if isinstance(err, HooksUnavailable) else "") from err
            return reduce_moments(trainer, part)

        try:
            return moments()
        except HooksUnavailable as err:
            if not (self._per_sample and self._hooks_ok):
                raise
            # the hooks cannot measure this model's probe batches (a layer applied to part of the
            # batch: a mixture of experts' routing, say): exact per-sample gradients from here on, in
            # every process at once (a matrix, round 30: the fit ended at the first probe, where
            # GradientDispersion had gone on by an extra pass)
            why = reason_anywhere(trainer, str(err) or None)
            self._hooks_ok, self._hooks_refused = False, True
            rank_zero_warn(f"HeldoutGradient: the norm hooks cannot measure the probe sets ({why}); exact per-sample "
                           "gradients by an extra pass measure them from this probe on.")
            return moments()

    def measure(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> dict[str, float]:
        params = list(trainable_parameters(pl_module).values())
        g_batch, self._manual_grad = self._manual_grad, None
        if g_batch is None:
            g_batch = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
        # one probe set at a time: what the held-out set's gradient sum gives is taken (a chunk
        # of one parameter tensor's float64 temporaries at a time) and the sum released before the
        # training probe's pass — the probe step held both sums, both means, their differences and
        # float64 copies at once (1,000 MiB of peak growth on the 28.7 M-parameter CNN, about nine
        # parameter sets' worth; benchmarks/probe_memory.py)
        ref = self._moments(trainer, pl_module, self.heldout_probe)
        assert ref.weighted_sum is not None
        m = int(ref.num_samples)
        s2_ref = dispersion_from_moments(ref).trace_cov
        # per group k: ‖ḡ_{B,k} − ĝ_{ref,k}‖² − s²_{ref,k}/m (the blocks of V_t; they sum to the total)
        per_diff, per_spread, cross_ref = against_mean(g_batch, ref.weighted_sum, m)
        diff_sq = group_sums(per_diff, self._groups)
        ref_spread = group_sums(per_spread, self._groups)
        ref_s2_groups = None
        if ref.group_sq is not None:
            k = ref.num_units
            ref_s2_groups = (ref.group_sq.to(diff_sq.device) - m * ref_spread) / (k - 1)
        del ref
        train = self._moments(trainer, pl_module, self.train_probe)
        assert train.weighted_sum is not None
        m_tr = int(train.num_samples)
        s2_tr = dispersion_from_moments(train).trace_cov
        # η ḡ_B·(ĝ_tr − ĝ_ref) as a difference of two float64 inner products (each divided after its sum)
        cross_tr = dot(g_batch, train.weighted_sum) / m_tr
        del train
        dist = diff_sq.sum() - s2_ref / m
        realized = self._lr * (cross_tr - cross_ref)
        packed = torch.stack([dist, realized, s2_tr.to(dist.device)]).cpu().tolist()
        out = {"grad/heldout_dist_sq": packed[0], "gap/step_realized": packed[1], "_s2_train": packed[2]}
        if ref_s2_groups is not None and len(self.group_names) > 1:
            per_group = (diff_sq - ref_s2_groups / m).cpu().tolist()
            for name, value in zip(self.group_names, per_group):
                out[f"grad/heldout_dist_sq/layer/{name}"] = value
        return out

    def finalize(self, trainer: Trainer, values: dict[str, float]) -> dict[str, float]:
        assert self._n is not None
        s2 = values.pop("_s2_train")
        self._s2_over_n = s2 / self._n
        predicted = self._lr * self._s2_over_n
        self.predicted_cumulative += predicted
        values["gap/step_predicted"] = predicted
        values["gap/predicted_cumulative"] = self.predicted_cumulative
        return values

    def publish(self, step: int, values: dict[str, float]) -> None:
        tags = [f"grad/heldout_dist_sq/layer/{g}" for g in self.group_names]
        self.channel.publish([
            HeldoutRecord(step=step, lr=self._lr, heldout_dist_sq=values["grad/heldout_dist_sq"],
                          step_realized=values["gap/step_realized"], step_predicted=values["gap/step_predicted"],
                          predicted_cumulative=values["gap/predicted_cumulative"],
                          groups=[values[t] for t in tags] if tags and tags[0] in values else None)
        ])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(predicted_cumulative=self.predicted_cumulative, s2_over_n=self._s2_over_n)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.predicted_cumulative = float(state_dict.get("predicted_cumulative", 0.0))
        self._s2_over_n = state_dict.get("s2_over_n")


def _warn_lr_groups(optimizer: Optimizer) -> None:
    lrs = {g["lr"] for g in optimizer.param_groups}
    if len(lrs) > 1:
        rank_zero_warn("HeldoutGradient: parameter groups have different learning rates; using the first group's.")
