"""The random draws of a user's ``training_step`` when genbounds runs it again: whether a call
drew (:func:`host_rng_states` beside torch's and the module's own generators, compared by the
loss contract's trial), and the same draws for every call on one batch at one training step
(:class:`DrawSeeds`, :func:`replayed_draws`).

A step that draws random numbers — dropout masks in a train-mode probe, mixup's ``λ`` and
permutation, noise from ``self.gen`` — makes its loss a random function. A probe that evaluates a
batch at several weights (flatness, the gradient sensitivity, Hessian-vector products) compares
``L_λ(w + ε)`` with ``L_λ(w)``: with one ``λ`` for both (common random numbers) the difference is
unbiased for the expected objective's and free of ``λ``'s own variance. The draws are new at
every step and for every other batch, and deterministic given the run's seed (docs/math.md §1).
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from genbounds.callbacks.user_state import generator_states, module_generators, restore_generators, seed_generators


def host_rng_states() -> tuple:
    """Python's and NumPy's global generator states, comparable with ``==``."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return random.getstate(), (kind, keys.tobytes(), pos, has_gauss, cached)


class DrawSeeds:
    """The seed of a random step's draws on a batch: one per distinct batch object and training
    step, numbered in the order the batches are first seen at the step, and the run's seed
    (``torch.initial_seed()``, what ``seed_everything`` set) — the same in every run of one seed (a
    batch's address would not be) and other under another seed; a batch freed and another made
    at its address is another batch."""

    def __init__(self) -> None:
        self._step = -1
        self._count = 0
        self._batches: dict[int, tuple[Callable[[], Any], int]] = {}

    def seed(self, module: nn.Module, batch: Any) -> int:
        from genbounds.estimators.batching import map_tensors

        trainer = getattr(module, "_trainer", None)
        step = int(getattr(trainer, "global_step", 0) or 0)
        if step != self._step:
            self._step, self._batches, self._count = step, {}, 0
        tensors: list[Tensor] = []
        map_tensors(batch, lambda t: tensors.append(t) or t)
        first = tensors[0] if tensors else None
        entry = self._batches.get(id(first))
        if entry is None or entry[0]() is not first:  # (a new batch, maybe at a freed one's address)
            self._count += 1
            entry = (weakref.ref(first) if first is not None else (lambda: None), self._count)
            self._batches[id(first)] = entry
        return zlib.crc32(repr((torch.initial_seed(), step, entry[1])).encode())


@contextmanager
def replayed_draws(module: nn.Module, seed: int) -> Iterator[Callable[[], None]]:
    """The block's random draws — torch's (the CPU's and the module's CUDA device's), Python's,
    NumPy's and those of the random generators kept on ``module`` — from ``seed``, all forked around
    it: training draws what it would without it. Yields a function that seeds them again (a call
    that runs the step twice draws the same both times)."""
    import random

    import numpy as np

    from genbounds.callbacks.isolation import _rng_devices, forked_host_rngs

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    gens = module_generators(module)  # (noise from self.gen: chunks of one batch must differ too)
    kept = generator_states(gens)

    def reseed() -> None:
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        seed_generators(gens, seed)

    try:
        with torch.random.fork_rng(devices=_rng_devices(device), device_type=device.type), forked_host_rngs():
            reseed()
            yield reseed
    finally:
        restore_generators(gens, kept)
