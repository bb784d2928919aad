"""Reproduction of seed 001 (Wang & Mao, ICLR 2022) Figure 4: dynamic gradient clipping
(Algorithm 1, E.5) narrows the train/test accuracy gap under label noise {0.2, 0.4}.

Setup
-----
* default (CPU): ``configs/repro/001_fig4_dynamic_clipping.yaml`` — the one-hidden-layer MLP
  (512 units) on scikit-learn's bundled 8x8 digits (1,258 training / 539 held-out samples, label
  noise in both), plain SGD lr 0.5, batch 60, fixed initialization, 200 epochs for every arm.
* arms, per noise level (same seed, same data order, same epochs):
    - ``none``: plain SGD;
    - ``grad_norm``: ``DynamicGradientClipping(alpha=0.1, auto_start="grad_norm")`` — the paper's
      automatic start (E.5): clipping begins after the first epoch whose mean gradient norm exceeds
      the previous epoch's;
    - ``dispersion``: ``DynamicGradientClipping(alpha=0.1, auto_start="dispersion")`` — clipping
      begins when ``DispersionPhaseDetector`` confirms the dispersion valley (genbounds' variant,
      not in the paper).
  Every arm also runs ``GradientDispersion`` + ``DispersionPhaseDetector`` (measurement only).
* ``--full``: ``configs/repro/001_fig4_dynamic_clipping_mnist.yaml`` — MNIST, lr 0.01, batch 60
  (E.1). Needs ``data/MNIST`` and a GPU; not run on CPU. Writes
  ``docs/results/001_fig4_dynamic_clipping_mnist.*``.

Settings were chosen once and not tuned against the paper.

Usage: python benchmarks/repro_001_fig4_dynamic_clipping.py [--full]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repro_common as rc  # noqa: E402

NOISES = (0.2, 0.4)
ARMS = ("none", "grad_norm", "dispersion")
ARM_LABEL = {"none": "no clipping", "grad_norm": "clipping, auto_start=grad_norm (paper E.5)",
             "dispersion": "clipping, auto_start=dispersion"}
ARM_COLOR = {"none": "tab:red", "grad_norm": "tab:blue", "dispersion": "tab:green"}
ALPHA = 0.1


def overrides(noise: float, arm: str) -> list[str]:
    out = [f"--data.init_args.label_noise={noise}"]
    if arm != "none":
        out += ["--trainer.callbacks+=genbounds.callbacks.DynamicGradientClipping",
                f"--trainer.callbacks.alpha={ALPHA}", f"--trainer.callbacks.auto_start={arm}"]
    return out


def analyse(run, spe: int) -> dict:
    train = dict(zip(*rc.at_epoch_ends(run, "train_acc", spe)))
    val = dict(zip(*rc.at_epoch_ends(run, "val_acc", spe)))
    start = run.final("clip/start_step")
    start = None if start is None else int(round(start))
    active_steps, active = run.series("clip/active")
    last_t, last_v = max(train), max(val)
    return {
        "train": train, "val": val, "start": start,
        "start_epoch": None if start is None else start // spe,
        "clipped_frac": (sum(active) / len(active)) if active else None,
        "final_train": train[last_t], "final_val": val[last_v],
        "best_val": max(val.values()), "best_val_epoch": max(val, key=val.get),
        "valley": run.final("phase/memorization_start_epoch"),
    }


def plot(results: dict, spe: int, title: str):
    plt = rc.pyplot()
    fig, axes = plt.subplots(1, len(NOISES), figsize=(13, 5.2), sharey=True)
    for ax, noise in zip(axes, NOISES):
        for arm in ARMS:
            r = results[(noise, arm)]
            c = ARM_COLOR[arm]
            te, ve = sorted(r["train"]), sorted(r["val"])
            ax.plot(te, [100 * r["train"][e] for e in te], color=c, lw=1.4, label=f"{ARM_LABEL[arm]}: train")
            ax.plot(ve, [100 * r["val"][e] for e in ve], color=c, lw=1.4, ls="--", label=f"{ARM_LABEL[arm]}: val")
            if r["start_epoch"] is not None:
                ax.axvline(r["start_epoch"], color=c, lw=0.9, ls=":")
        ax.set_title(f"label noise {noise:g} (dotted: epoch clipping starts)")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.suptitle(title, fontsize=11)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="paper scale: MNIST MLP (needs data/MNIST and a GPU)")
    args = ap.parse_args()
    if args.full:
        cfg, name, spe = "001_fig4_dynamic_clipping_mnist.yaml", "001_fig4_dynamic_clipping_mnist", 1000
        data_desc = "MNIST (60,000 train / 10,000 test), MLP 784-512-10, SGD lr 0.01, batch 60"
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny model: one thread per run is faster
        cfg, name, spe = "001_fig4_dynamic_clipping.yaml", "001_fig4_dynamic_clipping", 21
        data_desc = ("scikit-learn digits (1,258 train / 539 held out, 8x8), MLP 64-512-10, SGD lr 0.5, "
                     "batch 60 (21 steps per epoch), 200 epochs")
    t_all = time.perf_counter()
    results: dict[tuple[float, str], dict] = {}
    timings: dict[tuple[float, str], float] = {}
    for noise in NOISES:
        for arm in ARMS:
            t0 = time.perf_counter()
            run = rc.run_fit(rc.config_path(cfg), name, f"noise{noise:g}_{arm}", overrides(noise, arm))
            timings[(noise, arm)] = time.perf_counter() - t0
            r = results[(noise, arm)] = analyse(run, spe)
            print(f"noise {noise:g} {arm}: {timings[(noise, arm)]:.0f} s; start step {r['start']} "
                  f"(epoch {r['start_epoch']}), final train {r['final_train']:.3f} val {r['final_val']:.3f} "
                  f"gap {r['final_train'] - r['final_val']:.3f}", flush=True)
    total = time.perf_counter() - t_all
    print(f"total: {total:.0f} s", flush=True)

    rows = []
    for (noise, arm), r in results.items():
        start = "—" if r["start"] is None else f"{r['start']} (epoch {r['start_epoch']})"
        frac = "—" if r["clipped_frac"] is None else f"{100 * r['clipped_frac']:.1f} %"
        rows.append([f"{noise:g}", arm, start, frac, f"{r['best_val']:.3f} (epoch {r['best_val_epoch']})",
                     f"{r['final_train']:.3f}", f"{r['final_val']:.3f}",
                     f"{r['final_train'] - r['final_val']:+.3f}"])
    table = rc.md_table(["label noise", "arm", "clipping start step", "steps clipped after start",
                         "best val acc", "final train acc", "final val acc", "final gap (train − val)"], rows)
    cmd = "python benchmarks/repro_001_fig4_dynamic_clipping.py" + (" --full" if args.full else "")
    timing_line = ", ".join(f"{n:g}/{a}: {t:.0f} s" for (n, a), t in timings.items())
    md = f"""# Seed 001 Fig. 4 — dynamic gradient clipping under label noise{' (MNIST, paper scale)' if args.full else ' (digits, CPU scale)'}

