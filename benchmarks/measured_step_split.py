"""Where a measured step of ``GradientDispersion()`` spends its extra time, against an unmeasured
step of the same fit (the MLP 784-512-512-10 at batch 128, one process).

    OMP_NUM_THREADS=1 python benchmarks/measured_step_split.py            # about 1 min

``benchmarks/step_blocks.py`` gives the ratio; this splits the difference. One ``Trainer.fit``
whose dispersion measures alternating blocks of 20 steps (``step_blocks.block_schedule``), with
two marker callbacks, one first and one last in ``trainer.callbacks``. At each of the six
callback hooks of a training step the first marker notes the time before every other callback
runs and the last one the time after, so a step splits into

* **blocks** ``A:<hook> -> Z:<hook>`` — the callbacks' hook (the dispersion's, and Lightning's
  dispatch of it; on an unmeasured step most of the dispersion's are set aside);
* **segments** ``Z:<hook> -> A:<next hook>`` — what runs between two hooks: the user's
  ``training_step`` (the forward: the norm hooks' recording), the backward (their row norms),
  ``optimizer.step`` and the loop's bookkeeping.

Per kind of step, the median over its steps (each block's first step, the switch, left out); the
table gives measured, unmeasured and their difference. Below it, the norm hooks' own clock
(``GhostNormHooks.seconds``: their Python and kernels, forward and backward apart) and what one
drain of the row ring costs (``callbacks/dispersion/row_ring.py``: made at the step log's flush).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import describe_machine_md, emit_report, load_average, machine_description, quiet_child, sample_loader  # noqa: E402

HOOKS = ("on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
         "on_before_optimizer_step", "on_train_batch_end")


def split(pairs: int, block: int, warmup: int) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from genbounds.callbacks import GradientDispersion
    from genbounds.callbacks.dispersion import row_ring
    from genbounds.models import Classifier
    from overhead_dispersion import SPECS
    from step_blocks import block_schedule

    spec = SPECS["mlp"]
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    steps = warmup + 2 * block * pairs
    marks: dict[int, list[tuple[str, float]]] = {}
    hook_clock: dict[str, list[float]] = {}

    class Mark(pl.Callback):
        def __init__(self, tag: str) -> None:
            self.tag = tag

    def marker(hook: str):
        def mark(self, trainer, *args, **kwargs) -> None:  # noqa: ANN001
            shared = trainer.lightning_module.__dict__.get("_genbounds_norm_hooks")
            if self.tag == "A" and shared is not None and shared.ghost is not None:
                hook_clock.setdefault(hook, []).append(shared.ghost.seconds)
            marks.setdefault(trainer.global_step, []).append((f"{self.tag}:{hook}", time.perf_counter()))
        return mark

    for hook in HOOKS:
        setattr(Mark, hook, marker(hook))
    drains: list[tuple[int, float]] = []
    original = row_ring.RowRing.drain

    def timed_drain(ring) -> None:  # noqa: ANN001
        n, started = len(ring._steps), time.perf_counter()
        original(ring)
        drains.append((n, time.perf_counter() - started))

    row_ring.RowRing.drain = timed_drain
    disp, measured = GradientDispersion(log_every_step=False), {}
    try:
        with tempfile.TemporaryDirectory() as logdir:
            trainer = pl.Trainer(max_steps=steps + 1, logger=TensorBoardLogger(logdir, name="s"),
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50,
                                 callbacks=[Mark("A"), block_schedule(disp, block, warmup, measured), disp, Mark("Z")])
            trainer.fit(module, train_dataloaders=sample_loader(batches, steps + 9))
    finally:
        row_ring.RowRing.drain = original
    parts: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    for s in range(warmup, steps):
        if (s - warmup) % block == 0 or s + 1 not in marks:
            continue
        events = marks[s] + [("A:next step", marks[s + 1][0][1])]
        for (a, t0), (b, t1) in zip(events, events[1:]):
            parts[measured.get(s, False)].setdefault(f"{a} -> {b}", []).append(t1 - t0)
    rows = [(name, statistics.median(parts[True][name]), statistics.median(parts[False].get(name, [float("nan")])))
            for name in parts[True]]
    # the hooks' own clock between the batch start and the zero_grad (the forward) and from there
    # to the optimizer step (the backward); reset at the optimizer step, where it is charged
    start, zero, opt = (hook_clock.get(h, []) for h in ("on_train_batch_start", "on_before_zero_grad",
                                                          "on_before_optimizer_step"))
    forward = [b - a for a, b in zip(start, zero) if b > a]
    backward = [b - a for a, b in zip(zero, opt) if b > a]
    full = [t for n, t in drains if n >= 2]
    sizes = sorted({n for n, _ in drains if n >= 2})
    return {"rows": rows, "forward_hooks_s": statistics.median(forward) if forward else float("nan"),
            "backward_hooks_s": statistics.median(backward) if backward else float("nan"),
            "drains": [(n, statistics.median([t for m, t in drains if m == n])) for n in sizes],
            "drain_median_s": statistics.median(full) if full else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--out", default=None, help="also write the Markdown to this file")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    quiet_child()
    torch.set_num_threads(1)
    info, loads = machine_description(), [load_average()]
    result = split(args.pairs, args.block, args.warmup)
    loads.append(load_average())
    lines = [f"### A measured step of `GradientDispersion()` split against an unmeasured one (MLP, {args.pairs} pairs "
             f"of {args.block}-step blocks, one fit)", "", describe_machine_md(info, loads), "",
             "| part of the step | measured (µs) | unmeasured (µs) | difference (µs) |", "|---|---:|---:|---:|"]
    total_m = total_u = 0.0
    for name, m, u in result["rows"]:
        lines.append(f"| `{name}` | {1e6 * m:.1f} | {1e6 * u:.1f} | {1e6 * (m - u):+.1f} |")
        total_m, total_u = total_m + m, total_u + u
    lines += [f"| sum of the medians | {1e6 * total_m:.1f} | {1e6 * total_u:.1f} | {1e6 * (total_m - total_u):+.1f} |",
              "", f"The norm hooks' own clock in a measured step: forward {1e6 * result['forward_hooks_s']:.1f} µs, "
              f"backward {1e6 * result['backward_hooks_s']:.1f} µs.", "",
              "Row-ring drains (steps made at once: median µs): "
              + ", ".join(f"{n}: {1e6 * t:.0f}" for n, t in result["drains"]) + "."]
    emit_report("\n".join(lines), args.out, args.json, {"machine": info, "loads": loads, **result})


if __name__ == "__main__":
    main()
