"""The epoch-wise double descent of the gradient dispersion (seed 001 §5, Fig. 3): pure math.

Seed 001 observes three phases of the per-epoch gradient dispersion under label noise: a fast
descent while the network extracts patterns, a rise to a peak while it starts memorizing (train
and test accuracies part), and a second descent. The valley between the first two phases marks
the start of memorization. :func:`find_valley` locates it online: the series is smoothed by a
trailing moving average; the valley is the running minimum of the smoothed series, confirmed once
the smoothed value has stayed more than ``rise`` (relative) above that minimum for ``patience``
consecutive epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def trailing_mean(series: Sequence[float], window: int) -> np.ndarray:
    """Causal moving average (the first values average what exists so far)."""
    x = np.asarray(series, dtype=np.float64)
    if window <= 1 or x.size == 0:
        return x.copy()
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(x.size):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def find_valley(series: Sequence[float], *, smooth: int = 3, rise: float = 0.1, patience: int = 2) -> int | None:
    """Index (epoch) of the dispersion valley, or ``None`` while it is not confirmed.

    Args:
        series: per-epoch mean gradient dispersion.
        smooth: trailing moving-average window.
        rise: relative rise above the running minimum that counts as leaving the valley.
        patience: consecutive epochs that must stay above ``(1 + rise) ×`` the minimum.
    """
    s = trailing_mean(series, smooth)
    best, best_i, above = np.inf, None, 0
    for i, v in enumerate(s):
        if v < best:
            best, best_i, above = v, i, 0
        elif v > (1.0 + rise) * best:
            above += 1
            if above >= patience:
                return best_i
        else:
            above = 0
    return None
