"""Where a CUDA training step's time goes, with and without ``GradientDispersion()`` every step:
the GPU's kernel time against the wall time (is the step launch-bound?).

    python benchmarks/cuda_step_profile.py                   # the CUDA models of overhead_dispersion.py
    python benchmarks/cuda_step_profile.py --models cuda-cnn --rounds 5

Each run is one real ``Trainer.fit`` (as ``overhead_dispersion.py``'s CUDA rows: batch 128, host
batches pinned, Lightning's device copy, no logger output, no validation).  After ``--warmup``
steps it times ``--steps`` steps without a profiler (the wall time per step, synchronized at both
ends), then ``--steps`` more under ``torch.profiler`` (CPU and CUDA activities) and reads:

* **device ms / step**: the summed duration of the kernels, copies and memsets the GPU ran;
* **device events / step**: how many there were (a launch each);
* **busy**: device ms over the wall ms under the profiler — near 1 the GPU is the limit and our
  extra kernels cost their run time; far below 1 the host is (Python, dispatcher, launches), and
  what counts is how many ops and hooks a step adds, not their FLOPs.

Configurations alternate within each round; the tables give per-round medians and the ratio of
each quantity to plain in the same round.  ``--variants`` adds configurations that change one
route of the convolutions' norms, to see which one the time goes to: ``sliced`` (the patch Gram
by slices, the CPU's route, instead of the window sum) and ``unfold`` (no patch Gram: unfold the
patches).  ``--ops N`` prints, per model, the N ops (by name and input shapes) whose device time
grew most from plain to every-step dispersion in the last round.  Without CUDA it prints "not
measured" and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import around_batches, emit_report, sample_loader  # noqa: E402


CONFIGS = ("plain", "dispersion", "sliced", "unfold")


def _route(config: str) -> Any:
    """The convolutions' route of ``config`` (a context that patches ``ghost_norms.conv``)."""
    import contextlib
    from unittest import mock

    import genbounds.estimators.ghost_norms.conv as conv

    if config == "sliced":
        sliced = conv._patch_gram_sliced
        return mock.patch.object(conv, "_conv_patch_gram", lambda m, x, scratch=conv._FRESH, windowed=None:
                                 sliced(m, x, scratch))
    if config == "unfold":
        return mock.patch.object(conv, "_conv_gram_cheaper", lambda *a, **k: False)
    return contextlib.nullcontext()


