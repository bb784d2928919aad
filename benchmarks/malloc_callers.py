"""Who makes a measured step's small heap allocations: plain training against
``GradientDispersion()`` every step, per step, by calling code.

    OMP_NUM_THREADS=1 python benchmarks/malloc_callers.py            # MLP, about 30 s; needs gcc and glibc

A small ``LD_PRELOAD`` library (``malloc_callers.c`` next to this script, compiled into a
temporary folder) counts every ``malloc`` of at most 64 bytes made between steps 100 and 200 of
a fit (``overhead_dispersion.child``, the same fit as the overhead benchmark) with the call stack
that made it. Each configuration runs in a fresh process; the report gives the small allocations
per step of each, and the callers (the first named frames of their stacks) where the dispersion
makes more than plain training. Small allocations that outlive the step's large blocks are what
fragments the heap (``memory_breakdown.py``); this says whose they are. Without gcc, or off
glibc, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit_report, single_thread_env  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIRST, LAST = 100, 200


def _child(model: str, config: str, lib: str, out: str) -> None:
    import lightning.pytorch as pl

    import overhead_dispersion as od

    shim = ctypes.CDLL(lib)
    counting = ctypes.c_int.in_dll(shim, "counting")

    class Window(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step == FIRST:
                counting.value = 1
            elif trainer.global_step == LAST:
                counting.value = 0
                shim.dump(out.encode(), ctypes.c_ulong(LAST - FIRST))

        def summary(self) -> dict:
            return {}

    od.child(model, config, LAST + 10, 30, probe=Window())
    print(json.dumps({"total": ctypes.c_ulong.in_dll(shim, "total").value}))


def build_counter(prefix: str, report: str, out: str | None) -> tuple[str, str] | None:
    """The counter (``malloc_callers.c``) compiled into a new temporary folder: ``(folder, path
    of the library)``; ``None`` without gcc, or off Linux, after reporting ``report``: not
    measured (to ``out``, as :func:`common.emit_report`)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None or not sys.platform.startswith("linux"):
        emit_report(f"{report}: not measured (needs gcc and glibc on Linux).", out)
        return None
    work = tempfile.mkdtemp(prefix=prefix)
    lib = os.path.join(work, "libcallers.so")
    subprocess.run([gcc, "-O1", "-shared", "-fPIC", "-o", lib, os.path.join(HERE, "malloc_callers.c"), "-ldl"],
                   check=True)
    return work, lib


def _callers(path: str) -> collections.Counter:
    """Allocations per caller signature (the first six named frames) in a dump of the shim."""
    out: collections.Counter = collections.Counter()
    hits, frames = 0, []

    def flush() -> None:
        if hits:
            named = [f for f in frames if f]
            out[" <- ".join(named[:6])] += hits

    with open(path) as fh:
        for line in fh:
            if line.startswith("== "):
                flush()
                hits, frames = int(line.split()[1]), []
            else:
                m = re.search(r"\(([^)+]+)\+", line)
                frames.append(m.group(1)[:70] if m else "")
    flush()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    built = build_counter("genbounds_malloc_", "malloc callers", args.out)
    if built is None:
        return
    work, lib = built
    per_step, callers = {}, {}
    for config in ("plain", "dispersion"):
        dump = os.path.join(work, f"{config}.txt")
        env = {**single_thread_env(), "LD_PRELOAD": lib}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", args.model, config, lib, dump],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
        total = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])["total"]
        per_step[config] = total / (LAST - FIRST)
        callers[config] = _callers(dump)
    steps = LAST - FIRST
    lines = [f"### Small allocations (≤ 64 bytes) a step, {args.model}: plain vs GradientDispersion() every step "
             f"(steps {FIRST}–{LAST}, fresh processes)", "",
             f"plain {per_step['plain']:.1f}, dispersion {per_step['dispersion']:.1f} "
             f"(+{per_step['dispersion'] - per_step['plain']:.1f}) a step.", "",
             "| dispersion − plain, a step | caller (first named frames, innermost first) |", "|---:|---|"]
    extra = {k: (v - callers["plain"].get(k, 0)) / steps for k, v in callers["dispersion"].items()}
    for key, n in sorted(extra.items(), key=lambda kv: -kv[1])[:args.top]:
        lines.append(f"| {n:+.1f} | `{key or '(no named frame)'}` |")
    emit_report("\n".join(lines), args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
