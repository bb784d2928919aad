"""The norm hooks' per-step path in one pass against the general path, in one process.

    OMP_NUM_THREADS=1 python benchmarks/per_step_path.py --rounds 8     # about 3 min

``GradientDispersion()`` on the MLP 784-512-512-10 at batch 128 (the benchmark of
``overhead_dispersion.py``). ``one pass``: the default, where the hooks' per-module sums stay raw
until the optimizer step and ``hook_dispersion_row`` turns them and the gradient's piece norms
into the logged row with two matrix-vector products. ``general``: the same callback with the
per-step path switched off (``StepContext.groups_partition`` false), which groups and scales the
sums after the backward, builds ``GradientMoments``, takes ``grouped_sq_norms`` and then
``dispersion_row`` — the path every step took before.

Both run alternately in one process (fresh model, same seed, same batches; the order alternates
per round). Per run: the callback's own clock per measured step — every Lightning hook of it and
the norm hooks inside forward and backward, as charged to ``OverheadBudget.by_owner`` — and the
median step time. The logged values of the two paths must agree (relative 1e-9; checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args()

    import lightning.pytorch as pl

    from common import quiet_child, random_image_batches, sample_loader
    from genbounds.callbacks import GradientDispersion
    from genbounds.models import MLP, Classifier

    quiet_child()

    class GeneralPath(GradientDispersion):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_train_start(trainer, pl_module)
            self._groups_partition = False  # (the values are the same: the groups do partition)

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *args: object) -> None:
            self.starts.append(time.perf_counter())

    batches = random_image_batches(8, 128, (784,), 10, torch.device("cpu"))
    warm = 30
    results: dict[str, list[tuple[float, float]]] = {"one pass": [], "general": []}
    values: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for variant in (["one pass", "general"] if r % 2 == 0 else ["general", "one pass"]):
            torch.manual_seed(0)
            module = Classifier(MLP(784, 10, hidden=512, depth=2), num_classes=10, lr=0.01)
            cb = GradientDispersion() if variant == "one pass" else GeneralPath()
            records: list = []
            cb.add_listener(records.extend)
            clock = StepClock()
            trainer = pl.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, callbacks=[clock, cb],
                                 num_sanity_val_steps=0, limit_val_batches=0)
            trainer.fit(module, sample_loader(batches, args.steps + 8))
            budget = trainer.__dict__["_genbounds_overhead"]
            per_step = budget.by_owner.get("GradientDispersion", 0.0) / cb.measured_steps
            gaps = [b - a for a, b in zip(clock.starts, clock.starts[1:])][warm:]
            results[variant].append((per_step, statistics.median(gaps)))
            values.setdefault(variant, [rec.values["grad/dispersion"] for rec in records])
            print(f"[round {r + 1}/{args.rounds}] {variant:8s} callback {1e6 * per_step:6.1f} µs/step, "
                  f"step {1e3 * statistics.median(gaps):.3f} ms", flush=True)
    a, b = values["one pass"], values["general"]
    agree = len(a) == len(b) and all(abs(x - y) <= 1e-9 * abs(y) for x, y in zip(a, b))
    print()
    print("| path | the callback's own clock, µs per measured step: median [min–max] | share of the step (median) |")
    print("|---|---:|---:|")
    for variant, rows in results.items():
        own = [c for c, _ in rows]
        share = statistics.median(c / s for c, s in rows)
        print(f"| {variant} | {1e6 * statistics.median(own):.0f} [{1e6 * min(own):.0f}–{1e6 * max(own):.0f}] | "
              f"{100 * share:.1f} % |")
    diffs = [g[0] - o[0] for o, g in zip(results["one pass"], results["general"])]
    print(f"\nPer round, general − one pass: median {1e6 * statistics.median(diffs):.0f} µs "
          f"[{1e6 * min(diffs):.0f}, {1e6 * max(diffs):.0f}]; logged values of the two paths agree (rel 1e-9): {agree}")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
