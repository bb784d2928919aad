"""Where a measured step's per-sample values land: :class:`StepRows`, the ``[sites, b]`` rows of
the hooked modules and the 2-D ``Linear`` calls' row norms, with the buffers they live in (the
hooks' own, reused from step to step, or a lender's: ``callbacks/dispersion/row_ring.py``).

:class:`~genbounds.estimators.ghost_norms.hooks.GhostNormHooks` decides *what* is written (its
sites, calls and checks); this module only keeps *where*, and makes the deferred Linear rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from genbounds.estimators.ghost_norms.base import _compute_dtype
from genbounds.estimators.ghost_norms.linear import goodfellow_row_norms, goodfellow_rows

StepBuffers = tuple[Tensor | None, tuple[Tensor, ...], Tensor, tuple[Tensor, ...], tuple[tuple[Tensor, Tensor], ...]]
"""A step's ``(rows [sites, b], their views, pair norms [2, sites, b], its two halves, each site's
two views)`` (:meth:`StepRows.take`)."""

Lender = Callable[[int, torch.dtype, torch.device], "StepBuffers | None"]
"""``(b, dtype, device) → StepBuffers`` of a step, or ``None`` for the hooks' own buffers."""


def step_buffers_for(sites: int, b: int, dtype: torch.dtype, device: torch.device, rows: bool = True
                     ) -> StepBuffers:
    """New :data:`StepBuffers` (``rows=False``: the pair norms only)."""
    r = torch.empty((sites, b), dtype=dtype, device=device) if rows else None
    return step_buffer_views(r, torch.empty((2, sites, b), dtype=dtype, device=device))


def step_buffer_views(r: Tensor | None, pairs: Tensor) -> StepBuffers:
    """:data:`StepBuffers` of given rows ``[sites, b]`` and pair norms ``[2, sites, b]`` (a slot of
    a lender's buffers), with every view made once."""
    halves = pairs.unbind(0)
    views = tuple(zip(halves[0].unbind(0), halves[1].unbind(0)))
    return r, (r.unbind(0) if r is not None else ()), pairs, halves, views


