"""``backend="functorch"``: exact per-sample gradients by one extra pass, memory-bounded
(:func:`~genbounds.estimators.per_sample_gradients.per_sample_gradient_moments`)."""

from __future__ import annotations

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from genbounds.callbacks.dispersion.base import DispersionBackend, StepContext, WindowResult
from genbounds.callbacks.isolation import as_training_batch, isolated_pass
from genbounds.estimators.functional import LossFn, grouped_sq_norms
from genbounds.estimators.gradient_dispersion import GradientMoments
from genbounds.estimators.per_sample_gradients import DEFAULT_MEMORY_BUDGET, Method, per_sample_gradient_moments


class PerSampleBackend(DispersionBackend):
    name = "functorch"

    def __init__(self, loss_fn: LossFn, method: Method, chunk_size: int | None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, grad_is_mean: bool = True,
                 stochastic: bool = False) -> None:
        self.loss_fn = loss_fn
        self.grad_is_mean = grad_is_mean and not stochastic
        """Whether the training step's ``.grad`` is the mean of these per-sample gradients (not
        when the training loss holds a term they lack, e.g. a weight penalty, nor when the step
        draws random numbers — dropout —, which the pass draws anew): only then are the terms
        centred at it instead of at the pass's own mean (a running sum: one gradient's memory)."""
        self.method = method
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        how = "torch.func vmap(grad)" if method == "vmap" else "one forward and a batched backward"
        held = f"chunks of {chunk_size} samples" if chunk_size is not None else \
            f"≤ {memory_budget / 2**20:.0f} MiB of per-sample gradients at once, at least one sample's"
        self.description = f"exact per-sample gradients by {how} (one extra pass, {held})" + (
            " — training_step draws random numbers (dropout?): the pass draws its own, so it measures the "
            "dispersion of the same batch under another draw" if stochastic else "")
        self.failed: Exception | None = None
        self._verified = False
        self._mean_sq: Tensor | None = None
        """``[K + 1]``: ``‖ḡ_k‖²`` per group and ``‖ḡ‖²`` of the ``.grad`` a measured step's pass was
        centred at, when it kept no running sum of its own."""

    def after_backward(self, ctx: StepContext) -> GradientMoments | None:
        mean = None
        if self.grad_is_mean and ctx.accumulate == 1 \
                and isinstance(ctx.loss_scale, float) and ctx.loss_scale == 1.0:
            mean = list(ctx.extras.get("grads", [])) or None  # (zeros where .grad is None)
        self._mean_sq = None
        # one backward per window (automatic optimization, no accumulation): then that ḡ is the
        # window's, and the pass keeps no running sum of its own. Under DDP the sums are kept (the
        # processes' ḡ is their sum's), and .grad — DDP's average over the processes — centres the
        # standard error's terms: each process's own mean did (0.1546 against one process's 0.1409
        # in a DDP matrix, round 29; equal now)
        ddp, automatic = ctx.trainer.world_size > 1, ctx.module.automatic_optimization
        own_sum = mean is None or not automatic or ddp
        try:
            with isolated_pass(ctx.module, mode="keep"), as_training_batch(ctx.batch_idx):
                moments = per_sample_gradient_moments(
                    ctx.module, self.loss_fn, ctx.batch, method=self.method, chunk_size=self.chunk_size,
                    memory_budget=self.memory_budget, groups=ctx.groups,
                    mean_gradient=None if mean is None else [m.reshape(-1) for m in mean],
                    gradient_sum=own_sum,
                    center_at_mean=ddp and automatic)
        except Exception as err:  # noqa: BLE001 - never crash mid-training on a model torch.func cannot handle
            if self._verified:
                raise
            self.failed = err
            rank_zero_warn(
                f"GradientDispersion(backend='functorch'): per-sample gradients failed on this model "
                f"({type(err).__name__}: {err}); switching to backend='microbatch'.")
            return None
        self._verified = True
        if not own_sum:  # ‖ḡ‖² and ‖ḡ_k‖² of the ḡ the terms were centred at (one gradient's memory
            # less than a running sum, and no add over the whole gradient per sample)
            self._mean_sq = grouped_sq_norms(mean, ctx.groups)
        return moments

    def end_window(self, ctx: StepContext, window: GradientMoments | None) -> WindowResult | None:
        if window is None:
            return None
        norms, self._mean_sq = self._mean_sq, None
        if window.weighted_sum is not None or norms is None:
            return WindowResult(window)
        return WindowResult(window, mean_sq=norms[-1], group_mean_sq=norms[:-1])
