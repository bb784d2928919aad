"""Reproduction of the "idealized experiment" (Sec. 2.4, Table 1, App. A.1) of seed paper 002.

Setup (from the paper)
----------------------
* Population: 30 candidate 2-D loss functions on [0, 8]^2. Each has a local minimum at (7, 7)
  and one extra critical point at a location drawn uniformly from
  {(1,1), (1,4), (1,7), (4,1), (4,4), (4,7), (7,1), (7,4)}; with probability rho = 0.35 the extra
  point is a local maximum, otherwise a local minimum. Each critical point is a Gaussian bump
  whose height and width are Gaussian random variables.
* 10 training sets, each 30 candidates drawn with replacement; training loss = their average.
  Test (population) loss = average of all 30 candidates.
* GD, SGD and NoisyGD with identical initialisations / hyper-parameters: 200 iterations, learning
  rate 0.4 * 0.99**t, 100 initialisations on a 10 x 10 grid over [0, 8]^2. Reported: mean test
  loss of the final iterate over training sets x initialisations.

Constants the paper does not give (chosen once, a priori, never tuned against Table 1)
--------------------------------------------------------------------------------------
* Candidate function:  f_i(x) = -a_i * exp(-|x - (7,7)|^2 / (2 w_i^2))
                                 + s_i * b_i * exp(-|x - c_i|^2 / (2 v_i^2)),
  s_i = +1 (maximum, prob. rho) or -1 (minimum); no additive offset (the paper's loss level is
  unknown, so only differences between algorithms are comparable with Table 1).
* (7,7) well: depth a ~ N(10, 2^2), width w ~ N(1.5, 0.2^2).
* Extra critical point: height b ~ N(80, 20^2), width v ~ N(2.0, 0.3^2).
  Why so tall: every candidate has the (7,7) well but each of the 8 extra locations is hit by only
  ~30/8 candidates, so after averaging over 30 functions an extra location only beats the (7,7)
  well (depth ~10) in a *training* set if its bumps are ~an order of magnitude taller. With
  b ~ 80 an over-sampled location (e.g. 5-7 "minimum" draws, no "maximum" draw) gives a training
  minimum of depth ~13-19 (deeper than the good one, as the paper describes), while in the
  population (~2.4 minima and ~1.3 maxima per location on average) it stays shallower (~3) on
  average -- though a single population draw can violate this (see "conditioning" below).
  Wider extra bumps follow the paper's "the spurious minimum is deeper, broader". The large
  per-sample gradients also match the x10^3 scale of the gradient-covariance trace in Fig. 2g.
  Depths/heights are clipped at >= 1, widths at >= 0.5.
* Iterates are projected (clamped) onto the domain [0, 8]^2 after every step, for all algorithms.
* Initial grid: np.linspace(0, 8, 10) in each coordinate (boundaries included).
* SGD: batch size 1 -- each step uses the gradient of one training-set member drawn uniformly
  (with replacement across steps), independently for every run.
* NoisyGD: x <- x - lr_t * (grad L_train(x) + sigma * z), z ~ N(0, I_2), i.e. the noise enters
  exactly as SGD's gradient noise does (scaled by lr_t). sigma^2 is matched per training set to
  SGD's per-coordinate gradient-noise variance at the initial points:
  sigma^2 = mean over the 100 inits of tr(Cov_j[grad f_j(x0)]) / 2 (covariance over the 30
  members of the training set, i.e. the covariance of the batch-size-1 SGD gradient).
* Reported SE: std of the 10 x 100 final test losses / sqrt(1000); the SE over the 10
  training-set means is also printed.
* Population conditioning (added after the first run -- the only post-hoc change): the population
  is redrawn from the same RNG stream until the population loss has its global minimum within 1
  of (7,7), the landscape property the paper states (Fig. 2d). With the constants above ~2/3 of
  unconditioned draws violate it (seed 0 did: its population minimum was a merged extra-bump basin
  at (5.3, 6.4)). The a-priori unconditioned seed-0 run is re-run and reported alongside.
* Sensitivity check (reported separately, not the headline): shallower extra bumps,
  SHALLOW_BUMPS below (extra height N(12, 3^2), all widths N(1.5, 0.3^2)).

Scales
------
* default: the paper's scale -- one population, 10 training sets x 100 inits, one SGD/NoisyGD
  noise draw per run (plus the unconditioned and shallow-bump runs); ~15-20 s on 2 CPU cores.
  Writes docs/results/002_idealized_2d.{md,png}.
* --full : 5 populations (seeds seed..seed+4) x 10 training sets x 100 inits, SGD / NoisyGD
  repeated with 3 noise draws per run; ~1.5 min. Writes docs/results/002_idealized_2d_full.{md,png}.

Usage: python benchmarks/repro_002_idealized.py [--full] [--seed 0] [--out-dir docs/results]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

LOCATIONS = ((1.0, 1.0), (1.0, 4.0), (1.0, 7.0), (4.0, 1.0), (4.0, 4.0), (4.0, 7.0), (7.0, 1.0), (7.0, 4.0))
GOOD_MIN = (7.0, 7.0)
DOMAIN = (0.0, 8.0)


@dataclass(frozen=True)
class Config:
    n_candidates: int = 30
    rho: float = 0.35
    well_depth: tuple[float, float] = (10.0, 2.0)   # (mean, std) of the (7,7) well depth
    well_width: tuple[float, float] = (1.5, 0.2)
    extra_height: tuple[float, float] = (80.0, 20.0)  # (mean, std) of the extra bump height
    extra_width: tuple[float, float] = (2.0, 0.3)
    n_train_sets: int = 10
    train_size: int = 30
    iters: int = 200
    lr0: float = 0.4
    decay: float = 0.99
    grid: int = 10
    noise_repeats: int = 1
    condition_population: bool = True  # redraw until the population's global minimum is at (7,7)


# Sensitivity variant: shallower extra bumps, a first guess at the paper's unstated constants
# (run alongside, reported separately; NOT the headline). With extra bumps this shallow no training set can have a spurious
# minimum deeper than (7,7) (they are only shallower local minima), see the .md.
SHALLOW_BUMPS = dict(well_depth=(10.0, 2.0), well_width=(1.5, 0.3), extra_height=(12.0, 3.0), extra_width=(1.5, 0.3))


# ----------------------------------------------------------------------------------------------
# Population
# ----------------------------------------------------------------------------------------------
def population_min_near_good(pop: dict[str, torch.Tensor], radius: float = 1.0, n: int = 81) -> bool:
    """True if the population loss's global minimum over an n x n grid of [0,8]^2 is within `radius` of (7,7)."""
    pts = grid_inits(n)
    best = pts[population_loss(pts, pop).argmin()]
    return bool((best - torch.tensor(GOOD_MIN, dtype=torch.float64)).norm() < radius)


