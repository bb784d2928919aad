"""What a measured step of ``GradientDispersion`` costs, timed against unmeasured steps of the
same fit: alternating blocks of steps in one process.

    OMP_NUM_THREADS=1 python benchmarks/step_blocks.py                     # the MLP, about 1 min
    OMP_NUM_THREADS=1 python benchmarks/step_blocks.py --model cnn --block 3 --pairs 8   # about 4 min here

``benchmarks/overhead_dispersion.py`` runs every configuration in a fresh process, as the issue's
targets ask. On this shared machine a process lands in a slow or a fast state for its whole life
(every part of it 20–50 % slower or faster), so one round's ratio swings by ±30 % and a run of
nine rounds pins its median within several %: not enough for a 10 % target. Here both sides run
in one process, in alternating blocks of ``--block`` steps, so a slow state hits both alike.

**Lightning.** One ``Trainer.fit`` with ``GradientDispersion()`` (backend ``auto``, no budget),
whose schedule measures every step of one block of each pair and none of the other. Which block
of a pair is measured alternates from pair to pair. Step time is the interval between consecutive
``on_train_batch_start`` calls of a timer callback placed first in ``trainer.callbacks``. The
first step of each block is left out: it carries the switch, the hook attached or detached. A
pair's ratio is the median step time of its measured block over that of its unmeasured block.

An unmeasured step is not quite plain training. The dispersion's batch start still runs: it
decides the step and sets the other hooks aside (``hook_clock.HooksAside``). The table gives what
the budget's clock charged per unmeasured step, and the ratio with that taken out of the
denominator. The global forward hook is attached only from a measured step's forward to its
backward, so an unmeasured step runs no hook of ours in the forward or the backward.

**Raw loop** (``--raw``, default on). The same alternation without Lightning: a plain copy of the
model and a copy with :class:`~genbounds.estimators.ghost_norms.GhostNormHooks` attached, armed and
read after every backward as the callback's per-step path does (``overhead_dispersion.raw_step``).
The two copies run blocks in turn, order alternating per pair: the hooks' own cost.

Every ratio is reported as the median over pairs with its distribution-free 95 % interval
(``common.median_ci``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (  # noqa: E402
    describe_machine_md,
    emit_report,
    fmt_ci,
    load_average,
    machine_description,
    quiet_child,
    sample_loader,
)


def block_measured(step: int, block: int) -> bool:
    """Whether ``step`` lies in the measured block of its pair: pairs of two blocks, the first
    block measured in even pairs, the second in odd ones."""
    pair, second = divmod(step // block, 2)
    return bool(second) == bool(pair % 2)


def block_schedule(disp: Any, block: int, warmup: int, measured: dict[int, bool]) -> Any:
    """A callback that gives ``disp`` (a ``GradientDispersion``) the block schedule once its step
    budget exists: every step before ``warmup``, then :func:`block_measured` from there;
    ``measured`` records each step's decision. Used here and by ``kernel_floor.py``."""
    import lightning.pytorch as pl

    class Blocks(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            def measures(trainer, measured_steps, every_n_steps, *window) -> bool:  # noqa: ANN001
                step = int(trainer.global_step)
                out = step < warmup or block_measured(step - warmup, block)
                measured[step] = out
                return out

            disp.step_budget.measures = measures

    return Blocks()


def pair_ratios(times: dict[int, float], block: int, measured: dict[int, bool]) -> list[float]:
    """Per pair of blocks, the median step time of the measured block over the unmeasured one's
    (each block without its first step); pairs missing either side are left out."""
    by_block: dict[int, list[float]] = {}
    for step, seconds in times.items():
        if step % block == 0:
            continue  # the switch
        by_block.setdefault(step // block, []).append(seconds)
    ratios = []
    for pair in range(max(by_block, default=-1) // 2 + 1):
        a, b = by_block.get(2 * pair), by_block.get(2 * pair + 1)
        if not a or not b:
            continue
        first_measured = measured.get(2 * pair * block, block_measured(2 * pair * block, block))
        m, u = (a, b) if first_measured else (b, a)
        ratios.append(statistics.median(m) / statistics.median(u))
    return ratios


def lightning_blocks(model_name: str, block: int, pairs: int, warmup: int) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from genbounds.callbacks import GradientDispersion
    from genbounds.models import Classifier
    from overhead_dispersion import SPECS

    spec = SPECS[model_name]
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    steps = warmup + 2 * block * pairs

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.starts: dict[int, float] = {}
            self.charged: dict[int, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.starts[trainer.global_step] = time.perf_counter()
            budget = trainer.__dict__.get("_genbounds_overhead")
            if budget is not None:
                self.charged[trainer.global_step] = sum(budget.by_owner.values())

    disp = GradientDispersion(log_every_step=False)
    measured: dict[int, bool] = {}
    timer = Timer()

    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(max_steps=steps + 1, logger=TensorBoardLogger(logdir, name="b"), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, log_every_n_steps=50,
                             callbacks=[timer, block_schedule(disp, block, warmup, measured), disp])
        trainer.fit(module, train_dataloaders=sample_loader(batches, steps + 9))
    times = {s - warmup: timer.starts[s + 1] - timer.starts[s] for s in range(warmup, steps) if s + 1 in timer.starts}
    flags = {s - warmup: measured.get(s, False) for s in range(warmup, steps)}
    ratios = pair_ratios(times, block, flags)
    # what the budget's clock charged per unmeasured step (the dispersion's batch start), and the
    # ratio with it taken out of the unmeasured side
    charged = [timer.charged[s + 1] - timer.charged[s] for s in range(warmup, steps)
               if not flags[s - warmup] and (s - warmup) % block and s + 1 in timer.charged and s in timer.charged]
    idle = statistics.median(charged) if charged else 0.0
    unmeasured = [t for s, t in times.items() if not flags[s] and s % block]
    measured_t = [t for s, t in times.items() if flags[s] and s % block]
    u = statistics.median(unmeasured)  # r = M / U; with U − idle in the denominator: r · U / (U − idle)
    adjusted = [r * u / (u - idle) if u > idle else float("nan") for r in ratios]
    return {"ratios": ratios, "adjusted": adjusted, "idle_s": idle, "measured_ms": 1e3 * statistics.median(measured_t),
            "unmeasured_ms": 1e3 * u, "measured_steps": disp.measured_steps,
            "backend": disp.active_backend}


def raw_blocks(model_name: str, block: int, pairs: int, warmup: int) -> dict:
    from genbounds.estimators.ghost_norms import GhostNormHooks
    from overhead_dispersion import SPECS, raw_step

    spec = SPECS[model_name]
    torch.manual_seed(0)
    batches = spec.batches()
    base = spec.build()
    sides = {side: raw_step(copy.deepcopy(base), batches, side == "hooks", GhostNormHooks) for side in ("plain", "hooks")}

    def run_block(side: str, n: int, offset: int) -> list[float]:
        step, out = sides[side], []
        for i in range(n):
            t = time.perf_counter()
            step(offset + i)
            out.append(time.perf_counter() - t)
        return out

    for side in sides:
        run_block(side, warmup, 0)
    ratios = []
    for pair in range(pairs):
        order = ("hooks", "plain") if pair % 2 == 0 else ("plain", "hooks")
        got = {side: statistics.median(run_block(side, block, pair * block)[1:]) for side in order}
        ratios.append(got["hooks"] / got["plain"])
    return {"ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--block", type=int, default=None, help="steps per block (default: 20 for the MLP, 3 for the CNN)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs of blocks (default: 30 for the MLP, 8 for the CNN)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before the first block (default: 30 / 2)")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw loop")
    parser.add_argument("--out", default=None, help="also write the Markdown to this file")
    parser.add_argument("--json", default=None, help="also write the per-pair ratios to this JSON file")
    args = parser.parse_args()
    mlp = args.model == "mlp"
    block = args.block or (20 if mlp else 3)
    pairs = args.pairs or (30 if mlp else 8)
    warmup = args.warmup if args.warmup is not None else (30 if mlp else 2)
    quiet_child()
    info, loads = machine_description(), [load_average()]
    result = {"lightning": lightning_blocks(args.model, block, pairs, warmup)}
    loads.append(load_average())
    if not args.no_raw:
        result["raw"] = raw_blocks(args.model, block, pairs, warmup)
        loads.append(load_average())
    lt = result["lightning"]
    lines = [f"### `GradientDispersion()` measured vs unmeasured steps of one fit ({args.model}, {pairs} pairs of "
             f"{block}-step blocks, one process)", "", describe_machine_md(info, loads), "",
             "| comparison | ratio: median over pairs [95 % CI] | step (ms, median) |", "|---|---:|---:|",
             f"| Lightning: measured / unmeasured step (backend `{lt['backend']}`) | {fmt_ci(lt['ratios'])} | "
             f"{lt['measured_ms']:.2f} / {lt['unmeasured_ms']:.2f} |",
             f"| the same, the unmeasured step's charged {1e6 * lt['idle_s']:.0f} µs taken out | {fmt_ci(lt['adjusted'])} | – |"]
    if "raw" in result:
        lines.append(f"| raw loop: hooks armed and read / plain | {fmt_ci(result['raw']['ratios'])} | – |")
    lines += ["", f"Steps measured by the dispersion: {lt['measured_steps']} (the warm-up and every measured block)."]
    emit_report("\n".join(lines), args.out, args.json, {"machine": info, "loads": loads, "block": block,
                                                         "pairs": pairs, **result})


if __name__ == "__main__":
    main()
