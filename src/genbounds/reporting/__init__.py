"""Reporting: read TensorBoard event files back, plot, compare and gate runs."""

from genbounds.reporting.events import Run, UnreadableRun, find_runs, load_run
from genbounds.reporting.report import compare, plot_run, report, summary_table

__all__ = ["Run", "UnreadableRun", "compare", "find_runs", "load_run", "plot_run", "report", "summary_table"]
