"""Reproduction of seed 001 (Wang & Mao, ICLR 2022) Figure 3: the epoch-wise "double descent" of
the gradient dispersion, with train and test accuracy per epoch, under label noise {0, .2, .4, .6}.

Setup
-----
* default (CPU): ``configs/repro/001_fig3_double_descent.yaml`` — the paper's one-hidden-layer MLP
  (512 units) on scikit-learn's bundled 8x8 digits (1,258 training / 539 held-out samples, label
  noise applied to both, as in the paper), plain SGD lr 0.5, batch 60, fixed initialization
  (``seed_everything: 0``), 300 epochs for every noise level. ``GradientDispersion`` measures
  Tr Σ_B = s²/b at every step; ``DispersionPhaseDetector`` averages it per epoch and confirms the
  valley (running minimum of a 3-epoch trailing mean, left by > 10 % for 2 epochs).
* ``--full``: ``configs/repro/001_fig3_double_descent_mnist.yaml`` — the paper's scale (E.1): MNIST,
  lr 0.01, batch 60. Needs ``data/MNIST`` and a GPU; not run on CPU. Writes
  ``docs/results/001_fig3_double_descent_mnist.*``.

Settings were chosen once (lr 0.5 as in the project's Fig. 2 reproduction, where the 60 % noise run
fits the training set in ~180 epochs; 300 epochs so that every noise level is followed past that
point) and not tuned against the paper.

Definitions used in the table
-----------------------------
* valley epoch: ``phase/memorization_start_epoch`` as logged by the detector (and the epoch at whose
  end it was confirmed);
* parting epoch: the first epoch from which ``train_acc − val_acc`` stays above 0.05 for every later
  epoch (``train_acc`` is Lightning's running accuracy over the epoch's training batches);
* fit epoch: the first epoch with ``train_acc ≥ 0.99``;
* peak epoch: the epoch of the largest epoch-mean dispersion after the valley epoch.

Usage: python benchmarks/repro_001_fig3_double_descent.py [--full]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repro_common as rc  # noqa: E402

NOISES = (0.0, 0.2, 0.4, 0.6)
GAP = 0.05  # train − val accuracy that counts as "parted"
FIT = 0.99  # train accuracy that counts as "fit"


def parting_epoch(epochs: list[int], train: dict[int, float], val: dict[int, float]) -> int | None:
    common = [e for e in epochs if e in train and e in val]
    start = None
    for e in common:
        if train[e] - val[e] > GAP:
            if start is None:
                start = e
        else:
            start = None
    return start


def first_at_least(series: dict[int, float], level: float) -> int | None:
    for e in sorted(series):
        if series[e] >= level:
            return e
    return None


def analyse(run, spe: int) -> dict:
    de, dv = rc.at_epoch_ends(run, "phase/dispersion_epoch_mean", steps_per_epoch=spe)
    disp = dict(zip(de, dv))
    if not disp:  # fall back on the per-step series
        steps, vals = run.series("grad/dispersion")
        buckets: dict[int, list[float]] = {}
        for s, v in zip(steps, vals):
            buckets.setdefault(s // spe, []).append(v)
        disp = {e: float(np.mean(v)) for e, v in buckets.items()}
    train = dict(zip(*rc.at_epoch_ends(run, "train_acc", spe)))
    val = dict(zip(*rc.at_epoch_ends(run, "val_acc", spe)))
    valley = run.final("phase/memorization_start_epoch")
    valley = None if valley is None else int(round(valley))
    confirmed = None
    ms, _ = run.series("phase/memorization_start_epoch")
    if ms:
        confirmed = (ms[0] + 1) // spe - 1  # logged at the first step after the epoch's end
    epochs = sorted(set(train) | set(val) | set(disp))
    peak = None
    if valley is not None:
        after = {e: v for e, v in disp.items() if e > valley}
        if after:
            peak = max(after, key=after.get)
    last = max(train) if train else None
    return {
        "disp": disp, "train": train, "val": val, "valley": valley, "confirmed": confirmed, "peak": peak,
        "parting": parting_epoch(epochs, train, val), "fit": first_at_least(train, FIT),
        "final_train": train.get(last, math.nan) if last is not None else math.nan,
        "final_val": val.get(max(val), math.nan) if val else math.nan,
        "best_val": max(val.values()) if val else math.nan,
        "best_val_epoch": max(val, key=val.get) if val else None,
        "step_disp": run.series("grad/dispersion"),
    }


def fmt(e) -> str:
    return "—" if e is None else str(e)


def plot(results: dict[float, dict], spe: int, title: str):
    plt = rc.pyplot()
    fig = plt.figure(figsize=(12, 9))
    grid = fig.add_gridspec(3, 2, height_ratios=(1, 1, 0.1))
    axes = np.array([[fig.add_subplot(grid[i, j]) for j in range(2)] for i in range(2)])
    for ax in axes[0]:
        ax.sharex(axes[1, 0])
    for ax in axes[1, 1:]:
        ax.sharex(axes[1, 0])
    legend_ax = fig.add_subplot(grid[2, :])
    legend_ax.axis("off")
    handles: dict[str, object] = {}
    for ax, (noise, r) in zip(axes.ravel(), results.items()):
        steps, vals = r["step_disp"]
        if steps:
            (h,) = ax.plot(np.asarray(steps) / spe, vals, color="0.78", lw=0.4, zorder=1)
            handles["dispersion, per step"] = h
        de = sorted(r["disp"])
        (h,) = ax.plot(de, [r["disp"][e] for e in de], color="tab:blue", lw=1.8, zorder=2)
        handles["dispersion, epoch mean (left axis, log)"] = h
        ax.set_yscale("log")
        ax.set_ylabel("gradient dispersion Tr Σ_B", color="tab:blue")
        ax.tick_params(axis="y", colors="tab:blue")
        marks = []
        if r["valley"] is not None:
            handles["detected valley"] = ax.axvline(r["valley"], color="tab:red", ls="--", lw=1.4)
            marks.append(f"valley epoch {r['valley']}")
        else:
            marks.append("no valley detected")
        if r["peak"] is not None:
            handles["dispersion peak after the valley"] = ax.axvline(r["peak"], color="tab:purple", ls=":", lw=1.8)
            marks.append(f"peak epoch {r['peak']}")
        ax.set_title(f"label noise {noise:g}  ({', '.join(marks)})", fontsize=10)
        ax.grid(alpha=0.25)
        ax2 = ax.twinx()
        te, ve = sorted(r["train"]), sorted(r["val"])
        (h,) = ax2.plot(te, [100 * r["train"][e] for e in te], color="tab:orange", lw=1.4)
        handles["train accuracy (right axis)"] = h
        (h,) = ax2.plot(ve, [100 * r["val"][e] for e in ve], color="tab:green", lw=1.4)
        handles["val accuracy (right axis)"] = h
        ax2.set_ylim(0, 102)
        ax2.set_ylabel("accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(title, fontsize=11)
    legend_ax.legend(list(handles.values()), list(handles), loc="center", ncol=3, fontsize=9, frameon=False)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="paper scale: MNIST MLP (needs data/MNIST and a GPU)")
    args = ap.parse_args()
    if args.full:
        cfg, name, spe = "001_fig3_double_descent_mnist.yaml", "001_fig3_double_descent_mnist", 1000
        data_desc = "MNIST (60,000 train / 10,000 test), MLP 784-512-10, SGD lr 0.01, batch 60"
    else:
        # tiny model: one thread per training process is faster than two competing ones
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        cfg, name, spe = "001_fig3_double_descent.yaml", "001_fig3_double_descent", 21
        data_desc = ("scikit-learn digits (1,258 train / 539 held out, 8x8), MLP 64-512-10, "
                     "SGD lr 0.5, batch 60 (21 steps per epoch)")
    t_all = time.perf_counter()
    results: dict[float, dict] = {}
    timings: dict[float, float] = {}
    for noise in NOISES:
        t0 = time.perf_counter()
        run = rc.run_fit(rc.config_path(cfg), name, f"noise{noise:g}", [f"--data.init_args.label_noise={noise}"])
        timings[noise] = time.perf_counter() - t0
        results[noise] = analyse(run, spe)
        r = results[noise]
        print(f"noise {noise:g}: {timings[noise]:.0f} s; valley {r['valley']} (confirmed {r['confirmed']}), "
              f"parting {r['parting']}, fit {r['fit']}, peak {r['peak']}, final train {r['final_train']:.3f} "
              f"val {r['final_val']:.3f}", flush=True)
    total = time.perf_counter() - t_all
    print(f"total: {total:.0f} s", flush=True)

    rows = []
    for noise, r in results.items():
        vd = r["disp"].get(r["valley"]) if r["valley"] is not None else None
        pd = r["disp"].get(r["peak"]) if r["peak"] is not None else None
        rows.append([
            f"{noise:g}",
            fmt(r["valley"]) + ("" if r["confirmed"] is None else f" (confirmed {r['confirmed']})"),
            fmt(r["parting"]), fmt(r["fit"]), fmt(r["peak"]),
            "—" if vd is None or pd is None else f"{pd / vd:.2f}",
            f"{r['best_val']:.3f} (epoch {r['best_val_epoch']})",
            f"{r['final_train']:.3f}", f"{r['final_val']:.3f}",
        ])
    table = rc.md_table(
        ["label noise", "valley epoch detected", "parting epoch", "fit epoch (train ≥ 0.99)",
         "peak dispersion epoch (after valley)", "peak / valley dispersion", "best val acc",
         "final train acc", "final val acc"], rows)
    cmd = "python benchmarks/repro_001_fig3_double_descent.py" + (" --full" if args.full else "")
    timing_line = ", ".join(f"{n:g}: {t:.0f} s" for n, t in timings.items())
    md = f"""# Seed 001 Fig. 3 — epoch-wise double descent of the gradient dispersion{' (MNIST, paper scale)' if args.full else ' (digits, CPU scale)'}

