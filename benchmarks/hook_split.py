"""Where a measured step's extra time goes on the MLP, phase by phase, in a hand-written loop.

    OMP_NUM_THREADS=1 python benchmarks/hook_split.py              # about 1 min
    OMP_NUM_THREADS=1 python benchmarks/hook_split.py --steps 3000

The MLP 784-512-512-10 at batch 128 of ``overhead_dispersion.py``, two copies (same seed): one
plain, one with ``GhostNormHooks`` attached; their steps alternate in one process (so the
machine's slow states hit both alike). Each step is timed in phases with ``time.perf_counter``:
arming, the forward, the backward, reading the hooks' per-module sums (``read_sums``), the
gradient's per-layer squared norms (``grouped_sq_norms``, the ``‖ḡ_k‖²`` of the per-step path) and
the logged row (``dispersion_row``) — what ``GradientDispersion`` does on a measured step, less
Lightning. Medians over the steps after the first tenth. Then the same small ops timed alone (hot
caches, many repetitions): the inputs' row norms the forward hooks take and the gradient's piece
norms — the difference is what the training step's cold caches add.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import describe_machine_md, load_average, machine_description  # noqa: E402


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _alone(fn, reps: int = 300) -> float:
    """Median µs of ``fn`` over 7 blocks of ``reps`` calls (after a warm-up)."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps of each model (alternating)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from genbounds.estimators.functional import grouped_sq_norms, squared_pieces
    from genbounds.estimators.ghost_norms import GhostNormHooks
    from genbounds.estimators.gradient_dispersion import dispersion_row

    b = 128
    torch.manual_seed(1)
    x, y = torch.randn(b, 784), torch.randint(0, 10, (b,))
    plain, hooked = _mlp(), _mlp()
    hooks = GhostNormHooks.for_model(hooked)
    hooks.attach()
    params = list(hooked.parameters())
    groups = [[0, 1], [2, 3], [4, 5]]
    to_group = torch.eye(3, dtype=torch.float64)
    phases = ("arm", "forward", "backward", "read sums", "‖ḡ_k‖²", "row")
    got: dict[str, list[float]] = {k: [] for k in phases}
    base: dict[str, list[float]] = {"forward": [], "backward": []}

    loads = [load_average()]
    for i in range(2 * args.steps):
        if i % 2 == 0:
            plain.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.cross_entropy(plain(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            base["forward"].append(t1 - t0)
            base["backward"].append(t2 - t1)
            continue
        hooked.zero_grad(set_to_none=True)
        t = [time.perf_counter()]
        hooks.arm()
        t.append(time.perf_counter())
        loss = F.cross_entropy(hooked(x), y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        sums = to_group @ hooks.read_sums(scale=b)
        t.append(time.perf_counter())
        mean_sq = grouped_sq_norms([p.grad for p in params], groups)
        t.append(time.perf_counter())
        dispersion_row(sums, mean_sq[:-1], b, b)
        t.append(time.perf_counter())
        for k, name in enumerate(phases):
            got[name].append(t[k + 1] - t[k])

    loads.append(load_average())
    skip = args.steps // 10

    def med(v: list[float]) -> float:
        return statistics.median(v[skip:]) * 1e6

    print(f"### A measured step's phases on the MLP (raw loop, {args.steps} steps each, alternating)\n")
    print(describe_machine_md(machine_description(), loads) + "\n")
    print("| phase | plain (µs) | with the hooks (µs) | extra (µs) |")
    print("|---|---:|---:|---:|")
    total = 0.0
    for name in phases:
        p = med(base[name]) if name in base else 0.0
        h = med(got[name])
        total += h - p
        print(f"| {name} | {p:.0f} | {h:.0f} | {h - p:+.0f} |")
    print(f"| **sum of the medians** | {med(base['forward']) + med(base['backward']):.0f} | – | **{total:+.0f}** |")

    grads = [p.grad for p in params]
    inputs = [torch.randn(b, 784), torch.randn(b, 512), torch.randn(b, 512)]
    rows = sum(_alone(lambda t=t: torch.linalg.vector_norm(t, dim=-1).square_()) for t in inputs)
    print("\nThe same small ops timed alone (hot caches):\n")
    print(f"* the three inputs' row norms (the forward hooks' arithmetic): {rows:.0f} µs")
    print(f"* the gradient's piece norms (`squared_pieces`, inside `‖ḡ_k‖²`): {_alone(lambda: squared_pieces(grads)):.0f} µs")
    print(f"* `grouped_sq_norms` whole: {_alone(lambda: grouped_sq_norms(grads, groups)):.0f} µs")


if __name__ == "__main__":
    main()