def make_population(cfg: Config, rng: np.random.Generator, max_tries: int = 1000) -> dict[str, torch.Tensor]:
    """Draw the candidate population; if cfg.condition_population, redraw (same rng stream) until the
    population loss has its global minimum at the good well (7,7), as the paper's Fig. 2d shows.
    The number of draws used is stored under "draws"."""
    for k in range(1, max_tries + 1):
        pop = draw_population(cfg, rng)
        if not cfg.condition_population or population_min_near_good(pop):
            pop["draws"] = k
            return pop
    raise RuntimeError("no population with its global minimum at (7,7) found")


def draw_population(cfg: Config, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Candidate functions as bump parameters: centers (N,2,2), signed amplitudes (N,2), widths (N,2).

    Bump k of candidate i contributes amp[i,k] * exp(-|x - centers[i,k]|^2 / (2 widths[i,k]^2));
    amp < 0 is a minimum (well), amp > 0 a maximum.
    """
    n = cfg.n_candidates
    loc_idx = rng.integers(0, len(LOCATIONS), size=n)
    is_max = rng.random(n) < cfg.rho
    depth = np.clip(rng.normal(*cfg.well_depth, size=n), 1.0, None)
    wwidth = np.clip(rng.normal(*cfg.well_width, size=n), 0.5, None)
    height = np.clip(rng.normal(*cfg.extra_height, size=n), 1.0, None)
    ewidth = np.clip(rng.normal(*cfg.extra_width, size=n), 0.5, None)
    centers = np.stack([np.tile(GOOD_MIN, (n, 1)), np.asarray(LOCATIONS)[loc_idx]], axis=1)
    amps = np.stack([-depth, np.where(is_max, height, -height)], axis=1)
    widths = np.stack([wwidth, ewidth], axis=1)
    f64 = torch.float64
    return {
        "centers": torch.tensor(centers, dtype=f64),
        "amps": torch.tensor(amps, dtype=f64),
        "widths": torch.tensor(widths, dtype=f64),
        "loc_idx": torch.tensor(loc_idx),
        "is_max": torch.tensor(is_max),
    }


def make_train_sets(cfg: Config, rng: np.random.Generator) -> torch.Tensor:
    """(S, train_size) candidate indices, sampled with replacement."""
    return torch.tensor(rng.integers(0, cfg.n_candidates, size=(cfg.n_train_sets, cfg.train_size)))


def candidate_values(x: torch.Tensor, pop: dict[str, torch.Tensor]) -> torch.Tensor:
    """f_i(x) for every candidate i: x (..., 2) -> (..., N). Differentiable (autograd)."""
    d = x[..., None, None, :] - pop["centers"]                      # (..., N, 2, 2)
    r2 = (d * d).sum(-1)                                            # (..., N, 2)
    return (pop["amps"] * torch.exp(-r2 / (2 * pop["widths"] ** 2))).sum(-1)


def candidate_grads(x: torch.Tensor, pop: dict[str, torch.Tensor]) -> torch.Tensor:
    """Analytic grad f_i(x) for every candidate: x (..., 2) -> (..., N, 2)."""
    d = x[..., None, None, :] - pop["centers"]                      # (..., N, 2, 2)
    r2 = (d * d).sum(-1)
    w2 = pop["widths"] ** 2
    coef = -pop["amps"] * torch.exp(-r2 / (2 * w2)) / w2           # (..., N, 2)
    return (coef[..., None] * d).sum(-2)


def population_loss(x: torch.Tensor, pop: dict[str, torch.Tensor]) -> torch.Tensor:
    return candidate_values(x, pop).mean(-1)


def train_loss(x: torch.Tensor, pop: dict[str, torch.Tensor], members: torch.Tensor) -> torch.Tensor:
    """x (S, ..., 2), members (S, M) -> training loss (S, ...)."""
    vals = candidate_values(x, pop)                                 # (S, ..., N)
    idx = members.view(members.shape[0], *([1] * (vals.dim() - 2)), members.shape[1])
    return torch.gather(vals, -1, idx.expand(*vals.shape[:-1], members.shape[1])).mean(-1)


def _member_grads(x: torch.Tensor, pop, members: torch.Tensor) -> torch.Tensor:
    """x (S, R, 2) -> grads of the training-set members (S, R, M, 2)."""
    g = candidate_grads(x, pop)                                     # (S, R, N, 2)
    idx = members[:, None, :, None].expand(x.shape[0], x.shape[1], members.shape[1], 2)
    return torch.gather(g, 2, idx)


def grid_inits(n: int) -> torch.Tensor:
    t = torch.linspace(DOMAIN[0], DOMAIN[1], n, dtype=torch.float64)
    gx, gy = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)       # (n*n, 2)


def matched_noise_std(x0: torch.Tensor, pop, members: torch.Tensor) -> torch.Tensor:
    """Per training set: sqrt(mean over inits of tr Cov_j[grad f_j(x0)] / 2) -> (S,)."""
    g = _member_grads(x0, pop, members)                             # (S, R, M, 2)
    tr_cov = g.var(dim=2, unbiased=False).sum(-1)                   # (S, R)
    return torch.sqrt(tr_cov.mean(-1) / 2.0)


# ----------------------------------------------------------------------------------------------
# Algorithms (all training sets x all inits at once)
# ----------------------------------------------------------------------------------------------
def run_algorithm(algo: str, x0: torch.Tensor, pop, members: torch.Tensor, *, iters: int, lr0: float,
                  decay: float, gen: torch.Generator, noise_std: torch.Tensor | None = None,
                  record: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run `algo` in {"gd", "sgd", "noisygd"} from x0 (S, R, 2); returns final iterates (S, R, 2)
    and, if record, the trajectory (iters+1, S, R, 2)."""
    x = x0.clone()
    S, R, _ = x.shape
    M = members.shape[1]
    traj = [x.clone()] if record else None
    for t in range(iters):
        lr = lr0 * decay ** t
        if algo == "sgd":
            j = torch.randint(0, M, (S, R), generator=gen)
            cand = torch.gather(members, 1, j)                       # (S, R) candidate index
            g_all = candidate_grads(x, pop)                          # (S, R, N, 2)
            g = torch.gather(g_all, 2, cand[..., None, None].expand(S, R, 1, 2)).squeeze(2)
        else:
            g = _member_grads(x, pop, members).mean(2)
            if algo == "noisygd":
                z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
                g = g + noise_std[:, None, None] * z
            elif algo != "gd":
                raise ValueError(algo)
        x = (x - lr * g).clamp(*DOMAIN)
        if record:
            traj.append(x.clone())
    return x, (torch.stack(traj) if record else None)


def run_experiment(cfg: Config, seed: int = 0, record_set: int | None = 0) -> dict:
    """One population (drawn from `seed`), cfg.n_train_sets training sets, all three algorithms."""
    rng = np.random.default_rng(seed)
    pop = make_population(cfg, rng)
    members = make_train_sets(cfg, rng)
    S = members.shape[0]
    inits = grid_inits(cfg.grid)
    x0 = inits.expand(S, -1, -1).contiguous()                        # (S, R, 2)
    sigma = matched_noise_std(x0, pop, members)
    out: dict = {"pop": pop, "members": members, "inits": inits, "sigma": sigma, "cfg": cfg, "seed": seed}
    for k, algo in enumerate(("gd", "sgd", "noisygd")):
        reps = 1 if algo == "gd" else cfg.noise_repeats
        finals, tests, trains = [], [], []
        for r in range(reps):
            gen = torch.Generator().manual_seed(seed * 1000 + 10 * k + r)
            xf, traj = run_algorithm(algo, x0, pop, members, iters=cfg.iters, lr0=cfg.lr0, decay=cfg.decay,
                                     gen=gen, noise_std=sigma, record=(r == 0 and record_set is not None))
            finals.append(xf)
            tests.append(population_loss(xf, pop))
            trains.append(train_loss(xf, pop, members))
            if traj is not None:
                out[f"traj_{algo}"] = traj[:, record_set]
        out[algo] = {"final": torch.stack(finals), "test": torch.stack(tests), "train": torch.stack(trains)}
    return out


def final_step_sizes(res: dict, algo: str = "sgd") -> dict[str, float]:
    """Mean SGD step length lr_T * |grad f_j(x_T)| at the final iterates (over members j), vs GD's."""
    cfg: Config = res["cfg"]
    lr_T = cfg.lr0 * cfg.decay ** (cfg.iters - 1)
    xf = res[algo]["final"][0]                                        # (S, R, 2)
    g = _member_grads(xf, res["pop"], res["members"])                 # (S, R, M, 2)
    return {"lr_T": lr_T, "sample_step": (lr_T * g.norm(dim=-1)).mean().item(),
            "full_step": (lr_T * g.mean(2).norm(dim=-1)).mean().item()}


def landscape_stats(res: dict, n: int = 81) -> dict[str, float]:
    """Algorithm-independent facts about the drawn landscape."""
    pts = grid_inits(n)
    good = torch.tensor(GOOD_MIN, dtype=torch.float64)
    pl = population_loss(pts, res["pop"])
    members = res["members"]
    tl = train_loss(pts[None].expand(members.shape[0], -1, -1), res["pop"], members)   # (S, n*n)
    spurious = (pts[tl.argmin(1)] - good).norm(dim=-1) >= 1.0
    return {"pop_argmin": pts[pl.argmin()].tolist(), "pop_min": pl.min().item(),
            "pop_at_good": population_loss(good, res["pop"]).item(),
            "n_spurious_sets": int(spurious.sum()), "n_sets": int(members.shape[0])}


def summarize(results: list[dict]) -> dict[str, dict[str, float]]:
    """Pool one or more run_experiment results (populations) into mean / SE per algorithm."""
    summ = {}
    good = torch.tensor(GOOD_MIN, dtype=torch.float64)
    for algo in ("gd", "sgd", "noisygd"):
        test = torch.cat([r[algo]["test"] for r in results], dim=1)   # (reps, S_total, R)
        final = torch.cat([r[algo]["final"] for r in results], dim=1)
        flat = test.reshape(-1)
        per_set = test.mean(dim=(0, 2))
        per_pop = torch.stack([r[algo]["test"].mean() for r in results])
        summ[algo] = {
            "mean": flat.mean().item(),
            "se": (flat.std() / math.sqrt(flat.numel())).item(),
            "se_sets": (per_set.std() / math.sqrt(per_set.numel())).item(),
            "se_pops": (per_pop.std() / math.sqrt(len(results))).item() if len(results) > 1 else float("nan"),
            "train": torch.cat([r[algo]["train"] for r in results], dim=1).mean().item(),
            "frac_near_77": ((final - good).norm(dim=-1) < 1.0).double().mean().item(),
            "n": flat.numel(),
        }
    return summ


def ordering_holds(summ: dict) -> bool:
    return summ["sgd"]["mean"] < summ["noisygd"]["mean"] < summ["gd"]["mean"]


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
PAPER = {"gd": (13.99, 1.67), "sgd": (5.33, 1.73), "noisygd": (11.09, 1.71)}
NAMES = {"gd": "GD", "sgd": "SGD", "noisygd": "NoisyGD"}


def plot(res: dict, summ: dict, path: Path, set_idx: int = 0,
         extra_bars: list[tuple[str, dict, str]] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pop, members = res["pop"], res["members"]
    t = torch.linspace(*DOMAIN, 161, dtype=torch.float64)
    gx, gy = torch.meshgrid(t, t, indexing="xy")
    pts = torch.stack([gx, gy], -1)
    pl = population_loss(pts, pop).numpy()
    tl = train_loss(pts[None], pop, members[set_idx:set_idx + 1])[0].numpy()
    g = candidate_grads(pts, pop)[..., members[set_idx], :]          # (H, W, M, 2)
    trcov = g.var(dim=-2, unbiased=False).sum(-1).numpy()

    fig, axes = plt.subplots(2, 3, figsize=(18, 11))
    ext = (*DOMAIN, *DOMAIN)
    colors = {"gd": "tab:red", "sgd": "tab:green", "noisygd": "tab:blue"}
    markers = {"gd": "s", "sgd": "o", "noisygd": "^"}

    def finals_overlay(ax):
        jit = np.random.default_rng(0)
        for algo in ("gd", "noisygd", "sgd"):
            xf = res[algo]["final"][0, set_idx].numpy() + jit.normal(0, 0.06, (res[algo]["final"].shape[2], 2))
            ax.scatter(xf[:, 0], xf[:, 1], s=22, marker=markers[algo], facecolor=colors[algo], edgecolor="k",
                       linewidth=0.4, alpha=0.85, label=f"{NAMES[algo]} final iterates")

    for ax, field_, title in ((axes[0, 0], pl, "(a) population (test) loss"),
                              (axes[0, 1], tl, f"(b) training loss, training set {set_idx}")):
        im = ax.imshow(field_, origin="lower", extent=ext, cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046)
        finals_overlay(ax)
        ax.set_title(title + "\n+ final iterates of the 100 runs (jittered)")
        ax.set_xlabel("x1"); ax.set_ylabel("x2")
    axes[0, 0].legend(loc="lower left", fontsize=8, framealpha=0.9)

    im = axes[0, 2].imshow(np.log10(trcov + 1e-3), origin="lower", extent=ext, cmap="magma")
    fig.colorbar(im, ax=axes[0, 2], fraction=0.046, label="log10 tr Cov")
    axes[0, 2].set_title(f"(c) log10 trace of per-sample gradient covariance\n(training set {set_idx})")
    axes[0, 2].set_xlabel("x1"); axes[0, 2].set_ylabel("x2")

    for ax, algo, letter in zip(axes[1, :2], ("gd", "sgd"), "de"):
        traj = res.get(f"traj_{algo}")
        ax.imshow(tl, origin="lower", extent=ext, cmap="Greys_r", alpha=0.8)
        if traj is not None:
            tr = traj.numpy()
            h, _, _ = np.histogram2d(tr[..., 0].ravel(), tr[..., 1].ravel(), bins=40, range=[DOMAIN, DOMAIN])
            ax.imshow(np.log1p(h.T), origin="lower", extent=ext, cmap="hot", alpha=0.6)
            for r in (0, 45, 99):
                ax.plot(tr[:, r, 0], tr[:, r, 1], "-", color="cyan", lw=0.8, alpha=0.9)
                ax.plot(tr[0, r, 0], tr[0, r, 1], "o", color="cyan", ms=4)
        ax.set_title(f"({letter}) {NAMES[algo]} trajectory density (log), training set {set_idx}\n"
                     "over training loss (grey); 3 sample trajectories in cyan")
        ax.set_xlim(*DOMAIN); ax.set_ylim(*DOMAIN)

    ax = axes[1, 2]
    algos = ["gd", "noisygd", "sgd"]
    xs = np.arange(3)
    bars = [("main constants, conditioned population (± SE)", summ, None)] + list(extra_bars or [])
    w = 0.8 / (len(bars) + 1)
    offs = (np.arange(len(bars) + 1) - len(bars) / 2) * w
    for (label, sm, hatch), o in zip(bars, offs[:-1]):
        ax.bar(xs + o, [sm[a]["mean"] for a in algos], w, yerr=[sm[a]["se"] for a in algos],
               color=[colors[a] for a in algos], hatch=hatch, edgecolor="k", capsize=3, label=label)
    ax.bar(xs + offs[-1], [PAPER[a][0] for a in algos], w, yerr=[PAPER[a][1] for a in algos],
           color="lightgrey", edgecolor="k", capsize=3, label="paper Table 1")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(xs, [NAMES[a] for a in algos])
    ax.set_ylabel("mean test loss of final iterate")
    ax.set_title("(f) mean test loss (lower is better); our loss has no\noffset, so compare ordering and gaps, not levels")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(summ: dict, multi_pop: bool) -> list[str]:
    hdr = "| algorithm | mean test loss ± SE (runs) | SE over training-set means | "
    hdr += "SE over populations | " if multi_pop else ""
    hdr += "mean train loss | final iterate within 1 of (7,7) | paper (Table 1) |"
    rows = [hdr, "|" + "---|" * hdr.count(" | ") + "---|"]
    for a in ("gd", "sgd", "noisygd"):
        s = summ[a]
        row = f"| {NAMES[a]} | {s['mean']:.2f} ± {s['se']:.2f} | {s['se_sets']:.2f} | "
        row += f"{s['se_pops']:.2f} | " if multi_pop else ""
        row += f"{s['train']:.2f} | {100 * s['frac_near_77']:.0f}% | {PAPER[a][0]:.2f} ± {PAPER[a][1]:.2f} |"
        rows.append(row)
    return rows


def _gaps(summ: dict) -> str:
    m = {a: summ[a]["mean"] for a in summ}
    p = {a: PAPER[a][0] for a in PAPER}
    return (f"Gaps (the loss offset cancels): GD − SGD = {m['gd'] - m['sgd']:.2f} (paper {p['gd'] - p['sgd']:.2f}), "
            f"NoisyGD − SGD = {m['noisygd'] - m['sgd']:.2f} (paper {p['noisygd'] - p['sgd']:.2f}), "
            f"GD − NoisyGD = {m['gd'] - m['noisygd']:.2f} (paper {p['gd'] - p['noisygd']:.2f}).")


def _order(summ: dict) -> str:
    m = {a: summ[a]["mean"] for a in summ}
    return " < ".join(NAMES[a] for a in sorted(m, key=m.get))


def write_markdown(results: list[dict], summ: dict, path: Path, command: str, runtime: float,
                   uncond: dict | None = None, summ_uncond: dict | None = None, png_name: str = "",
                   alt: list[dict] | None = None, summ_alt: dict | None = None) -> None:
    res = results[0]
    cfg: Config = res["cfg"]
    S = res["members"].shape[0]
    multi = len(results) > 1
    lines = [
        "# Paper 002 — idealized 2-D experiment (Sec. 2.4, Table 1, App. A.1)",
        "",
        f"Produced by: `{command}`  (wall time {runtime:.1f} s on 2 CPU cores, float64 torch, all runs vectorised)",
        "",
        f"![results]({png_name})",
        "",
        "Figure: (a) population loss and (b) training loss of training set 0 with the final iterates of the 100 "
        "runs of each algorithm; (c) per-sample gradient-covariance trace; (d, e) GD / SGD trajectory densities; "
        "(f) mean test losses vs. the paper's Table 1.",
        "",
        "## Setup",
        "",
        f"- Population: {cfg.n_candidates} candidate functions on [0,8]², each = Gaussian well at (7,7) + one extra "
        f"Gaussian bump at a location drawn uniformly from the 8 points of App. A.1; the extra bump is a maximum "
        f"with probability ρ = {cfg.rho}, otherwise a minimum.",
        f"- {S} training sets of {cfg.train_size} candidates sampled with replacement per population; training "
        f"loss = their mean; test loss = mean of all {cfg.n_candidates} candidates, evaluated at the final iterate.",
        f"- {cfg.iters} iterations, learning rate {cfg.lr0}·{cfg.decay}^t, {cfg.grid}×{cfg.grid} grid of "
        f"initialisations (`linspace(0, 8, {cfg.grid})` per axis), the same inits for all algorithms.",
        f"- Populations: {len(results)} (seed(s) {', '.join(str(r['seed']) for r in results)}); SGD/NoisyGD noise "
        f"draws per (training set, init): {cfg.noise_repeats}. Runs per algorithm: GD {summ['gd']['n']}, "
        f"SGD {summ['sgd']['n']}, NoisyGD {summ['noisygd']['n']}.",
        "",
        "### Choices for constants the paper does not give",
        "",
        "- f_i(x) = −a_i·exp(−|x−(7,7)|²/(2w_i²)) + s_i·b_i·exp(−|x−c_i|²/(2v_i²)), s_i = +1 (max) / −1 (min); "
        "no additive offset.",
        f"- (7,7) well: depth a ~ N({cfg.well_depth[0]:g}, {cfg.well_depth[1]:g}²), width w ~ "
        f"N({cfg.well_width[0]:g}, {cfg.well_width[1]:g}²).",
        f"- Extra critical point: height b ~ N({cfg.extra_height[0]:g}, {cfg.extra_height[1]:g}²), width v ~ "
        f"N({cfg.extra_width[0]:g}, {cfg.extra_width[1]:g}²). Heights clipped ≥ 1, widths ≥ 0.5. The extra bumps "
        "must be ~an order of magnitude taller than the (7,7) well because each location is hit by only ~30/8 "
        "candidates: only then can an over-sampled location form a training-set minimum deeper than the (7,7) one "
        "(as the paper describes); it also matches the ×10³ scale of the paper's gradient-covariance trace "
        "(Fig. 2g). Wider extra bumps follow the paper's \"deeper, broader\" spurious minimum.",
        "- Iterates are clamped to [0,8]² after every step (all algorithms).",
        "- SGD: batch size 1 (one training-set member drawn uniformly per step, independently per run).",
        "- NoisyGD: x ← x − lr_t·(∇L_train(x) + σ·z), z ~ N(0, I₂); σ² matched per training set to SGD's "
        "per-coordinate gradient-noise variance at the initial points, σ² = mean_inits tr Cov_j[∇f_j(x₀)] / 2 "
        f"(σ for the training sets of population {res['seed']}: "
        f"{', '.join(f'{s:.1f}' for s in res['sigma'].tolist())}).",
        "- ± is the standard error over all runs (std / √n); SEs over per-training-set"
        + (" and per-population" if multi else "") + " means are listed too.",
        "- **Population conditioning (added after the first run, see below):** the population is redrawn from the "
        "same RNG stream until the population loss has its global minimum (81×81 grid) within 1 of (7,7), as in "
        "the paper's Fig. 2d (\"a better-generalizing minimum at (7,7)\"). No constant was changed.",
        "",
        "### Drawn landscapes",
        "",
    ]
    for r in results:
        ls = landscape_stats(r)
        locs = {LOCATIONS[i]: [0, 0] for i in range(len(LOCATIONS))}
        for i, mx in zip(r["pop"]["loc_idx"].tolist(), r["pop"]["is_max"].tolist()):
            locs[LOCATIONS[i]][int(mx)] += 1
        lines.append(
            f"- Population seed {r['seed']} (accepted after {r['pop']['draws']} draw(s)): population-loss minimum "
            f"{ls['pop_min']:.2f} at ({ls['pop_argmin'][0]:.1f}, {ls['pop_argmin'][1]:.1f}); "
            f"{ls['n_spurious_sets']}/{ls['n_sets']} training sets have their global training minimum away from "
            "(7,7). (min, max) bumps per location: "
            + ", ".join(f"({int(k[0])},{int(k[1])}): {v[0]},{v[1]}" for k, v in locs.items()) + ".")
    lines += ["", "## Results", ""]
    lines += _table(summ, multi)
    fs = final_step_sizes(res)
    lines += ["", _gaps(summ), "",
              f"Diagnosis: at the last step (lr = {fs['lr_T']:.3f}) a batch-size-1 SGD step at SGD's final iterates "
              f"has mean length {fs['sample_step']:.2f} (full-gradient step there: {fs['full_step']:.2f}). Early on, "
              "the per-sample gradients of the tall extra bumps throw batch-size-1 SGD across the whole domain "
              "(panel e), and with only 200 decaying steps it does not settle preferentially in the low-variability "
              "(7,7) basin; its final iterates stay scattered (panels a, b), which costs more test loss than GD's "
              "spurious minima do.",
              "", "## Verdict", ""]
    if ordering_holds(summ):
        lines.append("**The ordering SGD < NoisyGD < GD is reproduced** (observed: " + _order(summ) + ").")
    else:
        lines.append("**The ordering SGD < NoisyGD < GD is NOT reproduced** (observed: " + _order(summ) + ").")
    if uncond is not None:
        ls = landscape_stats(uncond)
        lines += [
            "",
            "## First, a-priori run (unconditioned population) — reported for honesty",
            "",
            "The constants above were fixed before any run. The first run drew the population without "
            f"conditioning (seed {uncond['seed']}). Its population-loss global minimum was {ls['pop_min']:.2f} at "
            f"({ls['pop_argmin'][0]:.1f}, {ls['pop_argmin'][1]:.1f}) — a merged extra-bump basin, far deeper than "
            f"the (7,7) well ({ls['pop_at_good']:.2f}) — so the landscape contradicted the paper's premise that "
            "(7,7) is the better-generalizing minimum. With that population:",
            "",
        ]
        lines += _table(summ_uncond, False)
        lines += ["", _gaps(summ_uncond), "",
                  ("Ordering SGD < NoisyGD < GD " + ("holds" if ordering_holds(summ_uncond) else "does NOT hold")
                   + f" there (observed: {_order(summ_uncond)})."),
                  "",
                  "The conditioning rule was then added because that population violated a property the paper "
                  "states about its landscape; it is a rule about the landscape only (no algorithm output is used "
                  "to accept a population), and it was the only change made after the first run. Without "
                  "conditioning, roughly 2/3 of populations drawn with these constants have their global minimum "
                  "away from (7,7) (estimated from 200 population draws).",
                  ]
    if alt is not None:
        acfg: Config = alt[0]["cfg"]
        n_sp = sum(landscape_stats(r)["n_spurious_sets"] for r in alt)
        n_s = sum(landscape_stats(r)["n_sets"] for r in alt)
        lines += [
            "",
            "## Sensitivity check: shallower extra bumps (not the headline)",
            "",
            f"Same code, same seeds and conditioning, but (7,7) depth ~ N({acfg.well_depth[0]:g}, "
            f"{acfg.well_depth[1]:g}²), width ~ N({acfg.well_width[0]:g}, {acfg.well_width[1]:g}²); extra height ~ "
            f"N({acfg.extra_height[0]:g}, {acfg.extra_height[1]:g}²), width ~ N({acfg.extra_width[0]:g}, "
            f"{acfg.extra_width[1]:g}²). With these shallow extra bumps {n_sp}/{n_s} training sets have a global "
            "training minimum away from (7,7): spurious minima exist only as shallower local minima, so this "
            "variant does not have the paper's \"deeper spurious minimum\" property. It was run once as a "
            "robustness check, with whatever result it gives:",
            "",
        ]
        lines += _table(summ_alt, len(alt) > 1)
        lines += ["", _gaps(summ_alt), "",
                  ("Ordering SGD < NoisyGD < GD " + ("holds" if ordering_holds(summ_alt) else "does NOT hold")
                   + f" here (observed: {_order(summ_alt)}).")]
    lines += [
        "",
        "## Why the numbers differ from the paper",
        "",
        "- The paper gives no bump heights/widths, no loss offset and no domain handling; in our zero-offset "
        "construction the loss far from all bumps is 0 and the wells are negative, so absolute values are not "
        "comparable with Table 1 — only the ordering and the gaps are.",
        "- The population and the training sets are one random draw (seed-dependent); the paper's ± (~1.7 for all "
        "three) is presumably a spread over its runs under its own draw; ours is the SE over 1000 runs, hence "
        "smaller.",
        "- The SGD batch size (we use 1), the NoisyGD noise level (we match SGD's initial gradient-noise "
        "variance) and the domain handling (we clamp) are not given in the paper and change how strongly the "
        "noisy methods escape spurious minima.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true",
                    help="5 populations (seeds seed..seed+4) x 10 training sets x 100 inits, 3 noise draws per "
                         "run for SGD/NoisyGD; writes 002_idealized_2d_full.{md,png}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    n_pops = 5 if args.full else 1
    cfg = Config(noise_repeats=3) if args.full else Config()
    command = "python benchmarks/repro_002_idealized.py" + (" --full" if args.full else "") + \
              (f" --seed {args.seed}" if args.seed != 0 else "")
    t0 = time.perf_counter()
    results = [run_experiment(cfg, seed=args.seed + p) for p in range(n_pops)]
    summ = summarize(results)
    uncond = run_experiment(replace(cfg, condition_population=False, noise_repeats=1), seed=args.seed,
                            record_set=None)
    summ_uncond = summarize([uncond])
    alt_cfg = replace(cfg, **SHALLOW_BUMPS)
    alt = [run_experiment(alt_cfg, seed=args.seed + p, record_set=None) for p in range(n_pops)]
    summ_alt = summarize(alt)
    runtime = time.perf_counter() - t0
    out = Path(args.out_dir)
    stem = "002_idealized_2d" + ("_full" if args.full else "")
    plot(results[0], summ, out / f"{stem}.png",
         extra_bars=[("a-priori run, unconditioned population (± SE)", summ_uncond, "//"),
                     ("shallow-bump constants (± SE)", summ_alt, "..")])
    write_markdown(results, summ, out / f"{stem}.md", command, runtime, uncond, summ_uncond, f"{stem}.png",
                   alt, summ_alt)
    for title, sm in (("main constants, conditioned population(s)", summ),
                      ("main constants, a-priori unconditioned population", summ_uncond),
                      ("shallow-bump constants (sensitivity check)", summ_alt)):
        print(f"--- {title}")
        print(f"{'algorithm':10s} {'test loss':>18s} {'SE(sets)':>9s} {'near(7,7)':>9s}   paper")
        for a in ("gd", "sgd", "noisygd"):
            s = sm[a]
            print(f"{NAMES[a]:10s} {s['mean']:9.2f} ± {s['se']:5.2f} {s['se_sets']:9.2f} "
                  f"{100 * s['frac_near_77']:8.0f}%   {PAPER[a][0]:.2f} ± {PAPER[a][1]:.2f}")
        print("ordering SGD < NoisyGD < GD reproduced:", ordering_holds(sm), f"({_order(sm)})")
    print(f"experiment time {runtime:.1f}s; wrote {out / stem}.{{md,png}}")
    return summ


if __name__ == "__main__":
    main()
