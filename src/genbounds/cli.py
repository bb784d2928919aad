"""``genbounds`` command line.

* ``genbounds fit|validate|test …`` — Lightning's own ``LightningCLI`` (configs in ``configs/``);
* ``genbounds report LOGDIR`` — PNG plots and a Markdown summary of a run;
* ``genbounds compare RUN…`` — final values side by side, overlay plot;
* ``genbounds gate LOGDIR --max METRIC=VALUE [--min …]`` — exit 0 when all hold, 1 with a table of
  violations, 2 on unreadable input.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def train_cli(args: list[str] | None) -> None:
    """LightningCLI with any LightningModule / LightningDataModule given by ``class_path``."""
    import genbounds.callbacks  # noqa: F401  (short class names resolve once imported)
    import genbounds.data  # noqa: F401
    import genbounds.models  # noqa: F401

    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


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
