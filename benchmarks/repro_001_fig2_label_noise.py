"""Seed 001 Fig. 2(c): Wang–Mao's bound and the measured generalization gap vs label noise.

    python benchmarks/repro_001_fig2_label_noise.py           # digits MLP, CPU, ~5 min
    python benchmarks/repro_001_fig2_label_noise.py --full    # MNIST MLP (paper scale; needs data/MNIST, a GPU)

For each label-noise level the MLP is trained until it fits its training set (≥ 99.9 % train
accuracy, as the paper trains to 100 %), then the bound (Eq. 3, and Eq. 2 minimized over σ) and the
measured gap (held-out − training loss) at the final weights are compared. Reports the Spearman
rank correlation between bound and gap over the noise levels.
"""

from __future__ import annotations

import argparse
import math
import sys

from scipy.stats import spearmanr

from repro_common import config_path, md_table, pyplot, run_fit, write_result

NOISE = [0.0, 0.2, 0.4, 0.6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="paper scale: MNIST MLP (needs data/MNIST and a GPU)")
    args = parser.parse_args()
    config = config_path("001_fig2_label_noise_mnist.yaml" if args.full else "001_fig2_label_noise.yaml")
    rows, results = [], []
    for noise in NOISE:
        run = run_fit(config, "001_fig2", f"noise{noise}", [f"--data.init_args.label_noise={noise}"])
        r = {k: run.final(k) for k in ("bound/wang_mao_eq3", "bound/wang_mao_eq3_se", "bound/wang_mao_eq2",
                                       "bound/wang_mao_eq2_se", "gap/measured", "train_acc", "val_acc", "setting/T",
                                       "setting/R", "curv/hessian_trace", "bound_terms/sigma_wang_mao_eq2")}
        results.append(r)
        rows.append([noise, r["setting/T"], r["train_acc"], r["val_acc"], r["gap/measured"],
                     f"{r['bound/wang_mao_eq3']:.4g} ± {r['bound/wang_mao_eq3_se']:.2g}",
                     f"{r['bound/wang_mao_eq2']:.4g} ± {r['bound/wang_mao_eq2_se']:.2g}", r["bound_terms/sigma_wang_mao_eq2"],
                     r["setting/R"], r["curv/hessian_trace"]])
    gaps = [r["gap/measured"] for r in results]
    rho3 = spearmanr([r["bound/wang_mao_eq3"] for r in results], gaps).statistic
    rho2 = spearmanr([r["bound/wang_mao_eq2"] for r in results], gaps).statistic

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(NOISE, [r["bound/wang_mao_eq3"] for r in results], yerr=[r["bound/wang_mao_eq3_se"] for r in results],
                marker="o", label="bound (Eq. 3)")
    ax.errorbar(NOISE, [r["bound/wang_mao_eq2"] for r in results], yerr=[r["bound/wang_mao_eq2_se"] for r in results],
                marker="s", label="bound (Eq. 2, grid minimum)")
    ax.plot(NOISE, [abs(g) for g in gaps], marker="^", color="black", label="|gap| measured")
    ax.set_yscale("log")
    ax.set_xlabel("label noise level")
    ax.set_title(f"{'MNIST' if args.full else 'digits'} MLP: bound vs gap (Spearman ρ = {rho3:.2f})")
    ax.legend()

    scale = "MNIST MLP (paper scale)" if args.full else "scikit-learn digits MLP (CPU scale)"
    md = f"""# Seed 001 Fig. 2(c): bound and measured gap vs label noise — {scale}

Command: `python benchmarks/repro_001_fig2_label_noise.py{' --full' if args.full else ''}`
(config `configs/repro/{'001_fig2_label_noise_mnist.yaml' if args.full else '001_fig2_label_noise.yaml'}`,
one training run per noise level: `--data.init_args.label_noise=…`).

Setup: MLP with one hidden layer of 512 units (seed 001 E.1), plain SGD, batch 60, trained until
≥ 99.9 % training accuracy (max 400 epochs), labels of train and held-out sets replaced at random
(seed 001 §5). Bounds at the final weights: Eq. 3 with Tr H from `HessianTrace` (Hutchinson,
5 % relative SE) and Σ η² V̂ from `GradientDispersion` (every step); Eq. 2 minimized over
σ ∈ {{1e-3, …, 0.1}} with the flatness term from `Flatness(scaling="sqrt_steps")` on 500-sample
probe sets. `gap/measured` = held-out − training loss on 500-sample subsets. R = half the observed
range of per-sample training losses (seed 001 E.1). ± = standard error of the Monte-Carlo parts
(Tr H; the flatness term at the grid minimum).

{md_table(["noise", "steps T", "train acc", "val acc", "gap (loss)", "Eq. 3 bound", "Eq. 2 bound",
           "σ at Eq. 2 min", "R", "Tr H(W_T)"], rows)}

**Spearman rank correlation between bound and measured gap over the {len(NOISE)} noise levels:
Eq. 3: ρ = {rho3:.2f}; Eq. 2: ρ = {rho2:.2f}.**

How this compares with the paper: seed 001 Fig. 2(c) shows the bound (Eq. 3) tracking the gap as
the noise grows (MNIST MLP, log scale). Here Eq. 3 does too — it ranks the noise levels as the
measured gap does — while staying one to two orders of magnitude above it (the paper's bound is not
tight either). Eq. 2's grid minimum sits at the grid's largest σ, 0.1: there the perturbation's
standard deviation σ√T is 3–6, which destroys the network, and the flatness term
|γ(S) − γ(S')| is the difference of two huge, noisy losses (its SE is the ± shown) — so Eq. 2 on this
grid mostly measures that noise; a grid fixed before the run cannot be moved after seeing it
without a winner's-curse bias, so it is reported as is. Differences: digits has 1,258 training images instead of 60,000,
so n in `R²/n` is ~50× smaller; the learning rate is 0.5 (not 0.01) so that 60 % noise is fitted
within the CPU budget, and more steps T enter both T·Tr H and Σ η² V̂; R is the observed loss range
(it grows with the noise, since memorized noisy labels drive some per-sample losses high).
"""
    write_result("001_fig2_label_noise", md, fig)
    print(md)
    if not all(math.isfinite(x) for x in gaps):
        sys.exit(1)


if __name__ == "__main__":
    main()
