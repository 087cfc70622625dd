"""Issue 30's analysis of a gold grid: over-optimisation of a learned proxy (docs/gold.md), per proxy size.

    python scripts/make_gold.py multirun/gold_frontier/<time> [more sweep dirs] --out results/gold

Stages (kl_research.analysis.gold): every run's evaluation points (gold, second gold, proxy on held-out prompts, KL of
the whole response) → each run's tail → per proxy size × β (× target for controllers) the mean over seeds with its
Student-t interval → Gao et al.'s RL form fitted per proxy size and seed on the fixed-β runs' points, then its α, β, KL*
and R(d*) over seeds. Writes to <out>/: points.csv, frontier.csv, fits_per_seed.csv, fit_gold.csv, fit_gold2.csv,
fit_proxy.csv, drops.csv and tests.csv (the registered hypotheses G1-G3 on the gold's drop between the pilot's
windows, Holm), equal_kl.csv (controller runs against the same seed's fixed-β frontier at equal KL, if any),
reward_models.csv (each proxy's agreement with the gold, from the RM cache), gold.png (gold and proxy
gain against d, one panel per proxy size, the fixed-β runs' tails with their intervals, the mean fit, controllers as
points) and samples/n<n>_<controller>_b<β>.md (the last evaluation's answers to the same held-out prompts, each seed,
with proxy and gold scores: what the proxy's exploit looks like).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the repo this script is in, whatever kl_research an install points at
    sys.path.insert(0, str(REPO))

from kl_research.analysis import gold as G  # noqa: E402
from kl_research.plots import panel_grid, save  # noqa: E402

N_KEY = "reward.n_labels"


def plot(front: pd.DataFrame, fits: dict[str, pd.DataFrame], path: Path) -> None:
    sizes = sorted(front[N_KEY].unique())
    fig, axes = panel_grid(len(sizes), "gain over π_ref (held-out prompts)")
    for ax, n in zip(axes, sizes, strict=True):
        g = front[front[N_KEY] == n]
        fixed, ctl = g[g["controller"] == "fixed"], g[g["controller"] != "fixed"]
        for k, color in (("gold", "tab:blue"), ("proxy", "tab:orange"), ("gold2", "tab:green")):
            yerr = [fixed[f"{k}_gain_mean"] - fixed[f"{k}_gain_lo"], fixed[f"{k}_gain_hi"] - fixed[f"{k}_gain_mean"]]
            ax.errorbar(fixed["d_mean"], fixed[f"{k}_gain_mean"], yerr=yerr, fmt="o", ms=4, color=color, capsize=2,
                        label=f"{k} (fixed β, tail, 95 % t)")  # fmt: skip
            fit = fits[k]
            f = fit[fit[N_KEY] == n]
            if len(f) and np.isfinite(f["alpha_mean"].iloc[0]):
                grid = np.linspace(1e-3, max(g["d_mean"].max(), 1.0) * 1.05, 200)
                ax.plot(grid, G.gao_curve(f["alpha_mean"].iloc[0], f["beta_mean"].iloc[0], grid), "--", color=color,
                        lw=1)  # fmt: skip
        for _, r in ctl.iterrows():
            err = [[r["gold_gain_mean"] - r["gold_gain_lo"]], [r["gold_gain_hi"] - r["gold_gain_mean"]]]
            ax.errorbar(r["d_mean"], r["gold_gain_mean"], yerr=err, fmt="s", ms=6, mfc="white", color="k", capsize=2)
            ax.annotate(f"{r['controller']} τ {r['target_kl']:g}", (r["d_mean"], r["gold_gain_mean"]), fontsize=6)
        ax.axvspan(*G.PEAK_WINDOW, color="tab:blue", alpha=0.06, lw=0)  # the registered windows (docs/gold.md)
        ax.axvspan(G.FALL_FROM, max(G.FALL_FROM, g["d_mean"].max()) * 1.05, color="tab:red", alpha=0.05, lw=0)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(title=f"proxy n = {n}", xlabel="d = √KL(π‖π_ref) per response (nats½)")
        ax.legend(fontsize=6)
    fig.suptitle(
        "dashed: Gao et al.'s R(d) = d(α − β log d), mean of the per-seed fits; squares: controllers", fontsize=8
    )
    fig.tight_layout()
    save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="sweep dirs of runs with reward=learned and a gold evaluation")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tail", type=float, default=0.25, help="tail fraction of each run's evaluations")
    default_cache = Path.home() / ".cache" / "kl-research" / "reward_model"
    ap.add_argument("--rm-cache", type=Path, default=default_cache, help="the runs' reward-model cache")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pts = G.load_points(args.dirs)
    tails = G.run_tails(pts, args.tail)
    front = G.frontier_table(tails)
    fits = {}
    per_seed = []
    for score in ("gold", "gold2", "proxy"):
        seeds, fits[score] = G.fits_over_seeds(pts, score)
        per_seed.append(seeds)
        fits[score].to_csv(out / f"fit_{score}.csv", index=False)
    pd.concat(per_seed).to_csv(out / "fits_per_seed.csv", index=False)
    pts.to_csv(out / "points.csv", index=False)
    front.to_csv(out / "frontier.csv", index=False)
    drops = G.window_drops(pts)
    drops.to_csv(out / "drops.csv", index=False)
    tests = G.registered_tests(drops)
    tests.to_csv(out / "tests.csv", index=False)
    if (tails["controller"] != "fixed").any():
        G.equal_kl_gold(tails).to_csv(out / "equal_kl.csv", index=False)
    rms = G.reward_model_table(args.rm_cache)
    rms[rms[N_KEY].isin(pts[N_KEY].unique())].to_csv(out / "reward_models.csv", index=False)
    plot(front, fits, out / "gold.png")
    n_samples = G.write_samples(args.dirs, tails, out)
    cols = [N_KEY, "seeds", "seeds_without_peak", "alpha_mean", "beta_mean", "kl_peak_mean", "kl_peak_lo", "kl_peak_hi"]
    print(fits["gold"][cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    cols = ["hypothesis", N_KEY, "seeds", "estimate", "lo", "hi", "p", "p_adj", "verdict", "proxy_drop"]
    print(tests[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"{len(tails)} runs, {len(front)} cells, {n_samples} sample files → {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
