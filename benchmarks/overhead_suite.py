"""What the whole default genbounds suite costs on the main job, and what the overhead budget
changes in its final bounds.

    python benchmarks/overhead_suite.py                           # 5 rounds + 2 dense runs
    python benchmarks/overhead_suite.py --rounds 7 --dense 2 --out bench_out/suite.md
    python benchmarks/overhead_suite.py --config configs/digits_mlp.yaml --max-epochs 10   # shorter

Three variants of one config (default ``configs/digits_mlp.yaml``), each trained in a fresh
process (``--in-process``: all in this one, one after another) through
``genbounds.lightning_cli.GenboundsCLI`` (the ``genbounds fit`` entry point),
with ``--trainer.enable_progress_bar=false`` (a progress bar written to a pipe would add the same
cost to both sides and flatter the ratio) and the TensorBoard logger pointed at a scratch folder:

* ``plain`` — ``--trainer.callbacks=null``: the same model, data, optimizer, logger and epochs;
* ``suite`` — the config as written (its ``GeneralizationBound(overhead_budget=0.2)``);
* ``dense`` — the config with ``overhead_budget`` removed from ``GeneralizationBound`` (every
  probe on its schedule), written to a temporary YAML.

**Training time** is the wall time from ``on_fit_start`` to ``on_fit_end`` of a timer callback
added through ``LightningCLI``'s ``trainer_defaults`` (appended after the config's callbacks):
interpreter start-up, imports, config parsing, data set-up and the callbacks' ``setup`` are
excluded; everything ``Trainer.fit`` runs after that (the training loop, validation, every probe,
the final evaluation, logging) is included.  ``plain`` and ``suite`` alternate within each round
(order alternating from round to round); the table gives the median of the per-round ratios and
their min–max.

**Bounds**: for every ``bound/<name>`` that has a ``bound/<name>_se``, the final values of the
budgeted runs and of the dense runs (read back with ``genbounds.reporting.load_run``) are compared
as ``z = |Δ| / sqrt(SE_a² + SE_b²)``; every (budgeted, dense) pair is reported (same seed, same
data order: the runs differ only in which probes ran, and probes do not change training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    quiet_child,
    emit_report,
    fmt_ci,
    describe_machine_md,
    fmt_ratio,
    load_average,
    machine_description,
    ratio_stats,
    run_json_child,
    speed_adjusted,
    verdict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_LIMIT = 1.25
"""Issue 9's target for the main job's suite with ``overhead_budget=0.2``: training time ≤ 1.25× plain."""


def make_timer():
    from common import FitTimer

    return FitTimer()


def make_hook_timer():
    """A callback that, at ``setup``, wraps every ``on_*`` hook of the trainer's other callbacks
    with a wall-clock accumulator (``--breakdown``): seconds per callback class.  Probes that one
    callback runs on another's behalf (the bound evaluation asks Flatness, HessianTrace, …) are
    counted under the caller's hook. The wrappers are set on the instances, which makes them the
    instances' own hooks: the suite's idle per-step hooks are then neither set aside nor put to
    sleep (``genbounds.callbacks.hook_clock``), so a breakdown run dispatches more than a run
    without it — use it for the shares, not for the ratio."""
    import functools

    from lightning.pytorch import Callback

    class HookTimer(Callback):
        def __init__(self) -> None:
            self.seconds: dict[str, float] = {}

        def setup(self, trainer, pl_module, stage):  # noqa: ANN001
            for cb in trainer.callbacks:
                if cb is self or type(cb).__name__ in ("FitTimer", "SaveConfigCallback"):
                    continue
                for name in dir(type(cb)):
                    owner = type(cb).__name__ + ("." + name if os.environ.get("HOOK_DETAIL") else "")
                    if not name.startswith("on_") or name in ("on_save_checkpoint", "on_load_checkpoint"):
                        continue
                    fn = getattr(cb, name)
                    if not callable(fn) or getattr(type(cb), name) is getattr(Callback, name, None):
                        continue

                    @functools.wraps(fn)
                    def timed(*a, __fn=fn, __owner=owner, **k):
                        t0 = time.perf_counter()
                        try:
                            return __fn(*a, **k)
                        finally:
                            self.seconds[__owner] = self.seconds.get(__owner, 0.0) + time.perf_counter() - t0

                    setattr(cb, name, timed)

    return HookTimer()


def dense_config(config: str, out_path: str) -> None:
    """``config`` with ``overhead_budget`` removed from every ``GeneralizationBound``."""
    import yaml

    with open(config) as fh:
        cfg = yaml.safe_load(fh)
    removed = 0
    for cb in cfg.get("trainer", {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("GeneralizationBound"):
            if (cb.get("init_args") or {}).pop("overhead_budget", None) is not None:
                removed += 1
    if not removed:
        raise SystemExit(f"{config}: no GeneralizationBound with an overhead_budget to remove")
    with open(out_path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)


def child(variant: str, config: str, save_dir: str, version: str, max_epochs: int | None,
          breakdown: bool = False) -> dict:


    quiet_child()
    from lightning.pytorch import LightningDataModule, LightningModule

    import genbounds.callbacks  # noqa: F401
    import genbounds.data  # noqa: F401
    import genbounds.models  # noqa: F401
    from genbounds.lightning_cli import GenboundsCLI

    args = ["fit", "--config", config, f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.logger.init_args.version={version}", "--trainer.enable_progress_bar=false"]
    if max_epochs:
        args.append(f"--trainer.max_epochs={max_epochs}")
    if variant == "plain":
        args.append("--trainer.callbacks=null")
    timer = make_timer()
    extra_callbacks = [timer]
    hook_timer = None
    if breakdown and variant != "plain":
        hook_timer = make_hook_timer()
        extra_callbacks.append(hook_timer)
    t0 = time.perf_counter()
    cli = GenboundsCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
        trainer_defaults={"callbacks": extra_callbacks},
    )
    total = time.perf_counter() - t0
    trainer = cli.trainer
    out = {"variant": variant, "fit_s": timer.seconds, "val_step_s": timer.val_step_s, "cli_s": total, "global_step": int(trainer.global_step),
           "epochs": int(trainer.current_epoch), "log_dir": trainer.logger.log_dir if trainer.logger else None,
           "callbacks": [type(c).__name__ for c in trainer.callbacks], "load": load_average()}
    if hook_timer is not None:
        out["hook_seconds"] = dict(hook_timer.seconds)
    budget = trainer.__dict__.get("_genbounds_overhead")
    if budget is not None:
        out["probe_s"] = budget.probe_time
        out["probe_by_owner"] = dict(budget.by_owner)
        out["deferred"] = budget.deferred
        out["budget_overhead"] = budget.overhead
    return out


def final_bounds(run_dir: str) -> dict[str, tuple[float, float | None]]:
    from genbounds.reporting import load_run

    run = load_run(run_dir)
    out = {}
    for tag in run.tags("bound/"):
        if tag.endswith("_se"):
            continue
        se = run.final(tag + "_se") if (tag + "_se") in run.scalars else None
        out[tag] = (run.final(tag), se)
    out["perf/overhead"] = (run.final("perf/overhead"), None) if "perf/overhead" in run.scalars else (math.nan, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "digits_mlp.yaml"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dense", type=int, default=2, help="runs of the dense (no budget) schedule")
    parser.add_argument("--breakdown", action="store_true",
                        help="time every callback's hooks (reported per callback; turns off the set-aside of idle hooks, so not for the ratio)")
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs (default: the config's)")
    parser.add_argument("--in-process", action="store_true",
                        help="every run in this process, one after another (the machine's slow states then "
                             "hit plain and suite alike); by default each run is a fresh process")
    parser.add_argument("--keep", default=None, help="keep the runs' logs under this folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="also write the Markdown to this file")
    parser.add_argument("--json", default=None, help="also write every run's measurements to this JSON file")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "CONFIG", "SAVE_DIR", "VERSION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, config, save_dir, version = args.child
        print(json.dumps(child(variant, config, save_dir, version, args.max_epochs, args.breakdown)))
        return

    here = os.path.abspath(__file__)
    work = args.keep or tempfile.mkdtemp(prefix="genbounds_suite_")
    os.makedirs(work, exist_ok=True)
    dense_yaml = os.path.join(work, "dense.yaml")
    dense_config(args.config, dense_yaml)
    extra = [f"--max-epochs={args.max_epochs}"] if args.max_epochs else []
    if args.breakdown:
        extra.append("--breakdown")
    info = machine_description()
    loads = [load_average()]
    runs: dict[str, list[dict]] = {"plain": [], "suite": [], "dense": []}

    def run(variant: str, index: int) -> dict:
        cfg = dense_yaml if variant == "dense" else args.config
        if args.in_process:
            res = child(variant, cfg, work, f"{variant}_{index}", args.max_epochs, args.breakdown)
        else:
            res = run_json_child([here, "--child", variant, cfg, work, f"{variant}_{index}", *extra])
        runs[variant].append(res)
        print(f"[{variant} {index}] fit {res['fit_s']:.1f} s (CLI total {res['cli_s']:.1f} s), steps "
              f"{res['global_step']}, probes {res.get('probe_s', 0):.1f} s, deferred {res.get('deferred', '–')}, "
              f"load {load_average()}", file=sys.stderr, flush=True)
        return res

    for r in range(args.rounds):
        group = ["plain", "suite"]
        for variant in group[r % len(group):] + group[:r % len(group)]:  # order rotates from round to round
            run(variant, r)
        if r < args.dense:  # dense runs interleaved with the first rounds, outside the timed pairs
            run("dense", r)
        loads.append(load_average())
    for r in range(args.rounds, args.dense):
        run("dense", r)

    # ---------------------------------------------------------------- tables
    fit = {v: [x["fit_s"] for x in runs[v]] for v in runs}
    lines = [f"### Main job `{os.path.relpath(args.config, ROOT)}`: whole default suite vs no callbacks "
             f"({args.rounds} rounds{', every run in one process' if args.in_process else ''})", "",
             describe_machine_md(info, loads), "",
             "| variant | median training time (s) | min–max (s) | ratio to plain: median [min–max] | "
             "probe time (s, median) | deferred probes (median) | `perf/overhead` logged (median) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    dense_ratio = None
    for v in ("plain", "suite", "dense"):
        if not fit[v]:
            continue
        if v == "plain":
            ratio = "1"
        elif v == "suite":
            ratio = fmt_ratio(ratio_stats(fit[v], fit["plain"]))
        else:
            dense_ratio = [d / statistics.median(fit["plain"]) for d in fit["dense"]]
            ratio = (f"{statistics.median(dense_ratio):.3f}× [{min(dense_ratio):.3f}–{max(dense_ratio):.3f}] "
                     "(vs the median plain)")
        probe = [x.get("probe_s", 0.0) for x in runs[v]]
        deferred = [x.get("deferred", 0) for x in runs[v]]
        logged = []
        for x in runs[v]:
            if v != "plain" and x.get("log_dir"):
                try:
                    logged.append(final_bounds(x["log_dir"])["perf/overhead"][0])
                except Exception:  # noqa: BLE001
                    pass
        lines.append(f"| {v} | {statistics.median(fit[v]):.2f} | {min(fit[v]):.2f}–{max(fit[v]):.2f} | {ratio} | "
                     f"{statistics.median(probe):.2f} | {statistics.median(deferred):.0f} | "
                     f"{statistics.median(logged):.3f} |" if logged else
                     f"| {v} | {statistics.median(fit[v]):.2f} | {min(fit[v]):.2f}–{max(fit[v]):.2f} | {ratio} | "
                     f"{statistics.median(probe):.2f} | {statistics.median(deferred):.0f} | – |")
    adjusted = [speed_adjusted(a, p) for a, p in zip(runs["suite"], runs["plain"])]
    adjusted = [x for x in adjusted if math.isfinite(x)]
    if adjusted:
        lines += ["", f"Speed-adjusted suite/plain (each run's fit time over its own validation steps' time, "
                  f"`common.speed_adjusted`: this machine's whole-process slow states taken out): median "
                  f"**{statistics.median(adjusted):.3f}×** [{min(adjusted):.3f}–{max(adjusted):.3f}] over "
                  f"{len(adjusted)} rounds."]
    raw = [a / b for a, b in zip(fit["suite"], fit["plain"])]
    if raw:
        lines += ["", f"Target ≤ {SUITE_LIMIT:.2f}× (median per-round ratio), read with the median's distribution-free "
                  f"95 % interval (`common.median_ci`; pool runs with benchmarks/pool_runs.py): raw {fmt_ci(raw)} — "
                  f"{verdict(raw, SUITE_LIMIT)}; speed-adjusted {fmt_ci(adjusted)} — {verdict(adjusted, SUITE_LIMIT)}."]
    # probe time by owner
    shown = [v for v in ("suite", "dense") if runs[v]]
    owners = sorted({o for v in shown for x in runs[v] for o in x.get("probe_by_owner", {})})
    if owners:
        lines += ["", "Probe time by callback (median seconds per run; `OverheadBudget.by_owner`):", "",
                  "| callback | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
        for o in owners:
            cells = []
            for v in shown:
                vals = [x.get("probe_by_owner", {}).get(o, 0.0) for x in runs[v]]
                cells.append(f"{statistics.median(vals):.2f}" if vals else "–")
            lines.append(f"| {o} | " + " | ".join(cells) + " |")

    hooked = [v for v in ("suite", "dense") if any("hook_seconds" in x for x in runs[v])]
    if hooked:
        names = sorted({o for v in hooked for x in runs[v] for o in x.get("hook_seconds", {})})
        lines += ["", "Wall time inside each callback's hooks (median seconds per run, `--breakdown`; a bound "
                  "evaluation's requests to the probes count under GeneralizationBound), and the rest of the "
                  "difference to plain:", "", "| callback | " + " | ".join(hooked) + " |", "|---|" + "---:|" * len(hooked)]
        for o in names:
            lines.append(f"| {o} | " + " | ".join(
                f"{statistics.median([x.get('hook_seconds', {}).get(o, 0.0) for x in runs[v]]):.2f}" for v in hooked) + " |")
        rest = []
        for v in hooked:
            diffs = [x["fit_s"] - sum(x.get("hook_seconds", {}).values()) - statistics.median(fit["plain"]) for x in runs[v]]
            rest.append(f"{statistics.median(diffs):.2f}")
        lines.append("| fit time − hooks − median plain (hook-less costs: forward hooks, autograd hooks, "
                     "Lightning dispatch) | " + " | ".join(rest) + " |")

    # ---------------------------------------------------------------- bounds
    if runs["dense"]:
        suite_b = [final_bounds(x["log_dir"]) for x in runs["suite"]]
        dense_b = [final_bounds(x["log_dir"]) for x in runs["dense"]]
        tags = sorted(t for t in suite_b[0] if t.startswith("bound/") and suite_b[0][t][1] is not None)
        lines += ["", f"Final bounds, budgeted (overhead_budget=0.2, {len(suite_b)} runs) vs dense ({len(dense_b)} runs): "
                  "z = |Δ| / sqrt(SE_a² + SE_b²) over every (budgeted, dense) pair", "",
                  "| bound | budgeted: value ± SE (median run) | dense: value ± SE (first run) | z median | z max | within 3 SE |",
                  "|---|---:|---:|---:|---:|---|"]
        for tag in tags:
            zs = []
            for a in suite_b:
                for b in dense_b:
                    (va, sa), (vb, sb) = a.get(tag, (math.nan, None)), b.get(tag, (math.nan, None))
                    if sa is None or sb is None or not all(math.isfinite(x) for x in (va, vb, sa, sb)):
                        zs.append(math.nan)
                        continue
                    den = math.sqrt(sa * sa + sb * sb)
                    zs.append(abs(va - vb) / den if den > 0 else (0.0 if va == vb else math.inf))
            finite = [z for z in zs if math.isfinite(z)]
            vals = sorted((a[tag][0], a[tag][1]) for a in suite_b if tag in a)
            mid = vals[len(vals) // 2] if vals else (math.nan, math.nan)
            d0 = dense_b[0].get(tag, (math.nan, math.nan))
            ok = "yes" if finite and max(finite) <= 3 else ("**no**" if finite else "n/a (NaN)")
            lines.append(f"| `{tag}` | {mid[0]:.4g} ± {mid[1]:.3g} | {d0[0]:.4g} ± {d0[1] if d0[1] is not None else math.nan:.3g} | "
                         f"{statistics.median(finite) if finite else math.nan:.2f} | {max(finite) if finite else math.nan:.2f} | {ok} |")
        no_se = sorted(t for t in suite_b[0] if t.startswith("bound/") and suite_b[0][t][1] is None)
        if no_se:
            lines += ["", "Without a standard error (not compared): " + ", ".join(f"`{t}`" for t in no_se) + "."]
    payload = None
    if args.json:  # reading the runs' event files back only when asked
        payload = {"machine": info, "loads": loads, "runs": runs,
                   "bounds": {v: [final_bounds(x["log_dir"]) for x in runs[v]] for v in ("suite", "dense")}}
    emit_report("\n".join(lines), args.out, args.json, payload)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
