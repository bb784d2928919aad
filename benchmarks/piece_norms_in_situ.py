"""Where and how to take the gradient's piece norms (``‖ḡ_k‖²`` of the per-step path), timed
inside a training step rather than alone.

    OMP_NUM_THREADS=1 python benchmarks/piece_norms_in_situ.py              # the MLP, about 1.5 min
    OMP_NUM_THREADS=1 python benchmarks/piece_norms_in_situ.py --steps 3000

A small op timed alone, with hot caches, says little about what it costs right after a backward:
the backward's matrix kernels evict both the data and the code of everything else. On this
machine the first 8-element ``add_`` after the MLP's backward took 29 µs against 3.6 for the
next one, a ``torch.cat`` of the small tensors 23 against 4.9, the piece norms of a 1 MB
gradient 64.5 against 33 (17.7 alone). So each variant here runs inside the step it serves.

The MLP 784-512-512-10 at batch 128 of ``overhead_dispersion.py``, stepped by hand (forward,
mean cross-entropy, backward, SGD step; ``zero_grad(set_to_none=True)`` as Lightning does). One
step of every variant per round, the order rotating; per round each variant's step time minus
the plain step's. Reported: the median of those differences with its distribution-free 95 %
interval (``common.median_ci``) over the rounds after the first tenth. The variants write the
pieces' fp32 norms into one row laid out as the row ring's (``PieceBlocks``):

* ``gather`` — the small tensors (three biases and the last layer's weight) copied into a
  zero-padded buffer by one ``torch.cat`` and normed at once (the route before round 24);
* ``apart`` — each small tensor's pieces normed where it lies (``functional._PiecePlan``: at most
  eight norms);
* ``in the backward`` — the large tensors' pieces normed by a hook as each ``.grad`` is
  accumulated (``register_post_accumulate_grad_hook``), the small ones after the backward;
* ``after the optimizer step`` — ``apart``, after ``optimizer.step()`` instead of before.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import describe_machine_md, load_average, machine_description, median_ci  # noqa: E402

VARIANTS = ("plain", "gather", "apart", "in the backward", "after the optimizer step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="rounds (one step of every variant each)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import torch.nn.functional as F

    from genbounds.estimators import functional
    from genbounds.estimators.piece_blocks import PieceBlocks
    from overhead_dispersion import raw_mlp
    from step_ablation import ablation_switch

    batches, model, opt = raw_mlp()
    params = [p for p in model.parameters() if p.requires_grad]
    plan = functional.piece_plan([torch.zeros_like(p) for p in params])
    assert plan is not None and plan.apart is not None, "the MLP's small tensors take at most eight norms"
    gather = ablation_switch("gather")  # (the small tensors gathered first, or normed where they lie)
    blocks = PieceBlocks(plan.layout)
    row = torch.zeros(blocks.width)
    views = blocks.views_of(row)
    in_backward = [False]
    big = {i: (j, k) for j, (i, k) in enumerate(plan.split)}

    def grad_ready(i: int, p: torch.Tensor) -> None:
        if in_backward[0]:
            j, k = big[i]
            torch.linalg.vector_norm(p.grad.view(k, 1024), dim=1, out=views[0][j])

    for i in big:
        params[i].register_post_accumulate_grad_hook(lambda p, i=i: grad_ready(i, p))

    def step(i: int, variant: str) -> float:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        gather(variant == "gather")
        in_backward[0] = variant == "in the backward"
        started = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad for p in params]
        if variant in ("gather", "apart"):
            plan.norms_into(grads, *views)
        elif variant == "in the backward":  # (the small tensors' pieces only)
            functional._apart_into([grads[i] for i in plan.gathered], plan.apart, views[2])
        opt.step()
        if variant == "after the optimizer step":
            plan.norms_into(grads, *views)
        return time.perf_counter() - started

    info, loads = machine_description(), [load_average()]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.steps):
        k = r % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:
            times[variant].append(step(r, variant))
    gather(False)  # (the kept plan as it was: the process's later steps use it)
    loads.append(load_average())
    skip = args.steps // 10
    plain = times["plain"][skip:]
    lines = [f"### The gradient's piece norms inside the MLP's training step ({args.steps} rounds, "
             "one step of each variant a round, the order rotating)", "", describe_machine_md(info, loads), "",
             "| variant | step (µs, median) | extra over plain (µs): median of per-round differences [95 % CI] |",
             "|---|---:|---:|"]
    for variant in VARIANTS:
        mine = times[variant][skip:]
        if variant == "plain":
            lines.append(f"| plain training | {1e6 * statistics.median(mine):.0f} | – |")
            continue
        diffs = [1e6 * (a - b) for a, b in zip(mine, plain)]
        lo, hi, _ = median_ci(diffs)
        lines.append(f"| {variant} | {1e6 * statistics.median(mine):.0f} | "
                     f"{statistics.median(diffs):+.0f} [{lo:+.0f}, {hi:+.0f}] |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
