"""Cost of per-sample gradient norms on every training step: ghost-norm hooks vs BackPACK.

    python benchmarks/bench_norm_hooks.py                     # both models, 5 rounds
    python benchmarks/bench_norm_hooks.py --models mlp --rounds 7 --steps 20

One training step = forward, mean cross-entropy, backward, SGD update, on a fixed in-memory
batch, CPU, ``torch.set_num_threads(1)``.  Configurations:

* ``plain``   — nothing else;
* ``ghost``   — :class:`~genbounds.estimators.ghost_norms.GhostNormHooks` attached once, armed on
  every step, ``read(scale=b)`` after every backward;
* ``backpack`` — ``backpack.extend`` on the model and the loss, every backward inside
  ``with backpack(BatchL2Grad())``, the per-sample norms summed over parameters afterwards.

Each configuration has its own copy of the same initial model.  Configurations are interleaved
within each round, one block of consecutive steps each (the order rotates from round to round);
a block runs ``--warmup`` untimed steps, then times ``--steps`` steps and keeps their median.
Blocks, not step-by-step alternation: alternating three models on every step evicts each one's
weights and activations from the CPU caches between its steps, which real training never does
and which inflates the cost of any extra memory traffic (measured: the MLP's ghost overhead is
~0.1 ms per step in blocks and ~0.7 ms when alternated).  Per-round ratios guard against slow
drifts of machine load; their spread is reported.  The table gives
the median over rounds of the step time, the median of the per-round ratios to the same round's
``plain`` and their min–max spread.

Memory (skip with ``--no-memory``): each configuration runs again in a fresh subprocess; just
before its first step the kernel's resident-set high-water mark is reset (``/proc/self/clear_refs``)
and the resident set noted; after 3 steps the table reports ``VmHWM − VmRSS(before)``: how far
the steps pushed the process's peak resident memory above what the model, data and optimizer
already held.  It counts every host allocation touched during the steps — activations, saved
tensors, gradients, the hooks' work buffers (kept between steps), BackPACK's per-sample
quantities, allocator caching — and is only meaningful on CPU (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from genbounds.estimators.ghost_norms import GhostNormHooks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import status_kib  # noqa: E402

CONFIGS = ("plain", "ghost", "backpack")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def alexnet_small() -> nn.Module:
    """AlexNet-style for 32×32×3 inputs with a CPU-sized classifier (512-512-10)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], int, tuple[int, ...], str]] = {
    "mlp": (mlp, 128, (784,), "MLP 784-512-512-10, batch 128"),
    "cnn": (alexnet_small, 64, (3, 32, 32), "AlexNet-style CNN (conv 64-192-384-256-256, fc 512-512-10), 32×32×3, batch 64"),
}


class Runner:
    """One configuration of one model: ``step()`` runs one training step."""

    def __init__(self, config: str, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.config, self.model, self.x, self.y = config, model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.loss_fn: nn.Module = nn.CrossEntropyLoss()
        self.hooks: GhostNormHooks | None = None
        self.last: Tensor | None = None
        if config == "ghost":
            self.hooks = GhostNormHooks.for_model(model)
            self.hooks.attach()
            self.hooks.arm()  # armed for the whole run: the cheap pattern
        elif config == "backpack":
            from backpack import extend

            self.model = extend(model)
            self.loss_fn = extend(self.loss_fn)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        b = self.x.shape[0]
        if self.config == "backpack":
            from backpack import backpack
            from backpack.extensions import BatchL2Grad

            with backpack(BatchL2Grad()):
                loss.backward()
            self.last = sum(p.batch_l2 for p in self.model.parameters()) * b ** 2
        else:
            loss.backward()
            if self.hooks is not None:
                norms = self.hooks.read(scale=b)
                assert norms is not None
                self.last = norms.total
        self.opt.step()


def make_runner(model_name: str, config: str) -> Runner:
    make, b, shape, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, *shape, generator=gen)
    y = torch.randint(0, 10, (b,), generator=gen)
    return Runner(config, model, x, y)


