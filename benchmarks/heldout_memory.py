"""Peak memory of ``HeldoutGradient``'s probe step, against plain training (CPU).

    OMP_NUM_THREADS=1 python benchmarks/heldout_memory.py                 # about 2 min
    OMP_NUM_THREADS=1 python benchmarks/heldout_memory.py --rounds 3 --steps 4

The AlexNet-style CNN of ``overhead_dispersion.py`` (``cuda-cnn``: 28.7 M parameters, 110 MiB a
parameter set, 32×32×3, batch 128), run on the CPU. Each round runs two fits in fresh processes,
in turn: plain training, and training with ``HeldoutGradient(every_n_steps=1)`` (a 4-batch
validation set in both, ``--steps`` optimizer steps). Reported per fit: the peak resident growth
of the whole ``fit`` (``common.PeakRSS``: heap trimmed, ``VmHWM`` reset, then ``VmHWM`` less the
resident set before), and for the measured fit the largest peak growth of one probe step
(``HeldoutGradient.measure``, above the resident set when it starts: its two probe passes and
what it computes from them). ``suite_memory.py`` found this hook; this script isolates it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import describe_machine_md, emit_report, load_average, machine_description  # noqa: E402


def child(config: str, steps: int) -> dict[str, Any]:
    import functools

    import lightning.pytorch as pl
    import torch

    from common import PeakRSS, sample_loader
    from genbounds.callbacks import HeldoutGradient
    from genbounds.callbacks import heldout_gradient
    from genbounds.models import Classifier
    from overhead_dispersion import SPECS

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    probe_peaks: list[float] = []
    measure = heldout_gradient.HeldoutGradient.measure

    @functools.wraps(measure)
    def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
        with PeakRSS() as peak:
            out = measure(self, *args, **kwargs)
        probe_peaks.append(peak.growth_mib)
        return out

    heldout_gradient.HeldoutGradient.measure = watched
    spec = SPECS["cuda-cnn"]
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()[:4]
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    val = [(x.roll(1, 0), y.roll(1, 0)) for x, y in batches]
    callbacks = [HeldoutGradient(every_n_steps=1)] if config == "heldout" else []
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=4,
                         callbacks=callbacks)
    with PeakRSS() as whole:
        trainer.fit(module, train_dataloaders=sample_loader(batches, steps), val_dataloaders=sample_loader(val, 4))
    return {"fit_mib": whole.growth_mib, "probe_mib": max(probe_peaks) if probe_peaks else None,
            "probes": len(probe_peaks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    info, loads = machine_description(), [load_average()]
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "heldout": []}
    for r in range(args.rounds):
        for config in (("plain", "heldout") if r % 2 == 0 else ("heldout", "plain")):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config, "--steps",
                                  str(args.steps)], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[config].append(res)
            print(f"[round {r + 1}/{args.rounds}] {config:8s} fit +{res['fit_mib']:7.1f} MiB"
                  + (f"  probe step +{res['probe_mib']:7.1f} MiB" if res["probe_mib"] is not None else ""),
                  file=sys.stderr, flush=True)
        loads.append(load_average())
    plain = [x["fit_mib"] for x in runs["plain"]]
    held = [x["fit_mib"] for x in runs["heldout"]]
    probe = [x["probe_mib"] for x in runs["heldout"]]
    lines = [f"### `HeldoutGradient`'s probe step, peak resident growth (cuda-cnn on the CPU, batch 128, "
             f"{args.steps} steps, {args.rounds} rounds)", "", describe_machine_md(info, loads), "",
             "| fit | peak growth of `fit`, MiB: median [min–max] | largest probe step, MiB: median [min–max] |",
             "|---|---:|---:|",
             f"| plain | {statistics.median(plain):.1f} [{min(plain):.1f}–{max(plain):.1f}] | – |",
             f"| `HeldoutGradient(every_n_steps=1)` | {statistics.median(held):.1f} [{min(held):.1f}–"
             f"{max(held):.1f}] | {statistics.median(probe):.1f} [{min(probe):.1f}–{max(probe):.1f}] |", "",
             f"Fit peak growth / plain: {statistics.median([h / p for h, p in zip(held, plain)]):.2f}× "
             "(median of per-round ratios)."]
    emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
