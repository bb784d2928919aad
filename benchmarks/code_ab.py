"""Two versions of the code against each other: plain training and ``GradientDispersion()`` every
step, each version's own fit in fresh processes, alternating, so that a change's effect is read
as a paired ratio instead of across runs taken at different times of a noisy machine.

    git worktree add /tmp/base <commit>                                   # the version to compare with
    OMP_NUM_THREADS=1 python benchmarks/code_ab.py --base /tmp/base --rounds 8     # MLP, about 4 min

Each round runs four children — (this tree, plain), (this tree, dispersion), (base, dispersion),
(base, plain), the order rotating — each ``overhead_dispersion.py --child`` of its own tree with
``PYTHONPATH`` on that tree's ``src``. Per quantity (ms a step, peak growth), the medians with
their 95 % intervals (``common.fmt_ci``) of: each version's dispersion over its plain run, and
this tree's dispersion and plain runs over the base's (a plain ratio away from 1 says the machine
drifted, not the code).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit_report, fmt_ci, load_average, run_json_child  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(tree: str, model: str, config: str, steps: int) -> dict:
    """One fit of ``tree``'s code: its own ``overhead_dispersion.py`` child, its ``src`` first on the path."""
    return run_json_child([os.path.join(tree, "benchmarks", "overhead_dispersion.py"), "--child", model, config,
                           "--steps", str(steps), "--warmup", "30", "--epoch-steps", "50"],
                          env={"PYTHONPATH": os.path.join(tree, "src")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a checkout of the version to compare with (a git worktree)")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trees = {"this": HERE, "base": os.path.abspath(args.base)}
    configs = [("this", "plain"), ("this", "dispersion"), ("base", "dispersion"), ("base", "plain")]
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    loads = [load_average()]
    for r in range(args.rounds):
        for tree, config in configs[r % 4:] + configs[:r % 4]:
            res = _child(trees[tree], args.model, config, args.steps)
            runs[(tree, config)].append(res)
            print(f"[round {r + 1}/{args.rounds}] {tree:4s} {config:10s} {res['ms_per_step']:.3f} ms/step, "
                  f"peak +{res['peak_growth_mib']:.1f} MiB", file=sys.stderr, flush=True)
        loads.append(load_average())

    def ratios(a: tuple[str, str], b: tuple[str, str], key: str) -> list[float]:
        return [x[key] / y[key] for x, y in zip(runs[a], runs[b])]

    lines = [f"### {args.model}: this tree against `{args.base}` ({args.rounds} rounds, fresh processes, "
             f"30 + {args.steps} steps)", "",
             f"Load averages (1/5/15 min) during the measurement: {'; '.join(loads)}.", "",
             "| median [95 % CI] | this: dispersion / plain | base: dispersion / plain | dispersion: this / base "
             "| plain: this / base |", "|---|---:|---:|---:|---:|"]
    for key, label in (("ms_per_step", "time a step"), ("peak_growth_mib", "peak growth")):
        lines.append(f"| {label} | {fmt_ci(ratios(('this', 'dispersion'), ('this', 'plain'), key))} "
                     f"| {fmt_ci(ratios(('base', 'dispersion'), ('base', 'plain'), key))} "
                     f"| {fmt_ci(ratios(('this', 'dispersion'), ('base', 'dispersion'), key))} "
                     f"| {fmt_ci(ratios(('this', 'plain'), ('base', 'plain'), key))} |")
    emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
