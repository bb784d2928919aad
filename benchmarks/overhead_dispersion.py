"""Overhead of GradientDispersion per backend, as a ratio to plain training in the same run.

    python benchmarks/overhead_dispersion.py            # CPU (digits MLP); CUDA too when available
    python benchmarks/overhead_dispersion.py --rounds 7 --out bench_out/dispersion.md

Each configuration trains for ``--steps`` optimizer steps on pre-built in-memory batches; the
time per step after ``--warmup`` steps is measured with one device synchronization at each end.
Configurations are interleaved round by round (plain, backpack, functorch, …, then again), every
ratio is taken against the *same round's* plain run, and the table reports the median ratio over
rounds with its half-range. Timed tests are avoided on purpose: this script is the evidence.

CPU: the digits MLP (64-512-10, batch 64). CUDA: a ResNet-18-sized network (11.2 M parameters,
BackPACK-compatible: no BatchNorm, no in-place ops) on random 32×32 data, batch 128.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(__file__))

from common import ResNet18NoBN, format_table, loader, median_table, random_image_batches, time_per_step  # noqa: E402

from genbounds.callbacks import GradientDispersion  # noqa: E402
from genbounds.models import MLP, Classifier  # noqa: E402


def configurations() -> dict[str, tuple[list, int, str]]:
    """name → (callbacks, accumulate_grad_batches, baseline name)."""
    return {
        "plain": ([], 1, "plain"),
        "backpack (every step)": ([GradientDispersion(backend="backpack")], 1, "plain"),
        "functorch (every step)": ([GradientDispersion(backend="functorch")], 1, "plain"),
        "microbatch k=4 (every step)": ([GradientDispersion(backend="microbatch", num_chunks=4)], 1, "plain"),
        "functorch (every 10 steps)": ([GradientDispersion(backend="functorch", every_n_steps=10)], 1, "plain"),
        "plain, accumulate 2": ([], 2, "plain, accumulate 2"),
        "microbatch from accumulation steps, accumulate 2": (
            [GradientDispersion(backend="microbatch")], 2, "plain, accumulate 2"),
    }


def run(device: str, rounds: int, steps: int, warmup: int) -> str:
    torch.manual_seed(0)
    dev = torch.device(device)
    if device == "cuda":
        batches = random_image_batches(8, 128, (3, 32, 32), 10, dev)
        make = lambda: Classifier(ResNet18NoBN(), lr=0.01)  # noqa: E731
        title = f"CUDA ({torch.cuda.get_device_name(dev)}): ResNet-18-sized (11.2 M params), batch 128"
    else:
        batches = random_image_batches(8, 64, (64,), 10, dev)
        make = lambda: Classifier(MLP(64, 10, 512), lr=0.01)  # noqa: E731
        title = f"CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()}): digits MLP 64-512-10, batch 64"
    configs = configurations()
    results: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, (callbacks, accumulate, _) in configs.items():
            pl.seed_everything(r, verbose=False)
            fresh = [type(cb)(**_init_args(cb)) for cb in callbacks]  # new callback per run
            total = steps * accumulate
            results[name].append(
                time_per_step(make, loader(batches, total + 8), fresh, steps, warmup, "gpu" if device == "cuda" else "cpu",
                              accumulate)
            )
        print(f"[{device}] round {r + 1}/{rounds} done", file=sys.stderr)
    rows = median_table(results, {name: cfg[2] for name, cfg in configs.items()})
    return format_table(title, rows)


def _init_args(cb: GradientDispersion) -> dict:
    return dict(backend=cb.backend, every_n_steps=cb.every_n_steps, num_chunks=cb.num_chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 1000 CPU, 150 CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 gives the steadiest CPU timings)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default=None, help="also write the Markdown tables to this file")
    args = parser.parse_args()
    import logging
    import warnings

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else (
        ["cpu"] if args.device == "auto" else [args.device])
    tables = []
    for device in devices:
        steps = args.steps or (1000 if device == "cpu" else 150)
        tables.append(run(device, args.rounds, steps, args.warmup))
    if not torch.cuda.is_available():
        tables.append("(CUDA not available on this machine: CUDA rows not measured.)")
    text = "\n\n".join(tables)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