class StepRows:
    """One row per hooked module (``sites`` of them) for the step in flight, taken at its first
    recorded call in that call's compute dtype (widened, never narrowed: :meth:`row_for`), and
    the pair norms ``‖δ_i‖``, ``‖a_i‖`` of its 2-D Linear calls (:meth:`write_pair`), squared and
    combined into their rows for every such module at once (:meth:`finish_linear`, or a lender's
    :meth:`sums_of` for many steps).

    Rows are not zeroed when taken: a row no call wrote is zeroed when read
    (:meth:`zero_unwritten`), an op saved on every step where each hooked module runs.

    Attributes:
        lender: where a step's buffers come from instead of this object's own (:data:`Lender`).
        rows, views: the step's rows ``[sites, b]`` and their row views (``None``, ``()``: none taken).
        lent: whether :attr:`rows` and the pairs are the lender's (a widening copies them: then not).
        written: indices of the rows written this step.
        deferred: ``(site index, bias trainable)`` of the Linear calls whose rows wait for
            :meth:`finish_linear`.
    """

    def __init__(self, sites: int) -> None:
        self.sites = sites
        self.lender: Lender | None = None
        # the last step's rows, reused by the next step of the same shape, dtype and device (an
        # allocation and an unbind saved per step: ~50 µs of the MLP benchmark's step)
        self._spare: tuple[Tensor, tuple[Tensor, ...]] | None = None
        self._own_pairs: StepBuffers | None = None
        self._finishers: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self.pairs: Tensor | None = None
        self.halves: tuple[Tensor, ...] = ()
        self.pair_views: tuple[tuple[Tensor, Tensor], ...] = ()
        self.rows: Tensor | None = None
        self.views: tuple[Tensor, ...] = ()
        self.lent = False
        self.written: set[int] = set()
        self.deferred: list[tuple[int, bool]] = []

    def reset(self) -> None:
        """A new step: nothing taken (this step's own rows become the next one's spare)."""
        if self.rows is not None and not self.lent:
            self._spare = (self.rows, self.views)
        self.rows = None
        self.views = ()
        self.lent = False
        self.written = set()
        self.deferred = []

    def release(self) -> None:
        """Drop the kept buffers (the spare rows and the own pair norms)."""
        self._spare = None
        self.pairs, self.halves, self.pair_views = None, (), ()
        self._own_pairs = None

    def take(self, b: int, dtype: torch.dtype, device: torch.device) -> None:
        """The step's rows and pair norms, at its first recorded call: the lender's when it lends
        them, else the last step's (reused) or new ones. In the compute dtype (fp32 for an fp32 or
        autocast model), so that each module's last op writes its ``[b]`` values there itself — a
        reduction into a wider dtype would first cast its whole input; the rows are summed in
        float64 when read (the same values and order as float64 rows: an fp32 value converts
        exactly)."""
        lent = self.lender(b, dtype, device) if self.lender is not None else None
        if lent is not None:
            self.rows, self.views, self.pairs, self.halves, self.pair_views = lent
            self.lent = True
            return
        spare = self._spare
        if spare is not None and spare[0].shape[1] == b and spare[0].dtype == dtype and spare[0].device == device:
            self.rows, self.views = spare
        else:
            self.rows = torch.zeros((self.sites, b), dtype=dtype, device=device)
            self.views = self.rows.unbind(0)
        self._spare = None
        own = self._own_pairs
        if own is None or own[2].shape[2] != b or own[2].dtype != dtype or own[2].device != device:
            own = step_buffers_for(self.sites, b, dtype, device, rows=False)
            self._own_pairs = own
        _, _, self.pairs, self.halves, self.pair_views = own

    def row_for(self, index: int, dtype: torch.dtype) -> Tensor:
        """Row ``index``, the rows first widened when ``dtype`` is wider (a float64 layer in a
        model whose first call was fp32: never narrowed, so no value is rounded)."""
        assert self.rows is not None
        wider = _compute_dtype(dtype, self.rows.dtype)
        if wider != self.rows.dtype:
            self.rows = self.rows.to(wider)
            self.views = self.rows.unbind(0)
            self.lent = False  # (a copy of the lent rows: the step is read at once)
        return self.views[index]

    def store(self, index: int, sq: Tensor) -> None:
        """Row ``index`` is ``sq`` (``[b]``; usually already written in place by the module's last op)."""
        self.written.add(index)
        if sq is not self.views[index]:
            row = self.row_for(index, sq.dtype)
            if sq.shape != row.shape:
                raise RuntimeError(
                    f"mismatched batch sizes: {sq.shape[0] if sq.dim() else 1} per-sample values against "
                    f"{row.shape[0]} for the step's first hooked call (a layer applied to part of the batch — a "
                    "mixture of experts' routing, a mask — or one whose output the whole batch shares has no rows the "
                    "hooks can give to samples)")
            row.copy_(sq)

    def write_pair(self, index: int, x: Tensor | None, grad: Tensor, bt: bool) -> bool:
        """A 2-D Linear call's row norms ``‖δ_i‖`` and ``‖a_i‖`` (``x`` ``None``: a frozen
        weight) into its pair views, its row made later (:meth:`finish_linear`); ``False`` when
        the call does not fit the pair buffer (another dtype or batch size: the general route)."""
        pairs = self.pairs
        if (grad.dim() != 2 or pairs is None or grad.dtype != pairs.dtype or grad.shape[0] != pairs.shape[2]
                or (x is not None and x.dtype != pairs.dtype)):
            return False
        goodfellow_row_norms(x, grad, *self.pair_views[index])
        self.deferred.append((index, bt))
        self.written.add(index)
        return True

    def finish_linear(self) -> None:
        """The deferred Linear rows: ``‖δ_i‖² (‖a_i‖² + [bias trainable])`` for every call of
        :meth:`write_pair` at once, written into their rows (the others untouched)."""
        deferred, self.deferred = self.deferred, []
        rows, pairs = self.rows, self.pairs
        assert rows is not None and pairs is not None
        bias, mask = self.finisher(tuple(deferred), pairs)
        g, a = self.halves
        if mask is None:  # every hooked module a 2-D Linear: three ops (their rows never widened)
            goodfellow_rows(g, a, bias, out=rows)
            return
        torch.where(mask, goodfellow_rows(g, a, bias).to(rows.dtype), rows, out=rows)

    def finisher(self, deferred: tuple[tuple[int, bool], ...], pairs: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(bias [sites, 1], mask [sites, 1] or None when every site is deferred)`` for
        :func:`~genbounds.estimators.ghost_norms.linear.goodfellow_rows` (cached per deferred set)."""
        key = (deferred, pairs.device, pairs.dtype)
        made = self._finishers.get(key)
        if made is None:
            # (from lists: an element set is a copy kernel, a mask's all() another; neither runs in training)
            bias_list, mask_list = [[0.0] for _ in range(self.sites)], [[False] for _ in range(self.sites)]
            for index, bt in deferred:
                bias_list[index][0] = float(bt)
                mask_list[index][0] = True
            bias = torch.tensor(bias_list, dtype=pairs.dtype, device=pairs.device)
            every = all(m[0] for m in mask_list)
            made = (bias, None if every else torch.tensor(mask_list, dtype=torch.bool, device=pairs.device))
            if len(self._finishers) > 16:
                self._finishers.clear()
            self._finishers[key] = made
        return made

    def sums_of(self, rows: Tensor, pairs: Tensor, deferred: tuple[tuple[int, bool], ...]) -> Tensor:
        """``[k, sites]`` float64 row sums of ``k`` steps' rows ``[k, sites, b]`` and pair norms
        ``[k, 2, sites, b]`` with the same ``deferred`` calls, their Linear rows made first."""
        if not deferred:
            return rows.sum(2, dtype=torch.float64)
        bias, mask = self.finisher(deferred, pairs)
        made = goodfellow_rows(pairs[:, 0], pairs[:, 1], bias)
        if mask is not None:
            made = torch.where(mask, made.to(rows.dtype), rows)
        return made.sum(2, dtype=torch.float64)

    def zero_unwritten(self) -> None:
        """Zero the rows no call wrote this step (they are not zeroed when taken)."""
        if len(self.written) < len(self.views):
            for j, row in enumerate(self.views):
                if j not in self.written:
                    row.zero_()

    def rows64(self) -> Tensor:
        """The step's rows in float64 (a copy when they are narrower: exact; lent rows are the
        lender's, so they are copied too)."""
        rows = self.rows
        assert rows is not None
        if rows.dtype != torch.float64:
            return rows.double()
        return rows.clone() if self.lent else rows

    def hand_out(self) -> tuple[Tensor, ...]:
        """The views of the rows just handed out by :meth:`rows64` (its own float64 rows): they
        are the caller's now, so the next step takes new ones."""
        views = self.views
        self.rows, self.views = None, ()
        return views
