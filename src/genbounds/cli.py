"""``genbounds`` command line.

* ``genbounds fit|validate|test …`` — Lightning's own ``LightningCLI`` (configs in ``configs/``);
* ``genbounds report LOGDIR`` — PNG plots and a Markdown summary of a run;
* ``genbounds compare RUN…`` — final values side by side, overlay plot;
* ``genbounds gate LOGDIR --max METRIC=VALUE [--min …]`` — exit 0 when all hold, 1 with a table of
  violations, 2 on unreadable input.
"""

from __future__ import annotations

import sys

from genbounds.lightning_cli import train_cli


REPORTING_COMMANDS = ("report", "compare", "gate")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``genbounds`` console script (``argv`` for calls from Python)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in REPORTING_COMMANDS:
        from genbounds.reporting.commands import run_command

        sys.exit(run_command(list(args)))
    train_cli(argv)


if __name__ == "__main__":
    main()
