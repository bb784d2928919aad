"""Where the main job's suite spends its time inside a training step: the user's own work between
the callback hooks, against plain training, in one process.

    OMP_NUM_THREADS=1 python benchmarks/step_segments.py                 # 6 rounds, ~2 min
    OMP_NUM_THREADS=1 python benchmarks/step_segments.py --rounds 10 --out bench_out/segments.md

``benchmarks/overhead_suite.py`` measures the whole run against plain training; what the overhead
budget is charged (``perf/overhead``) covers the measurement callbacks' hooks. This script splits
the difference. Two marker callbacks are added to the trainer, one first and one last in
``trainer.callbacks``; at each of the six callback hooks of a training step (automatic
optimization: ``on_train_batch_start``, ``on_before_zero_grad``, ``on_before_backward``,
``on_after_backward``, ``on_before_optimizer_step``, ``on_train_batch_end``) the first marker
notes the time before every other callback runs and the last one the time after. So each step
splits into

* **blocks** ``B:<hook>`` — every callback's hook and Lightning's dispatch of it (in the suite
  the measurement callbacks' work, charged to the budget);
* **segments** ``S:<hook>-><next hook>`` — what runs between two hooks: the user's
  ``training_step`` (forward and ``self.log``; Lightning calls ``on_before_zero_grad`` after it), the
  backward, Lightning's closure, ``optimizer.step`` and the loop's bookkeeping and data loading.
  Nothing of genbounds runs there except the norm hooks inside forward and backward on the steps
  ``GradientDispersion`` measures (their time is charged too).

Per run, the median over its steps of each block and segment; ``plain`` (``--trainer.callbacks=null``)
and ``suite`` (the config as written) alternate in one process (order alternating per round), and
the table gives, per block and segment, the median over rounds of the per-round difference
suite − plain with its min–max. A segment that is slower in the suite is time no hook sees.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = ("on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
         "on_before_optimizer_step", "on_train_batch_end")


def _markers(log: list) -> tuple:
    from lightning.pytorch import Callback

    def make(position: str) -> Callback:
        class Marker(Callback):
            pass

        for hook in HOOKS:
            def mark(self, trainer, *args, _hook=hook, **kwargs):  # noqa: ANN001, ANN002, ANN003
                log.append((_hook, position, time.perf_counter()))
                if _hook in ("on_train_batch_start", "on_train_batch_end"):
                    from genbounds.callbacks.hook_clock import BUDGET_KEY

                    budget = trainer.__dict__.get(BUDGET_KEY)
                    log.append(("charged_now", position, budget.probe_time if budget is not None else 0.0))
            setattr(Marker, hook, mark)
        if position == "first":
            def fit_start(self, trainer, pl_module):  # noqa: ANN001
                log.append(("fit_start", position, time.perf_counter()))
            Marker.on_fit_start = fit_start
        else:
            def fit_end(self, trainer, pl_module):  # noqa: ANN001
                from genbounds.callbacks.hook_clock import BUDGET_KEY

                budget = trainer.__dict__.get(BUDGET_KEY)
                log.append(("fit_end", position, time.perf_counter()))
                log.append(("charged", position, budget.probe_time if budget is not None else 0.0))
            Marker.on_fit_end = fit_end
        return Marker()

    return make("first"), make("last")


def split(log: list) -> dict[str, float]:
    """Median seconds per block and segment over the run's steps (steps with fewer samples than
    100 — a run shorter than that — are left out)."""
    spans: dict[str, list[float]] = {}
    marks = {hook: t for hook, _, t in log if hook in ("fit_start", "fit_end", "charged")}
    whole = {"fit": marks["fit_end"] - marks["fit_start"], "charged": marks["charged"]}
    # the training steps end to end (first marker's batch start to the last one's batch end,
    # summed) and the rest of the fit: validation, epoch ends, the run's start and end; and what
    # the budget was charged inside the steps
    begun = charged_from = None
    whole["steps"] = whole["charged_steps"] = 0.0
    for (hook, pos, t), (next_hook, _, value) in zip(log, log[1:]):
        if next_hook != "charged_now":
            continue
        if hook == "on_train_batch_start" and pos == "first":
            begun, charged_from = t, value
        elif hook == "on_train_batch_end" and pos == "last" and begun is not None:
            whole["steps"] += t - begun
            whole["charged_steps"] += value - charged_from
            begun = None
    whole["outside"] = whole["fit"] - whole["steps"]
    log = [entry for entry in log if entry[0] in HOOKS]
    for (hook, pos, t), (hook2, pos2, t2) in zip(log, log[1:]):
        if pos == "first" and pos2 == "last" and hook == hook2:
            key = "B:" + hook[3:]
        elif pos == "last" and pos2 == "first":
            key = "S:" + hook[3:] + "->" + hook2[3:]
        else:
            continue
        spans.setdefault(key, []).append(t2 - t)
    return {**{k: statistics.median(v) for k, v in spans.items() if len(v) >= 100}, **whole}


def run(config: str, variant: str, log: list, max_epochs: int | None) -> dict[str, float]:
    from lightning.pytorch import Trainer

    from genbounds.cli import main

    first, last = _markers(log)
    original = Trainer.fit

    def fit(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self.callbacks.insert(0, first)
        self.callbacks.append(last)
        return original(self, *args, **kwargs)

    log.clear()
    Trainer.fit = fit
    try:
        args = ["fit", "--config", config, "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--trainer.logger.init_args.save_dir=" + _scratch()]
        if max_epochs is not None:
            args.append(f"--trainer.max_epochs={max_epochs}")
        if variant == "plain":
            args.append("--trainer.callbacks=null")
        main(args)
    finally:
        Trainer.fit = original
    return split(log)


_SCRATCH: list[str] = []


def _scratch() -> str:
    if not _SCRATCH:
        import tempfile

        _SCRATCH.append(tempfile.mkdtemp(prefix="genbounds_segments_"))
    return _SCRATCH[0]


def table(rounds: list[tuple[dict, dict]]) -> str:
    keys = [k for k in rounds[0][1] if k[:2] in ("B:", "S:") and all(k in p and k in s for p, s in rounds)]
    keys.sort(key=lambda k: (k[0] != "B", k))
    lines = ["| part | plain (µs, median) | suite (µs, median) | suite − plain (µs): median [min–max] |",
             "|---|---:|---:|---:|"]
    totals = {"B": [], "S": []}
    for kind in ("B", "S"):
        for r in range(len(rounds)):
            totals[kind].append(sum(rounds[r][1][k] - rounds[r][0][k] for k in keys if k[0] == kind))
    for k in keys:
        plain = statistics.median(p[k] for p, _ in rounds) * 1e6
        suite = statistics.median(s[k] for _, s in rounds) * 1e6
        diff = [(s[k] - p[k]) * 1e6 for p, s in rounds]
        lines.append(f"| `{k}` | {plain:.1f} | {suite:.1f} | {statistics.median(diff):+.1f} "
                     f"[{min(diff):+.1f}, {max(diff):+.1f}] |")
    for kind, what in (("B", "all blocks (the hooks, charged)"), ("S", "all segments (no hook sees them)")):
        d = [x * 1e6 for x in totals[kind]]
        lines.append(f"| **{what}** | | | **{statistics.median(d):+.1f}** [{min(d):+.1f}, {max(d):+.1f}] |")
    plain_step = [sum(p[k] for k in keys) * 1e6 for p, _ in rounds]
    lines.append(f"| plain step (sum of medians) | {statistics.median(plain_step):.1f} | | |")
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values):+.0f} [{min(values):+.0f}, {max(values):+.0f}]"

    steps = [(s["steps"] - p["steps"]) * 1e3 for p, s in rounds]
    outside = [(s["outside"] - p["outside"]) * 1e3 for p, s in rounds]
    unseen_steps = [(s["steps"] - p["steps"] - s["charged_steps"]) * 1e3 for p, s in rounds]
    unseen_outside = [(s["outside"] - p["outside"] - (s["charged"] - s["charged_steps"])) * 1e3 for p, s in rounds]
    lines += ["", "Whole runs, suite − plain (ms, median [min–max]): all training steps end to end "
              f"{ms(steps)}, of it not charged to the budget {ms(unseen_steps)}; everything else (validation, epoch "
              f"ends, the run's start and end, the final evaluation) {ms(outside)}, of it not charged "
              f"{ms(unseen_outside)}."]
    ratio = [s["fit"] / p["fit"] for p, s in rounds]
    residual = [(s["fit"] - s["charged"]) / p["fit"] for p, s in rounds]
    lines += ["", "Whole fit (`on_fit_start` to `on_fit_end`), same rounds: suite / plain "
              f"{statistics.median(ratio):.3f}× [{min(ratio):.3f}–{max(ratio):.3f}]; (suite − charged to the budget) / plain "
              f"{statistics.median(residual):.3f}× [{min(residual):.3f}–{max(residual):.3f}]; plain fit "
              f"{statistics.median(p['fit'] for p, _ in rounds):.2f} s, charged "
              f"{statistics.median(s['charged'] for _, s in rounds):.2f} s (medians)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "digits_mlp.yaml"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    log: list = []
    rounds = []
    for r in range(args.rounds):
        order = ("plain", "suite") if r % 2 == 0 else ("suite", "plain")
        got = {v: run(args.config, v, log, args.max_epochs) for v in order}
        rounds.append((got["plain"], got["suite"]))
        seg = sum(got["suite"][k] - got["plain"][k] for k in got["plain"] if k[:2] == "S:" and k in got["suite"])
        blk = sum(got["suite"][k] - got["plain"][k] for k in got["plain"] if k[:2] == "B:" and k in got["suite"])
        print(f"[round {r + 1}/{args.rounds}] fit {got['suite']['fit'] / got['plain']['fit']:.3f}×, segments "
              f"suite − plain {seg * 1e6:+.0f} µs/step, blocks {blk * 1e6:+.0f} µs/step", file=sys.stderr, flush=True)
    text = (f"Step segments, `{os.path.relpath(args.config, ROOT)}`, {args.rounds} rounds in one process "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}):\n\n" + table(rounds) + "\n")
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
