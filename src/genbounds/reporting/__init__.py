"""Reporting: read runs back (TensorBoard event files or CSVLogger tables, integrity-checked), then
plot, compare, gate and rank them."""

from genbounds.reporting.events import (
    CorruptRun, IncompleteRun, Run, UnreadableRun, assign_labels, find_runs, load_run, read_run_dir, require_complete,
)
from genbounds.reporting.rank import granulated_tau, kendall_tau_b, rank_runs
from genbounds.reporting.report import compare, report, summary_table

__all__ = [
    "CorruptRun", "IncompleteRun", "Run", "UnreadableRun", "assign_labels", "compare", "find_runs", "granulated_tau",
    "kendall_tau_b", "load_run", "rank_runs", "read_run_dir", "report", "require_complete", "summary_table",
]