def profile_run(model: str, config: str, warmup: int, steps: int) -> dict[str, Any]:
    """One fit of ``model`` (a CUDA model of ``overhead_dispersion.SPECS``) in ``config``."""
    import lightning.pytorch as pl
    from torch.profiler import ProfilerActivity, profile

    from genbounds.callbacks import GradientDispersion
    from genbounds.models import Classifier
    from overhead_dispersion import SPECS

    spec = SPECS[model]
    measured = config != "plain"
    out: dict[str, Any] = {}

    state: dict[str, Any] = {"prof": None, "t0": 0.0}

    def start(trainer: pl.Trainer) -> None:
        """Steps ``warmup … warmup+steps−1`` timed, the next ``steps`` profiled."""
        s = trainer.global_step
        if s in (warmup, warmup + steps):
            torch.cuda.synchronize()
            if s == warmup + steps:
                out["wall_ms"] = 1e3 * (time.perf_counter() - state["t0"]) / steps
                state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True)
                state["prof"].__enter__()
            state["t0"] = time.perf_counter()

    def end(trainer: pl.Trainer) -> None:
        prof = state["prof"]
        if prof is None or trainer.global_step != warmup + 2 * steps:
            return
        torch.cuda.synchronize()
        out["profiled_wall_ms"] = 1e3 * (time.perf_counter() - state["t0"]) / steps
        prof.__exit__(None, None, None)
        # kernels, copies and memsets; not the GPU-side spans of record_function ranges
        # (``Optimizer.step#SGD.step`` spans the whole closure: counted, it doubled the sum)
        device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)]
        out["device_ms"] = sum(e.time_range.elapsed_us() for e in device) / 1e3 / steps
        out["device_events"] = len(device) / steps
        # per CPU op (with its input shapes) the device time of the kernels it launched; the
        # kernels' own rows and the ranges' spans are left out (each would count a kernel twice)
        out["ops"] = {f"{e.key} {e.input_shapes}": (e.self_device_time_total / 1e3 / steps, e.count / steps)
                      for e in prof.key_averages(group_by_input_shape=True)
                      if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CPU
                      and not getattr(e, "is_user_annotation", False)}
        state["prof"] = None

    torch.manual_seed(0)
    batches = spec.batches()
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    callbacks = around_batches([GradientDispersion()] if measured else [], start, end)
    trainer = pl.Trainer(max_steps=warmup + 2 * steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         num_sanity_val_steps=0, limit_val_batches=0, accelerator="gpu", devices=1)
    with _route(config):
        trainer.fit(module, sample_loader(batches, warmup + 2 * steps + 4, pin_memory=True))
    out["busy"] = out["device_ms"] / out["profiled_wall_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cuda-resnet18-gn,cuda-resnet18-bn,cuda-cnn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", action="store_true", help="also the sliced and unfold routes of the convolutions")
    parser.add_argument("--ops", type=int, default=0, help="the N ops whose device time grew most, per model")
    parser.add_argument("--out", default=None, help="also write the Markdown to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        emit_report("CUDA step profile: not measured (torch.cuda.is_available() is False on this machine).", args.out)
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    models = [m for m in args.models.split(",") if m]
    configs = CONFIGS if args.variants else CONFIGS[:2]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for m in models:
            for config in configs[r % len(configs):] + configs[:r % len(configs)]:
                res = profile_run(m, config, args.warmup, args.steps)
                runs.setdefault((m, config), []).append(res)
                print(f"[round {r + 1}/{args.rounds}] {m} {config}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in res.items() if k != "ops"), file=sys.stderr, flush=True)
    keys = ("wall_ms", "device_ms", "device_events", "busy", "profiled_wall_ms")
    lines = [f"### Where a CUDA step's time goes ({torch.cuda.get_device_name(0)}, {args.rounds} rounds, "
             f"{args.steps} timed + {args.steps} profiled steps after {args.warmup})", "",
             "| model | configuration | wall ms / step | device ms / step | device events / step | busy | "
             "wall under the profiler |", "|---|---|---:|---:|---:|---:|---:|"]
    for m in models:
        for config in configs:
            med = {k: statistics.median(x[k] for x in runs[(m, config)]) for k in keys}
            cells = [f"{med['wall_ms']:.2f}", f"{med['device_ms']:.2f}", f"{med['device_events']:.0f}",
                     f"{med['busy']:.2f}", f"{med['profiled_wall_ms']:.2f}"]
            if config != "plain":
                for i, k in enumerate(("wall_ms", "device_ms", "device_events")):
                    pairs = zip(runs[(m, config)], runs[(m, "plain")])
                    ratio = statistics.median([a[k] / b[k] if b[k] else float("nan") for a, b in pairs])
                    cells[i] += f" ({ratio:.3f}×)"
            lines.append(f"| {m} | {LABELS[config]} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (in brackets): median over rounds of the configuration / plain in the same round; busy: "
              "device ms over the wall ms under the profiler."]
    for m in models if args.ops else ():
        plain, measured = runs[(m, "plain")][-1]["ops"], runs[(m, "dispersion")][-1]["ops"]
        grown = sorted(((measured.get(k, (0.0, 0.0))[0] - plain.get(k, (0.0, 0.0))[0], k) for k in {*plain, *measured}),
                       reverse=True)[:args.ops]
        lines += ["", f"{m}: the ops whose device time grew most, plain → every-step dispersion (ms per step; calls "
                  "per step)", "", "| op and input shapes | plain | dispersion | growth |", "|---|---:|---:|---:|"]
        for growth, k in grown:
            a, b = plain.get(k, (0.0, 0.0)), measured.get(k, (0.0, 0.0))
            lines.append(f"| `{k[:160]}` | {a[0]:.3f} ({a[1]:.0f}) | {b[0]:.3f} ({b[1]:.0f}) | {growth:+.3f} |")
    emit_report("\n".join(lines), args.out)


LABELS = {"plain": "plain", "dispersion": "GradientDispersion() every step",
          "sliced": "the same, patch Gram by slices", "unfold": "the same, patches unfolded (no patch Gram)"}


if __name__ == "__main__":
    main()
