"""ATen ops dispatched by one measured training step, against the same step without measurement.

    python benchmarks/op_counts.py                       # about 1 min on one CPU thread
    python benchmarks/op_counts.py --models resnet18-gn --by line

Time on a shared machine is noisy; the number of ops a step dispatches is not.  It is what a
GPU step pays in host time (every op is a few µs of Python and dispatcher work; the ones that
run a kernel are a launch each), so it is the CPU-side measure of the risk that per-sample
norms make a small CUDA model launch-bound (docs/results/overhead.md, "CUDA").  Counted with a
``TorchDispatchMode`` around one whole training step (the ``training_step``, the backward, the
optimizer step, every callback hook in between), after a few warm-up steps, with
``GradientDispersion()`` every step against no callback.  ``kernels`` leaves out the ops that
only make views or read metadata (no kernel on a GPU).  ``--paths cuda`` counts, still on the
CPU, the branches our code takes on a GPU: the patch Gram's window sum, work buffers allocated
rather than kept, one multi-tensor norm of the gradient (the device branches on the per-step
path).  A ``TorchDispatchMode`` sees the ops our Python calls, not what an op does inside (an
op that casts its input first launches that cast too): ``--device cuda`` on a GPU counts the
real branches the same way; a profiler's kernel events would show the rest.  Models are those of
``overhead_dispersion.py`` at small batches: the counts do not depend on the batch size, except
where a convolution's work buffers are split into chunks of samples (not at these sizes).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import sys
import traceback
from typing import Any, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import (  # noqa: E402
    quiet_child,
    TinyTransformer,
    around_batches,
    random_image_batches,
    random_token_batches,
    resnet18_torchvision,
    sample_loader,
)

VIEW_OPS = frozenset({
    "view", "_unsafe_view", "slice", "select", "detach", "alias", "transpose", "t", "permute", "expand",
    "unsqueeze", "squeeze", "as_strided", "unbind", "split", "split_with_sizes", "chunk", "narrow", "unfold",
    "_reshape_alias", "reshape", "view_as", "promote_types", "result_type", "is_same_size", "size", "stride",
    "sym_size", "sym_stride", "sym_numel", "lift_fresh", "diagonal", "empty", "empty_like", "empty_strided",
    "_local_scalar_dense",
})
"""Ops that make a view, allocate without writing, or read metadata: no kernel on a GPU
(``Tensor.unfold`` is a view; ``im2col``, ``F.unfold``'s kernel, is counted)."""


def _models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], list]]]:
    from genbounds.models import MLP, AlexNetSmall

    cpu = torch.device("cpu")
    return {
        "mlp": (lambda: MLP(784, 10, hidden=512, depth=2), lambda: random_image_batches(4, 32, (784,), 10, cpu)),
        "cnn": (lambda: AlexNetSmall(3, 10, width=1.0), lambda: random_image_batches(4, 8, (3, 32, 32), 10, cpu)),
        "resnet18-gn": (lambda: resnet18_torchvision(norm="group"),
                        lambda: random_image_batches(4, 8, (3, 32, 32), 10, cpu)),
        "resnet18-bn": (resnet18_torchvision, lambda: random_image_batches(4, 8, (3, 32, 32), 10, cpu)),
        "transformer": (TinyTransformer, lambda: random_token_batches(4, 8, 32, 1000, 10)),
    }


