"""Where a fit's peak growth goes: plain training against ``GradientDispersion()`` every step,
split by kind of memory, in fresh processes.

    OMP_NUM_THREADS=1 python benchmarks/memory_breakdown.py                      # MLP, 3 rounds, about 1 min
    OMP_NUM_THREADS=1 python benchmarks/memory_breakdown.py --mmap-threshold 131072 --steps 1000
    OMP_NUM_THREADS=1 python benchmarks/memory_breakdown.py --ops                # + the ops only the dispersion runs

Each run is ``overhead_dispersion.child`` (the same fit and the same peak growth,
``VmHWM − VmRSS`` before ``fit``) in a fresh interpreter, with a probe callback placed first
that reads ``/proc/self/status`` at every step's batch start, before and after the backward,
before the optimizer step and at the batch end. Per configuration, medians over the rounds:

* **peak growth**: as ``overhead_dispersion.py`` reports it;
* **by mapping** (``/proc/self/smaps``, at the end of ``fit`` less at its start): the resident
  pages of ``libtorch_cpu.so`` (code of the kernels a fit runs for the first time: file-backed,
  shared between processes, reclaimable), of ``[heap]`` (glibc's main arena) and of anonymous
  mappings (blocks glibc ``mmap``s, Python's arenas);
* **anon peak at the hooks**: the largest anonymous resident set read at those hook points,
  above its value at ``on_fit_start`` (a lower bound on the anonymous peak: a backward's own
  high point falls between two reads);
* **live after trim**: the anonymous resident set after ``fit`` and ``malloc_trim(0)``, above
  the same start: the pages the run still touches once glibc gives its free pages back (a page
  that holds one live small block stays);
* **bytes in use**: what glibc has handed out and not had back (``mallinfo2``), at the train end
  less at step 30 (after the warm-up): a leak would grow it with the run's length.

``--ops``: the ``(ATen op, dtypes)`` pairs the dispersion's fit dispatches that the plain fit
does not (a ``TorchDispatchMode`` around ``fit``: slow, counts only). Each runs code that the
plain fit never touched; ``--code-pages`` adds, per pair of a short list, the file-backed
resident growth of its first call in a fresh process (after a plain step has run).

``--mmap-threshold BYTES`` runs every child with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed (by
default the threshold moves up with the sizes a run frees, and where a step's blocks then land
changes the heap's high-water mark). ``--no-row-ring``: the dispersion with its row ring's lending
disabled (each step read at once). ``--measure first`` / ``--measure none``: the dispersion set
up and attached as usual (the loss contract's trial and the hooks' check before step 0) but
measuring only step 0, or no step at all (``StepBudget.measures`` replaced) — how much of the
growth the set-up leaves and how much the measured steps add (round 32: most of it is the
set-up's). Write-up: ``docs/results/mlp_memory_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402

from common import (  # noqa: E402
    describe_machine_md,
    emit_report,
    fmt_ci,
    load_average,
    machine_description,
    run_json_child,
    verdict,
)

STATUS = ("VmRSS", "RssAnon", "RssFile")
MAPPINGS = ("libtorch_cpu.so", "[heap]", "[anon]")


def _status() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in STATUS:
                out[key] = int(value.split()[0])
    return out


def _in_use_bytes() -> int | None:
    """Bytes glibc's allocator has handed out and not had back (``mallinfo2``: ``uordblks`` +
    ``hblkhd``), or ``None`` without glibc ≥ 2.33."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                           "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)


def _by_mapping() -> dict[str, int]:
    """Resident KiB per mapping name (``[anon]`` for the unnamed ones)."""
    out: dict[str, int] = {}
    name = "[anon]"
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if not head:
                continue
            if not head[0].endswith(":"):  # a mapping's first line: range perms offset dev inode [path]
                name = os.path.basename(head[5]) if len(head) > 5 else "[anon]"
            elif head[0] == "Rss:":
                out[name] = out.get(name, 0) + int(head[1])
    return out


