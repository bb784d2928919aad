"""``backend="microbatch"``: SPEC §1's chunk estimator by one extra pass (any model, any layer;
an approximation under train-mode BatchNorm, where each chunk is normalized on its own)."""

from __future__ import annotations

import torch

from genbounds.callbacks.dispersion.base import DispersionBackend, StepContext
from genbounds.callbacks.isolation import as_training_batch, isolated_pass
from genbounds.estimators.batching import batch_device, batch_size
from genbounds.estimators.functional import LossFn
from genbounds.estimators.gradient_dispersion import GradientMoments
from genbounds.estimators.microbatch_gradients import microbatch_gradient_moments


class MicrobatchBackend(DispersionBackend):
    name = "microbatch"

    def __init__(self, loss_fn: LossFn, num_chunks: int, seed: int) -> None:
        self.loss_fn = loss_fn
        self.num_chunks = num_chunks
        self.seed = seed
        self.description = f"{num_chunks} random micro-batch chunks (one extra pass)"
        self._generator: torch.Generator | None = None
        self.generator_state: torch.Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self.generator_state is not None:
                try:
                    self._generator.set_state(self.generator_state)
                except RuntimeError:
                    pass  # saved on another device type: restart the stream from the seed
        return self._generator

    def after_backward(self, ctx: StepContext) -> GradientMoments | None:
        if batch_size(ctx.batch) < 2:
            return None
        with isolated_pass(ctx.module, mode="keep"), as_training_batch(ctx.batch_idx):
            return microbatch_gradient_moments(ctx.module, self.loss_fn, ctx.batch, self.num_chunks,
                                               generator=self.generator(batch_device(ctx.batch)), groups=ctx.groups)

    def state(self) -> dict:
        return {} if self._generator is None else {"generator_state": self._generator.get_state()}