Command: `{cmd}` (trains `genbounds fit --config configs/repro/{cfg} --data.init_args.label_noise=p`
for p in {{0, 0.2, 0.4, 0.6}}; runs in `bench_out/repro/{name}/noise<p>/`). Wall time {total:.0f} s
in all ({timing_line}){' on 2 shared CPU cores, one torch thread per run' if not args.full else ''}.

Setup: {data_desc}; label noise replaces that fraction of the training *and* held-out labels by
uniform random labels (the paper's protocol, so the best attainable held-out accuracy is about
1 − 0.9p); fixed initialization (`seed_everything: 0`), no weight decay, no momentum, the same
number of epochs for every noise level. `GradientDispersion` (BackPACK, every step) logs
`grad/dispersion` = s²/b = Tr Σ_B; `DispersionPhaseDetector` (3-epoch trailing mean, valley confirmed
after a > 10 % rise lasting 2 epochs) logs `phase/dispersion_epoch_mean` and
`phase/memorization_start_epoch`.

Definitions: *valley epoch* = `phase/memorization_start_epoch` (the epoch at whose end the detector
confirmed it in brackets); *parting epoch* = first epoch from which train − val accuracy stays
above {GAP} for the rest of training (train accuracy is the running accuracy over the epoch's
batches, in train mode); *fit epoch* = first epoch with train accuracy ≥ {FIT}; *peak* = largest
epoch-mean dispersion after the valley. Epochs count from 0.