class _Count(TorchDispatchMode):
    def __init__(self, by_line: bool) -> None:
        super().__init__()
        self.by_line = by_line
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        where = ""
        if self.by_line:
            ours = [f"{f.filename.rsplit(os.sep + 'genbounds' + os.sep, 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                    if f"{os.sep}genbounds{os.sep}" in f.filename and f"{os.sep}models{os.sep}" not in f.filename]
            where = ours[-1] if ours else "-"
        self.counts[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def count_step(build: Callable[[], nn.Module], batches: list, measured: bool, step: int = 3,
               by_line: bool = False, device: str = "cpu") -> collections.Counter:
    """Ops of training step ``step`` (0-based) of a short fit."""
    import lightning.pytorch as pl

    from genbounds.callbacks import GradientDispersion
    from genbounds.models import Classifier

    counting: dict[str, Any] = {"mode": None, "counts": None}

    def start(trainer: pl.Trainer) -> None:
        if trainer.global_step == step:
            counting["mode"] = _Count(by_line)
            counting["mode"].__enter__()

    def end(trainer: pl.Trainer) -> None:
        if counting["mode"] is not None:
            counting["mode"].__exit__(None, None, None)
            counting["counts"], counting["mode"] = counting["mode"].counts, None

    torch.manual_seed(0)
    module = Classifier(build(), num_classes=10, lr=0.01)
    callbacks = around_batches([GradientDispersion()] if measured else [], start, end)
    trainer = pl.Trainer(max_steps=step + 2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0,
                         accelerator="gpu" if device == "cuda" else "cpu", devices=1)
    trainer.fit(module, sample_loader(batches, step + 4))
    assert counting["counts"] is not None
    return counting["counts"]


@contextlib.contextmanager
def cuda_paths() -> Iterator[None]:
    """Our per-step path's GPU branches, taken on the CPU (values unchanged: tested alike)."""
    from genbounds.estimators import functional
    from genbounds.estimators.ghost_norms import conv as ghost_conv
    from genbounds.estimators import gradient_dispersion as gd

    def fresh(self: Any, slot: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def per_tensor(tensors: list, reuse: bool = False) -> tuple:
        n = len(tensors)
        return functional._foreach_sq_norms64(tensors), ((0,) * n, tuple(range(n)))  # (per_tensor_sq_norms off the CPU)

    def no_ring(self: Any, b: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lent = None  # (the row ring lends the CPU only: each step read at once)

    from genbounds.callbacks.dispersion import row_ring
    from genbounds.estimators.ghost_norms import linear

    saved = (ghost_conv._conv_patch_gram, ghost_conv._Scratch.get, gd.squared_pieces, row_ring.RowRing.lend)
    loaded_only = set(linear.LOADED_KERNELS_ONLY)
    ghost_conv._conv_patch_gram = functools.partial(saved[0], windowed=True)
    ghost_conv._Scratch.get = fresh
    gd.squared_pieces = per_tensor
    row_ring.RowRing.lend = no_ring
    linear.LOADED_KERNELS_ONLY.clear()
    try:
        yield
    finally:
        ghost_conv._conv_patch_gram, ghost_conv._Scratch.get, gd.squared_pieces, row_ring.RowRing.lend = saved
        linear.LOADED_KERNELS_ONLY.update(loaded_only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,resnet18-gn,resnet18-bn,transformer")
    parser.add_argument("--by", choices=("op", "line"), default="op",
                        help="break the extra ops down by op name, or by op and our source line")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--paths", choices=("cpu", "cuda"), default="cpu",
                        help="the branches our code takes on the CPU, or those it takes on a GPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="train on a GPU: its branches are taken for real (checks --paths cuda)")
    args = parser.parse_args()
    quiet_child()
    models = _models()
    rows = []
    for name in args.models.split(","):
        build, make_batches = models[name]
        batches = make_batches()
        plain = count_step(build, batches, measured=False, by_line=args.by == "line", device=args.device)
        with cuda_paths() if args.paths == "cuda" and args.device == "cpu" else contextlib.nullcontext():
            ours = count_step(build, batches, measured=True, by_line=args.by == "line", device=args.device)
        total = (sum(plain.values()), sum(ours.values()))
        kern = (sum(v for (op, _), v in plain.items() if op not in VIEW_OPS),
                sum(v for (op, _), v in ours.items() if op not in VIEW_OPS))
        rows.append((name, *total, *kern))
        extra = sorted(((v, k) for k, v in (ours - plain).items()), reverse=True)[:args.top]
        print(f"\n{name}: the largest extra counts")
        for v, (op, where) in extra:
            print(f"  {v:5d}  {op}{'  ' + where if where else ''}")
    paths = "CUDA (on a GPU)" if args.device == "cuda" else args.paths.upper()
    print(f"\nour code's {paths} paths")
    print("\n| model | ops plain | ops measured | extra | kernels plain | kernels measured | extra kernels |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, a, b, ka, kb in rows:
        print(f"| {name} | {a} | {b} | +{b - a} | {ka} | {kb} | +{kb - ka} |")


if __name__ == "__main__":
    main()
