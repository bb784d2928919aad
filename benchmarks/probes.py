"""Probe costs, as ratios measured in the same run.

    python benchmarks/probes.py                  # CPU models; the CUDA model too when available
    python benchmarks/probes.py --out bench_out/probes.md

1. **Hessian-vector products**: time per product for double backward one vector at a time,
   double backward on a block of vectors (``is_grads_batched``), and forward-over-reverse
   (``torch.func.jvp`` of ``grad``) on a block.
2. **Hessian trace to 5 % relative standard error**, ours vs PyHessian 0.1, same model, same
   batch: ours runs ``hutchinson_trace(rel_tol=0.05)``; PyHessian runs ``trace(maxIter=n, tol=0)``
   with ``n`` the number of samples the same 5 % needs (from the variance of our samples — both use
   Rademacher probes, so the variance per sample is the same). Both timed end to end, including
   PyHessian's own set-up pass.
3. **Flatness**: ``gaussian_flatness`` with 32 draws × 3 σ × train+held-out sets, vectorized over
   8 draws per pass vs one draw at a time.

CPU: the digits MLP (64-512-10, batch 256) and the FashionMNIST CNN (batch 64, random data).
CUDA: a ResNet-18-sized network (11.2 M parameters) on random 32×32 data, batch 128.
Every timing is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from common import ResNet18NoBN, emit_report  # noqa: E402

from genbounds.callbacks.hessian_trace import pyhessian_trace  # noqa: E402
from genbounds.estimators.flatness import gaussian_flatness  # noqa: E402
from genbounds.estimators.hessian_trace import hutchinson_trace  # noqa: E402
from genbounds.estimators.hessian_vector_product import LossHessian, rademacher_like  # noqa: E402
from genbounds.models import MLP, FashionCNN  # noqa: E402


def ce(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_model(name: str, model: nn.Module, batch, device: torch.device, repeats: int) -> list[str]:
    model = model.to(device).eval()
    batch = tuple(t.to(device) for t in batch)
    lines = [f"### {name}", ""]
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(0)
    block = 10

    # 1. HVP methods ------------------------------------------------------------------------
    rev = LossHessian(model, ce, batch, method="reverse", vectorize=True)
    rev.hvp([t[0] for t in rademacher_like(params, 1, gen)])  # build the graph once
    vs = rademacher_like(params, block, gen)
    one = best_time(lambda: [rev.hvp([t[j] for t in vs]) for j in range(block)], device, repeats) / block
    batched = best_time(lambda: rev.hvp_batched(vs), device, repeats) / block
    fwd = LossHessian(model, ce, batch, method="forward", vectorize=True)
    try:
        forward = best_time(lambda: fwd.hvp_batched(vs), device, repeats) / block
    except Exception as err:  # noqa: BLE001 - some layers lack forward-mode AD
        forward = math.nan
        lines.append(f"(forward-over-reverse failed: {type(err).__name__})")
    lines += ["| HVP method | ms per product | ratio to double backward, one at a time |", "|---|---:|---:|"]
    for label, t in (("double backward, one vector at a time", one), (f"double backward, block of {block}", batched),
                     (f"forward-over-reverse (vmap), block of {block}", forward)):
        lines.append(f"| {label} | {1000 * t:.2f} | {t / one:.2f} |")
    rev.release()

    # 2. trace to 5 % relative SE -----------------------------------------------------------
    trace_block = 1 if device.type == "cpu" else block  # HessianTrace's device default
    def ours() -> object:
        op = LossHessian(model, ce, batch, method="reverse")
        est = hutchinson_trace(op, torch.Generator(device=device).manual_seed(1), rel_tol=0.05, min_probes=10,
                               max_probes=20000, block_size=trace_block)
        op.release()
        return est

    est = ours()
    t_ours = best_time(ours, device, repeats)
    sd = float(est.samples.std())
    needed = max(2, math.ceil((sd / (0.05 * abs(est.value))) ** 2))
    torch.manual_seed(0)
    t_pyh = best_time(lambda: pyhessian_trace(model, ce, batch, needed, 0.0), device, repeats)
    lines += ["", f"Trace to 5 % relative SE: Tr H ≈ {est.value:.4g} ± {est.standard_error:.2g} "
              f"({est.num_probes} Rademacher samples; PyHessian given the {needed} samples the same 5 % needs).", "",
              "| trace | wall time (s) | speed-up over PyHessian |", "|---|---:|---:|",
              f"| PyHessian 0.1 `trace(maxIter={needed}, tol=0)` | {t_pyh:.3f} | 1.00 |",
              f"| genbounds `hutchinson_trace(rel_tol=0.05)`, blocks of {trace_block} | {t_ours:.3f} | {t_pyh / t_ours:.2f} |"]

    # 3. flatness: vmapped vs sequential ---------------------------------------------------
    half = batch[0].shape[0] // 2
    train_b, held_b = (batch[0][:half], batch[1][:half]), (batch[0][half:], batch[1][half:])
    sigmas = [1e-3, 1e-2, 1e-1]

    def flat(per_pass: int) -> Callable[[], object]:
        return lambda: gaussian_flatness(model, ce, train_b, sigmas, 32, torch.Generator(device=device).manual_seed(2),
                                         heldout_batch=held_b, draws_per_pass=per_pass)

    t_seq = best_time(flat(1), device, repeats)
    t_vec = best_time(flat(8), device, repeats)
    lines += ["", "| flatness (32 draws × 3 σ × 2 sets, antithetic) | wall time (s) | speed-up |", "|---|---:|---:|",
              f"| sequential (1 draw per pass) | {t_seq:.3f} | 1.00 |",
              f"| vmapped (8 draws per pass) | {t_vec:.3f} | {t_seq / t_vec:.2f} |", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    lines = [f"CPU: {torch.get_num_threads()} threads. Best of {args.repeats} runs per timing.", ""]
    torch.manual_seed(0)
    lines += bench_model("CPU — digits MLP 64-512-10, batch 256", MLP(64, 10, 512),
                         (torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)), cpu, args.repeats)
    torch.manual_seed(0)
    lines += bench_model("CPU — FashionMNIST CNN, batch 64", FashionCNN(),
                         (torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)), cpu,
                         args.repeats)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        torch.manual_seed(0)
        lines += bench_model(f"CUDA ({torch.cuda.get_device_name(dev)}) — ResNet-18-sized, batch 128", ResNet18NoBN(),
                             (torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)), dev,
                             args.repeats)
    else:
        lines.append("(CUDA not available on this machine: CUDA rows not measured.)")
    emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