Command: `{cmd}` (trains `genbounds fit --config configs/repro/{cfg} --data.init_args.label_noise=p`,
and for the clipped arms appends `--trainer.callbacks+=genbounds.callbacks.DynamicGradientClipping
--trainer.callbacks.alpha={ALPHA} --trainer.callbacks.auto_start=<grad_norm|dispersion>`; runs in
`bench_out/repro/{name}/`). Wall time {total:.0f} s in all ({timing_line}){', on 2 shared CPU cores, one torch thread per run' if not args.full else ''}.

Setup: {data_desc}; label noise replaces that fraction of the training *and* held-out labels by
uniform random labels (the paper's protocol). Same seed, initialization, batch order and number of
epochs for every arm. `DynamicGradientClipping` is Algorithm 1 of the paper's E.5 (α = {ALPHA}; from
the start step on, a gradient whose norm exceeds the running minimum G of the unclipped norms is
rescaled to norm α·G). Start step: `grad_norm` = after the first epoch whose mean gradient norm
exceeds the previous epoch's (the paper's automatic rule, E.5); `dispersion` = when
`DispersionPhaseDetector` confirms the valley of the epoch-mean gradient dispersion (not in the
paper). "Steps clipped after start" = share of the steps from the start step on that were rescaled
(`clip/active`). Train accuracy is Lightning's running accuracy over each epoch's batches
(train mode); val accuracy is on the (equally noisy) held-out split; "final" = last epoch.

