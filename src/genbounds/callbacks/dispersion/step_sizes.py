"""Each optimizer step's batch size, measured or not: what the bounds need to fill the steps the
dispersion did not measure.

``Tr Σ_B = tr Σ / b``: a step's dispersion scales with its own batch size, so a measurement stands
for the unmeasured steps of its block at *their* sizes (``docs/math.md`` §6.8;
:func:`genbounds.bounds.series.size_scaling`). A loader that keeps its last, smaller batch
(``drop_last=False``, the default) has one such step an epoch; in a sweep run (899 samples, batch
128) its 3-sample batch had a dispersion about 100 times the others', and whether the budget's
stride happened to measure it moved Wang–Mao Eq. 3 from 19 to 34 between two recordings of the
same seed.

Kept run-length encoded (the sizes change about twice an epoch; a loader that buckets by length may
change them every step: 16 bytes a step), in this process's samples: under
DDP every process's shard has one size (Lightning's distributed sampler), so the ratios the filling
uses are the global batch's.
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np

from genbounds.estimators.batching import batch_size


class StepSizes:
    """The batch size of every optimizer step seen, as runs ``(first step, size)``; 0: unknown."""

    def __init__(self) -> None:
        self.starts = array("q")
        self.sizes = array("q")
        self._step = -1
        self._size = 0

    def add(self, step: int, batch: Any, first: bool) -> int:
        """One micro-batch of optimizer step ``step`` (``first``: the first of its window); its size
        (0: unknown)."""
        try:
            m = batch_size(batch)
        except (ValueError, TypeError, AttributeError):
            m = 0  # (a batch whose size cannot be read: unknown, and the filling falls back to blocks)
        if first or step != self._step:
            self._close()
            self._step, self._size = step, m
        elif self._size and m:
            self._size += m
        else:
            self._size = 0
        return m

    def _close(self) -> None:
        step, size = self._step, self._size
        if step < 0:
            return
        if self.starts and step <= self.starts[-1]:  # (a step seen again: a fit resumed from an earlier step)
            self.truncate(step)
        if not self.sizes or self.sizes[-1] != size:
            self.starts.append(step)
            self.sizes.append(size)
        self._step = -1

    def truncate(self, step: int) -> None:
        """Forget the sizes from ``step`` on (a fit that starts there: from 0, or resumed)."""
        if self._step >= step:
            self._step = -1
        while self.starts and self.starts[-1] >= step:
            self.starts.pop()
            self.sizes.pop()

    def runs(self) -> tuple[list[int], list[int]]:
        """``(starts, sizes)``, the step under way included."""
        starts, sizes = self.starts.tolist(), self.sizes.tolist()
        if self._step >= 0:
            while starts and starts[-1] >= self._step:  # (as _close will: a step seen again)
                starts.pop()
                sizes.pop()
            if not sizes or sizes[-1] != self._size:
                starts.append(self._step)
                sizes.append(self._size)
        return starts, sizes

    def extremes(self, first: int, end: int) -> tuple[int, int] | None:
        """The smallest and largest known size of the steps ``first … end − 1`` (``None``: none known)."""
        starts, sizes = self.runs()
        seen = [size for start, size, nxt in zip(starts, sizes, starts[1:] + [end])
                if size > 0 and start < end and nxt > first]
        return (min(seen), max(seen)) if seen else None

    def array(self, total_steps: int) -> np.ndarray:
        """Per-step sizes of steps ``0 … total_steps − 1`` (0 where unknown)."""
        out = np.zeros(max(total_steps, 0), dtype=np.float64)
        starts, sizes = self.runs()
        ends = starts[1:] + [None]
        for start, size, end in zip(starts, sizes, ends):
            if start >= total_steps:
                break
            # (a run stands until the next one; the last one for the step it began at and those
            # after it that were seen: the run continues while sizes are equal)
            out[start:total_steps if end is None else min(end, total_steps)] = size
        return out

    def state_dict(self) -> dict[str, Any]:
        starts, sizes = self.runs()
        return {"step_size_starts": starts, "step_sizes": sizes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.starts = array("q", (int(s) for s in state.get("step_size_starts", [])))
        self.sizes = array("q", (int(s) for s in state.get("step_sizes", [])))
        self._step, self._size = -1, 0
