"""Choosing the noise level from a grid of noisy estimates (pure numpy).

Minimizing noisy estimates over a grid is optimistic (winner's curse): the smallest of several
noisy values is biased low, and a candidate with a huge standard error can win by chance (a
signed flatness term of −45 ± 42 makes a "bound" of −43). The rule used for every bound: take the
minimizer of ``value + z·SE`` (an upper confidence limit; ``z = 1`` by default), report the value
and its SE there, ignore non-finite candidates and say so, and flag a minimizer at the edge of
the grid (the grid should be extended).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Selection:
    """The minimizer of ``value + z·SE`` over the finite candidates."""

    index: int
    """Selected candidate, ``-1`` when no candidate is usable."""
    criterion: np.ndarray
    """``value + z·SE`` per candidate (NaN where ignored)."""
    ignored: np.ndarray
    """Boolean mask: candidates left out (non-finite value, or non-finite SE while ``z ≠ 0``)."""
    at_edge: bool
    """The minimizer is the first or last usable member of its ordered grid (extend the grid)."""
    se_missing: bool
    """No SE was given: the selection used the values alone."""
    z: float

    @property
    def n_ignored(self) -> int:
        return int(np.count_nonzero(self.ignored))


def sigma_min_with_se(values: Sequence[float] | np.ndarray, ses: Sequence[float] | np.ndarray | None = None,
                      z: float = 1.0, groups: Sequence[int] | np.ndarray | None = None) -> Selection:
    """Index of ``argmin_c (values[c] + z·ses[c])`` over the usable candidates.

    Non-finite values are ignored; with ``z ≠ 0`` so are candidates whose SE is non-finite (an unknown
    SE must not win by counting as 0). ``ses=None``: select on the values alone (``se_missing``).
    ``groups`` labels the ordered grid each candidate belongs to (candidates of one grid in grid
    order; default: the whole array is one ordered grid; label ``-1``: not part of a grid, never an
    edge). ``at_edge`` is set when the minimizer is the first or the last usable member of its grid.
    Ties go to the first index.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    se_missing = ses is None
    s = np.zeros_like(v) if se_missing else np.asarray(ses, dtype=np.float64).ravel()
    if s.shape != v.shape:
        raise ValueError(f"values and ses differ in length: {v.shape} vs {s.shape}")
    z = float(z)
    usable = np.isfinite(v)
    if z != 0.0:
        usable &= np.isfinite(s)
    crit = np.full_like(v, np.nan)
    crit[usable] = v[usable] + (z * s[usable] if z != 0.0 else 0.0)
    if not usable.any():
        return Selection(-1, crit, ~usable, False, se_missing, z)
    idx = int(np.flatnonzero(usable)[np.argmin(crit[usable])])
    g = np.zeros(v.shape, dtype=np.int64) if groups is None else np.asarray(groups).ravel()
    if g.shape != v.shape:
        raise ValueError("groups must have one label per candidate")
    at_edge = False
    if g[idx] != -1:
        members = np.flatnonzero(usable & (g == g[idx]))
        at_edge = bool(idx == members[0] or idx == members[-1])
    return Selection(idx, crit, ~usable, at_edge, se_missing, z)
