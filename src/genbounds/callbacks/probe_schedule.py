"""When a probe runs (:class:`ProbeSchedule`), and the names and random streams that depend only on
the step: a probe's seed (:func:`probe_seed`) and its σ tag (:func:`sigma_tag`)."""

from __future__ import annotations

import math


class ProbeSchedule:
    """When a probe runs. ``step`` is the number of optimizer steps already taken."""

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced: int | None = None,
        at_train_end: bool = True,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.log_spaced = log_spaced
        self.at_train_end = at_train_end

    @property
    def empty(self) -> bool:
        return not (self.every_n_steps or self.every_n_epochs or self.log_spaced or self.at_train_end)

    def due_at_step(self, step: int) -> bool:
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        if self.log_spaced:
            # k points per decade: step s is due when ⌊k·log10(s+1)⌋ advances past ⌊k·log10(s)⌋
            k = self.log_spaced
            return step == 0 or math.floor(k * math.log10(step + 1)) > math.floor(k * math.log10(step))
        return False

    def next_due_step(self, step: int) -> float:
        """The first step after ``step`` at which :meth:`due_at_step` holds (``inf``: none)."""
        nxt = math.inf
        if self.every_n_steps:
            nxt = (step // self.every_n_steps + 1) * self.every_n_steps
        if self.log_spaced:
            # due steps are s = ⌈10^(m/k)⌉ − 1 for integers m: the first m past step, checked
            # against due_at_step (rounding of 10^(m/k) can move it by one)
            k = self.log_spaced
            m = math.floor(k * math.log10(step + 1)) + 1
            while True:
                s = max(step + 1, math.ceil(10 ** (m / k)) - 1 - 1)
                found = next((t for t in range(s, s + 3) if t > step and self.due_at_step(t)), None)
                if found is not None:
                    nxt = min(nxt, found)
                    break
                m += 1
        return nxt

    def due_at_epoch_end(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0


def probe_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed from ``(seed, step, stream)`` (distinct inputs give well-separated seeds)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB + 0x5EED) % (2**64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (2**64)
    x ^= x >> 32
    return x % (2**63 - 1)


def sigma_tag(sigma: float) -> str:
    return f"sigma={sigma:g}"
