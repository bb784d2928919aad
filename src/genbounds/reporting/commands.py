"""``genbounds report | compare | gate | rank`` — argument parsing, output formats and exit codes.

Exit codes (the worst outcome over all runs wins):

* 0 — success (``gate``: every run passes every threshold);
* 1 — ``gate`` only: at least one run violates a threshold (NaN / missing / stale values count as
  violations unless ``--lenient``);
* 2 — bad input, or a run that is unreadable, corrupt (cut or bad checksum) or incomplete (no
  ``run/complete``; ``--allow-incomplete`` lets it through).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import textwrap
from typing import Any

from genbounds.reporting.events import (
    HParamsOnly, IncompleteRun, Run, UnreadableRun, assign_labels, common_parent, expand_paths, read_run_dir,
    require_complete,
)
from genbounds.reporting.gate import (
    DEFAULT_STALE_TOLERANCE, LENIENT_CASES, Threshold, Verdict, format_text, parse_threshold, verdict_for,
)
from genbounds.reporting.rank import as_json as rank_json
from genbounds.reporting.rank import markdown as rank_markdown
from genbounds.reporting.rank import plot as rank_plot
from genbounds.reporting.rank import rank_runs, text_table
from genbounds.reporting.report import compare, compare_records, report

EXIT_OK, EXIT_VIOLATED, EXIT_UNREADABLE = 0, 1, 2

def _para(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), 92)


def _item(code: str, text: str) -> str:
    return textwrap.fill(" ".join(text.split()), 92, initial_indent=f"  {code}  ", subsequent_indent="     ")


INPUTS = _para("""Inputs: run directories or parent folders, walked for TensorBoard event files
(events.out.tfevents.*) and Lightning CSVLogger tables (metrics.csv + hparams.yaml); a folder with
both is one run, read from the event files (from metrics.csv if they fail their checks). Every
event-file record's CRC32C is verified and metrics.csv must end in a complete row; a run must have
logged run/complete = 1 (the genbounds callbacks log it when Trainer.fit finishes).""")


def _exit2(extra: str = "") -> str:
    return _item("2", """bad arguments, or a run that is unreadable, corrupt (a file cut mid-record, a bad
checksum, trailing bytes: the message names the file and the byte offset) or incomplete (no
run/complete, unless --allow-incomplete)""" + extra)


EXIT_2 = _exit2()

REPORT_EPILOG = f"""\
writes (per run, into --out or RUN/report; with several runs and --out: --out/<run name>/):
  summary.md              final values ± SE, complete/incomplete status, hyper-parameters
  loss.png, bounds_vs_gap.png, error_bounds.png, tightness.png, trajectory_vs_flatness.png,
  dispersion.png, curvature.png, per_layer.png
                          only those whose series were logged (no blank figures)

{INPUTS}

exit codes:
  0  every report written
{EXIT_2}
"""

COMPARE_EPILOG = f"""\
prints a table of final values (± SE), one column per run labelled by its name and the
settings that differ between the runs (stdout; --format json|csv for machines).
writes with --out DIR:
  bounds_overlay.png      Eq. 3 / Eq. 2 bounds and measured gap of every run over steps (± SE)
  final_bounds.png        grouped bars: final headline bounds and gap/measured per run (log y, ± SE)
  tightness.png           grouped bars: final bound ÷ measured gap per run (log y)
(figures without data are not written; without --out or --plot nothing is written)

{INPUTS}

exit codes:
  0  compared
{_exit2('; nothing is compared then')}
"""

_GATE_RULES = _para("""A gated metric's final value that is NaN ("nan"), never logged ("missing",
with the available tags and a did-you-mean), or stale (its last step is older than the run's end,
which is the step of run/complete, else the largest step of any scalar, by more than
--stale-tolerance steps: "stale: last logged at step 120, run ended at step 300") is a VIOLATION
by default. --lenient nan|missing|stale (repeatable) turns that case into a warning (a lenient
stale value is still compared with the limit). --max M=nan is refused (a NaN limit can never
fire); --max M=inf is allowed.""")

GATE_EPILOG = f"""\
prints PASS / FAIL per run with the reason per metric (stdout; --format json|csv for machines);
writes no files.

{_GATE_RULES}

{INPUTS}

