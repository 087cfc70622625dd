"""Can the learned proxy be over-optimised at this model size? (issue 30's pilot, docs/gold.md)

    bash scripts/gold_frontier.sh pilot                      # the runs: low fixed β under each proxy size
    python scripts/gold_pilot.py multirun/gold_pilot/<time> --out results/gold/pilot

Reads every run's evaluation points (kl_research.analysis.gold.eval_points: gold, second gold and proxy on held-out
prompts at each eval step, against √KL of the whole response), per proxy size (`reward.n_labels`): Gao et al.'s RL form
fitted to the gold's and the proxy's gain over π_ref, where the gold peaks, and whether the proxy still rises where the
gold has fallen (`overoptimised`). Writes points.csv, summary.csv, reward_models.csv (each proxy's held-out agreement
with the gold, from the RM cache) pilot.png (gold and proxy gain against d, one panel per proxy size, one line per
run) and samples/ (each run's last answers to the same held-out prompts, with proxy and gold scores).
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


def summarise(pts: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for n, g in pts.groupby(N_KEY):
        row = {N_KEY: n, "runs": g["run"].nunique(), "d_max": g["d"].max(), "kl_seq_max": g["kl_seq"].max()}
        for k in ("gold", "gold2", "proxy"):
            fit = G.fit_gao(g["d"], g[f"{k}_gain"])
            row.update({f"{k}_{name}": v for name, v in fit.items() if name != "n"})
        row.update({f"oo_{k}": v for k, v in G.overoptimised(g).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def plot(pts: pd.DataFrame, summary: pd.DataFrame, path: Path) -> None:
    sizes = sorted(pts[N_KEY].unique())
    fig, axes = panel_grid(len(sizes), "gain over π_ref (held-out prompts)")
    for ax, n in zip(axes, sizes, strict=True):
        g = pts[pts[N_KEY] == n]
        for (beta, _run), r in g.groupby(["init_kl_coef", "run"]):
            r = r.sort_values("step")
            ax.plot(r["d"], r["proxy_gain"], "-", color="tab:orange", alpha=0.6, lw=1)
            ax.plot(r["d"], r["gold_gain"], "-", color="tab:blue", alpha=0.6, lw=1)
            ax.plot(r["d"], r["gold2_gain"], ":", color="tab:green", alpha=0.6, lw=1)
            ax.annotate(f"β {beta:g}", (r["d"].iloc[-1], r["proxy_gain"].iloc[-1]), fontsize=7)
        s = summary[summary[N_KEY] == n].iloc[0]
        grid = np.linspace(1e-3, g["d"].max() * 1.05, 200)
        for k, c in (("gold", "tab:blue"), ("proxy", "tab:orange")):
            if np.isfinite(s[f"{k}_alpha"]):
                ax.plot(grid, G.gao_curve(s[f"{k}_alpha"], s[f"{k}_beta"], grid), "--", color=c, lw=2,
                        label=f"{k}: Gao fit (R² {s[f'{k}_r2']:.2f})")  # fmt: skip
        ax.plot([], [], "-", color="tab:blue", label="gold (VADER) gain")
        ax.plot([], [], ":", color="tab:green", label="gold2 (AFINN) gain")
        ax.plot([], [], "-", color="tab:orange", label="proxy (learned RM) gain")
        ax.axhline(0, color="grey", lw=0.5)
        r = s.get("test_pearson", float("nan"))
        ax.set(
            title=f"proxy n = {n} (test Pearson r with the gold {r:.2f})",
            xlabel="d = √KL(π‖π_ref) per response (nats½)",
        )
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="sweep dirs of runs with reward=learned and a gold evaluation")
    ap.add_argument("--out", required=True)
    default_cache = Path.home() / ".cache" / "kl-research" / "reward_model"
    ap.add_argument("--rm-cache", type=Path, default=default_cache,
                    help="the runs' reward-model cache (<cache_dir>/reward_model): each RM's agreement")  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pts = G.load_points(args.dirs)
    rms = G.reward_model_table(args.rm_cache)
    rms = rms[rms[N_KEY].isin(pts[N_KEY].unique())]
    rms.to_csv(out / "reward_models.csv", index=False)
    summary = summarise(pts)
    if len(rms) and not rms[N_KEY].duplicated().any():  # one RM per n in the cache: its agreement beside the runs
        summary = summary.merge(rms[[N_KEY, "test_pearson", "test_accuracy"]], on=N_KEY, how="left")
    pts.to_csv(out / "points.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    plot(pts, summary, out / "pilot.png")
    G.write_samples(args.dirs, G.run_tails(pts), out)
    cols = [N_KEY, *(["test_pearson"] if "test_pearson" in summary else []), "runs", "kl_seq_max", "gold_kl_peak",
            "oo_gold_peak", "oo_gold_top", "oo_gold_drop", "oo_proxy_rise", "gold_r2", "proxy_r2"]  # fmt: skip
    print(summary[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
