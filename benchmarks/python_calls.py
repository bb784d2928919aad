"""Python function calls a step of the MLP's fit makes: plain, with ``GradientDispersion()``
measuring no step, and measuring every step (one fit each, ``cProfile``, steps 50–349).

    OMP_NUM_THREADS=1 python benchmarks/python_calls.py            # about 1 min

Call counts are exact and do not depend on the machine's state; the profiler's times are
inflated by the profiler itself (about 2× for Python-heavy code) and are shown only to rank the
functions. The table lists, per step, the calls and profiled time a measured step adds over a
plain one, by function (the largest first): where the callback's Python goes.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import describe_machine_md, load_average, machine_description, sample_loader  # noqa: E402

START, STEPS = 50, 300


def profiled_fit(variant: str) -> pstats.Stats:
    import lightning.pytorch as pl

    from genbounds.callbacks import GradientDispersion
    from genbounds.models import Classifier
    from overhead_dispersion import SPECS

    spec = SPECS["mlp"]
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()
    module = Classifier(spec.build(), num_classes=10, lr=0.01)
    profile = cProfile.Profile()

    class Window(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step == START:
                profile.enable()
            elif trainer.global_step == START + STEPS:
                profile.disable()

    callbacks: list = [Window()]
    if variant != "plain":
        disp = GradientDispersion(log_every_step=False)
        if variant == "unmeasured":
            class Never(pl.Callback):  # (measures the first steps only: the backend's set-up done)
                def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
                    disp.step_budget.measures = lambda t, m, e, *window: t.global_step < 20
            callbacks.append(Never())
        callbacks.append(disp)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(max_steps=START + STEPS + 10, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, log_every_n_steps=50, default_root_dir=logdir, callbacks=callbacks)
        trainer.fit(module, train_dataloaders=sample_loader(batches, START + STEPS + 19))
    return pstats.Stats(profile)


def by_function(stats: pstats.Stats) -> dict[str, tuple[int, float]]:
    out: dict[str, tuple[int, float]] = {}
    for (path, line, name), (_, calls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = path.split("site-packages/")[-1].split("src/")[-1]
        key = f"{where}:{line}({name})" if line else name.split(" at 0x")[0]  # (built-ins: no address)
        n, t = out.get(key, (0, 0.0))
        out[key] = (n + calls, t + tottime)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loads = [load_average()]
    runs = {v: by_function(profiled_fit(v)) for v in ("plain", "unmeasured", "measured")}
    loads.append(load_average())
    print(f"### Python calls a step makes (MLP, `cProfile`, steps {START}–{START + STEPS - 1} of one fit each)\n")
    print(describe_machine_md(machine_description(), loads) + "\n")
    totals = {v: sum(n for n, _ in r.values()) / STEPS for v, r in runs.items()}
    print("| variant | Python calls a step | over plain |")
    print("|---|---:|---:|")
    for v, n in totals.items():
        print(f"| {v} | {n:.0f} | {n - totals['plain']:+.0f} |")
    plain, measured = runs["plain"], runs["measured"]
    rows = []
    for key in set(plain) | set(measured):
        (n0, t0), (n1, t1) = plain.get(key, (0, 0.0)), measured.get(key, (0, 0.0))
        if n1 != n0:
            rows.append(((n1 - n0) / STEPS, (t1 - t0) / STEPS * 1e6, key))
    rows.sort(key=lambda r: -r[1])
    print(f"\nWhat a measured step adds over a plain one, by function (the {args.top} with the most profiled time):\n")
    print("| extra calls a step | extra profiled µs a step | function |")
    print("|---:|---:|---|")
    for calls, micros, key in rows[:args.top]:
        print(f"| {calls:+.1f} | {micros:+.1f} | `{key}` |")


if __name__ == "__main__":
    main()
