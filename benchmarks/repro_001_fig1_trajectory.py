"""Seed 001 Fig. 1: Neu et al.'s vs Wang & Mao's trajectory terms over training, σ ∈ {1e-5, 1e-6}.

    python benchmarks/repro_001_fig1_trajectory.py           # digits MLP, CPU, ~3 min
    python benchmarks/repro_001_fig1_trajectory.py --full    # MNIST MLP (needs data/MNIST, a GPU)

At every validation epoch end `GeneralizationBound` logs, for each grid σ, the two trajectory
terms with the common R²/n dropped (SPEC §6): Neu `sqrt(4 Σ_t η_t² (Γ_{σ√(t−1)} + V_t)/σ²)` (Γ from
`GradientSensitivity`, V_t from `HeldoutGradient`) and Wang–Mao `sqrt(d Σ_t log1p(η_t² V̂_t/(dσ²)))`
(V̂_t from `GradientDispersion`).
"""

from __future__ import annotations

import argparse

from repro_common import config_path, md_table, pyplot, run_fit, write_result

SIGMAS = ["1e-06", "1e-05"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="paper scale: MNIST MLP (needs data/MNIST and a GPU)")
    args = parser.parse_args()
    name = "001_fig1_trajectory_mnist.yaml" if args.full else "001_fig1_trajectory.yaml"
    run = run_fit(config_path(name), "001_fig1", "mnist" if args.full else "digits")

    plt = pyplot()
    fig, axes = plt.subplots(1, len(SIGMAS), figsize=(10, 4))
    rows = []
    for ax, s in zip(axes, SIGMAS):
        steps_n, neu = run.series(f"bound_terms/fig1_trajectory_neu/sigma={s}")
        steps_w, wm = run.series(f"bound_terms/fig1_trajectory_wang_mao/sigma={s}")
        ax.plot(steps_n, neu, marker="o", label="Neu et al. (Thm 1 / Lemma 2)")
        ax.plot(steps_w, wm, marker="s", label="Wang & Mao (Thm 2, Eq. 2)")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(f"trajectory terms, σ = {float(s):g}")
        ax.legend(fontsize=8)
        for step, a, b in list(zip(steps_n, neu, wm))[:: max(1, len(neu) // 5)] + [(steps_n[-1], neu[-1], wm[-1])]:
            rows.append([float(s), step, a, b, a / b])
    gamma_tags = {s: f"sens/gradient_sensitivity_growing/sigma={s}" for s in SIGMAS}
    gamma = {s: run.final(tag) for s, tag in gamma_tags.items()}
    gamma_se = {s: run.final(f"sens/gradient_sensitivity_growing_se/sigma={s}") for s in SIGMAS}
    gamma_step = run.last_step(gamma_tags[SIGMAS[0]])

    def with_se(s: str) -> str:
        se = gamma_se[s]
        return f"{gamma[s]:.3g}" + (f" ± {se:.2g}" if se is not None else "")
    v_final = run.final("grad/heldout_dist_sq")
    md = f"""# Seed 001 Fig. 1: Neu vs Wang–Mao trajectory terms — {'MNIST' if args.full else 'digits'} MLP

Command: `python benchmarks/repro_001_fig1_trajectory.py{' --full' if args.full else ''}` (config
`configs/repro/{name}`).

Setup: the MLP of seed 001 E.1 (512 hidden units), plain SGD, batch 60; at every epoch end the
aggregator evaluates, with the common factor R²/n dropped (SPEC §6),
Neu: `sqrt(4 Σ_t η_t² (Γ_{{σ√(t−1)}}(W_{{t−1}}) + V_t(W_{{t−1}}))/σ²)` and
Wang–Mao: `sqrt(d Σ_t log1p(η_t² V̂_t/(dσ²)))`.
Γ: `GradientSensitivity` (half-split estimator, 16 draws, float64, every 7 steps, held-out probe of
240 samples); V_t: `HeldoutGradient` (`‖ḡ_B − ĝ_ref‖² − s²_ref/m`, every 3 steps); V̂_t:
`GradientDispersion` (every step). Each measurement stands for the steps until the next one.

{md_table(["σ", "step", "Neu term", "Wang–Mao term", "ratio Neu / Wang–Mao"], rows)}

At the last Γ probe (step {gamma_step}; each ± its standard error): Γ at σ√T = {with_se(SIGMAS[0])} (σ = 1e-6) and
{with_se(SIGMAS[1])} (σ = 1e-5),
against V_t ≈ {v_final:.3g}: at these σ the sensitivity term is negligible and Neu's term is
essentially `sqrt(4 Σ η² V)/σ`, linear in 1/σ, while Wang–Mao's grows only like `sqrt(log(1/σ²))`
thanks to the `log1p`.

What is reproduced: as in seed 001 Fig. 1, the Wang–Mao trajectory term is far below Neu et al.'s at
small σ, and the gap widens from σ = 1e-5 to 1e-6 (the paper: "the improvement upon Neu et al.
(2021) is significant" when σ is small). What is not: the absolute values — seed 001 E.2 drops
constants ("the same constants like R, λ_t and σ_t … are ignored") and may average perturbed
gradients before taking norms, so its curves cannot be matched number for number from the text;
the paper also trains deterministically on full MNIST (fixed batches) while this run uses shuffled
digits batches, and V_t here is the held-out estimate (train/test mismatch included), which the
paper's deterministic setting equates with the dispersion.
"""
    write_result("001_fig1_trajectory", md, fig)
    print(md)


if __name__ == "__main__":
    main()
