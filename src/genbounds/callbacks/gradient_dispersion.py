"""``GradientDispersion``: per-step gradient statistics of the training batch (SPEC §1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from genbounds.callbacks.channel import Channel, DispersionRecord
from genbounds.callbacks.checks import (
    MIXED_PRECISIONS,
    check_automatic_optimization,
    check_positive,
    check_precision,
    check_strategy,
)
from genbounds.callbacks.distributed import reduce_moments
from genbounds.callbacks.isolation import isolated_pass
from genbounds.callbacks.loss_contract import resolve_loss_fn
from genbounds.callbacks.step_log import Listener, StepLog, logger_step, is_log_step
from genbounds.estimators.backpack_norms import BackpackNormHooks, backpack_coverage, has_batchnorm
from genbounds.estimators.batching import batch_device, batch_size
from genbounds.estimators.functional import LossFn, dot, per_sample_losses, sq_norm, trainable_parameters
from genbounds.estimators.gradient_dispersion import GradientMoments, dispersion_from_moments
from genbounds.estimators.microbatch_gradients import microbatch_gradient_moments
from genbounds.estimators.per_sample_gradients import per_sample_gradient_moments

Backend = Literal["auto", "backpack", "functorch", "microbatch"]

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class GradientDispersion(Callback):
    r"""Log the gradient statistics of every training batch (SPEC §1).

    Logged (TensorBoard tags), each describing the batch ``B_t`` at the weights ``W_{t−1}`` the
    step's gradient is computed at:

    * ``grad/norm_sq`` — ``‖ḡ_B‖²``;
    * ``grad/trace_cov`` — ``s² = 1/(b−1) Σ_i ‖g_i − ḡ_B‖²``, unbiased for ``tr Σ``, the trace of
      the per-sample gradient covariance (``grad/trace_cov_se``: its standard error where the
      backend affords it);
    * ``grad/dispersion`` — ``s²/b = Tr Σ_B``, the trace of the mini-batch gradient covariance:
      the gradient dispersion of Wang & Mao (2022, §5).

    It also tracks the smallest and largest per-sample training loss seen (``loss_range``), the
    observed-range estimate of ``R`` used by the bounds.

    Caveats: batches drawn without replacement make ``s²/b`` too large by ``n/(n−b)`` (only
    matters for tiny ``n``); once a model memorizes, ``s²`` measures the *training-set*
    covariance, smaller than the population one — :class:`HeldoutGradient` measures that gap.

    Backends (``backend``):

    * ``"backpack"`` — BackPACK's ``BatchL2Grad`` inside the training step's own backward: no
      extra pass. Needs every trainable parameter in a layer BackPACK supports (checked at
      ``setup``: Linear, Conv, Embedding, RNN/LSTM; not LayerNorm, not train-mode BatchNorm),
      fp32 training, and a training loss equal to the mean of the per-sample losses (checked
      once, at the first measured step). No standard error.
    * ``"functorch"`` — exact per-sample gradients with ``torch.func.vmap(grad(...))`` of the loss
      contract: any layer except train-mode BatchNorm; one extra pass in fp32.
    * ``"microbatch"`` — SPEC §1's chunk estimator with ``num_chunks`` random chunks: any model,
      any layer (approximate under train-mode BatchNorm); one extra pass. Under
      ``accumulate_grad_batches ≥ 2`` (single process) the accumulation micro-steps *are* the
      chunks and nothing extra is computed.
    * ``"auto"`` — backpack when it covers the model, else functorch, else microbatch; the choice
      is logged once at ``setup``.

    Extra passes run in the module's own train/eval mode, in fp32, under a forked RNG, with
    buffers restored: training is bit-identical with or without this callback. Nothing is
    copied to the host except on Lightning's logging steps.

    Args:
        backend: how per-sample statistics are obtained (see above).
        every_n_steps: measure every this many optimizer steps.
        num_chunks: ``k`` for the micro-batch backend (≥ 2).
        use_accumulation_steps: with ``backend="microbatch"`` and gradient accumulation, use the
            accumulation micro-steps as chunks instead of an extra pass.
        chunk_size: the functorch backend vectorizes over at most this many samples at once
            (bounds memory at ``chunk_size × d`` floats; its SE needs the whole batch at once).
        loss_fn: ``loss_fn(pl_module, batch) -> per-sample losses``; default: the module's
            ``per_sample_loss(batch)`` method.
        track_loss_range: keep the min/max per-sample training loss at the step's weights ``W_{t−1}``
            (from the extra pass, or from ``training_step``'s output key ``"per_sample_loss"``; with
            backpack and no such key, one extra no-grad forward per measured step, before the update).
        check_loss_contract: verify once that the training loss is the mean of ``loss_fn``'s
            per-sample losses before trusting the training backward (backpack, accumulation
            micro-steps); on a mismatch, warn and switch to an extra-pass backend.
        prog_bar: show ``grad/dispersion`` in the progress bar.
        seed: seed of this callback's own generator (random chunk assignment).
    """

    def __init__(
        self,
        backend: Backend = "auto",
        every_n_steps: int = 1,
        num_chunks: int = 4,
        use_accumulation_steps: bool = True,
        chunk_size: int | None = None,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        track_loss_range: bool = True,
        check_loss_contract: bool = True,
        prog_bar: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if backend not in ("auto", "backpack", "functorch", "microbatch"):
            raise MisconfigurationException(
                f"GradientDispersion(backend={backend!r}) must be one of "
                "'auto', 'backpack', 'functorch', 'microbatch'"
            )
        check_positive("GradientDispersion", every_n_steps=every_n_steps, chunk_size=chunk_size)
        if num_chunks < 2:
            raise MisconfigurationException(f"GradientDispersion(num_chunks={num_chunks}) must be >= 2")
        self.backend = backend
        self.every_n_steps = every_n_steps
        self.num_chunks = num_chunks
        self.use_accumulation_steps = use_accumulation_steps
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn
        self.track_loss_range = track_loss_range
        self.check_loss_contract = check_loss_contract
        self.seed = seed
        self.step_log = StepLog("GradientDispersion", prog_bar=("grad/dispersion",) if prog_bar else ())
        self.channel: Channel[DispersionRecord] = Channel()
        self.step_log.add_listener(self._publish)

        self.active_backend: str | None = None
        self.loss_min: Tensor | None = None
        self.loss_max: Tensor | None = None
        self.measured_steps = 0
        self._loss_fn: LossFn | None = None
        self._hooks: BackpackNormHooks | None = None
        self._params: list[nn.Parameter] = []
        self._accumulate = 1
        self._free_chunks = False
        self._has_bn = False
        self._scaler = False
        self._contract_pending = False
        self._functorch_verified = False
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._generator_device: str | None = None
        # per optimizer step ("window" of accumulation micro-steps)
        self._measuring = False
        self._step = 0
        self._batch: Any = None
        self._train_loss: Tensor | None = None
        self._window: GradientMoments | None = None
        self._prev_grad: list[Tensor] | None = None
        self._losses_seen = False
        self._pending_losses: list[Tensor] = []
        self._range_losses: Tensor | None = None
        self._outputs_have_losses = False
        self._accumulated: list[Tensor] | None = None  # Σ_j m_j·A·δ_j (backpack under accumulation)

    # ------------------------------------------------------------------ public helpers
    @property
    def state_key(self) -> str:
        return self._generate_state_key(backend=self.backend, every_n_steps=self.every_n_steps)

    def _publish(self, records: list) -> None:
        self.channel.publish([
            DispersionRecord(
                step=r.step, norm_sq=r.values["grad/norm_sq"], trace_cov=r.values["grad/trace_cov"],
                dispersion=r.values["grad/dispersion"], trace_cov_se=r.values.get("grad/trace_cov_se"),
            )
            for r in records
        ])

    def add_listener(self, listener: Listener) -> None:
        """Receive the finite step records (host floats) at every flush."""
        self.step_log.add_listener(listener)

    def flush(self, trainer: Trainer, pl_module: LightningModule | None = None, epoch_end: bool = False) -> None:
        """Log and dispatch the buffered records; fold the buffered losses (all ranks call it)."""
        self._fold_losses(trainer)
        self.step_log.flush(trainer, pl_module, epoch_end=epoch_end)

    @property
    def loss_range(self) -> tuple[float, float] | None:
        """``(min, max)`` per-sample training loss observed so far (host sync)."""
        self._fold_losses()
        if self.loss_min is None or self.loss_max is None:
            return None
        return float(self.loss_min), float(self.loss_max)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = "GradientDispersion"
        check_strategy(owner, trainer)
        check_automatic_optimization(owner, pl_module)
        precision = check_precision(owner, trainer)
        self._loss_fn = resolve_loss_fn(owner, pl_module, self.loss_fn)
        self._accumulate = int(trainer.accumulate_grad_batches)
        self._has_bn = has_batchnorm(pl_module)
        mixed = precision in MIXED_PRECISIONS
        self._scaler = precision == "16-mixed"
        self.active_backend = self._choose_backend(pl_module, mixed)
        self._free_chunks = (
            self.active_backend == "microbatch"
            and self.use_accumulation_steps
            and self._accumulate >= 2
            and trainer.world_size == 1
        )
        reads_training_backward = self.active_backend == "backpack" or self._free_chunks
        self._contract_pending = self.check_loss_contract and reads_training_backward and not self._scaler
        how = {
            "backpack": "BackPACK BatchL2Grad in the training backward",
            "functorch": "torch.func per-sample gradients (one extra pass)",
            "microbatch": (
                f"the {self._accumulate} gradient-accumulation micro-steps as chunks (no extra pass)"
                if self._free_chunks
                else f"{self.num_chunks} random micro-batch chunks (one extra pass)"
            ),
        }[self.active_backend]
        rank_zero_info(f"GradientDispersion: backend={self.active_backend!r} — {how}.")

    def _choose_backend(self, pl_module: LightningModule, mixed: bool) -> str:
        coverage = backpack_coverage(pl_module)
        blockers = []
        if mixed:
            blockers.append(
                "mixed precision (BackPACK would sum squares of float16/bfloat16 activations, "
                "which overflow or lose the digits the covariance trace needs)"
            )
        if not coverage.complete:
            blockers.append(
                f"BackPACK covers {100 * coverage.fraction:.1f}% of the trainable parameters, "
                f"not {coverage.describe()}"
            )
        if self.backend == "backpack":
            if blockers:
                raise MisconfigurationException(
                    "GradientDispersion(backend='backpack') cannot measure this model: "
                    + "; ".join(blockers)
                    + ". Use backend='functorch' (exact, any layer but train-mode BatchNorm), "
                    "'microbatch' (any model) or 'auto'."
                )
            self._hooks = BackpackNormHooks(coverage.covered_modules)
            return "backpack"
        if self.backend == "functorch":
            if self._has_bn:
                raise MisconfigurationException(
                    "GradientDispersion(backend='functorch') cannot give per-sample gradients of a "
                    "model with BatchNorm in train mode (it couples the samples of a batch); use "
                    "backend='microbatch' or 'auto'."
                )
            return "functorch"
        if self.backend == "microbatch":
            return "microbatch"
        if not blockers:
            self._hooks = BackpackNormHooks(coverage.covered_modules)
            return "backpack"
        fallback = "microbatch" if self._has_bn else "functorch"
        rank_zero_warn(
            "GradientDispersion(backend='auto'): not using BackPACK because of "
            + "; ".join(blockers)
            + f". Falling back to {fallback!r}"
            + (" (train-mode BatchNorm has no per-sample gradients)." if self._has_bn else ".")
        )
        return fallback

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % self._accumulate == 0:  # Lightning's first micro-batch of a window
            self._start_window(trainer, pl_module)
        self._losses_seen = False
        if not self._measuring:
            return
        self._batch = batch
        if self.active_backend == "backpack":
            assert self._hooks is not None
            self._hooks.attach()

    def _start_window(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window = None
        self._prev_grad = None
        self._accumulated = None
        self._step = logger_step(trainer)
        self._measuring = trainer.global_step % self.every_n_steps == 0
        if self._measuring and not self._params:
            self._params = list(trainable_parameters(pl_module).values())

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if not self._measuring:
            return
        self._train_loss = loss.detach()
        if self.active_backend == "backpack" and self._hooks is not None and self._hooks.attached:
            self._hooks.enter_backward()

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._measuring or self._batch is None:
            return
        batch = self._batch
        m = batch_size(batch)
        moments: GradientMoments | None = None
        if self.active_backend == "backpack":
            assert self._hooks is not None
            self._hooks.exit_backward()
            read = self._hooks.read(scale=m * self._accumulate)
            self._hooks.detach()
            if self._contract_pending and not self._loss_contract_holds(pl_module, batch):
                self.active_backend = "microbatch" if self._has_bn else "functorch"
            elif read is None:
                rank_zero_warn(
                    "GradientDispersion: BackPACK produced no per-sample norms for a covered layer "
                    "(a layer unused in this step?); switching to backend='functorch'."
                )
                self.active_backend = "functorch"
            else:
                moments = GradientMoments(read[0], m, m)
                if self._accumulate >= 2 and trainer.world_size == 1:
                    # ḡ = Σ_j m_j h_j / b, which .grad = Σ_j h_j / A equals only for full windows of
                    # equal micro-batches: keep Σ_j m_j h_j from the micro-steps' gradient deltas
                    part = [m * self._accumulate * d for d in self._grad_delta()]
                    self._accumulated = part if self._accumulated is None else [
                        a + p for a, p in zip(self._accumulated, part)]
        elif self._free_chunks:
            if self._contract_pending and not self._loss_contract_holds(pl_module, batch):
                self._free_chunks = False
            else:
                moments = self._accumulation_chunk(m)
        if moments is None:
            moments = self._extra_pass(pl_module, batch)
        if moments is None:
            return
        if moments.losses is not None:
            self._update_loss_range(moments.losses)
            self._losses_seen = True
        self._window = moments if self._window is None else self._window.merged(moments)
        if moments.losses is None and self.track_loss_range and not self._outputs_have_losses:
            # the per-sample losses at W_{t−1} (the step's own weights) for the loss range R
            with isolated_pass(pl_module, mode="keep", grad=False):
                self._range_losses = per_sample_losses(pl_module, self._loss_fn, batch).detach()
        self._batch = None

    def _grad_delta(self) -> list[Tensor]:
        """What this accumulation micro-step's backward added to ``.grad``: ``S·h_j/A`` (``h_j`` its
        mean gradient, ``S`` the AMP loss scale, ``A`` the accumulation factor)."""
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self._params]
        if self._prev_grad is None:
            delta = [g.clone() for g in grads]
            self._prev_grad = [g.clone() for g in grads]
        else:
            delta = [g - prev for g, prev in zip(grads, self._prev_grad)]
            for prev, g in zip(self._prev_grad, grads):
                prev.copy_(g)
        return delta

    def _accumulation_chunk(self, m: int) -> GradientMoments:
        """Chunk moments from the micro-step's gradient delta (in ``.grad`` units; unscaled at the step)."""
        delta = self._grad_delta()
        return GradientMoments(m * sq_norm(delta), m, 1, weighted_sum=[m * d for d in delta])

    def _extra_pass(self, pl_module: LightningModule, batch: Any) -> GradientMoments | None:
        assert self._loss_fn is not None
        with isolated_pass(pl_module, mode="keep"):
            if self.active_backend == "functorch":
                try:
                    moments = per_sample_gradient_moments(
                        pl_module, self._loss_fn, batch, chunk_size=self.chunk_size
                    )
                    self._functorch_verified = True
                    return moments
                except Exception as err:  # noqa: BLE001 - never crash mid-training
                    if self._functorch_verified:
                        raise
                    rank_zero_warn(
                        "GradientDispersion(backend='functorch'): torch.func could not compute "
                        f"per-sample gradients of this model ({type(err).__name__}: {err}); "
                        "switching to backend='microbatch'."
                    )
                    self.active_backend = "microbatch"
            if batch_size(batch) < 2:
                return None
            return microbatch_gradient_moments(
                pl_module, self._loss_fn, batch, self.num_chunks, generator=self._rng(batch)
            )

    def _rng(self, batch: Any) -> torch.Generator:
        device = batch_device(batch)
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._generator_state is not None and self._generator_device == device.type:
                self._generator.set_state(self._generator_state)
        return self._generator

    def _loss_contract_holds(self, pl_module: LightningModule, batch: Any) -> bool:
        """Once: is the training loss the mean of ``loss_fn``'s per-sample losses? (One host
        sync.) Skipped when dropout is active — the two forwards would draw different masks."""
        self._contract_pending = False
        if self._train_loss is None or _has_active_dropout(pl_module):
            return True
        assert self._loss_fn is not None
        with isolated_pass(pl_module, mode="keep", grad=False):
            reference = per_sample_losses(pl_module, self._loss_fn, batch).double().mean()
        observed = self._train_loss.double() * self._accumulate
        tol = 1e-4 if str(pl_module.trainer.precision) not in MIXED_PRECISIONS else 3e-2
        ok = bool(torch.isclose(observed, reference.to(observed.device), rtol=tol, atol=1e-7))
        if not ok:
            fallback = "an extra-pass estimator"
            rank_zero_warn(
                "GradientDispersion: the training loss "
                f"({float(observed):.6g}) is not the mean of the per-sample losses from loss_fn "
                f"({float(reference):.6g}), so statistics read from the training backward would be "
                f"wrong (a sum reduction? a regularizer?). Switching to {fallback} on loss_fn."
            )
        return ok

    def _update_loss_range(self, losses: Tensor) -> None:
        """Buffer the per-sample losses; they are folded into the running min/max at flush."""
        if self.track_loss_range and losses.numel() > 0:
            self._pending_losses.append(losses.detach().reshape(-1))

    def _fold_losses(self, trainer: Trainer | None = None) -> None:
        """Fold the buffered losses into ``loss_min``/``loss_max`` (non-finite ones ignored),
        reduced over DDP ranks when a multi-process trainer is given."""
        if not self._pending_losses and (trainer is None or trainer.world_size == 1):
            return
        losses = torch.cat(self._pending_losses).double() if self._pending_losses else None
        self._pending_losses = []
        if losses is not None:
            lo = losses.nan_to_num(nan=float("inf")).min()
            hi = losses.nan_to_num(nan=float("-inf")).max()
            self.loss_min = lo if self.loss_min is None else torch.fmin(self.loss_min.to(lo.device), lo)
            self.loss_max = hi if self.loss_max is None else torch.fmax(self.loss_max.to(hi.device), hi)
        if trainer is not None and trainer.world_size > 1:
            device = trainer.strategy.root_device
            inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
            lo = inf if self.loss_min is None else self.loss_min.to(device)
            hi = -inf if self.loss_max is None else self.loss_max.to(device)
            both = trainer.strategy.reduce(torch.stack([-lo, hi]), reduce_op=torch.distributed.ReduceOp.MAX)
            self.loss_min, self.loss_max = -both[0], both[1]

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if not self._measuring or self._window is None:
            return
        window, self._window = self._window, None
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self._params]
        mean_sq: Tensor | None = None
        if self.active_backend == "backpack":
            if self._accumulated is not None:
                b = int(window.num_samples)
                mean_sq = sq_norm([a / b for a in self._accumulated])
                self._accumulated = None
            else:
                mean_sq = sq_norm(grads)
        elif self._free_chunks:
            window = self._unscale_accumulation_chunks(window, grads)
            if window is None:
                return
        if trainer.world_size > 1:
            window = reduce_moments(trainer, window)
        elif isinstance(window.num_units, int) and window.num_units < 2:
            return  # a one-sample batch has no spread to measure (e.g. a last batch of size 1)
        estimate = dispersion_from_moments(window, mean_sq)
        values = {
            "grad/norm_sq": estimate.norm_sq,
            "grad/trace_cov": estimate.trace_cov,
            "grad/dispersion": estimate.dispersion,
        }
        if estimate.trace_cov_se is not None:
            values["grad/trace_cov_se"] = estimate.trace_cov_se
        self.step_log.record(self._step, values)
        self.measured_steps += 1

    def _unscale_accumulation_chunks(self, window: GradientMoments, grads: list[Tensor]) -> GradientMoments | None:
        """Convert chunk moments measured in ``.grad`` units (``S·h_j/A``) to gradients ``h_j``.
        ``S`` (the AMP loss scale, 1 without a scaler) is recovered on the device as
        ``⟨scaled, unscaled⟩/‖unscaled‖²`` from the last scaled cumulative gradient."""
        if isinstance(window.num_units, int) and window.num_units < 2:
            return None  # a partial accumulation window of one micro-step
        factor: Tensor | float = float(self._accumulate)
        if self._scaler and self._prev_grad is not None:
            unscaled_sq = sq_norm(grads)
            scale = dot(self._prev_grad, grads) / unscaled_sq
            factor = self._accumulate / scale
        assert window.weighted_sum is not None
        return GradientMoments(
            weighted_sq_norm_sum=window.weighted_sq_norm_sum * factor**2,
            num_samples=window.num_samples,
            num_units=window.num_units,
            weighted_sum=[w * factor for w in window.weighted_sum],
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._measuring and self.track_loss_range and not self._losses_seen:
            losses = outputs.get("per_sample_loss") if isinstance(outputs, dict) else None
            self._outputs_have_losses = losses is not None
            if losses is None and self._range_losses is not None:
                losses = self._range_losses  # computed in on_after_backward, at W_{t−1}
            if isinstance(losses, Tensor):
                self._update_loss_range(losses)
        self._range_losses = None
        if self._hooks is not None and self._hooks.attached:
            self._hooks.detach()
        if is_log_step(trainer):
            self.flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.flush(trainer, pl_module, epoch_end=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.flush(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._cleanup()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._hooks is not None:
            self._hooks.detach()
        self._window = None
        self._prev_grad = None
        self._batch = None
        self._pending_losses = []
        self.step_log.clear()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self._fold_losses()
        state: dict[str, Any] = {
            "measured_steps": self.measured_steps,
            "skipped_steps": list(self.step_log.skipped_steps),
            "active_backend": self.active_backend,
        }
        if self.loss_min is not None and self.loss_max is not None:
            state["loss_min"] = float(self.loss_min)
            state["loss_max"] = float(self.loss_max)
        if self._generator is not None:
            state["generator_state"] = self._generator.get_state()
            state["generator_device"] = self._generator.device.type
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_steps = int(state_dict.get("measured_steps", 0))
        self.step_log.skipped_steps = list(state_dict.get("skipped_steps", []))
        if "loss_min" in state_dict:
            self.loss_min = torch.tensor(state_dict["loss_min"], dtype=torch.float64)
            self.loss_max = torch.tensor(state_dict["loss_max"], dtype=torch.float64)
        self._generator_state = state_dict.get("generator_state")
        self._generator_device = state_dict.get("generator_device")
        self._generator = None


def _has_active_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, _DROPOUT_TYPES) and m.training and m.p > 0 for m in module.modules())
