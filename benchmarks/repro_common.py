"""Shared machinery of the ``repro_*.py`` scripts.

Every reproduction trains through the public command line — ``genbounds fit --config
configs/repro/<name>.yaml`` plus overrides, in a subprocess — and reads the results back from the
TensorBoard event files with :mod:`genbounds.reporting`, exactly as a user would. Results (a PNG and
a Markdown table with the command that produced them) go to ``docs/results/``; training runs to
``bench_out/repro/`` (git-ignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
RUNS = os.path.join(ROOT, "bench_out", "repro")

sys.path.insert(0, os.path.join(ROOT, "src"))

from genbounds.reporting.events import Run, load_run  # noqa: E402


def config_path(name: str) -> str:
    return os.path.join(ROOT, "configs", "repro", name)


def run_fit(config: str, name: str, version: str, overrides: Sequence[str] = (), timeout: int = 3600) -> Run:
    """Train ``config`` (a path) with ``overrides``; returns the run read back from its event files.

    The run is written to ``bench_out/repro/<name>/<version>`` (re-created on every call).
    """
    save_dir = RUNS
    run_dir = os.path.join(save_dir, name, version)
    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    cmd = [
        sys.executable, "-m", "genbounds", "fit", "--config", config,
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version={version}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    print(f"  {name}/{version}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return load_run(run_dir)


def at_epoch_ends(run: Run, tag: str, steps_per_epoch: int | None = None) -> tuple[list[int], list[float]]:
    """A per-epoch tag's series as (epoch index, value), using the logged ``epoch`` scalar."""
    steps, values = run.series(tag)
    epoch_steps, epochs = run.series("epoch")
    lookup = dict(zip(epoch_steps, epochs))
    out_e, out_v = [], []
    for s, v in zip(steps, values):
        e = lookup.get(s)
        if e is None and steps_per_epoch:
            e = (s + 1) // steps_per_epoch - 1
        if e is not None:
            out_e.append(int(e))
            out_v.append(v)
    return out_e, out_v


def write_result(name: str, markdown: str, figure) -> tuple[str, str]:
    """Save ``docs/results/<name>.png`` and ``.md``; returns both paths."""
    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.join(RESULTS, f"{name}.png")
    md = os.path.join(RESULTS, f"{name}.md")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    with open(md, "w") as fh:
        fh.write(markdown.rstrip() + f"\n\n![{name}]({name}.png)\n")
    print(f"wrote {png}\nwrote {md}", file=sys.stderr)
    return png, md


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fit_in_process(config: str, overrides: Sequence[str] = ()):
    """Build trainer, model and data from ``config`` + ``overrides`` with LightningCLI (exactly as
    ``genbounds fit`` would) and fit in this process — for sweeps of many small runs, where a
    subprocess per run would cost more than the run. Returns ``(trainer, model, datamodule)``."""
    import warnings

    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    import genbounds.callbacks  # noqa: F401
    import genbounds.data  # noqa: F401
    import genbounds.models  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           args=["--config", config, *overrides], run=False, save_config_callback=None,
                           auto_configure_optimizers=False)
        cli.trainer.fit(cli.model, cli.datamodule)
    return cli.trainer, cli.model, cli.datamodule
