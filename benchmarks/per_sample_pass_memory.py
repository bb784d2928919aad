"""What the functorch backend's per-sample pass holds, in one process: its resident-set peak with
and without the running sum ``Σ_i g_i``, next to a plain training backward's.

    OMP_NUM_THREADS=1 python benchmarks/per_sample_pass_memory.py             # about 2.5 min
    OMP_NUM_THREADS=1 python benchmarks/per_sample_pass_memory.py --rounds 11

The 5.6 M-parameter MLP (784-2000-2000-10) at batch 128 of ``overhead_dispersion.py``, default
memory budget (one sample at a time). Three things, in turn with the order rotating:

* ``plain backward`` — the training step's forward and backward of the batch-mean loss (the
  gradient a plain run allocates);
* ``pass, running sum`` — ``per_sample_gradient_moments`` keeping ``Σ_i g_i``
  (``gradient_sum=True``: what the backend does when ``.grad`` is not the batch mean);
* ``pass, no running sum`` — ``gradient_sum=False`` with ``ḡ`` from that ``.grad`` (what the
  backend does under automatic optimization, no accumulation, one process).

Each round measures each once, in a fresh process (the allocator's state after one measurement
would decide the next one's), after a training backward and a first small pass. Each is
measured as ``VmHWM − VmRSS`` before it (heap trimmed, high-water mark reset: see
``common.trim_heap`` and ``common.reset_peak_rss``), in MiB, and timed; the table gives the median over the
rounds with the min–max, also in units of one per-sample gradient (``4·d`` bytes: what the pass
holds at least; the running sum is one more).
Each configuration is run twice: with glibc's mmap threshold fixed at 128 KiB in the child
(``MALLOC_MMAP_THRESHOLD_``, which also turns off its dynamic adjustment: every block of 128 KiB
or more is mapped on allocation and unmapped on free, so the peak tracks the tensors alive), and
with glibc's default, whose threshold follows the largest block freed so far (up to 32 MiB) and
keeps freed heap pages up to twice that: what a user's process sees. (Before the pass centred
into one scratch buffer, its many 1 MiB temporaries made the default's peaks scatter by tens of
MiB: docs/results/overhead.md.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import (  # noqa: E402
    describe_machine_md,
    load_average,
    machine_description,
    reset_peak_rss,
    status_kib,
    trim_heap,
)

KINDS = ("plain backward", "pass, running sum", "pass, no running sum")
ALLOCATORS = {
    "mmap threshold fixed at 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"},  # freed large blocks leave at once
    "glibc's default": {},
}


def _loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1], reduction="none")


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _growth_mib(fn) -> tuple[float, float]:
    """``(MiB of resident-set growth while fn runs, its seconds)``."""
    trim_heap()
    before = status_kib("VmRSS")
    if not reset_peak_rss() or before is None:
        raise SystemExit("needs Linux's /proc/self/clear_refs and /proc/self/status")
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM")
    assert peak is not None
    return (peak - before) / 1024, seconds


def child(kind: str, width: int, b: int, budget_mib: float) -> tuple[float, float]:
    """One measurement of ``kind`` in this (fresh) process: (MiB of resident-set growth, seconds)."""
    torch.set_num_threads(1)
    from genbounds.estimators.per_sample_gradients import per_sample_gradient_moments

    torch.manual_seed(0)
    model = _mlp(width)
    batch = (torch.randn(b, 784), torch.randint(0, 10, (b,)))

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        _loss(model, batch).mean().backward()

    plain()  # .grad exists: the passes run where the backend runs them, after the training backward
    mean = [p.grad.reshape(-1) for p in model.parameters()]
    per_sample_gradient_moments(model, _loss, (batch[0][:2], batch[1][:2]), mean_gradient=None)  # vmap's first call
    if kind == "plain backward":
        return _growth_mib(plain)
    keep = kind == "pass, running sum"
    budget = int(budget_mib * 2**20)
    return _growth_mib(lambda: per_sample_gradient_moments(model, _loss, batch, mean_gradient=mean, gradient_sum=keep,
                                                           memory_budget=budget))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=2000, help="hidden width (2000: the 5.6 M-parameter MLP)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--budget-mib", type=float, default=64.0, help="the pass's memory budget (the default's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        growth, seconds = child(args.child, args.width, args.batch, args.budget_mib)
        print(f"GROWTH {growth!r} {seconds!r}")
        return

    import subprocess

    d = sum(p.numel() for p in _mlp(args.width).parameters())
    loads = [load_average()]
    results: dict[str, dict[str, list[float]]] = {}
    times: dict[str, dict[str, list[float]]] = {}
    for allocator, env in ALLOCATORS.items():
        growth: dict[str, list[float]] = {k: [] for k in KINDS}
        seconds: dict[str, list[float]] = {k: [] for k in KINDS}
        for r in range(args.rounds):
            for kind in KINDS[r % 3:] + KINDS[:r % 3]:  # a fresh process each, the order rotating
                command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--width", str(args.width),
                           "--batch", str(args.batch), "--budget-mib", str(args.budget_mib)]
                out = subprocess.run(command, capture_output=True, text=True, check=True,
                                     env={**os.environ, **env}).stdout
                fields = next(ln for ln in out.splitlines() if ln.startswith("GROWTH")).split()
                growth[kind].append(float(fields[1]))
                seconds[kind].append(float(fields[2]))
            loads.append(load_average())
        results[allocator] = growth
        times[allocator] = seconds

    print(f"### The per-sample pass's resident-set peak, {d / 1e6:.2f} M parameters, b = {args.batch} "
          f"({args.rounds} rounds, a fresh process each)\n")
    print(describe_machine_md(machine_description(), loads) + "\n")
    print(f"One per-sample gradient: {4 * d / 2**20:.1f} MiB (`4·d` bytes).\n")
    print("| allocator | what | peak growth MiB: median [min–max] | in per-sample gradients (`4·d` bytes) |")
    print("|---|---|---:|---:|")
    for allocator, growth in results.items():
        for kind in KINDS:
            v = growth[kind]
            print(f"| {allocator} | {kind} | {statistics.median(v):.1f} [{min(v):.1f}–{max(v):.1f}] | "
                  f"{statistics.median(v) * 2**20 / (4 * d):.2f} |")
    default = times["glibc's default"]
    with_sum, without = default["pass, running sum"], default["pass, no running sum"]
    print(f"\nThe pass's time (glibc's default): running sum {statistics.median(with_sum):.2f} s "
          f"[{min(with_sum):.2f}–{max(with_sum):.2f}], no running sum {statistics.median(without):.2f} s "
          f"[{min(without):.2f}–{max(without):.2f}]; per round, no sum over sum: "
          + ", ".join(f"{b / a:.2f}" for a, b in zip(with_sum, without)))


if __name__ == "__main__":
    main()
