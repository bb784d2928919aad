"""How close the MLP's measured step is to what its arithmetic costs: the kernels alone, their
alternatives, and where Lightning spends the rest.

    OMP_NUM_THREADS=1 python benchmarks/kernel_floor.py              # about 2 min
    OMP_NUM_THREADS=1 python benchmarks/kernel_floor.py --steps 200  # shorter
    OMP_NUM_THREADS=1 python benchmarks/kernel_floor.py --compile    # also the read compiled (torch.compile)

``GradientDispersion()`` every step on the MLP 784-512-512-10 at batch 128 (the model of
``overhead_dispersion.py``) adds two kinds of work to a step: the per-sample norms of each layer
(Goodfellow's ``‖δ_i‖²·‖a_i‖² + ‖δ_i‖²``, read off the layer's input and output gradient) and
``‖ḡ_k‖²``, the squared norm of each layer's batch gradient (one read of ``.grad``: 0.67 M values).
Neither can be skipped: the dispersion is ``mean_i ‖g_i‖² − ‖ḡ‖²`` up to ``b/(b−1)``, and the
cross terms ``Σ_{i≠j} ⟨g_i, g_j⟩`` inside ``‖ḡ‖²`` need the summed gradient (from per-sample
factors they cost ``b²·(d_in + d_out)`` per layer, 19 M multiply-adds here: more than the read).

1. **The kernels alone** (hot caches, many repetitions): each route to a layer's squared row
   norms and to ``‖ḡ‖²``, with its time and its largest relative error against float64. The
   routes the hooks take are marked; a faster route that is less exact than ours (≲ 3e-7) is
   shown with its error, not taken.
2. **Inside a step** (a hand-written loop, the sides alternating): ``‖ḡ_k‖²`` taken after the
   backward, as the callback does, against the same norms taken in each parameter's
   post-accumulate-grad hook, while the backward has just written the gradient, taken after the
   optimizer step, which has just read it, and against one fp32 multi-tensor norm of the gradient
   (the fastest route, not taken: it is off by ~3e-6, and SPEC sums squares in float64); then the reads
   alone, right after the backward and at once again: the per-sample norms' inputs and output
   gradients, and the gradient. What a first read pays beyond the second is the memory system's:
   after the backward's matrix kernels the data is not where the kernel alone finds it.
3. **Lightning's own profiler** (``SimpleProfiler``), in one fit whose dispersion measures
   alternate blocks of steps: the median time of each action of a step, measured and unmeasured
   steps apart, and the difference. The callback's own hooks are there, next to what the forward
   and backward gained (both sides in one process: a slow state of it hits both).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import alone_us, describe_machine_md, load_average, machine_description, sample_loader  # noqa: E402

LAYERS = ((784, 512), (512, 512), (512, 10))
"""The MLP's Linear layers ``(d_in, d_out)``."""


def max_rel_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((got.double() - exact).abs() / exact.abs()).max())


def row_norm_routes() -> dict:
    """Routes to ``[b, d] → [b]`` squared row norms (the hooks' ``_rowsq`` first)."""
    from genbounds.estimators.ghost_norms.base import _rowsq

    return {
        "`_rowsq` (ours: `vector_norm(dim=-1).square_()`, `vecdot` under 64 columns)": _rowsq,
        "`linalg.vecdot(t, t)`": lambda t: torch.linalg.vecdot(t, t),
        "`t.square().sum(1)`": lambda t: t.square().sum(1),
        "`einsum('ij,ij->i')`": lambda t: torch.einsum("ij,ij->i", t, t),
    }


def _float64_sq_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.double().square().sum() for t in tensors]).sum()


_COMPILED: list = []
"""``torch.compile`` of :func:`_float64_sq_sum`, once (``--compile``)."""


def compiled_sq_sum():
    if not _COMPILED:
        _COMPILED.append(torch.compile(_float64_sq_sum, dynamic=False))
    return _COMPILED[0]