class MemoryProbe(pl.Callback):
    """Reads the resident set at each step's hooks (see the module docstring)."""

    def __init__(self) -> None:
        self.start: dict[str, int] = {}
        self.start_maps: dict[str, int] = {}
        self.anon_peak = 0
        self.where = ""
        self.in_use: list[int | None] = []

    def _read(self, trainer: pl.Trainer, hook: str) -> None:
        anon = _status()["RssAnon"]
        if anon > self.anon_peak:
            self.anon_peak, self.where = anon, f"{hook}, step {trainer.global_step}"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start, self.start_maps = _status(), _by_mapping()
        self.anon_peak = self.start["RssAnon"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._read(trainer, "batch start")
        if trainer.global_step == 30:  # (after the warm-up: the in-use bytes from here to the end)
            self.in_use.append(_in_use_bytes())

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.in_use.append(_in_use_bytes())

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # noqa: ANN001
        self._read(trainer, "before backward")

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._read(trainer, "after backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self._read(trainer, "before optimizer step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._read(trainer, "batch end")

    def summary(self) -> dict[str, Any]:
        from common import trim_heap

        maps = _by_mapping()
        trim_heap()
        after = _status()
        base = self.start["RssAnon"]
        ends = self.in_use if len(self.in_use) == 2 and None not in self.in_use else None
        return {"anon_peak_mib": (self.anon_peak - base) / 1024, "anon_peak_at": self.where,
                "in_use_growth_mib": (ends[1] - ends[0]) / 2**20 if ends else float("nan"),
                "live_after_trim_mib": (after["RssAnon"] - base) / 1024,
                "maps_mib": {k: (maps.get(k, 0) - self.start_maps.get(k, 0)) / 1024 for k in MAPPINGS}}


def _ops_child(model: str, config: str, steps: int) -> dict[str, int]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import overhead_dispersion as od

    seen: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)})
            key = f"{func}({','.join(dtypes)})"
            seen[key] = seen.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    class Counting(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.mode = Count()
            self.mode.__enter__()

        def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.mode.__exit__(None, None, None)

        def summary(self) -> dict:
            return {}

    od.child(model, config, steps, min(5, steps), probe=Counting())
    return seen


CODE_PAGE_OPS = {
    "linalg_vector_norm(float32, dim)": "torch.linalg.vector_norm(torch.randn(64, 1024), dim=1)",
    "_foreach_copy_(float32)": "torch._foreach_copy_([torch.empty(5)], [torch.randn(5)])",
    "addcmul(float32 into float64)": "torch.addcmul(torch.zeros(9, dtype=torch.float64), torch.randn(9), "
                                     "torch.randn(9))",
    "mm(float64)": "torch.randn(3, 9, dtype=torch.float64) @ torch.randn(9, 128, dtype=torch.float64)",
    "addmm(float64)": "torch.addmm(torch.zeros(3, 3, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64), "
                      "torch.randn(9, 3, dtype=torch.float64))",
    "index_put_(float64)": "torch.zeros(9, dtype=torch.float64).index_put_((torch.tensor([1]),), "
                           "torch.tensor([1.0], dtype=torch.float64))",
    "where(bool, float32)": "torch.where(torch.ones(9, dtype=torch.bool), torch.randn(9), torch.randn(9))",
    "mv(float64)": "torch.mv(torch.randn(3, 9, dtype=torch.float64), torch.randn(9, dtype=torch.float64))",
    "_foreach_norm(float32 → float64)": "torch._foreach_norm([torch.randn(9)], 2, dtype=torch.float64)",
    "mean(float64)": "torch.randn(9, dtype=torch.float64).mean()",
    "square_(float64)": "torch.randn(9, dtype=torch.float64).square_()",
}


def _code_pages_child(statement: str) -> dict[str, float]:
    """File-backed resident growth (MiB) of ``statement``'s first run, after a plain step."""
    import torch

    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.cross_entropy(net(torch.randn(128, 784)), torch.randint(0, 10, (128,))).backward()
    opt.step()
    before = _status()["RssFile"]
    eval(statement, {"torch": torch})  # noqa: S307 - our own fixed statements (CODE_PAGE_OPS)
    return {"file_mib": (_status()["RssFile"] - before) / 1024}


MEASURES = {"every": "every step", "first": "measuring step 0 only", "none": "set up, measuring no step"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per fit (after 30 warm-up steps)")
    parser.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES")
    parser.add_argument("--no-row-ring", action="store_true",
                        help="the dispersion without its row ring (RowRing.lend disabled: every step read at once)")
    parser.add_argument("--measure", choices=tuple(MEASURES), default="every",
                        help="which steps the dispersion measures: every one, step 0 only, or none (set up only)")
    parser.add_argument("--ops", action="store_true", help="list the ops only the dispersion's fit runs")
    parser.add_argument("--code-pages", action="store_true", help="the code pages of a few of those ops")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--ops-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--code-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import overhead_dispersion as od

        if args.no_row_ring:
            from genbounds.callbacks.dispersion.row_ring import RowRing

            RowRing.lend = lambda self, b, dtype, device: None  # (the hooks then use their own buffers)
        if args.measure != "every":
            from genbounds.callbacks.step_budget import StepBudget

            first = args.measure == "first"
            StepBudget.measures = lambda self, trainer, measured, every, *window: first and trainer.global_step == 0
        res = od.child(args.child[0], args.child[1], args.steps, 30, probe=MemoryProbe())
        print(json.dumps(res))
        return
    if args.ops_child:
        print(json.dumps(_ops_child(args.ops_child[0], args.ops_child[1], min(args.steps, 60))))
        return
    if args.code_child:
        print(json.dumps(_code_pages_child(CODE_PAGE_OPS[args.code_child])))
        return

    here = os.path.abspath(__file__)
    env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else None
    configs = ("plain", "dispersion")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    loads = [load_average()]
    for r in range(args.rounds):
        for config in configs if r % 2 == 0 else configs[::-1]:
            res = run_json_child([here, "--child", args.model, config, "--steps", str(args.steps),
                                  "--measure", args.measure, *(["--no-row-ring"] if args.no_row_ring else [])],
                                 env=env)
            runs[config].append(res)
            p = res["probe"]
            print(f"[round {r + 1}/{args.rounds}] {config:10s} peak +{res['peak_growth_mib']:.1f} MiB, anon peak "
                  f"+{p['anon_peak_mib']:.1f} ({p['anon_peak_at']}), live +{p['live_after_trim_mib']:.1f}",
                  file=sys.stderr, flush=True)
        loads.append(load_average())

    def med(config: str, get: Any) -> float:
        return statistics.median(get(x) for x in runs[config])

    rows = [
        ("peak growth (VmHWM − VmRSS before fit)", lambda x: x["peak_growth_mib"]),
        *[(f"growth by mapping: {k}", (lambda k: lambda x: x["probe"]["maps_mib"][k])(k)) for k in MAPPINGS],
        ("anonymous peak at the hooks", lambda x: x["probe"]["anon_peak_mib"]),
        ("anonymous, live after fit and malloc_trim", lambda x: x["probe"]["live_after_trim_mib"]),
        ("bytes in use (mallinfo2), train end − step 30", lambda x: x["probe"]["in_use_growth_mib"]),
    ]
    lines = [f"### Peak growth by kind of memory: {args.model}, plain vs GradientDispersion() {MEASURES[args.measure]} "
             f"({args.rounds} rounds, fresh processes, 30 + {args.steps} steps"
             + (f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "")
             + (", the dispersion without its row ring" if args.no_row_ring else "") + ")",
             describe_machine_md(machine_description(), loads),
             "| MiB (medians over rounds) | plain | dispersion | dispersion − plain |", "|---|---:|---:|---:|"]
    for label, get in rows:
        a, b = med("plain", get), med("dispersion", get)
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    ratios = [d["peak_growth_mib"] / p["peak_growth_mib"] for d, p in zip(runs["dispersion"], runs["plain"])]
    lines.append(f"\nPeak-growth ratio per round: {', '.join(f'{x:.3f}×' for x in ratios)} "
                 f"(median {statistics.median(ratios):.3f}×; with its 95 % CI {fmt_ci(ratios)}, ≤ 1.2×: "
                 f"{verdict(ratios, 1.2)}).")
    if args.ops:
        plain = run_json_child([here, "--ops-child", args.model, "plain", "--steps", str(args.steps)], env=env)
        disp = run_json_child([here, "--ops-child", args.model, "dispersion", "--steps", str(args.steps)], env=env)
        new = sorted((k for k in disp if k not in plain), key=lambda k: (-disp[k], k))
        lines.append(f"\n{len(new)} (op, dtypes) pairs dispatched by the dispersion's fit (60 steps) and not by "
                     "plain training's, with their calls: " + "; ".join(f"`{k}` {disp[k]}" for k in new) + ".")
    if args.code_pages:
        lines += ["", "| first call of (fresh process, after a plain step) | file-backed growth MiB |", "|---|---:|"]
        for name in CODE_PAGE_OPS:
            res = run_json_child([here, "--code-child", name])
            lines.append(f"| `{name}` | {res['file_mib']:.2f} |")
    emit_report("\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]), args.out)


if __name__ == "__main__":
    main()
