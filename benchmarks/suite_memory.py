"""Which callback of the default suite holds the peak memory, hook by hook.

    python benchmarks/suite_memory.py --device cuda                 # the AlexNet-style CNN, batch 128
    python benchmarks/suite_memory.py --device cuda --model cuda-resnet18-gn --steps 100
    OMP_NUM_THREADS=1 python benchmarks/suite_memory.py --device cpu --steps 4 --epoch-steps 2 --widths fixed

One ``Trainer.fit`` of ``overhead_dispersion.py``'s suite configuration (``configs/digits_mlp.yaml``'s
callbacks, epochs of ``--epoch-steps`` steps, a 4-batch validation set) on the CUDA model's
batches (batch 128).  Every Lightning hook of every callback class of the suite is wrapped (on the
class, so a hook that a callback sets aside on its instance stays aside) and its call's peak
growth recorded: on CUDA ``max_memory_allocated() − memory_allocated()`` before the call, the
allocator's peak reset first; on the CPU ``VmHWM − VmRSS`` before the call, the heap trimmed and
the high-water mark reset first (``/proc/self/clear_refs``).  The table gives, per callback and
hook, the largest peak growth over the run and the number of calls.

``--widths`` sets the probes' vectorization widths as on an accelerator, also on the CPU:
``budget`` (``probe.vectorization_width``, the default on an accelerator), ``fixed`` (8, and 10
for ``HessianTrace``: the accelerator's widths before the budget) or ``one``; ``device`` leaves the
device's own default.  Without CUDA, ``--device cuda`` prints "not measured" and exits 0.
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

from common import PeakRSS, emit_report, sample_loader  # noqa: E402


def record_peaks(cls: type, name: str, table: dict[tuple[str, str], list[float]], cuda: bool) -> None:
    """Wrap ``cls.name`` (on the class: a hook a callback sets aside on its instance stays aside) so
    that each call's peak growth is recorded in ``table[(class name, name)] = [largest MiB, calls]``:
    on CUDA the allocator's peak above what was allocated before the call, on the CPU
    ``common.PeakRSS``. Also used by ``probe_memory.py``."""
    hook = getattr(cls, name)

    @functools.wraps(hook)
    def measured(self: Any, *args: Any, **kwargs: Any) -> Any:
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                return hook(self, *args, **kwargs)
            finally:
                torch.cuda.synchronize()
                _record(table, (type(self).__name__, name), (torch.cuda.max_memory_allocated() - before) / 2**20)
        peak = PeakRSS()
        try:
            with peak:
                return hook(self, *args, **kwargs)
        finally:
            _record(table, (type(self).__name__, name), peak.growth_mib)

    setattr(cls, name, measured)


def _record(table: dict[tuple[str, str], list[float]], key: tuple[str, str], growth: float) -> None:
    row = table.setdefault(key, [0.0, 0])
    row[0] = max(row[0], growth)
    row[1] += 1


def _force_widths(mode: str) -> None:
    """The probes' vectorization widths as ``--widths`` says, whatever the device."""
    from genbounds.callbacks import probe
    from genbounds.estimators.functional import num_trainable

    if mode == "device":
        return
    original = probe.ProbeCallback.per_pass

    def per_pass(self: Any, requested: int | None, module: torch.nn.Module, gpu_default: int = 8) -> int:
        if requested is not None or (self.contract is not None and self.contract.tier in ("captured", "returned")):
            return original(self, requested, module, gpu_default)
        if mode == "fixed":
            return gpu_default
        if mode == "one":
            return 1
        return probe.vectorization_width(num_trainable(module), gpu_default)

    probe.ProbeCallback.per_pass = per_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--model", default="cuda-cnn", help="a CUDA model of overhead_dispersion.py (its batches)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--epoch-steps", type=int, default=50)
    parser.add_argument("--widths", choices=("device", "budget", "fixed", "one"), default="device")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        emit_report("Suite memory by callback: not measured (torch.cuda.is_available() is False on this machine).",
                    args.out)
        return
    import lightning.pytorch as pl

    from genbounds.models import Classifier
    from overhead_dispersion import SPECS, suite_callbacks

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if not cuda:
        torch.set_num_threads(1)
    _force_widths(args.widths)
    spec = SPECS[args.model]
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    callbacks = suite_callbacks()
    table: dict[tuple[str, str], list[float]] = {}
    for cls in {type(cb) for cb in callbacks}:
        for name in dir(pl.Callback):
            if name.startswith("on_") and getattr(cls, name) is not getattr(pl.Callback, name):
                record_peaks(cls, name, table, cuda)
    val = [(x.roll(1, 0), y.roll(1, 0)) for x, y in batches]
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps,
                             default_root_dir=logdir, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=4, callbacks=callbacks)
        trainer.fit(module, sample_loader(batches, args.epoch_steps, pin_memory=cuda),
                    sample_loader(val, 4, pin_memory=cuda))
    rows = sorted(((peak, calls, cb, hook) for (cb, hook), (peak, calls) in table.items() if peak > 0.05),
                  reverse=True)
    where = torch.cuda.get_device_name(0) if cuda else "CPU, resident set"
    lines = [f"### Peak memory by callback and hook ({args.model}, {args.steps} steps, {where}, "
             f"probe widths: {args.widths})", "",
             "| callback | hook | largest peak growth in one call (MiB) | calls |", "|---|---|---:|---:|"]
    lines += [f"| {cb} | `{hook}` | {peak:.1f} | {calls} |" for peak, calls, cb, hook in rows[:25]]
    emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