def grad_norm_routes(compiled: bool = False) -> dict:
    """Routes to ``‖ḡ‖²`` over a list of fp32 tensors (ours first; with ``compiled``, also the
    float64 squared sums compiled by ``torch.compile`` into one call)."""
    from genbounds.estimators.functional import squared_pieces

    extra = {"`torch.compile` of the float64 squared sums (one call)": compiled_sq_sum()} if compiled else {}
    return {
        "`squared_pieces` (ours: fp32 norms of 1,024-value pieces, squared and summed in float64)":
            lambda ts: squared_pieces(ts)[0].sum(),
        "`_foreach_norm`, fp32": lambda ts: torch.stack(torch._foreach_norm(ts)).double().square().sum(),
        "`_foreach_norm`, float64": lambda ts: torch.stack(torch._foreach_norm(ts, dtype=torch.float64)).square().sum(),
        "`dot` per tensor": lambda ts: sum(torch.dot(t.reshape(-1), t.reshape(-1)).double() for t in ts),
        "`square().sum(dtype=float64)` per tensor": lambda ts: sum(t.square().sum(dtype=torch.float64) for t in ts),
    } | extra


def kernels_alone(reps: int, compiled: bool = False) -> str:
    from genbounds.estimators.ghost_norms.linear import _LinearKind

    torch.manual_seed(0)
    b = 128
    lines = ["### 1. The kernels alone (hot caches; median µs of a call, largest relative error against float64)\n",
             "Per-sample norms, per layer of the MLP (`[128, d]` inputs `a` and output gradients `δ`):\n",
             "| route | " + " | ".join(f"`a` {d_in}, `δ` {d_out}" for d_in, d_out in LAYERS) + " |",
             "|---|" + "---:|" * len(LAYERS)]
    tensors = [(torch.randn(b, d_in), torch.randn(b, d_out)) for d_in, d_out in LAYERS]
    for name, fn in row_norm_routes().items():
        cells = []
        for a, d in tensors:
            us = alone_us(lambda: (fn(a), fn(d)), reps)
            err = max(max_rel_error(fn(t), t.double().square().sum(1)) for t in (a, d))
            cells.append(f"{us:.1f} µs ({err:.1e})")
        lines.append(f"| {name}, both | " + " | ".join(cells) + " |")
    kind = _LinearKind()
    row = torch.zeros(b)
    cells = []
    for (d_in, d_out), (a, d) in zip(LAYERS, tensors):
        layer = torch.nn.Linear(d_in, d_out)
        cells.append(f"{alone_us(lambda: kind.single(layer, a, d, True, True, None, out=row), reps):.1f} µs")
    lines.append("| the hooks' whole per-layer rule (`_LinearKind.single`: both norms and the product into the row) | "
                 + " | ".join(cells) + " |")

    grads = [torch.randn(d_out, d_in) * 1e-3 for d_in, d_out in LAYERS]
    grads = [t for pair in zip(grads, (torch.randn(d_out) * 1e-3 for _, d_out in LAYERS)) for t in pair]
    exact = sum(float(t.double().square().sum()) for t in grads)
    nbytes = sum(t.numel() * t.element_size() for t in grads)
    lines += ["", f"`‖ḡ‖²` over the MLP's gradient ({sum(t.numel() for t in grads):,} fp32 values, "
              f"{nbytes / 2**20:.2f} MiB):\n", "| route | µs | read rate | relative error |", "|---|---:|---:|---:|"]
    for name, fn in grad_norm_routes(compiled).items():
        us = alone_us(lambda: fn(grads), max(1, reps // 4))
        err = abs(float(fn(grads)) - exact) / exact
        lines.append(f"| {name} | {us:.0f} | {nbytes / us / 1e3:.1f} GB/s | {err:.1e} |")
    return "\n".join(lines)


def inside_a_step(steps: int, compiled: bool = False) -> str:
    """Five copies of the MLP stepped in turn: plain, ``‖ḡ_k‖²`` after the backward (ours), the
    same norms in post-accumulate-grad hooks (the gradient just written) and after the optimizer
    step (the gradient just read), and one fp32 multi-tensor norm per tensor after the backward."""
    import torch.nn.functional as F

    from genbounds.estimators.functional import grouped_sq_norms, squared_pieces
    from overhead_dispersion import SPECS

    spec = SPECS["mlp"]
    torch.manual_seed(0)
    base = spec.build()
    batches = spec.batches()
    sides = ("plain", "after the backward (ours)", "in post-accumulate-grad hooks", "after the optimizer step",
             "one fp32 multi-tensor norm after the backward (not taken)")
    models = {side: copy.deepcopy(base) for side in sides}
    opts = {side: torch.optim.SGD(m.parameters(), lr=0.01) for side, m in models.items()}
    groups = [[0, 1], [2, 3], [4, 5]]
    hooked = list(models[sides[2]].parameters())
    slots: list[torch.Tensor | None] = [None] * len(hooked)

    def grad_hook(i: int):
        def hook(p: torch.Tensor) -> None:
            slots[i] = squared_pieces([p.grad])[0].sum()
        return hook

    for i, p in enumerate(hooked):
        p.register_post_accumulate_grad_hook(grad_hook(i))
    times: dict[str, list[float]] = {side: [] for side in sides}
    for it in range(steps):
        order = sides[it % len(sides):] + sides[: it % len(sides)]
        for side in order:
            model, opt = models[side], opts[side]
            x, y = batches[it % len(batches)]
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            if side == sides[1]:
                grouped_sq_norms([p.grad for p in model.parameters()], groups)
            elif side == sides[2]:  # (the per-layer sums the hooks' norms are for)
                torch.stack([slots[2 * k] + slots[2 * k + 1] for k in range(3)])
            elif side == sides[4]:
                torch.stack(torch._foreach_norm([p.grad for p in model.parameters()])).double().square_()
            opt.step()
            if side == sides[3]:
                grouped_sq_norms([p.grad for p in model.parameters()], groups)
            times[side].append(time.perf_counter() - t0)
    skip = steps // 10
    plain = statistics.median(times[sides[0]][skip:]) * 1e6
    lines = [f"### 2. `‖ḡ_k‖²` inside a step ({steps} steps of each copy, in turn, the order rotating; medians)\n",
             "| where | step (µs) | extra (µs) |", "|---|---:|---:|"]
    for side in sides:
        t = statistics.median(times[side][skip:]) * 1e6
        lines.append(f"| {side} | {t:.0f} | {t - plain:+.0f} |")
    # the reads themselves after the backward, each twice in a row (the second finds the data in
    # cache): the layers' inputs and output gradients (kept by a forward hook and retain_grad, on
    # a copy of its own), then the gradient, then the weights. What a first read pays beyond the
    # second is the memory system's, not the kernel's
    from genbounds.estimators.ghost_norms.linear import _LinearKind

    kind = _LinearKind()
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kept: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []

    def keep(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        kept.append((module, args[0].detach(), out))

    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(keep)
    row = torch.zeros(batches[0][0].shape[0])

    def norms() -> None:
        for layer, a, out in kept:
            kind.single(layer, a, out.grad, True, True, None, out=row)

    reads: dict[str, list[float]] = {k: [] for k in ("norms", "norms again", "grad", "grad again", "weights",
                                                     "grad, compiled")}
    sq_sum = compiled_sq_sum() if compiled else None
    for it in range(steps):
        x, y = batches[it % len(batches)]
        opt.zero_grad(set_to_none=True)
        kept.clear()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad for p in model.parameters()]
        weights = [p.detach() for p in model.parameters()]
        # (with --compile, every other step's first read of the gradient is the compiled one)
        first_read = ("grad, compiled", lambda: sq_sum(grads)) if compiled and it % 2 else (
            "grad", lambda: grouped_sq_norms(grads, groups))
        for key, fn in (("norms", norms), ("norms again", norms), first_read,
                        ("grad again", lambda: grouped_sq_norms(grads, groups)),
                        ("weights", lambda: grouped_sq_norms(weights, groups))):
            t0 = time.perf_counter()
            fn()
            reads[key].append(time.perf_counter() - t0)
        opt.step()
    us = {k: statistics.median(v[skip // 2:]) * 1e6 for k, v in reads.items() if v}
    lines += ["", f"Right after the backward ({steps} steps), each read twice in a row (µs):\n",
              "| read | first | again at once |", "|---|---:|---:|",
              f"| the per-sample norms of the three layers (`_LinearKind.single` on the kept inputs and output "
              f"gradients) | {us['norms']:.0f} | {us['norms again']:.0f} |",
              f"| `‖ḡ_k‖²` (`grouped_sq_norms` of `.grad`) | {us['grad']:.0f} | {us['grad again']:.0f} |",
              f"| the same of the weights | {us['weights']:.0f} | – |"]
    if compiled:
        lines.append(f"| `‖ḡ‖²` compiled (`torch.compile` of the float64 squared sums), every other step | "
                     f"{us['grad, compiled']:.0f} | – |")
    return "\n".join(lines)


def lightning_profile(steps: int) -> str:
    """``SimpleProfiler``'s median per action in one fit of ``GradientDispersion()`` whose
    schedule measures alternate blocks of ten steps (fewer in a short run;
    ``step_blocks.block_schedule``), split into measured and unmeasured steps: both sides in one
    process, so its slow states hit both."""
    import lightning.pytorch as pl
    from lightning.pytorch.profilers import SimpleProfiler

    from genbounds.callbacks import GradientDispersion
    from genbounds.models import Classifier
    from overhead_dispersion import SPECS
    from step_blocks import block_schedule

    spec = SPECS["mlp"]
    block = max(2, min(10, steps // 12))  # (10 in a full run; a short test run keeps a few pairs)
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    disp = GradientDispersion(log_every_step=False)
    decided: dict[int, bool] = {}

    profiler = SimpleProfiler()
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # (the profiler's report and Lightning's notes; restored below)
    try:
        with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(max_steps=steps, default_root_dir=logdir, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 limit_val_batches=0, callbacks=[block_schedule(disp, block, 0, decided), disp],
                                 profiler=profiler)
            trainer.fit(module, train_dataloaders=sample_loader(batches, steps + 9))
    finally:
        lightning_log.setLevel(level)
    flags = [decided[step] for step in sorted(decided)]  # (step 0 on: one decision a step)
    skip = 2 * block  # the first pair: warm-up
    rows = []
    for action, durations in profiler.recorded_durations.items():
        if len(durations) == len(flags):  # once a step: split by the step's side, the switch steps left out
            kept = [(d, f) for i, (d, f) in enumerate(zip(durations, flags)) if i >= skip and i % block]
            plain = statistics.median([d for d, f in kept if not f]) * 1e6
            measured = statistics.median([d for d, f in kept if f]) * 1e6
        elif len(durations) == sum(flags) and "GradientDispersion" in action:  # the callback's, measured steps only
            plain, measured = None, statistics.median(durations[skip // 2:]) * 1e6
        else:
            continue
        if max(plain or 0.0, measured) >= 5.0:  # (Lightning's empty default hooks left out)
            rows.append((action, plain, measured))
    lines = [f"### 3. Lightning's profiler, per action of a step (one fit, {steps} steps in alternating blocks of "
             f"{block}, measured and not; medians, each block's first step left out)\n",
             "| action | unmeasured step (µs) | measured step (µs) | extra (µs) |", "|---|---:|---:|---:|"]
    for action, plain, measured in sorted(rows, key=lambda r: -r[2]):
        # (an action of the callback's own runs on measured steps only: all of it is extra)
        extra = measured - (plain or 0.0)
        lines.append(f"| {action.replace('|', '/')} | {_us(plain)} | {_us(measured)} | {extra:+.0f} |")
    return "\n".join(lines)


def _us(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="steps of each side in parts 2 and 3")
    parser.add_argument("--reps", type=int, default=400, help="calls per timed block in part 1")
    parser.add_argument("--out", default=None, help="also write the Markdown to this file")
    parser.add_argument("--compile", action="store_true",
                        help="also time the gradient's read compiled by torch.compile (a C++ compiler; ~20 s more)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loads = [load_average()]
    parts = [kernels_alone(args.reps, args.compile), inside_a_step(args.steps, args.compile),
             lightning_profile(args.steps)]
    loads.append(load_average())
    text = "\n\n".join(["## The MLP's measured step against its kernels (`benchmarks/kernel_floor.py`)",
                        describe_machine_md(machine_description(), loads), *parts])
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
