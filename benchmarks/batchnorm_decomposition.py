"""How wrong is the gradient dispersion under train-mode BatchNorm, per estimator?

    python benchmarks/batchnorm_decomposition.py                  # 3 training points
    python benchmarks/batchnorm_decomposition.py --steps 0,50,500 --truth-batches 400 --out bench_out/bn.md

Under train-mode BatchNorm the samples of a batch are coupled (each is normalized with the batch's
statistics), so "the gradient of sample i" is undefined and every dispersion estimator is an
approximation of something.  This script measures, on a small ResNet-style network with
BatchNorm trained by plain SGD on scikit-learn's 8×8 digits (all 1,797 images, batch b = 32), at
a few points of training:

* **(o) hooks decomposition** — what ``GradientDispersion(backend="auto")`` logs for this model
  (the ghost-norm hooks): ``s²/b`` from the per-sample terms ``g̃_i`` of the batch gradient's exact
  split ``ḡ_B = mean_i g̃_i`` (batch statistics as computed on ``B``), in train mode;
* **(i) eval-mode exact** — the exact per-sample ``s²/b`` of the same weights in eval mode (running
  statistics: per-sample gradients are defined; the hooks are exact there);
* **(ii) micro-batch chunks, k = 4 and k = 8** — SPEC §1's chunk estimator in train mode (each
  chunk normalized with its own statistics), averaged over ``--chunkings`` random chunkings of
  each batch;
* **(iv) paired batches** — ``½‖ḡ_B − ḡ_B'‖²`` for two independent batches at the same weights
  (one extra train-mode forward/backward per measured step): unbiased for (iii) by construction;
  the table gives its spread per pair, i.e. how noisy a per-step log of it would be;
* **(iii) truth** — ``Tr Cov_B(ḡ_B)`` of the train-mode mini-batch gradient over the draw of
  ``B`` (b samples without replacement), from ``--truth-batches`` independent batches (an unbiased
  U-statistic, jackknife SE) — the quantity the bounds want.  The same in eval mode is a control:
  (i) must match it.

Estimators (o)–(ii) are averaged over ``--batches`` other random batches (mean ± SE over batches).
Per-sample estimators target ``Tr Σ/b`` with the population covariance of the n samples; batches
drawn without replacement have ``Tr Cov(ḡ_B) = (n−b)/(n−1)·σ²/b`` while ``E[s²/b] = n/(n−1)·σ²/b``,
so each estimate is multiplied by ``(n−b)/n`` before it is compared with the truth (the README's
``n/(n−b)`` caveat; 0.982 here).  Measurements never change the weights or the BatchNorm running
statistics (a copy with ``momentum=0`` is measured).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from common import describe_machine_md, emit_report, load_average, machine_description  # noqa: E402


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:  # no in-place ops (the hooks keep layer inputs)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """conv3×3(16)-BN-ReLU, a 16-channel block, a 32-channel stride-2 block, global average
    pooling, Linear(32, 10): 24 k parameters, BatchNorm after every convolution."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target, dtype=torch.long)


def per_sample_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


