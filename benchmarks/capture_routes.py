"""How a Linear layer's input and output gradient reach the per-sample norms, and what each way
costs inside a training step: the question of whether a measured step could run with fewer
Python entries than the ghost hooks' (``estimators/ghost_norms/hooks.py``).

    OMP_NUM_THREADS=1 python benchmarks/capture_routes.py              # about 1 min
    OMP_NUM_THREADS=1 python benchmarks/capture_routes.py --rounds 120

The MLP 784-512-512-10 at batch 128 of ``overhead_dispersion.py``, stepped by hand (forward,
mean cross-entropy, backward, SGD step, ``zero_grad(set_to_none=True)``). Three routes to each
``Linear`` product's input ``a`` and output gradient ``δ``, each run with the two row norms
``‖δ_i‖``, ``‖a_i‖`` a layer (what ``GhostNormHooks`` computes there for a 2-D Linear) and with
an empty pre-hook (the route alone):

* ``global hook`` — the ghost hooks' route: one process-wide module forward hook, live from the
  step's forward to its end, that keeps each hooked call's input and puts a pre-hook on its
  output's autograd node (every module call of the forward takes PyTorch's hooked path);
* ``module hooks`` — a forward hook on each Linear only (``prepend=True``), registered for the
  step's forward and removed after it;
* ``graph walk`` — no forward hook: after the forward, one walk of the loss's autograd graph
  finds each ``AddmmBackward0`` whose weight operand is a hooked weight's ``TBackward0``, reads the
  input it saved (``_saved_mat1``) and puts the pre-hook on that node.

Before timing, one step's row norms by the walk are checked equal (``torch.equal``) to the global
hook's. Blocks of 20 steps per route and round, the order rotating; each block's median step,
the first left out; per round each route's block minus the plain block. Reported: the median of
those differences and its distribution-free 95 % interval (``common.median_ci``).

What it cannot show: the walk sees only what the autograd graph holds when the forward ends, so
a segment checkpointed with ``use_reentrant=True`` (its forward runs again inside the backward)
or a compiled region stays opaque to it; the global hook sees those calls. It is a measurement
of the route, not a replacement (docs/results/overhead.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.modules.module import register_module_forward_hook  # noqa: E402

from common import describe_machine_md, load_average, machine_description, median_ci  # noqa: E402

ROUTES = ("global hook", "module hooks", "graph walk")
VARIANTS = ("plain", *ROUTES, *(f"{r}, route only" for r in ROUTES))


class Capture:
    """The row norms of one step's Linear products, by one of :data:`ROUTES`."""

    def __init__(self, linears: list[nn.Linear], batch: int) -> None:
        self.linears = linears
        self.index = {id(m): i for i, m in enumerate(linears)}
        self.weight_index = {id(m.weight): i for i, m in enumerate(linears)}
        self.pairs = torch.zeros(2, len(linears), batch)
        self.g_rows, self.a_rows = self.pairs[0].unbind(0), self.pairs[1].unbind(0)
        self.norms = True
        self.found = 0

    def pre_hook(self, i: int, x: Tensor, grad_outputs: tuple) -> None:
        self.found += 1
        if self.norms:
            torch.linalg.vector_norm(grad_outputs[0], dim=1, out=self.g_rows[i])
            torch.linalg.vector_norm(x, dim=1, out=self.a_rows[i])

    def forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        i = self.index.get(id(module))
        if i is not None and output.grad_fn is not None:
            output.grad_fn.register_prehook(functools.partial(self.pre_hook, i, args[0]))

    def walk(self, loss: Tensor) -> None:
        stack, seen = [loss.grad_fn], set()
        while stack:
            node = stack.pop()
            nexts = node.next_functions
            if type(node).__name__ == "AddmmBackward0":
                t = nexts[2][0]
                if t is not None and type(t).__name__ == "TBackward0":
                    acc = t.next_functions[0][0]
                    i = self.weight_index.get(id(getattr(acc, "variable", None)))
                    if i is not None:
                        node.register_prehook(functools.partial(self.pre_hook, i, node._saved_mat1))
            for fn, _ in nexts:
                if fn is not None and fn not in seen and type(fn).__name__ != "AccumulateGrad":
                    seen.add(fn)
                    stack.append(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--block", type=int, default=20, help="steps per route and round")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import torch.nn.functional as F

    from overhead_dispersion import raw_mlp

    batches, model, opt = raw_mlp()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    cap = Capture(linears, batches[0][0].shape[0])

    def step(i: int, variant: str) -> float:
        x, y = batches[i % len(batches)]
        route = variant.split(",")[0]
        cap.norms = "route only" not in variant
        opt.zero_grad(set_to_none=True)
        started = time.perf_counter()
        handles = []
        if route == "global hook":
            handles = [register_module_forward_hook(cap.forward_hook)]
        elif route == "module hooks":
            handles = [m.register_forward_hook(cap.forward_hook, prepend=True) for m in linears]
        loss = F.cross_entropy(model(x), y)
        for h in handles:
            h.remove()
        if route == "graph walk":
            cap.walk(loss)
        loss.backward()
        opt.step()
        return time.perf_counter() - started

    # the routes find the same products and give the same row norms (same weights: no step in between)
    x, y = batches[0]
    rows = {}
    for route in ("global hook", "graph walk"):
        cap.norms, cap.found = True, 0
        cap.pairs.zero_()
        h = register_module_forward_hook(cap.forward_hook) if route == "global hook" else None
        loss = F.cross_entropy(model(x), y)
        if h is not None:
            h.remove()
        else:
            cap.walk(loss)
        loss.backward()
        assert cap.found == len(linears), (route, cap.found)
        rows[route] = cap.pairs.clone()
    model.zero_grad(set_to_none=True)
    assert torch.equal(rows["global hook"], rows["graph walk"]), "the walk's row norms differ from the hooks'"

    info, loads = machine_description(), [load_average()]
    blocks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    i = 0
    for r in range(args.rounds):
        k = r % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:
            times = []
            for _ in range(args.block):
                times.append(step(i, variant))
                i += 1
            blocks[variant].append(statistics.median(times[1:]))
    loads.append(load_average())
    plain = blocks["plain"]
    lines = [f"### A Linear's input and output gradient, three routes, inside the MLP's training step ({args.rounds} "
             f"rounds of {args.block}-step blocks, the order rotating)", "", describe_machine_md(info, loads), "",
             "The routes' row norms of one step compared before timing: equal (`torch.equal`).", "",
             "| route | step (µs, median of blocks) | extra over plain (µs): median of per-round differences "
             "[95 % CI] |",
             "|---|---:|---:|"]
    for variant in VARIANTS:
        mine = blocks[variant]
        if variant == "plain":
            lines.append(f"| plain training | {1e6 * statistics.median(mine):.0f} | – |")
            continue
        diffs = [1e6 * (a - b) for a, b in zip(mine, plain)]
        lo, hi, _ = median_ci(diffs)
        label = variant if "route only" in variant else f"{variant}, with the row norms"
        lines.append(f"| {label} | {1e6 * statistics.median(mine):.0f} | "
                     f"{statistics.median(diffs):+.0f} [{lo:+.0f}, {hi:+.0f}] |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