{table}
"""
    if not args.full:
        md += DISCUSSION
    fig = plot(results, spe, "Seed 001 Fig. 3 at " + ("MNIST scale" if args.full else "digits scale")
               + ": epoch-mean gradient dispersion (log, left) and train / val accuracy (right)")
    rc.write_result(name, md, fig)


DISCUSSION = """
## Comparison with the paper

(Written after looking at this run's numbers; the settings were fixed before it and not changed
afterwards. Numbers quoted below are from the run this file was written with; the runs are
deterministic on this machine, so a re-run should give the same table.)

**What matches.** With label noise the epoch-mean dispersion follows the paper's three phases:
it is flat or falling at first, then rises by a factor 1.8 / 3.0 / 4.7 (noise 0.2 / 0.4 / 0.6) to a
peak at epoch 68 / 81 / 94, then falls by about two decades while the network fits the noisy
training labels (train accuracy ≥ 0.99 at epoch 134 / 145 / 159, about 65 epochs after the peak).
The rise coincides with the memorization regime: train accuracy climbs past the best attainable
held-out accuracy while val accuracy falls from its best (0.800 / 0.605 / 0.432) to 0.74 / 0.50 /
0.29 at the end; the peak falls where train accuracy is 0.86 / 0.77 / 0.72. More noise gives a
higher and later peak (the paper does not quantify this). Without noise there is no double descent:
the dispersion falls steadily (up to epoch-to-epoch noise) by 3.5 decades and no valley is detected (the paper's Fig. 3a
and E.6 — although here the decay on a log axis is concave, slower than exponential, not a
straight line). At noise 0.2 the detected valley (epoch 8) is exactly the epoch of the best val
accuracy: the "great divide" between generalization and memorization.

**What differs, and why.**
* *Phase 1 is compressed into the first epoch at noise 0.4 and 0.6.* The per-step dispersion drops
  from 0.39 to about 0.3 within the first ~5–10 steps of epoch 0 and starts rising in epoch 1, so
  the epoch-mean valley is epoch 0 and the detector's valley precedes the best val accuracy
  (epoch 21 / 11) instead of marking it: on digits the dispersion begins to rise while val accuracy
  is still creeping up. With 21 steps per epoch at lr 0.5 an epoch here is a much coarser unit of
  training than an MNIST epoch (1,000 steps at lr 0.01), and the 8×8 digits are easy enough that
  the clean patterns are extracted within a few dozen steps — the paper itself notes that the first
  phase is shorter for simpler and cleaner data. The "descent" of phase 1 in epoch means is small
  (about −11 % at noise 0.2, from epoch 1 to the valley at epoch 8), far from the paper's rapid drop to "a very low level".
* *Train and val accuracy part late relative to the valley.* With the definition above (gap
  > 0.05 for good) they part at epoch 56 / 30 / 26 — during the rise, not at the valley. The
  running train accuracy on noisy labels starts *below* the attainable val accuracy, so a gap of
  5 points only builds up after a good part of the noisy labels has been memorized.
* *Phase 3 does not push val accuracy to a minimum.* In the paper the third phase ends with train
  and test curves at their maximum and minimum. Here val accuracy bottoms out around the peak or
  shortly after (5-epoch smoothed minimum at epoch 113 / 95 / 128) and then recovers a little
  while the dispersion falls (noise 0.6: 0.25 → 0.29; 0.4: 0.46 → 0.50; 0.2: 0.72 → 0.74).
* *Scale.* Digits has 1,258 training samples (MNIST 60,000), uses lr 0.5 instead of 0.01, and
  trains a fixed 300 epochs rather than "until 100 % training accuracy"; the valley detector's
  3-epoch trailing mean also reports the valley up to an epoch late. The paper-scale runs
  (`--full`, MNIST, lr 0.01) were not run here (no MNIST files, no GPU).
"""


if __name__ == "__main__":
    main()
