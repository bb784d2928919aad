"""What one part of ``GradientDispersion``'s measured step costs inside Lightning: one fit whose
steps run in blocks of three kinds — unmeasured, measured, measured with that part changed —
the order rotating from triple to triple.

    OMP_NUM_THREADS=1 python benchmarks/step_ablation.py --ablation no-piece-norms      # about 2.5 min
    OMP_NUM_THREADS=1 python benchmarks/step_ablation.py --ablation gather --triples 60

``benchmarks/step_blocks.py`` sets measured steps against unmeasured ones in one process; this
adds a third block kind whose measured steps run with one part of the per-step path changed,
so that the part's cost is read as a paired ratio in the same process state (separate runs on
this machine differ by more than a part costs). Ablations (timing only: an ablated step's
logged values are wrong):

* ``no-piece-norms`` — the gradient's piece norms (``‖ḡ_k‖²``'s read of ``.grad``) skipped;
* ``no-row-norms`` — the backward's row norms of the Linear layers' inputs and output gradients
  skipped;
* ``gather`` — the small tensors' pieces gathered into a padded buffer by one ``torch.cat``
  first (the route before they were normed where they lie; values unchanged).

The MLP of ``overhead_dispersion.py`` (784-512-512-10, batch 128), blocks of 20 steps, the first
step of each block left out (it carries the switch). Per triple, each kind's median step; the
ratios measured / unmeasured, changed / unmeasured and changed / measured, each the median over
triples with its distribution-free 95 % interval (``common.median_ci``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


from common import (  # noqa: E402
    describe_machine_md,
    fmt_ci,
    load_average,
    machine_description,
    quiet_child,
    sample_loader,
)

KINDS = ("unmeasured", "measured", "changed")


def kind_of(step: int, warmup: int, block: int) -> str:
    """The block kind of ``step``: measured before ``warmup``, then triples of blocks whose order
    rotates by one kind per triple."""
    if step < warmup:
        return "measured"
    triple, pos = divmod((step - warmup) // block, 3)
    k = triple % 3
    return (KINDS[k:] + KINDS[:k])[pos]


def ablation_switch(name: str):  # noqa: ANN201
    """``switch(changed: bool)``: the part of the per-step path ``name`` names, changed or restored."""
    from genbounds.estimators import functional
    from genbounds.estimators.ghost_norms import step_rows

    if name == "no-piece-norms":
        real = functional._PiecePlan.norms_into

        def switch(changed: bool) -> None:
            functional._PiecePlan.norms_into = (lambda self, *a, **k: None) if changed else real
        return switch
    if name == "no-row-norms":
        real_rows = step_rows.goodfellow_row_norms

        def switch(changed: bool) -> None:
            step_rows.goodfellow_row_norms = (lambda *a: None) if changed else real_rows
        return switch
    if name == "gather":
        kept: dict[str, tuple] = {}

        def switch(changed: bool) -> None:
            plan = functional._PIECE_PLAN[0]
            if plan is None:
                return
            if "apart" not in kept:
                sizes = [plan.shapes[i].numel() for i in plan.gathered]
                kept["apart"] = (plan.apart, plan.gather_buffer, plan.gather_pads)
                kept["gather"] = (None, *functional._gather_parts(sizes, len(plan.layout[1])))
            plan.apart, plan.gather_buffer, plan.gather_pads = kept["gather" if changed else "apart"]
            plan.gather_flat = plan.gather_buffer.view(-1)
        return switch
    raise SystemExit(f"unknown ablation {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", required=True, choices=["no-piece-norms", "no-row-norms", "gather"])
    parser.add_argument("--triples", type=int, default=25)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    quiet_child()

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from genbounds.callbacks import GradientDispersion
    from genbounds.models import Classifier
    from overhead_dispersion import SPECS

    switch = ablation_switch(args.ablation)
    spec = SPECS["mlp"]
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    steps = args.warmup + 3 * args.block * args.triples
    disp = GradientDispersion(log_every_step=False)
    starts: dict[int, float] = {}

    class Blocks(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            disp.step_budget.measures = lambda trainer, measured, every, *window: (
                kind_of(int(trainer.global_step), args.warmup, args.block) != "unmeasured")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            step = trainer.global_step
            starts[step] = time.perf_counter()
            switch(kind_of(step, args.warmup, args.block) == "changed")

    info, loads = machine_description(), [load_average()]
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(max_steps=steps + 1, logger=TensorBoardLogger(logdir, name="b"),
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50,
                             callbacks=[Blocks(), disp])
        trainer.fit(module, train_dataloaders=sample_loader(batches, steps + 9))
    switch(False)
    loads.append(load_average())
    blocks: dict[int, list[float]] = {}
    for s in range(args.warmup, steps):
        if s + 1 in starts and (s - args.warmup) % args.block:
            blocks.setdefault((s - args.warmup) // args.block, []).append(starts[s + 1] - starts[s])
    ratios: dict[str, list[float]] = {"measured / unmeasured": [], "changed / unmeasured": [],
                                      "changed / measured": []}
    for t in range(args.triples):
        order = KINDS[t % 3:] + KINDS[:t % 3]
        med = {order[p]: statistics.median(blocks[3 * t + p]) for p in range(3) if 3 * t + p in blocks}
        if len(med) < 3:
            continue
        ratios["measured / unmeasured"].append(med["measured"] / med["unmeasured"])
        ratios["changed / unmeasured"].append(med["changed"] / med["unmeasured"])
        ratios["changed / measured"].append(med["changed"] / med["measured"])
    lines = [f"### `{args.ablation}`: one fit, {args.triples} triples of {args.block}-step blocks (the MLP)", "",
             describe_machine_md(info, loads), "", "| ratio of block medians | median over triples [95 % CI] |",
             "|---|---:|"]
    lines += [f"| {name} | {fmt_ci(values)} |" for name, values in ratios.items()]
    lines.append("")
    lines.append(f"Steps measured by the dispersion: {disp.measured_steps}.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
