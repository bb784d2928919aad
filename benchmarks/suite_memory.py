"""Which callback of the default suite holds the peak device memory, hook by hook (CUDA).

    python benchmarks/suite_memory.py                      # the AlexNet-style CNN, batch 128
    python benchmarks/suite_memory.py --model cuda-resnet18-gn --steps 100

One ``Trainer.fit`` of ``overhead_dispersion.py``'s suite configuration (``configs/digits_mlp.yaml``'s
callbacks, epochs of ``--epoch-steps`` steps, a 4-batch validation set).  Every Lightning hook of
every callback class of the suite is wrapped (on the class, so a hook that a callback sets aside on
its instance stays aside): before the call the allocator's peak is reset, after it
``max_memory_allocated() − memory_allocated()`` before the call is that call's peak growth.  The
table gives, per callback and hook, the largest peak growth over the run and the number of calls,
next to the training step's own (plain training's peak growth, from ``overhead_dispersion.py``).
Without CUDA it prints "not measured" and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import emit_report, sample_loader  # noqa: E402


def _wrap(cls: type, name: str, table: dict[tuple[str, str], list[float]]) -> None:
    """Wrap ``cls.name`` (on the class: a hook a callback sets aside on its instance stays aside)."""
    hook = getattr(cls, name)

    @functools.wraps(hook)
    def measured(self: Any, *args: Any, **kwargs: Any) -> Any:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            return hook(self, *args, **kwargs)
        finally:
            torch.cuda.synchronize()
            row = table.setdefault((type(self).__name__, name), [0.0, 0])
            row[0] = max(row[0], (torch.cuda.max_memory_allocated() - before) / 2**20)
            row[1] += 1

    setattr(cls, name, measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cuda-cnn")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--epoch-steps", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        emit_report("Suite memory by callback: not measured (torch.cuda.is_available() is False on this machine).",
                    args.out)
        return
    import lightning.pytorch as pl

    from genbounds.models import Classifier
    from overhead_dispersion import SPECS, suite_callbacks

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    spec = SPECS[args.model]
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    callbacks = suite_callbacks()
    table: dict[tuple[str, str], list[float]] = {}
    for cls in {type(cb) for cb in callbacks}:
        for name in dir(pl.Callback):
            if name.startswith("on_") and getattr(cls, name) is not getattr(pl.Callback, name):
                _wrap(cls, name, table)
    val = [(x.roll(1, 0), y.roll(1, 0)) for x, y in batches]
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=args.steps, default_root_dir=logdir,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=4,
                             callbacks=callbacks)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, sample_loader(batches, args.epoch_steps, pin_memory=True),
                    sample_loader(val, 4, pin_memory=True))
    rows = sorted(((peak, calls, cb, hook) for (cb, hook), (peak, calls) in table.items() if peak > 0.05),
                  reverse=True)
    lines = [f"### Peak device memory by callback and hook ({args.model}, {args.steps} steps, "
             f"{torch.cuda.get_device_name(0)})", "",
             f"Model, optimizer and data on the device before `fit`: {base / 2**20:.0f} MiB.", "",
             "| callback | hook | largest peak growth in one call (MiB) | calls |", "|---|---|---:|---:|"]
    lines += [f"| {cb} | `{hook}` | {peak:.1f} | {calls} |" for peak, calls, cb, hook in rows[:25]]
    emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