def frozen_copy(model: nn.Module, train: bool) -> nn.Module:
    """A copy to measure: BatchNorm momentum 0 (running statistics never move), mode as asked."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = 0.0
    return m.train(train)


def batch_gradient(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(per_sample_loss(model, batch).mean(), params)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def truth(model: nn.Module, x: Tensor, y: Tensor, b: int, count: int, gen: torch.Generator
          ) -> tuple[tuple[float, float], tuple[float, float, float]]:
    """Tr Cov_B(ḡ_B) over batches of b drawn without replacement: the unbiased U-statistic
    ``1/(N−1) Σ_j ‖ḡ_j − mean‖²`` of N independent batch gradients, jackknife SE; and the
    paired-batch estimate ``½‖ḡ_{2j} − ḡ_{2j+1}‖²`` of disjoint pairs (what one extra batch per
    measured step gives): its mean ± SE and its relative standard deviation per pair."""
    n = x.shape[0]
    g = torch.stack([batch_gradient(model, (x[idx], y[idx]))
                     for idx in (torch.randperm(n, generator=gen)[:b] for _ in range(count))])
    k = g @ g.T
    N = count
    tr, tot, rows = k.diagonal().sum(), k.sum(), k.sum(1)
    est = (tr - tot / N) / (N - 1)
    # leave-one-out: drop row/column j
    tr_j = tr - k.diagonal()
    tot_j = tot - 2 * rows + k.diagonal()
    loo = (tr_j - tot_j / (N - 1)) / (N - 2)
    se = math.sqrt((N - 1) / N * float(((loo - loo.mean()) ** 2).sum()))
    pairs = 0.5 * ((g[0:N - 1:2] - g[1:N:2]) ** 2).sum(1)
    pm, psd = float(pairs.mean()), float(pairs.std())
    return (float(est), se), (pm, psd / math.sqrt(pairs.numel()), psd / pm)


def hooks_dispersion(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[float, bool]:
    """``s²/b`` from the ghost-norm hooks in the model's current mode (what the hooks backend of
    ``GradientDispersion`` computes: ``(Σ_i ‖g̃_i‖² − b‖ḡ‖²) / ((b − 1) b)``)."""
    from genbounds.estimators.functional import per_tensor_sq_norms
    from genbounds.estimators.ghost_norms import GhostNormHooks
    from genbounds.estimators.gradient_dispersion import GradientMoments, dispersion_from_moments

    params = [p for p in model.parameters() if p.requires_grad]
    hooks = GhostNormHooks.for_model(model)
    hooks.arm()
    try:
        b = batch[0].shape[0]
        grads = torch.autograd.grad(per_sample_loss(model, batch).mean(), params)
        norms = hooks.read(scale=b)
    finally:
        hooks.detach()
    assert norms is not None
    est = dispersion_from_moments(GradientMoments(norms.total.sum(), b, b), per_tensor_sq_norms(list(grads)).sum())
    return float(est.dispersion), norms.exact


def functorch_dispersion(model: nn.Module, batch: tuple[Tensor, Tensor]) -> float:
    """Exact per-sample ``s²/b`` by ``torch.func`` (eval mode only): a cross-check of (i)."""
    from genbounds.estimators.gradient_dispersion import dispersion_from_moments
    from genbounds.estimators.per_sample_gradients import per_sample_gradient_moments

    return float(dispersion_from_moments(per_sample_gradient_moments(model, per_sample_loss, batch, method="vmap")).dispersion)


def microbatch_dispersion(model: nn.Module, batch: tuple[Tensor, Tensor], k: int, chunkings: int,
                          gen: torch.Generator) -> float:
    from genbounds.estimators.gradient_dispersion import dispersion_from_moments
    from genbounds.estimators.microbatch_gradients import microbatch_gradient_moments

    vals = [float(dispersion_from_moments(microbatch_gradient_moments(model, per_sample_loss, batch, k,
                                                                      generator=gen)).dispersion)
            for _ in range(chunkings)]
    return sum(vals) / len(vals)


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def measure_point(model: nn.Module, x: Tensor, y: Tensor, b: int, args: argparse.Namespace, seed: int) -> dict:
    n = x.shape[0]
    fpc = (n - b) / n
    gen = torch.Generator().manual_seed(seed)
    train_m, eval_m = frozen_copy(model, True), frozen_copy(model, False)
    out: dict = {}
    t0 = time.perf_counter()
    out["truth_train"], out["paired"] = truth(train_m, x, y, b, args.truth_batches, gen)
    out["truth_eval"], _ = truth(eval_m, x, y, b, args.truth_batches, gen)
    est: dict[str, list[float]] = {"hooks": [], "eval": [], "mb4": [], "mb8": []}
    exact_flags = set()
    for _ in range(args.batches):
        idx = torch.randperm(n, generator=gen)[:b]
        batch = (x[idx], y[idx])
        v, exact = hooks_dispersion(train_m, batch)
        est["hooks"].append(v * fpc)
        exact_flags.add(exact)
        est["eval"].append(hooks_dispersion(eval_m, batch)[0] * fpc)
        est["mb4"].append(microbatch_dispersion(train_m, batch, 4, args.chunkings, gen) * fpc)
        est["mb8"].append(microbatch_dispersion(train_m, batch, 8, args.chunkings, gen) * fpc)
    idx = torch.randperm(n, generator=gen)[:b]
    check = (x[idx], y[idx])
    out["eval_crosscheck"] = (hooks_dispersion(eval_m, check)[0], functorch_dispersion(eval_m, check))
    out["hooks_marked_exact"] = sorted(exact_flags)
    for name, vals in est.items():
        out[name] = mean_se(vals)
    out["seconds"] = time.perf_counter() - t0
    return out


def ratio(a: tuple[float, float], t: tuple[float, float]) -> tuple[float, float]:
    r = a[0] / t[0]
    return r, abs(r) * math.sqrt((a[1] / a[0]) ** 2 + (t[1] / t[0]) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="0,50,500", help="SGD steps at which to measure (comma-separated)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batches", type=int, default=200, help="batches the estimators are averaged over")
    parser.add_argument("--chunkings", type=int, default=5, help="random chunkings per batch (micro-batch)")
    parser.add_argument("--truth-batches", type=int, default=400, help="independent batches for the truth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x, y = digits()
    n, b = x.shape[0], args.batch
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    points = sorted(int(s) for s in args.steps.split(","))
    gen = torch.Generator().manual_seed(args.seed + 1)
    info = machine_description()
    loads = [load_average()]
    results = {}
    step = 0
    for target in points:
        model.train()
        while step < target:  # plain SGD, train-mode BatchNorm (running statistics updated)
            idx = torch.randperm(n, generator=gen)[:b]
            opt.zero_grad(set_to_none=True)
            per_sample_loss(model, (x[idx], y[idx])).mean().backward()
            opt.step()
            step += 1
        with torch.no_grad():
            model.eval()
            acc = float((model(x).argmax(1) == y).float().mean())
            model.train()
        results[target] = measure_point(model, x, y, b, args, seed=args.seed + 100 + target)
        results[target]["train_acc_eval_mode"] = acc
        loads.append(load_average())
        r = results[target]
        print(f"[step {target}] truth(train) {r['truth_train'][0]:.4g} ± {r['truth_train'][1]:.2g}  hooks "
              f"{r['hooks'][0]:.4g}  eval {r['eval'][0]:.4g}  mb4 {r['mb4'][0]:.4g}  mb8 {r['mb8'][0]:.4g}  "
              f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)

    lines = [f"### Dispersion under train-mode BatchNorm: estimators vs the truth (SmallResNet, digits n = {n}, b = {b})",
             "", describe_machine_md(info, loads), "",
             f"Estimators: mean ± SE over {args.batches} random batches (micro-batch: {args.chunkings} random chunkings "
             f"per batch), each × (n−b)/n = {(n - b) / n:.4f}; truth: {args.truth_batches} independent batches, "
             "jackknife SE. Error = estimate / truth(train) − 1 (± SE of the ratio).", "",
             "| SGD steps | accuracy (eval mode, all n) | truth: Tr Cov_B(ḡ_B), train mode | control: same, eval mode | "
             "(o) hooks decomposition (train) | (i) exact per-sample, eval mode | (ii) micro-batch k=4 (train) | "
             "(ii) micro-batch k=8 (train) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    paired_lines = ["| SGD steps | truth (U-statistic) | paired batches ½‖ḡ_B − ḡ_B'‖²: mean ± SE | error vs truth | "
                    "relative SD of one pair |", "|---:|---:|---:|---:|---:|"]
    for s, r in results.items():
        t = r["truth_train"]
        cells = [f"{s}", f"{r['train_acc_eval_mode']:.3f}", f"{t[0]:.4g} ± {t[1]:.2g}",
                 f"{r['truth_eval'][0]:.4g} ± {r['truth_eval'][1]:.2g}"]
        for key in ("hooks", "eval", "mb4", "mb8"):
            v = r[key]
            q, qse = ratio(v, t)
            cells.append(f"{v[0]:.4g} ± {v[1]:.2g} ({100 * (q - 1):+.1f} % ± {100 * qse:.1f})")
        lines.append("| " + " | ".join(cells) + " |")
        pm, pse, pcv = r["paired"]
        paired_lines.append(f"| {s} | {t[0]:.4g} ± {t[1]:.2g} | {pm:.4g} ± {pse:.2g} | {100 * (pm / t[0] - 1):+.1f} % | "
                            f"{pcv:.2f} |")
    lines += ["", "Control (eval mode, where per-sample gradients exist): (i) vs the eval-mode truth — "
              + "; ".join(f"step {s}: {100 * (ratio(r['eval'], r['truth_eval'])[0] - 1):+.1f} % ± "
                          f"{100 * ratio(r['eval'], r['truth_eval'])[1]:.1f}" for s, r in results.items())
              + ". Hooks vs torch.func on one eval-mode batch (unscaled s²/b): "
              + "; ".join(f"step {s}: {r['eval_crosscheck'][0]:.6g} vs {r['eval_crosscheck'][1]:.6g}"
                          for s, r in results.items())
              + ". The hooks marked the train-mode values "
              + ", ".join(sorted({('exact' if e else 'decomposition') for r in results.values()
                                  for e in r['hooks_marked_exact']})) + "."]
    lines += ["", "(iv) Paired batches — a second independent batch at the same weights, train mode (one extra "
              "forward and backward per measured step): unbiased for the truth by construction; the same batches "
              "as the truth, in disjoint pairs (not independent of the truth column).", "", *paired_lines]
    emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
