"""What a ``torch.func`` transform run in the training thread leaves to every later training step.

    OMP_NUM_THREADS=1 python benchmarks/functorch_state.py            # about 1 min; needs gcc and glibc

A functorch transform creates functorch's thread-local state in the thread that runs it; the
state lives as long as the thread, and every later backward there copies it
(``estimators/transform_thread.py``). It cannot be reset from Python, so each configuration runs
in a fresh process, which trains the MLP 784-512-512-10 at batch 128 (plain SGD with learning rate
0: the same work every step), then does one thing, then trains again:

* ``nothing`` — the baseline;
* ``vmap in the thread`` — one ``torch.func.vmap`` of a tiny function;
* ``a vectorized probe`` — a vectorized probe pass of ours (``PerturbedLoss.losses_at`` and
  ``gradients_at`` at two stacked points, as ``Flatness``/``GradientSensitivity`` with
  ``draws_per_pass=2`` do), whose transforms run in the transforms' worker thread.

Per configuration: the small allocations (≤ 64 bytes) a training step makes before and after, counted by the
``LD_PRELOAD`` library of ``malloc_callers.py`` (exact and repeatable), and the median step time
before and after (``--rounds`` blocks of ``--steps`` each side; time drifts within a process, so
the time column is indicative only). Without gcc, or off glibc, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit_report, single_thread_env  # noqa: E402
from malloc_callers import build_counter  # noqa: E402

CONFIGS = ("nothing", "vmap in the thread", "a vectorized probe")


def _child(config: str, lib: str, steps: int) -> None:
    import torch

    shim = ctypes.CDLL(lib)
    counting = ctypes.c_int.in_dll(shim, "counting")
    total = ctypes.c_ulong.in_dll(shim, "total")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                              torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    def measure() -> tuple[float, float]:
        for _ in range(10):
            step()
        start = total.value
        counting.value = 1
        for _ in range(50):
            step()
        counting.value = 0
        allocations = (total.value - start) / 50
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return allocations, statistics.median(times) * 1e6

    before = measure()
    if config == "vmap in the thread":
        torch.func.vmap(lambda t: t * 2)(torch.ones(3, 2))
    elif config == "a vectorized probe":
        from genbounds.estimators.perturbation import PerturbedLoss

        def per_sample(module: torch.nn.Module, batch: tuple) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(module(batch[0]), batch[1], reduction="none")

        fn = PerturbedLoss(net, per_sample)
        points = {k: torch.stack([v, v]) for k, v in fn.base.items()}
        fn.losses_at(points, (x, y))
        fn.gradients_at(points, (x, y))
        del points
    after = measure()
    print(json.dumps({"before": before, "after": after}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="timed steps on each side")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    built = build_counter("genbounds_functorch_state_", "functorch state", args.out)
    if built is None:
        return
    work, lib = built
    lines = ["### A transform's after-effect on later training steps (MLP 784-512-512-10, b = 128, raw loop; "
             "a fresh process each)", "",
             "| done between the two measurements | small allocations a step: before → after | "
             "median µs a step: before → after (indicative) |", "|---|---:|---:|"]
    for config in CONFIGS:
        env = {**single_thread_env(), "LD_PRELOAD": lib}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config, lib, str(args.steps)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
        got = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        (a0, t0), (a1, t1) = got["before"], got["after"]
        lines.append(f"| {config} | {a0:.1f} → {a1:.1f} | {t0:.0f} → {t1:.0f} |")
    emit_report("\n".join(lines), args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
