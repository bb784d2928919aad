"""Bounds: pure math over accumulated per-step series (numpy; no torch hooks, no Lightning)."""

from genbounds.bounds.neu import NeuResult, neu_theorem1, trajectory_comparison
from genbounds.bounds.phases import find_valley, trailing_mean
from genbounds.bounds.series import (
    block_weights,
    expand_blocks,
    expand_blocks_scaled,
    growing_level_series,
    size_scaling,
)
from genbounds.bounds.wang_mao import Eq2Result, Eq3Result, eq2_relaxed, trajectory_wang_mao, wang_mao_eq2, wang_mao_eq3

__all__ = [
    "Eq2Result",
    "Eq3Result",
    "NeuResult",
    "block_weights",
    "eq2_relaxed",
    "expand_blocks",
    "expand_blocks_scaled",
    "find_valley",
    "growing_level_series",
    "neu_theorem1",
    "size_scaling",
    "trailing_mean",
    "trajectory_comparison",
    "trajectory_wang_mao",
    "wang_mao_eq2",
    "wang_mao_eq3",
]