{table}
"""
    if not args.full:
        md += DISCUSSION
    fig = plot(results, spe, "Seed 001 Fig. 4 at " + ("MNIST scale" if args.full else "digits scale")
               + f": train (solid) and val (dashed) accuracy, with and without dynamic clipping (α = {ALPHA})")
    rc.write_result(name, md, fig)


DISCUSSION = """
## Did the gap narrow?

(Written after looking at this run's numbers; the settings were fixed before it and not changed
afterwards. The runs are deterministic on this machine: the unclipped noise-0.2 run repeats the
Fig. 3 reproduction's run step for step.)

**Yes, at the end of training, for both noise levels and both start rules** — the final
train − val gap falls from 0.25 to 0.03 (noise 0.2) and from 0.50 to 0.04 (noise 0.4), and the
final val accuracy is higher than without clipping (0.79–0.80 vs 0.75 at noise 0.2; 0.60–0.61 vs
0.50 at noise 0.4). As in the paper, the clipped models keep a near-optimal held-out accuracy
(about 80 % at noise 0.2 — the best attainable on labels with 20 % noise is about 82 %) instead of
memorizing the noisy labels (unclipped: ≥ 99.6 % train accuracy by epoch 150).

**How it narrows, and the caveats.**
* *It is a slow-down, not a different solution.* Algorithm 1 only lowers the level G when a step
  is *not* clipped, and G is the running minimum of the unclipped norms; from the start step on,
  99.7–99.9 % of the steps are clipped to the fixed norm α·G ≈ 0.033–0.043, about 16–19× smaller
  than the unclipped gradient norms (median 0.58–0.71 after the start). SGD then runs with a constant, much shorter
  step: the train accuracy still rises, by 1–3 points over the remaining 177–198 epochs, and the
  gradient dispersion keeps rising slowly (it never reaches the unclipped runs' peak and second
  descent). The paper says the same ("conspicuously slowing down the transition to the
  memorization regime"); with more epochs the gap would presumably keep growing slowly.
* *No gain over the best epoch of plain SGD.* The best val accuracy of the clipped arms
  (0.796 / 0.803 at noise 0.2, 0.597 / 0.609 at noise 0.4) equals the unclipped run's best (0.800 at
  epoch 8, 0.605 at epoch 21) to within 0.8 points (one of the 539 held-out samples is 0.19 points) — the clipping freezes
  the model near the accuracy it had when clipping began, which early stopping on the held-out
  set would also give.
* *The paper's automatic start fires early on digits.* The epoch-mean gradient norm already rises
  after epoch 1 here (the dispersion's first descent fits inside the first epoch, see the Fig. 3
  reproduction), so `grad_norm` starts clipping at epoch 6 (noise 0.2) and epoch 2 (noise 0.4),
  before the unclipped runs' best val epoch; at noise 0.4 this freezes the model at a slightly
  lower accuracy (0.596) than the `dispersion` start at epoch 10 (0.607). The `dispersion` start
  (valley confirmed at the end of epoch 22 / 9) is later and ends 0.7–1.1 points higher on val
  accuracy, with the same gap.
* The section-5 text of the paper describes a variant that compares with the norm K steps
  earlier; genbounds implements Algorithm 1 of E.5 (running minimum), which is what ran here.
  Digits scale (1,258 training samples, lr 0.5, 200 epochs), not the paper's MNIST (lr 0.01); the
  `--full` runs were not made (no MNIST files, no GPU).
"""


if __name__ == "__main__":
    main()
