"""How far the dispersion's set-up passes grow glibc's heap, pass by pass, against plain training.

    OMP_NUM_THREADS=1 python benchmarks/setup_heap.py --model cnn      # about 1 min
    OMP_NUM_THREADS=1 python benchmarks/setup_heap.py --model mlp

One fit of each configuration (``overhead_dispersion.child``: the benchmark's fit, 2 + 6 steps),
each in a fresh process. Around each pass ``GradientDispersion`` runs before step 0 — the loss
contract's trial (``LossContract._trial``), its coupling check (``losses_couple``, once per run
of the trial batch's samples), the hooks' check on one sample (``hook_norm_errors``) and their
forward of the whole first batch (``batch_layout_problem``) — and at the first steps' starts and
ends, it prints the size of the ``[heap]`` mapping (``/proc/self/maps``) and the resident set
above its value at ``on_fit_start``.

Why it matters (round 33): blocks under glibc's moving ``mmap`` threshold are carved from the
heap, which glibc shrinks only from its top. A block that outlives a pass — a first-use cache
made in it — keeps the heap at least as high as where it was placed, and the heap's free pages
below stay resident or are faulted in again by later steps. A pass run while an earlier pass's
graph is still held is placed above it: the heap, and with it the fit's peak growth, then
carries both. The peak growth itself is read by ``overhead_dispersion.py`` over several rounds;
one fit's heap sizes here show where the set-up leaves the heap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit_report, run_json_child  # noqa: E402


def _heap_mib() -> float:
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                return (hi - lo) / 2**20
    return float("nan")


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(model: str, config: str) -> None:
    import lightning.pytorch as pl
    import overhead_dispersion as od

    import genbounds.callbacks.dispersion.norm_hooks as norm_hooks
    import genbounds.callbacks.loss_contract as loss_contract

    start = [0.0]
    rows: list[str] = []

    def note(what: str) -> None:
        rows.append(f"| {config} | {what} | {_heap_mib():.1f} | {_rss_mib() - start[0]:+.1f} |")

    def around(owner: object, name: str, what: str) -> None:
        inner = getattr(owner, name)

        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            note(f"before {what}")
            try:
                return inner(*args, **kwargs)
            finally:
                note(f"after {what}")

        setattr(owner, name, wrapped)

    around(loss_contract.LossContract, "_trial", "the loss contract's trial")
    around(loss_contract, "losses_couple", "a coupling check")
    around(norm_hooks, "hook_norm_errors", "the hooks' check on one sample")
    around(norm_hooks, "batch_layout_problem", "the hooks' forward of the first batch")

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            start[0] = _rss_mib()
            note("fit start")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step < 3:
                note(f"step {trainer.global_step}'s start")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step <= 3:
                note(f"step {trainer.global_step - 1}'s end")

        def summary(self) -> dict:
            return {}

    result = od.child(model, config, 6, 2, probe=Probe())
    rows.append(f"| {config} | peak growth (VmHWM − VmRSS before fit) | – | {result['peak_growth_mib']:+.1f} |")
    print(json.dumps({"rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    lines = [f"### The heap through the set-up: {args.model}, one fit each (fresh processes)", "",
             "| fit | when | `[heap]` MiB | resident set − at fit start (MiB) |", "|---|---|---:|---:|"]
    for config in ("plain", "dispersion"):
        lines += run_json_child([os.path.abspath(__file__), "--child", args.model, config])["rows"]
    emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
