"""``genbounds fit|validate|test …``: Lightning's own ``LightningCLI`` over any LightningModule
and LightningDataModule given by ``class_path`` (configs in ``configs/``).

Run identity: a run started with command-line overrides gets a log folder named after them —
``runs/digits_mlp/label_noise=0.4`` instead of ``runs/digits_mlp/version_1`` (``…_2`` if that
folder exists) — and the overrides are recorded with its settings in TensorBoard's HParams
(``cli_overrides``), so runs that differ look different. A run without overrides keeps
Lightning's ``version_N``; an explicit ``--trainer.logger.init_args.version`` always wins.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def cli_overrides(args: list[str]) -> list[str]:
    """The ``--key=value`` overrides of a command line (``--config`` files and flags excluded)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in SUBCOMMANDS:
            i += 1
            continue
        if arg.startswith("--config") or arg in ("--print_config", "-h", "--help"):
            i += 1 if "=" in arg or arg in ("--print_config", "-h", "--help") else 2
            continue
        if arg.startswith("--"):
            if "=" in arg:
                out.append(arg[2:])
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out.append(f"{arg[2:]}={args[i + 1]}")
                i += 1
        i += 1
    return [o for o in out if not o.startswith(("trainer.logger", "trainer.enable_progress_bar", "trainer.callbacks"))]


def run_name(overrides: list[str]) -> str:
    """A folder name from the overrides: the last component of each key, ``=`` its value."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.split('.')[-1]}={value}")
    name = ",".join(parts)
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)[:120]


class GenboundsCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the arguments LightningCLI parses: its ``args``, or the command line when none are given
        # (the console script passes None)
        given = kwargs.get("args")
        self._raw_args = list(sys.argv[1:] if given is None else given)
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        overrides = cli_overrides(self._raw_args)
        self._overrides = overrides
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        logger = config.get("trainer", {}).get("logger") if hasattr(config, "get") else None
        init = getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, bool) else None
        if init is None:
            return
        save_dir = getattr(init, "save_dir", ".") or "."
        name = getattr(init, "name", "") or ""
        given = getattr(init, "version", None)
        if given is None and overrides:
            base = run_name(overrides)
        elif given is not None and not config.get("ckpt_path"):
            # a folder named in the config (a run's stored config.yaml run again, whose overrides
            # named it): one that holds a run already gets the next free name — written into, it
            # took a second event file, and `genbounds report` read both runs as one
            base = given if isinstance(given, str) else f"version_{given}"
            folder = os.path.join(save_dir, name, base)
            if not (os.path.isdir(folder) and os.listdir(folder)):
                return
        else:
            return
        version, k = base, 2
        while os.path.exists(os.path.join(save_dir, name, version)):
            version, k = f"{base}_{k}", k + 1
        if given is not None:
            print(f"genbounds: {os.path.join(save_dir, name, base)} holds an earlier run; this one logs to "
                  f"{os.path.join(save_dir, name, version)}", file=sys.stderr)
        init.version = version

    def before_fit(self) -> None:
        self.trainer.__dict__["_genbounds_cli_overrides"] = list(getattr(self, "_overrides", []))


def train_cli(args: list[str] | None) -> None:
    """LightningCLI with any LightningModule / LightningDataModule given by ``class_path``."""
    import genbounds.callbacks  # noqa: F401  (short class names resolve once imported)
    import genbounds.data  # noqa: F401
    import genbounds.models  # noqa: F401

    GenboundsCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,  # (None from the console script: LightningCLI reads sys.argv itself, without warning)
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
