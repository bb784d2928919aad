"""The measured generalization gap and its standard error (pure numpy).

``gap = mean(ℓ on S') − mean(ℓ on S)`` at the same weights, in eval mode. The held-out mean
estimates the population loss ``L_μ(w)`` with standard error ``sd'/√m'``. The training mean is
computed on ``m ≤ n`` samples drawn without replacement from the training set ``S``: when
``m = n`` it *is* ``L_S(w)`` exactly and contributes no error; otherwise its SE carries the
finite-population factor ``√(1 − m/n)``. So

    SE(gap)² = sd'²/m' + (1 − m/n)·sd²/m.

The same formula gives the 0-1 error gap for classifiers (per-sample errors in {0, 1}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class GapEstimate:
    train: float
    heldout: float
    gap: float
    standard_error: float
    train_count: int
    heldout_count: int
    dropped: int = 0
    """Non-finite per-sample values left out (counted, never averaged in)."""


def measured_gap(train_values: np.ndarray, heldout_values: np.ndarray, num_train: int | None,
                 train_is_means_of: int | None = None) -> GapEstimate:
    """Gap and SE from per-sample values (float64 arrays). Non-finite values are dropped and
    counted. ``train_is_means_of``: the arrays hold means of chunks of that many samples (a loss
    contract that only knows batch means), whose spread gives the SE."""
    tr = np.asarray(train_values, dtype=np.float64).ravel()
    he = np.asarray(heldout_values, dtype=np.float64).ravel()
    keep_tr, keep_he = np.isfinite(tr), np.isfinite(he)
    dropped = int((~keep_tr).sum() + (~keep_he).sum())
    tr, he = tr[keep_tr], he[keep_he]
    if tr.size == 0 or he.size == 0:
        return GapEstimate(math.nan, math.nan, math.nan, math.nan, int(tr.size), int(he.size), dropped)
    unit = train_is_means_of or 1
    m, m_h = tr.size * unit, he.size * unit
    var_tr = float(tr.var(ddof=1)) / tr.size if tr.size > 1 else math.inf
    var_he = float(he.var(ddof=1)) / he.size if he.size > 1 else math.inf
    fpc = max(0.0, 1.0 - m / num_train) if num_train else 1.0
    se = math.sqrt(var_he + fpc * var_tr) if fpc > 0 else math.sqrt(var_he)
    return GapEstimate(float(tr.mean()), float(he.mean()), float(he.mean() - tr.mean()), se, m, m_h, dropped)
