"""The gold controller stage's targets and β₀, by the rule registered in docs/gold.md before the grid ran.

    python scripts/gold_targets.py results/gold [--n 350]      # prints one "τ β₀" line per target

From the grid's evaluation points (<dir>/points.csv) at proxy size n: Gao's RL form fitted on every fixed-β point of
every seed pooled; its gold peak d* gives KL* = d*²/24 nats per token (24 = the response length cap); the targets are
KL*·{1/2, 1, 2} rounded to 2 significant digits. β₀ per target: the grid's fixed β whose mean tail KL per token
(<dir>/frontier.csv) lands there, interpolated linearly in log β against log KL (clamped to the grid's β range).
Exits 1, saying why, if the pooled fit has no interior peak (the stage then does not run).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kl_research.analysis import gold as G  # noqa: E402

N_KEY = "reward.n_labels"
RESPONSE_TOKENS = 24


def targets(points: pd.DataFrame, front: pd.DataFrame, n: int) -> tuple[dict, list[tuple[float, float]]]:
    pts = points[(points[N_KEY] == n) & (points["controller"] == "fixed")]
    fit = G.fit_gao(pts["d"].to_numpy(float), pts["gold_gain"].to_numpy(float))
    if not math.isfinite(fit["kl_peak"]):
        return fit, []
    kl_star = fit["kl_peak"] / RESPONSE_TOKENS
    f = front[(front[N_KEY] == n) & (front["controller"] == "fixed")].sort_values("kl_token_mean")
    x, y = np.log(f["kl_token_mean"].to_numpy(float)), np.log(f["init_kl_coef"].to_numpy(float))
    out = []
    for k in (0.5, 1.0, 2.0):
        tau = float(f"{kl_star * k:.2g}")
        out.append((tau, float(f"{math.exp(np.interp(math.log(tau), x, y)):.3g}")))
    return fit, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="the grid's analysis dir (points.csv, frontier.csv)")
    ap.add_argument("--n", type=int, default=350)
    args = ap.parse_args(argv)
    fit, rows = targets(pd.read_csv(args.dir / "points.csv"), pd.read_csv(args.dir / "frontier.csv"), args.n)
    per_token = fit["kl_peak"] / RESPONSE_TOKENS
    print(f"# n = {args.n}: pooled Gao fit α {fit['alpha']:.4g}, β {fit['beta']:.4g}, R² {fit['r2']:.3f}, "
          f"KL* {fit['kl_peak']:.3g} nats/response ({per_token:.3g}/token)", file=sys.stderr)  # fmt: skip
    if not rows:
        print(f"no interior gold peak at n = {args.n} (β ≤ 0): the controller stage does not run", file=sys.stderr)
        return 1
    for tau, b0 in rows:
        print(f"{tau:g} {b0:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