exit codes (the worst run wins; the output names it):
  0  every run passes every threshold
  1  a run violates a threshold (incl. nan / missing / stale unless --lenient)
{EXIT_2}
"""

_RANK_WHAT = _para("""For every scalar whose final value exists in all runs (headline bounds
always listed) and the baselines lr/batch (hyper-parameters lr, batch_size),
bound_terms/sum_eta2_dispersion (Σ η² V̂) and gap/predicted_cumulative (Roberts), against the
final --target: Kendall τ-b over all runs, and the granulated τ Ψ of Jiang et al. (2019): per
hyper-parameter axis (a varying hyper-parameter; run identifiers, seeds and aliases such as
model/lr next to lr are not axes), the mean τ within groups of runs that agree on every other
axis; Ψ = mean over axes. Constant, NaN or missing metrics are listed with a note; a value logged
before the run's end is ranked with a "stale" note.""")

RANK_EPILOG = f"""\
{_RANK_WHAT}

prints the table sorted by Ψ then τ (stdout; --format json|csv for machines) and writes into --out
(default: the common parent folder of the runs):
  rank.md                 the table, axes, runs and notes
  rank.png                bars of τ and Ψ per metric, baselines highlighted

{INPUTS}

exit codes:
  0  ranked
{_exit2('; also fewer than 2 runs, or the target missing or NaN in a run')}
"""


def _threshold(kind: str):
    def parse(text: str) -> Threshold:
        try:
            return parse_threshold(text, kind)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _common(p: argparse.ArgumentParser, runs_help: str) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_OR_PARENT", help=runs_help)
    p.add_argument("--allow-incomplete", action="store_true",
                   help="use runs without run/complete (killed or crashed before Trainer.fit finished); "
                        "the output says so")


def parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="genbounds", description="Reports, comparisons, gates and rankings of "
                                "genbounds runs. Training: `genbounds fit --config …`.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="figures and summary.md of each run", epilog=REPORT_EPILOG, formatter_class=fmt,
                       description="Figures and a Markdown summary (final values ± SE) of each run.")
    _common(r, "a run directory (e.g. runs/digits_mlp/version_0) or a folder of runs")
    r.add_argument("--out", default=None, help="output directory (default: RUN/report)")

    c = sub.add_parser("compare", help="final values of several runs side by side, and comparison figures",
                       epilog=COMPARE_EPILOG, formatter_class=fmt,
                       description="Final values of several runs side by side.")
    _common(c, "run directories or folders of runs")
    c.add_argument("--out", default=None, metavar="DIR", help="write the comparison figures into DIR")
    c.add_argument("--plot", default=None, metavar="PNG", help="write the overlay figure to this file")
    c.add_argument("--tag", action="append", default=[], metavar="TAG", help="also tabulate TAG (repeatable)")
    c.add_argument("--format", choices=("text", "json", "csv"), default="text", help="stdout format")

    g = sub.add_parser("gate", help="PASS/FAIL per run on thresholds of final values (exit 0/1/2)",
                       epilog=GATE_EPILOG, formatter_class=fmt,
                       description="Check thresholds on the final values of each run.")
    _common(g, "run directories or folders of runs (each run found is gated)")
    g.add_argument("--max", action="append", type=_threshold("max"), default=[], metavar="METRIC=VALUE",
                   help="fail when the final METRIC exceeds VALUE (repeatable)")
    g.add_argument("--min", action="append", type=_threshold("min"), default=[], metavar="METRIC=VALUE",
                   help="fail when the final METRIC is below VALUE (repeatable)")
    g.add_argument("--lenient", action="append", choices=LENIENT_CASES, default=[],
                   help="treat a NaN / missing / stale final value as a warning instead of a violation (repeatable)")
    g.add_argument("--stale-tolerance", type=int, default=DEFAULT_STALE_TOLERANCE, metavar="STEPS",
                   help="a value logged at most STEPS before the run's end is not stale (default "
                        f"{DEFAULT_STALE_TOLERANCE}: Lightning logs its own step and epoch-end metrics at "
                        "global_step - 1, callbacks at global_step)")
    g.add_argument("--format", choices=("text", "json", "csv"), default="text", help="stdout format")

    k = sub.add_parser("rank", help="Kendall τ and granulated τ Ψ of every metric against the measured gap",
                       epilog=RANK_EPILOG, formatter_class=fmt,
                       description="Rank-correlate every logged quantity with the measured generalization gap "
                                   "across runs.")
    _common(k, "run directories or folders of runs (at least 2 runs)")
    k.add_argument("--target", default="gap/measured", help="the quantity to predict (default gap/measured)")
    k.add_argument("--out", default=None, metavar="DIR",
                   help="where rank.md and rank.png go (default: the runs' common parent folder)")
    k.add_argument("--axis", action="append", default=[], metavar="HPARAM",
                   help="use these hyper-parameters as the axes of Ψ (repeatable; default: every varying one)")
    k.add_argument("--include-seed", action="store_true", help="let a varying seed be an axis of Ψ")
    k.add_argument("--format", choices=("text", "json", "csv"), default="text", help="stdout format")
    return p


