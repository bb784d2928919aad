"""``genbounds report | compare | gate`` — argument parsing and exit codes."""

from __future__ import annotations

import argparse
import os
import sys

from genbounds.callbacks.bound_gate import check_thresholds, format_violations
from genbounds.reporting.events import UnreadableRun, fmt, load_run
from genbounds.reporting.report import compare, report

EXIT_OK, EXIT_VIOLATED, EXIT_UNREADABLE = 0, 1, 2


def _threshold(text: str) -> tuple[str, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected METRIC=VALUE, got {text!r}")
    name, value = text.rsplit("=", 1)
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number (in {text!r})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genbounds", description="Reports, comparisons and gates on genbounds runs "
                                "(TensorBoard event files). Training: `genbounds fit --config …`.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="PNG plots and a Markdown summary of one run")
    r.add_argument("logdir", help="a run directory (e.g. runs/digits_mlp/version_0)")
    r.add_argument("--out", default=None, help="output directory (default: LOGDIR/report)")
    c = sub.add_parser("compare", help="final values of several runs side by side, and an overlay plot")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--plot", default=None, help="write the overlay plot to this PNG")
    g = sub.add_parser("gate", help="exit 0 when every threshold holds on the run's final values, 1 otherwise")
    g.add_argument("logdir", help="a run directory")
    g.add_argument("--max", action="append", type=_threshold, default=[], metavar="METRIC=VALUE",
                   help="fail when the final METRIC exceeds VALUE (repeatable)")
    g.add_argument("--min", action="append", type=_threshold, default=[], metavar="METRIC=VALUE",
                   help="fail when the final METRIC is below VALUE (repeatable)")
    return p


def run_command(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: bad arguments are unreadable input
        return EXIT_UNREADABLE if exc.code not in (0, None) else EXIT_OK
    try:
        if args.command == "report":
            run = load_run(args.logdir)
            out = args.out or os.path.join(args.logdir, "report")
            paths, md = report(run, out)
            print(md)
            print("wrote:\n  " + "\n  ".join(paths))
            return EXIT_OK
        if args.command == "compare":
            runs = [load_run(path) for path in args.runs]
            print(compare(runs, args.plot))
            return EXIT_OK
        return _gate(args)
    except UnreadableRun as err:
        print(f"genbounds {args.command}: {err}", file=sys.stderr)
        return EXIT_UNREADABLE


def _gate(args: argparse.Namespace) -> int:
    if not args.max and not args.min:
        print("genbounds gate: give at least one --max or --min threshold", file=sys.stderr)
        return EXIT_UNREADABLE
    run = load_run(args.logdir)
    limits_max, limits_min = dict(args.max), dict(args.min)
    finals = {tag: run.final(tag) for tag in [*limits_max, *limits_min]}
    missing = sorted(t for t, v in finals.items() if v is None)
    if missing:
        print(f"genbounds gate: metric(s) {missing} not found in {run.path}; available: "
              f"{', '.join(run.tags())}", file=sys.stderr)
        return EXIT_UNREADABLE
    values = {t: v for t, v in finals.items() if v is not None}
    violations = check_thresholds(values, limits_max, limits_min)
    checked = [f"{t} = {fmt(v)}" for t, v in values.items()]
    if violations:
        print(f"genbounds gate: {len(violations)} threshold(s) violated in {run.path}\n")
        print(format_violations(violations))
        return EXIT_VIOLATED
    print(f"genbounds gate: all thresholds hold in {run.path} ({'; '.join(checked)})")
    return EXIT_OK