def time_rounds(model_name: str, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    runners = {c: make_runner(model_name, c) for c in CONFIGS}
    for r in runners.values():  # identical starting weights
        r.model.load_state_dict(runners["plain"].model.state_dict())
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for rnd in range(rounds):
        order = CONFIGS[rnd % len(CONFIGS):] + CONFIGS[:rnd % len(CONFIGS)]
        for c in order:  # one block of consecutive steps per configuration, as in real training
            run = runners[c]
            for _ in range(warmup):
                run.step()
            per_step = []
            for _ in range(steps):
                t0 = time.perf_counter()
                run.step()
                per_step.append(time.perf_counter() - t0)
            times[c].append(statistics.median(per_step))
        print(f"[{model_name}] round {rnd + 1}/{rounds}: "
              + ", ".join(f"{c} {1e3 * times[c][-1]:.1f} ms" for c in CONFIGS), file=sys.stderr)
    # sanity check: ghost and BackPACK train separate copies from the same weights on the same
    # batch with the same updates, so their last step's per-sample norms coincide up to rounding
    g, bp = runners["ghost"].last, runners["backpack"].last
    if g is not None and bp is not None:
        rel = float(((g - bp.double()).abs().max() / bp.double().abs().max()))
        print(f"[{model_name}] max relative difference ghost vs BackPACK, last step: {rel:.2e}", file=sys.stderr)
    print(f"[{model_name}] ghost methods: {json.dumps(_methods(runners['ghost']))}; reusable work buffers "
          f"{runners['ghost'].hooks.workspace_bytes / 2**20:.1f} MiB", file=sys.stderr)
    return times


def _methods(run: Runner) -> dict[str, str]:
    assert run.hooks is not None
    run.opt.zero_grad(set_to_none=True)
    run.loss_fn(run.model(run.x), run.y).backward()
    norms = run.hooks.read(scale=run.x.shape[0])
    return norms.methods if norms is not None else {}


def measure_peak_growth(model_name: str, config: str, steps: int) -> float:
    """In this (fresh) process: MiB by which the resident set's high-water mark rises above the
    resident set just before the first step, over ``steps`` steps."""
    torch.set_num_threads(1)
    run = make_runner(model_name, config)
    before = status_kib("VmRSS")
    try:  # reset the kernel's high-water mark (Linux ≥ 4.0) so that import-time peaks don't hide ours
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(steps):
        run.step()
    if reset and before is not None:
        peak = status_kib("VmHWM")
        assert peak is not None
        return (peak - before) / 1024.0
    return float("nan")  # no way to isolate the steps' peak from the process's


def peak_rss_growth(model_name: str, config: str, steps: int = 3) -> float:
    """:func:`measure_peak_growth` in a fresh subprocess."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import bench_norm_hooks as b\n"
        f"print(b.measure_peak_growth({model_name!r}, {config!r}, {steps}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def table(model_name: str, times: dict[str, list[float]], memory: dict[str, float] | None) -> str:
    title = MODELS[model_name][3]
    lines = [f"### {title}", "",
             "| configuration | median step (ms) | ratio to plain (median) | per-round ratio min–max | peak RSS growth (MiB) |",
             "|---|---|---|---|---|"]
    for c in CONFIGS:
        ratios = [t / p for t, p in zip(times[c], times["plain"])]
        mem = "–" if memory is None else f"{memory[c]:.0f}"
        lines.append(f"| {c} | {1e3 * statistics.median(times[c]):.2f} | {statistics.median(ratios):.3f}× | "
                     f"{min(ratios):.3f}–{max(ratios):.3f} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default: 50 MLP, 3 CNN)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per block (default: 10 MLP, 1 CNN)")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    out = [f"CPU, 1 thread ({platform.processor() or platform.machine()}), torch {torch.__version__}"]
    for name in args.models.split(","):
        steps = args.steps or (50 if name == "mlp" else 3)
        warmup = args.warmup if args.warmup is not None else (10 if name == "mlp" else 1)
        times = time_rounds(name, args.rounds, steps, warmup)
        memory = None if args.no_memory else {c: peak_rss_growth(name, c) for c in CONFIGS}
        out.append(table(name, times, memory))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