# --- helpers ---------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Non-finite floats become the strings "nan" / "inf" / "-inf" (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _dump_json(obj: Any) -> None:
    print(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False))


def _dump_csv(header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    sys.stdout.write(buf.getvalue())


def _err(command: str, message: str) -> None:
    print(f"genbounds {command}: {message}", file=sys.stderr)


def load(paths: list[str], allow_incomplete: bool) -> tuple[list[Run], list[tuple[str, str]]]:
    """Every run under ``paths`` (labelled), and ``(path, message)`` for each that cannot be used."""
    runs: list[Run] = []
    errors: list[tuple[str, str]] = []
    hparams_only: list[HParamsOnly] = []
    for path, problem in expand_paths(paths):
        if problem:
            errors.append((path, problem))
            continue
        try:
            try:
                run = read_run_dir(path)
            except HParamsOnly as err:
                hparams_only.append(err)
                err.path = path
                continue
            try:
                require_complete(run)
            except IncompleteRun:
                if not allow_incomplete:
                    raise
                run.notes.append(f"INCOMPLETE: no run/complete = 1 (ended before Trainer.fit finished; "
                                 f"last logged step {run.end_step}); used because of --allow-incomplete")
        except UnreadableRun as err:
            errors.append((path, str(err)))
            continue
        runs.append(run)
    by_dir = {os.path.realpath(r.path): r for r in runs}
    for err in hparams_only:  # SummaryWriter.add_hparams writes them into a sub-folder of the run
        parent = by_dir.get(os.path.realpath(os.path.dirname(err.path)))
        if parent is None:
            errors.append((err.path, str(err)))
        else:
            parent.hparams = {**err.hparams, **parent.hparams}
    assign_labels(runs, paths)
    return runs, errors


def _print_notes(command: str, runs: list[Run]) -> None:
    for run in runs:
        for note in run.notes:
            _err(command, f"note: {run.name}: {note}")


def _print_errors(command: str, errors: list[tuple[str, str]]) -> None:
    for path, message in errors:
        _err(command, f"{'unusable run' if os.path.isdir(path) else 'error'} {path}: {message}")


# --- commands --------------------------------------------------------------------------------------
def run_command(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help → 0, bad arguments → 2
        return EXIT_OK if exc.code in (0, None) else EXIT_UNREADABLE
    handler = {"report": _report, "compare": _compare, "gate": _gate, "rank": _rank}[args.command]
    return handler(args)


def _report(args: argparse.Namespace) -> int:
    runs, errors = load(args.runs, args.allow_incomplete)
    _print_notes("report", runs)
    for run in runs:
        if args.out:
            out = args.out if len(runs) == 1 else os.path.join(args.out, run.name)
        else:
            out = os.path.join(run.path, "report")
        paths, md = report(run, out)
        print(md)
        print("wrote:\n  " + "\n  ".join(paths))
    _print_errors("report", errors)
    return EXIT_UNREADABLE if errors or not runs else EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    runs, errors = load(args.runs, args.allow_incomplete)
    if errors:
        _print_errors("compare", errors)
        _err("compare", "nothing compared (fix or drop the runs above)")
        if args.format == "json":
            _dump_json({"exit_code": EXIT_UNREADABLE, "errors": [{"path": p, "error": m} for p, m in errors]})
        return EXIT_UNREADABLE
    _print_notes("compare", runs)
    text, written = compare(runs, args.out, args.plot, args.tag)
    if args.format == "text":
        print(text)
    elif args.format == "json":
        _dump_json({"exit_code": EXIT_OK,
                    "runs": [{"run": r.name, "label": r.label, "path": r.path, "source": r.source,
                              "complete": r.complete, "end_step": r.end_step, "hparams": r.hparams} for r in runs],
                    "metrics": compare_records(runs, args.tag), "files": written})
    else:
        records = compare_records(runs, args.tag)
        _dump_csv(["metric", "run", "label", "value", "se", "step"],
                  [[r["metric"], r["run"], r["label"], r["value"], r["se"], r["step"]] for r in records])
    return EXIT_OK


def _gate(args: argparse.Namespace) -> int:
    thresholds = [*args.max, *args.min]
    if not thresholds:
        _err("gate", "give at least one --max or --min threshold")
        return EXIT_UNREADABLE
    runs, errors = load(args.runs, args.allow_incomplete)
    lenient = set(args.lenient)
    verdicts = [verdict_for(r, thresholds, lenient, args.stale_tolerance) for r in runs]
    verdicts += [Verdict(path, path, path, "ERROR", error=message) for path, message in errors]
    code = max((v.exit_code for v in verdicts), default=EXIT_UNREADABLE)
    if args.format == "text":
        print(format_text(verdicts, thresholds))
    elif args.format == "json":
        _dump_json({"exit_code": code, "lenient": sorted(lenient),
                    "thresholds": [{"metric": t.metric, "kind": t.kind, "limit": t.limit} for t in thresholds],
                    "runs": [v.as_dict() for v in verdicts]})
    else:
        rows = []
        for v in verdicts:
            if v.status == "ERROR":
                rows.append([v.name, v.label, v.path, v.status, None, None, None, None, None, None, "error", v.error])
            for c in v.checks:
                rows.append([v.name, v.label, v.path, v.status, c.metric, c.kind, c.limit, c.value, c.step,
                             c.end_step, c.status, c.reason])
        _dump_csv(["run", "label", "path", "verdict", "metric", "kind", "limit", "value", "step", "end_step",
                   "check", "reason"], rows)
    if args.format != "text":
        for v in verdicts:
            if v.status != "PASS":
                _err("gate", f"{v.status} {v.label}" + (f": {v.error}" if v.error else ""))
    return code


def _rank(args: argparse.Namespace) -> int:
    runs, errors = load(args.runs, args.allow_incomplete)
    problem = None
    if errors:
        _print_errors("rank", errors)
        problem = "nothing ranked (fix or drop the runs above)"
    elif len(runs) < 2:
        problem = f"rank needs at least 2 runs, found {len(runs)}"
    ranking = None
    if problem is None:
        _print_notes("rank", runs)
        try:
            ranking = rank_runs(runs, args.target, args.axis or None, args.include_seed)
        except ValueError as err:
            problem = str(err)
    if ranking is None:
        _err("rank", problem)
        if args.format == "json":
            _dump_json({"exit_code": EXIT_UNREADABLE, "error": problem,
                        "errors": [{"path": p, "error": m} for p, m in errors]})
        return EXIT_UNREADABLE
    out = args.out or common_parent(runs)
    os.makedirs(out, exist_ok=True)
    md_path = os.path.join(out, "rank.md")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(rank_markdown(ranking))
    written = [md_path]
    png = rank_plot(ranking, os.path.join(out, "rank.png"))
    if png:
        written.append(png)
    if args.format == "text":
        print(f"genbounds rank: {len(runs)} runs, target {ranking.target}, "
              f"axes: {', '.join(ranking.axes) or 'none'}")
        for note in ranking.notes:
            print(f"note: {note}")
        for run in runs:
            print(f"  {run.label}: {run.path}")
        print()
        print(text_table(ranking))
        print("\nwrote:\n  " + "\n  ".join(written))
    elif args.format == "json":
        _dump_json({"exit_code": EXIT_OK, **rank_json(ranking), "files": written})
    else:
        rows = [[r.metric, r.tau, r.psi, *(r.tau_axis.get(a) for a in ranking.axes), r.n_runs,
                 bool(r.baseline), r.note] for r in ranking.rows]
        _dump_csv(["metric", "tau", "psi", *(f"tau[{a}]" for a in ranking.axes), "n_runs", "baseline", "note"], rows)
    return EXIT_OK
