"""Where a measured step's extra time goes on the MLP, phase by phase, in a hand-written loop.

    OMP_NUM_THREADS=1 python benchmarks/hook_split.py              # about 1 min
    OMP_NUM_THREADS=1 python benchmarks/hook_split.py --steps 3000

The MLP 784-512-512-10 at batch 128 of ``overhead_dispersion.py``, two copies (same weights): one
plain, one with ``GhostNormHooks`` attached, each stepped by ``overhead_dispersion.raw_step`` — what
``GradientDispersion`` does on a measured step, less Lightning: arming, the forward, the backward,
reading the hooks' per-module sums (``read_sums``), the gradient's per-layer squared norms
(``grouped_sq_norms``, the ``‖ḡ_k‖²`` of the per-step path), the logged row (``dispersion_row``),
the SGD step. Their steps alternate in one process (so the machine's slow states hit both alike),
each phase timed by ``raw_step``'s marks. Medians over the steps after the first tenth. Then the
same small ops timed alone (hot caches, many repetitions): the inputs' row norms ``‖a_i‖²`` (taken
in the backward hooks) and the gradient's piece norms — the difference is what the training step's cold
caches add. Last, the forward alone three ways, in turn with the order rotating: plain, under a
no-op global forward hook (PyTorch's hook dispatch alone), and with the hooks armed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import alone_us, describe_machine_md, load_average, machine_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps of each model (alternating)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import copy

    from genbounds.estimators.functional import grouped_sq_norms, squared_pieces
    from genbounds.estimators.ghost_norms import GhostNormHooks
    from overhead_dispersion import SPECS, raw_step

    spec = SPECS["mlp"]
    torch.manual_seed(0)
    base = spec.build()
    batches = spec.batches()
    hooked = copy.deepcopy(base)
    marks: dict[str, list[tuple[str, float]]] = {"plain": [], "hooks": []}
    steps = {"plain": raw_step(base, batches, False, GhostNormHooks, marks["plain"]),
             "hooks": raw_step(hooked, batches, True, GhostNormHooks, marks["hooks"])}
    phases = ("arm", "forward", "backward", "read sums", "‖ḡ_k‖²", "row", "optimizer step")
    got: dict[str, dict[str, list[float]]] = {side: {k: [] for k in phases} for side in steps}

    loads = [load_average()]
    for i in range(2 * args.steps):
        side = ("plain", "hooks")[i % 2]
        marks[side].clear()
        steps[side](i // 2)
        for (_, t0), (phase, t1) in zip(marks[side], marks[side][1:]):
            got[side][phase].append(t1 - t0)
    loads.append(load_average())
    skip = args.steps // 10

    def med(v: list[float]) -> float:
        return statistics.median(v[skip:]) * 1e6 if v else 0.0

    print(f"### A measured step's phases on the MLP (raw loop, {args.steps} steps each, alternating)\n")
    print(describe_machine_md(machine_description(), loads) + "\n")
    print("| phase | plain (µs) | with the hooks (µs) | extra (µs) |")
    print("|---|---:|---:|---:|")
    total = 0.0
    for name in phases:
        p, h = med(got["plain"][name]), med(got["hooks"][name])
        total += h - p
        print(f"| {name} | {p:.0f} | {h:.0f} | {h - p:+.0f} |")
    plain_total = sum(med(got["plain"][name]) for name in phases)
    print(f"| **sum of the medians** | {plain_total:.0f} | – | **{total:+.0f}** |")

    params = list(hooked.parameters())
    groups = [[0, 1], [2, 3], [4, 5]]
    grads = [p.grad for p in params]
    b = batches[0][0].shape[0]
    inputs = [torch.randn(b, 784), torch.randn(b, 512), torch.randn(b, 512)]
    rows = sum(alone_us(lambda t=t: torch.linalg.vector_norm(t, dim=-1).square_()) for t in inputs)
    print("\nThe same small ops timed alone (hot caches):\n")
    print(f"* the three inputs' row norms (‖a_i‖², taken in the backward hooks): {rows:.0f} µs")
    pieces = alone_us(lambda: squared_pieces(grads))
    print(f"* the gradient's piece norms (`squared_pieces`, inside `‖ḡ_k‖²`): {pieces:.0f} µs")
    print(f"* `grouped_sq_norms` whole: {alone_us(lambda: grouped_sq_norms(grads, groups)):.0f} µs")
    forward_alone(base, batches, args.steps)
    hooks_own_time(base, batches, args.steps)


def forward_alone(model: torch.nn.Module, batches: list, steps: int) -> None:
    """The forward alone, three ways in turn: plain, under a no-op global forward hook (PyTorch's
    hook dispatch for every module of the step), and with the ghost-norm hooks armed (what our
    recording adds; the calls are cleared without a backward)."""
    import copy

    from torch.nn.modules.module import register_module_forward_hook

    from genbounds.estimators.ghost_norms import GhostNormHooks

    hooked = copy.deepcopy(model)
    hooks = GhostNormHooks.for_model(hooked)
    kinds = ("plain", "no-op global forward hook", "ghost-norm hooks armed")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(3 * steps):
        kind = kinds[(i + i // 3) % 3]  # the order rotates from triple to triple
        x = batches[(i // 3) % len(batches)][0]
        handle = register_module_forward_hook(lambda m, a, o: None) if kind == kinds[1] else None
        net = hooked if kind == kinds[2] else model
        if kind == kinds[2]:
            hooks.attach()
            hooks.arm()
        t0 = time.perf_counter()
        out = net(x)
        times[kind].append(time.perf_counter() - t0)
        if handle is not None:
            handle.remove()
        if kind == kinds[2]:
            hooks.clear()
            hooks.unhook()
        del out
    skip = steps // 10
    print(f"\nThe forward alone ({steps} of each, in turn, the order rotating; medians):\n")
    plain = statistics.median(times[kinds[0]][skip:]) * 1e6
    for kind in kinds:
        t = statistics.median(times[kind][skip:]) * 1e6
        print(f"* forward, {kind}: {t:.0f} µs ({t - plain:+.0f})")


def hooks_own_time(model: torch.nn.Module, batches: list, steps: int) -> None:
    """The hooks' own Python, timed inside them (``GhostNormHooks.seconds``, the clock the
    overhead budget charges), in the forward and in the backward of training steps: what the
    phase table's extra is beyond it is PyTorch's dispatch of the hooks and the step's caches."""
    import copy

    import torch.nn.functional as F

    from genbounds.estimators.ghost_norms import GhostNormHooks

    hooked = copy.deepcopy(model)
    hooks = GhostNormHooks.for_model(hooked)
    hooks.attach()
    opt = torch.optim.SGD(hooked.parameters(), lr=0.01)
    forward: list[float] = []
    backward: list[float] = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        hooks.arm()
        s0 = hooks.seconds
        loss = F.cross_entropy(hooked(x), y)
        s1 = hooks.seconds
        loss.backward()
        forward.append(s1 - s0)
        backward.append(hooks.seconds - s1)
        hooks.read_sums()
        opt.step()
    hooks.unhook()
    skip = steps // 10
    fwd, bwd = (statistics.median(v[skip:]) * 1e6 for v in (forward, backward))
    print(f"\nThe hooks' own time, timed inside them ({steps} steps; medians): forward {fwd:.0f} µs, "
          f"backward {bwd:.0f} µs")


if __name__ == "__main__":
    main()
