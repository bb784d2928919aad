"""``genbounds`` command line.

* ``genbounds fit|validate|test …`` — Lightning's own ``LightningCLI`` (configs in ``configs/``);
* ``genbounds report RUN…`` — figures and a Markdown summary of each run;
* ``genbounds compare RUN…`` — final values side by side, comparison figures;
* ``genbounds gate RUN_OR_PARENT… --max METRIC=VALUE [--min …]`` — PASS/FAIL per run: exit 0 when
  all pass, 1 when one fails, 2 on unreadable, corrupt or incomplete input;
* ``genbounds rank RUN_OR_PARENT…`` — Kendall τ and granulated τ Ψ of every metric against the
  measured gap.

``genbounds``, ``genbounds -h`` and ``genbounds --help`` print the list of commands.
"""

from __future__ import annotations

import sys

from genbounds.lightning_cli import train_cli


REPORTING_COMMANDS = ("report", "compare", "gate", "rank")

HELP = """\
usage: genbounds <command> [options]      (genbounds <command> --help for each command's options)

Training — Lightning's LightningCLI (e.g. genbounds fit --config configs/digits_mlp.yaml):
  fit        train a model with the genbounds callbacks, logging gradient statistics and bounds
  validate   run the validation loop of a model/config once
  test       run the test loop of a model/config once
  predict    run the prediction loop of a model/config once

Reporting — read runs back from disk (TensorBoard event files or CSVLogger metrics.csv):
  report     figures and summary.md (final values ± SE) of each run
  compare    final values of several runs side by side, labelled by their differing settings
  gate       PASS/FAIL per run on --max/--min thresholds (exit 0 pass, 1 fail, 2 unreadable)
  rank       Kendall τ and granulated τ Ψ of every metric against the measured gap

Reporting exit codes: 0 success, 1 a gate threshold is violated, 2 bad input or a run that is
unreadable, corrupt or incomplete (no run/complete; see --allow-incomplete).
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``genbounds`` console script (``argv`` for calls from Python)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP, end="")
        sys.exit(0)
    if args[0] in REPORTING_COMMANDS:
        from genbounds.reporting.commands import run_command

        sys.exit(run_command(args))
    train_cli(argv)


if __name__ == "__main__":
    main()
