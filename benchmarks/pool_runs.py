"""Pool the per-round ratios of several runs of an overhead benchmark, with the median's
distribution-free 95 % interval.

    python benchmarks/pool_runs.py run1.json run2.json                      # the suite (overhead_suite.py --json)
    python benchmarks/pool_runs.py mlp1.json mlp2.json mlp3.json --model mlp   # overhead_dispersion.py --json

One run of 9–11 rounds on this shared machine puts the median of its per-round ratios within
several % of the truth at best (single rounds range over ±30 %): whether a target is met *with
confidence* is read off rounds pooled over runs of the same code.  Every JSON file is one run of
``overhead_suite.py --json`` (pairs: ``suite`` / ``plain``) or ``overhead_dispersion.py --json``
(pairs: ``<model>|dispersion`` / ``<model>|plain``, with ``--model``); a round is kept only as
its pair.  For each run and for the pool it prints the raw ratio (training time over plain's, the
same round) and the speed-adjusted one (``common.speed_adjusted`` for the suite; each run over
its own forward-and-backward calibration for the dispersion rows), each as ``median [95 % CI of
the median]`` (``common.median_ci``: order statistics, no assumption on the distribution), and
the verdict against ``--limit``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import calibrated_ratio, fmt_ci, speed_adjusted, verdict  # noqa: E402

LIMITS = {"suite": 1.25, "mlp": 1.10, "cnn": 1.25}
"""The targets of issue 9 (the median per-round time ratio to plain)."""


def round_ratios(payload: dict, model: str | None) -> tuple[list[float], list[float]]:
    """``(raw, adjusted)`` per-round ratios of one run's JSON payload (rounds paired in order)."""
    runs = payload["runs"]
    if model is None:
        if "suite" not in runs:
            raise SystemExit("not an overhead_suite.py JSON (no 'suite' runs); pass --model for overhead_dispersion.py")
        pairs = list(zip(runs["suite"], runs["plain"]))
        raw = [a["fit_s"] / b["fit_s"] for a, b in pairs]
        adjusted = [speed_adjusted(a, b) for a, b in pairs]
    else:
        key, base = f"{model}|dispersion", f"{model}|plain"
        if key not in runs or base not in runs:
            raise SystemExit(f"no {key!r} / {base!r} runs in this JSON (models: "
                             f"{sorted({k.split('|')[0] for k in runs})})")
        pairs = list(zip(runs[key], runs[base]))
        raw = [a["ms_per_step"] / b["ms_per_step"] for a, b in pairs]
        adjusted = [calibrated_ratio(a, b) for a, b in pairs]
    return raw, adjusted


def pooled_table(files: list[str], model: str | None, limit: float) -> str:
    lines = ["| run | rounds | raw ratio: median [95 % CI] | speed-adjusted: median [95 % CI] |",
             "|---|---:|---:|---:|"]
    all_raw: list[float] = []
    all_adj: list[float] = []
    for path in files:
        with open(path) as fh:
            raw, adjusted = round_ratios(json.load(fh), model)
        all_raw += raw
        all_adj += adjusted
        lines.append(f"| {os.path.basename(path)} | {len(raw)} | {fmt_ci(raw)} | {fmt_ci(adjusted)} |")
    lines.append(f"| **pooled** | {len(all_raw)} | **{fmt_ci(all_raw)}** | **{fmt_ci(all_adj)}** |")
    before = []  # overhead_dispersion.py --calibrate-before: adjusted by each process's speed before fit
    if model is not None:
        for path in files:
            with open(path) as fh:
                runs = json.load(fh)["runs"]
            ratios = (calibrated_ratio(a, b, key="calib_before_ms")
                      for a, b in zip(runs.get(f"{model}|dispersion", []), runs.get(f"{model}|plain", [])))
            before += [x for x in ratios if math.isfinite(x)]
    if before:
        lines += ["", f"Adjusted by the calibration before `fit` (the runs with `--calibrate-before`, {len(before)} "
                  f"rounds): {fmt_ci(before)}."]
    lines += ["", f"Target median ≤ {limit:.2f}×: raw — {verdict(all_raw, limit)}; "
              f"speed-adjusted — {verdict(all_adj, limit)}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="JSON files written by the benchmark's --json")
    parser.add_argument("--model", default=None, help="overhead_dispersion.py's model (default: the suite's JSON)")
    parser.add_argument("--limit", type=float, default=None, help="the target (default: issue 9's for the model)")
    args = parser.parse_args()
    limit = args.limit if args.limit is not None else LIMITS.get(args.model or "suite")
    if limit is None:
        raise SystemExit(f"no default target for {args.model!r}; pass --limit")
    print(pooled_table(args.files, args.model, limit))


if __name__ == "__main__":
    main()
