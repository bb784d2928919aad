"""The hooks' per-step path with its arithmetic batched over steps.

A step that ``GradientDispersion`` measures with the norm hooks alone (one backward a step, one
process, on the CPU) writes only raw values: the ghost hooks' rows and row norms, into buffers
this ring lends them (``GhostNormHooks.step_buffers``), and the fp32 norms of the gradient's
pieces (``functional._PiecePlan.norms_into``, into a row laid out by
``estimators.piece_blocks.PieceBlocks``). The logged rows of every pending step are made at once
— ``GhostNormHooks.sums_of``, ``PieceBlocks.group_sums`` and ``hook_dispersion_rows``, about eight
ops for all of them and the rest on the host in float64 (no float64 matrix product: its first
call maps 0.5–0.7 MiB of MKL's code, which training never runs) — when the step log is about to
flush or take another record (the ring is one of its sources, ``StepLog.add_source``), when the
ring is full, or when a step cannot join the pending ones (another batch size, loss scale, set of
layers whose rows wait, gradient layout).

Why: on the MLP benchmark a measured step spent more in the dispatch of its eight small read-out
ops (the Linear rows squared and combined, their sums, the pieces squared, two matrix-vector
products, the copy into the log) than in their arithmetic, each op paying ~10 µs in the cold
caches of a training step. Measured in one process (blocks of measured steps with and without
the ring, alternating) the ring took the step from 1.111x to 1.100-1.104x plain; with the other
changes of its round, ``benchmarks/step_blocks.py`` went from 1.119x to 1.098-1.102x
(docs/results/overhead.md, the row ring). The values are the per-step path's up to the order of
float64 sums.

Memory: the lent rows and row norms and the piece norms (4 bytes per 1,024 parameters a step,
and fewer than one block of zeros per gradient tensor) of at most ``max_steps`` steps (64: a
drain costs about 250 µs plus 6.5 µs a step on the MLP, 22 µs a step when it drained every 16
steps, 11 µs at the step log's flush every 50 steps — Lightning's default ``log_every_n_steps``;
docs/results/overhead.md, round 29) and within
``budget_bytes`` (default 1 MiB; at least one step, so a model of more than 256 M parameters
keeps one step's piece norms beyond it); a step of the MLP keeps 7 KiB. Each step's checks run
at its own read, so a failing step fails at once (the kept steps before it are logged); only the
arithmetic that turns the raw values into rows waits. The CPU only: elsewhere each step is read
at once, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from genbounds.estimators.functional import piece_plan
from genbounds.estimators.ghost_norms.hooks import GhostNormHooks
from genbounds.estimators.ghost_norms.step_rows import StepBuffers, step_buffer_views
from genbounds.estimators.gradient_dispersion import hook_dispersion_rows
from genbounds.estimators.piece_blocks import PieceBlocks

if TYPE_CHECKING:
    from genbounds.callbacks.step_log import StepLog


_CPU = torch.device("cpu")


class RowRing:
    """Raw per-step values of the norm hooks' path, kept for a run of steps (module docstring)."""

    def __init__(self, ghost: GhostNormHooks, step_log: StepLog, names: tuple[str, ...],
                 budget_bytes: int = 1 << 20, max_steps: int = 64) -> None:
        self.ghost, self.step_log, self.names = ghost, step_log, names
        self.budget_bytes, self.max_steps = budget_bytes, max_steps
        self.capacity = 0
        self._lent_bytes = 0
        self._shape: tuple | None = None  # (b, dtype, device) of the lent buffers
        self._rows: Tensor | None = None  # [capacity, sites, b]
        self._pairs: Tensor | None = None  # [capacity, 2, sites, b]
        self._norms: Tensor | None = None  # [capacity, blocks.width] fp32, laid out by PieceBlocks
        self._blocks: PieceBlocks | None = None
        self._lent_views: list[StepBuffers] = []
        self._piece_views: list[tuple[tuple[Tensor, ...], Tensor, tuple[Tensor, ...]]] = []
        self._first = 0  # the pending steps' slots: _first, _first + 1, …
        self._steps: list[int] = []
        self._key: tuple | None = None  # (deferred, scale, b, module_groups, layout) of the pending steps
        self._groups: list[list[int]] | None = None  # (compared by identity, as the hooks' row maps)
        self.lent: int | None = None
        """The slot lent to the step in flight (``None``: its buffers are the hooks' own)."""
        step_log.add_source(self)

    # -- lending (GhostNormHooks.step_buffers) ------------------------------------------------

    def lend(self, b: int, dtype: torch.dtype, device: torch.device) -> StepBuffers | None:
        """A slot's rows and pair norms for the step in flight, or ``None`` (the hooks use their
        own: a device other than the CPU, or a step of another shape while steps are pending)."""
        self.lent = None
        if device != _CPU:
            return None
        if self._shape != (b, dtype, device):
            if self._steps:
                return None  # (read at once; its record makes the pending ones first)
            self._allocate(b, dtype, device)
        slot = self._first + len(self._steps)
        if slot >= self.capacity:
            return None
        self.lent = slot
        return self._lent_views[slot]

    def _allocate(self, b: int, dtype: torch.dtype, device: torch.device) -> None:
        sites = self.ghost.site_count
        per_step = 3 * sites * b * torch.empty((), dtype=dtype).element_size()
        self.capacity = max(1, min(self.max_steps, self.budget_bytes // max(per_step, 1)))
        self._lent_bytes = self.capacity * per_step
        self._rows = torch.empty((self.capacity, sites, b), dtype=dtype, device=device)
        self._pairs = torch.empty((self.capacity, 2, sites, b), dtype=dtype, device=device)
        self._norms = None
        # every slot's views made now, once (a view is an op: ~4 a slot and step otherwise)
        self._lent_views = [step_buffer_views(*pair) for pair in zip(self._rows.unbind(0), self._pairs.unbind(0))]
        self._piece_views = []
        self._shape = (b, dtype, device)
        self._first = 0

    # -- keeping a step ------------------------------------------------------------------------

    def keep(self, step: int, deferred: tuple, scale: float | Tensor, b: int, grads: list[Tensor],
             module_groups: tuple[tuple[int, ...], ...], groups: list[list[int]]) -> bool:
        """Keep the step whose buffers were lent (its hooks read by ``read_parts``) and write its
        gradient's piece norms; ``False`` when it cannot wait (a tensor loss scale, a gradient
        without a piece plan): its sums are then :meth:`sums_now`."""
        slot = self.lent
        if slot is None or isinstance(scale, Tensor):
            return False
        plan = piece_plan(grads)
        if plan is None:
            return False
        key = (deferred, float(scale), int(b), module_groups, plan.layout)
        if self._steps and (key != self._key or groups is not self._groups):
            self.drain()
            self._first = slot
        if not self._steps:
            self._first, self._key, self._groups = slot, key, groups
        if self._norms is None or self._blocks is None or self._blocks.layout != plan.layout:
            # (a new batch shape dropped the norms (_allocate); the layout fixes the pieces)
            # (pending steps, if any, were made above: another layout is another key) the piece
            # norms count against the budget too: as many steps as fit beside the lent buffers
            self._blocks = blocks = PieceBlocks(plan.layout)
            width = max(1, blocks.width)
            self.capacity = max(1, min(self.capacity, (self.budget_bytes - self._lent_bytes) // (4 * width)))
            self._norms = torch.zeros((self.capacity, blocks.width), dtype=torch.float32)  # (the gaps stay zero)
            self._piece_views = [blocks.views_of(row) for row in self._norms.unbind(0)]
        if slot >= self.capacity:  # (a ring just narrowed for the piece norms: nothing pending)
            self.drain()
            self._first = 0
            return False
        plan.norms_into(grads, *self._piece_views[slot])
        self._steps.append(step)
        self.lent = None
        if self._first + len(self._steps) >= self.capacity:
            self.drain()
        return True

    def sums_now(self, deferred: tuple) -> Tensor:
        """The per-module sums of the step in flight, whose buffers were lent but which is not kept."""
        slot = self.lent
        assert slot is not None and self._rows is not None and self._pairs is not None
        self.lent = None
        return self.ghost.sums_of(self._rows[slot:slot + 1], self._pairs[slot:slot + 1], deferred)[0]

    # -- making the rows (a StepLog source) ----------------------------------------------------

    def pending_count(self) -> int:
        return len(self._steps)

    def drain(self) -> None:
        """Make the pending steps' rows (a few ops for all) and hand them to the step log."""
        steps = self._steps
        if not steps:
            return
        self._steps = []
        a, z = self._first, self._first + len(steps)
        self._first = 0
        assert self._key is not None and self._rows is not None and self._pairs is not None
        assert self._norms is not None and self._groups is not None and self._blocks is not None
        deferred, scale, b, module_groups, _ = self._key
        sums = self.ghost.sums_of(self._rows[a:z], self._pairs[a:z], deferred)
        group_sq = self._blocks.group_sums(self._norms[a:z], self._groups)
        rows = hook_dispersion_rows(sums, module_groups, scale, group_sq, b)
        self.step_log.record_rows(steps, self.names, rows)

    def close(self) -> None:
        """Make what is pending, stop lending and leave the step log. Called while a run fails
        too (``on_exception``): a drain that fails then drops the kept steps with a warning
        instead of raising over the run's own error."""
        lost = len(self._steps)
        try:
            self.drain()
        except Exception as err:  # noqa: BLE001 - cleanup; the records are reported as lost
            self._steps = []
            rank_zero_warn(f"GradientDispersion: the rows of {lost} measured step(s) kept by the hooks' row ring "
                           f"could not be made ({type(err).__name__}: {err}); they are not logged.")
        finally:
            if self.ghost.step_buffers == self.lend:
                self.ghost.step_buffers = None
            self.step_log.remove_source(self)
