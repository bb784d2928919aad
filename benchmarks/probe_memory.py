"""Peak memory of one probe callback's probe, against plain training (CPU).

    OMP_NUM_THREADS=1 python benchmarks/probe_memory.py                      # HeldoutGradient, about 1 min
    OMP_NUM_THREADS=1 python benchmarks/probe_memory.py --rounds 1 --probes sensitivity   # about 3 min

(``trace`` with its defaults — HessianTrace's Hutchinson probes on this 28.7 M-parameter CNN — ran
past 10 minutes on the 2-core CI-sized machine; ``--trace-probes 3`` caps its Hutchinson probes and
power iterations at 3 each, about 2 minutes a fit there.)

The AlexNet-style CNN of ``overhead_dispersion.py`` (``cuda-cnn``: 28.7 M parameters, 110 MiB a
parameter set, 32×32×3, batch 128), run on the CPU. Each round runs, in fresh processes and in
turn, plain training and training with each probe of ``--probes`` alone, measuring every step
(``HeldoutGradient``, ``GradientSensitivity``, ``HessianTrace``, ``Flatness`` with their defaults
and ``every_n_steps=1``; a 4-batch validation set in every fit, ``--steps`` optimizer steps).
Reported per fit: the peak resident growth of the whole ``fit`` (``common.PeakRSS``: heap
trimmed, ``VmHWM`` reset, then ``VmHWM`` less the resident set before), and the largest peak
growth of one probe (the callback's ``measure``, above the resident set when it starts).
``suite_memory.py`` finds the hook that holds a suite's peak; this script isolates one probe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import describe_machine_md, emit_report, load_average, machine_description, quiet_child  # noqa: E402


PROBES = ("heldout", "sensitivity", "trace", "flatness")


def _probe(name: str) -> Any:
    from genbounds import callbacks

    return {"heldout": callbacks.HeldoutGradient, "sensitivity": callbacks.GradientSensitivity,
            "trace": callbacks.HessianTrace, "flatness": callbacks.Flatness}[name]


def child(config: str, steps: int, trace_probes: int | None = None) -> dict[str, Any]:
    import lightning.pytorch as pl

    from common import PeakRSS, sample_loader
    from genbounds.models import Classifier
    from overhead_dispersion import SPECS
    from suite_memory import record_peaks

    quiet_child()
    table: dict[tuple[str, str], list[float]] = {}
    callbacks = []
    if config != "plain":
        cls = _probe(config)
        record_peaks(cls, "measure", table, cuda=False)
        capped = ({"min_probes": trace_probes, "max_probes": trace_probes, "eig_max_iter": trace_probes}
                  if config == "trace" and trace_probes else {})
        callbacks = [cls(every_n_steps=1, **capped)]
    spec = SPECS["cuda-cnn"]
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()[:4]
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    val = [(x.roll(1, 0), y.roll(1, 0)) for x, y in batches]
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=4,
                         callbacks=callbacks)
    with PeakRSS() as whole:
        trainer.fit(module, train_dataloaders=sample_loader(batches, steps), val_dataloaders=sample_loader(val, 4))
    peak, calls = table.get((callbacks[0].__class__.__name__, "measure"), (None, 0)) if callbacks else (None, 0)
    return {"fit_mib": whole.growth_mib, "probe_mib": peak, "probes": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--probes", default="heldout", help=f"comma-separated, from {', '.join(PROBES)}")
    parser.add_argument("--trace-probes", type=int, default=None,
                        help="HessianTrace's Hutchinson probes and power iterations (default: its own)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.trace_probes)))
        return
    info, loads = machine_description(), [load_average()]
    probes = [p for p in args.probes.split(",") if p]
    configs = ["plain", *probes]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for config in (configs if r % 2 == 0 else configs[::-1]):
            extra = ["--trace-probes", str(args.trace_probes)] if args.trace_probes else []
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config, "--steps",
                                  str(args.steps), *extra], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[config].append(res)
            print(f"[round {r + 1}/{args.rounds}] {config:11s} fit +{res['fit_mib']:7.1f} MiB"
                  + (f"  largest probe +{res['probe_mib']:7.1f} MiB ({res['probes']} probes)"
                     if res["probe_mib"] is not None else ""), file=sys.stderr, flush=True)
        loads.append(load_average())

    def span(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} [{min(values):.1f}–{max(values):.1f}]"

    plain = [x["fit_mib"] for x in runs["plain"]]
    lines = [f"### One probe's peak resident growth (cuda-cnn on the CPU, batch 128, {args.steps} steps, "
             f"{args.rounds} rounds)", "", describe_machine_md(info, loads), "",
             "| fit | peak growth of `fit`, MiB: median [min–max] | / plain (median of rounds) | "
             "largest probe, MiB: median [min–max] |", "|---|---:|---:|---:|",
             f"| plain | {span(plain)} | 1.00× | – |"]
    for p in probes:
        fit = [x["fit_mib"] for x in runs[p]]
        probe = [x["probe_mib"] for x in runs[p] if x["probe_mib"] is not None]
        ratio = statistics.median([f / b for f, b in zip(fit, plain)])
        capped = (f", min_probes={args.trace_probes}, max_probes={args.trace_probes}, "
                  f"eig_max_iter={args.trace_probes}") if p == "trace" and args.trace_probes else ""
        lines.append(f"| `{_probe(p).__name__}(every_n_steps=1{capped})` | {span(fit)} | {ratio:.2f}× | "
                     f"{span(probe) if probe else '–'} |")
    emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
