"""Gold against proxy (issue 30, docs/gold.md): the evaluation points of runs trained on a learned proxy, and Gao,
Schulman & Hilton's functional form for reward over-optimisation (2022, "Scaling laws for reward model
overoptimization", arXiv 2210.10760, eq. 2): for RL, the gold gain over the initial policy at distance
d = √KL(π‖π_ref) (KL of the whole response, nats) is

    R(d) = d·(α − β·log d)

which is linear in (α, β): least squares on the features (d, −d·log d), no intercept (R(0) = 0 by construction).
Its maximum, for β > 0, is at log d* = α/β − 1, i.e. KL* = d*² = exp(2α/β − 2), where R(d*) = β·d*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

GOLD_COLUMNS = {"gold": "eval/gold_reward", "gold2": "eval/gold2_reward", "proxy": "eval/proxy_reward"}
REF_COLUMNS = {"gold": "eval/gold_reward_ref", "gold2": "eval/gold2_reward_ref", "proxy": "eval/proxy_reward_ref"}


def eval_points(curves: pd.DataFrame, window: int = 5, by: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (run, evaluation step): the KL the policy had there and its gold, second gold and proxy on the
    held-out prompts, each also as the gain over π_ref's (measured at the run's first evaluation).

    KL at an evaluation step is the mean of the exact per-token KL (``kl/exact``, nats/token) and of the response
    length over the ``window`` rollouts up to it (one rollout's batch KL is noisy); ``kl_seq`` = their product, the
    mean KL of a whole response (exact when the per-token mean is token-weighted, as ``kl/exact`` is), and
    ``d`` = √kl_seq, Gao et al.'s distance. ``by``: extra id columns to carry (e.g. ``reward.n_labels``)."""
    need = ["run", "step", "kl/exact", "response/length", *GOLD_COLUMNS.values()]
    missing = [c for c in need if c not in curves]
    if missing:
        raise ValueError(f"eval_points needs the columns {missing}: runs with a gold evaluation (docs/gold.md)")
    ids = [c for c in ("controller", "target_kl", "init_kl_coef", "seed", *by) if c in curves]
    rows = []
    for run, g in curves.sort_values("step").groupby("run", sort=False):
        kl = g["kl/exact"].rolling(window, min_periods=1).mean().to_numpy()
        length = g["response/length"].rolling(window, min_periods=1).mean().to_numpy()
        refs = {k: g[c].dropna().iloc[0] if c in g and g[c].notna().any() else math.nan for k, c in REF_COLUMNS.items()}
        at = g[GOLD_COLUMNS["gold"]].notna().to_numpy()
        for i in np.flatnonzero(at):
            r = g.iloc[i]
            row = {"run": run, **{c: r[c] for c in ids}, "step": int(r["step"]), "kl_token": float(kl[i]),
                   "length": float(length[i]), "kl_seq": float(kl[i] * length[i])}  # fmt: skip
            for k, c in GOLD_COLUMNS.items():
                row[k] = float(r[c])
                row[f"{k}_gain"] = float(r[c]) - refs[k]
            rows.append(row)
    out = pd.DataFrame(rows)
    if not out.empty:
        out["d"] = np.sqrt(out["kl_seq"].clip(lower=0))
    return out


def fit_gao(d: np.ndarray, gain: np.ndarray) -> dict[str, float]:
    """Least squares of gain = d·(α − β·log d) over points with d > 0. Returns α, β, the peak (d*, KL* = d*²,
    R(d*)) where β > 0 (else NaN: no interior maximum, the gold still rising at every d), the fit's R² and n."""
    d, gain = np.asarray(d, float), np.asarray(gain, float)
    ok = (d > 0) & np.isfinite(gain)
    d, gain = d[ok], gain[ok]
    n = len(d)
    out = {"alpha": math.nan, "beta": math.nan, "d_peak": math.nan, "kl_peak": math.nan, "gain_peak": math.nan,
           "r2": math.nan, "n": n}  # fmt: skip
    if n < 3:
        return out
    X = np.column_stack([d, -d * np.log(d)])
    (alpha, beta), *_ = np.linalg.lstsq(X, gain, rcond=None)
    resid = gain - X @ np.array([alpha, beta])
    ss_tot = float(((gain - gain.mean()) ** 2).sum())
    out.update(
        alpha=float(alpha), beta=float(beta), r2=1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    )
    if beta > 0:
        d_peak = math.exp(alpha / beta - 1)
        out.update(d_peak=d_peak, kl_peak=d_peak**2, gain_peak=beta * d_peak)
    return out


def gao_curve(alpha: float, beta: float, d: np.ndarray) -> np.ndarray:
    """R(d) = d·(α − β·log d), with R(0) = 0."""
    d = np.asarray(d, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)


def overoptimised(points: pd.DataFrame, top: float = 0.25) -> dict[str, float]:
    """Does the proxy rise while the gold falls at the largest KL? Over one group of evaluation points: the gold's
    and the proxy's mean gain among the points of the largest ``top`` fraction of d, against the gold's best mean over
    any equally sized window of d below them. Returns gold_peak, gold_top, proxy_peak_window, proxy_top, the drop
    (gold_peak − gold_top) and the proxy's rise over the same two windows; the caller judges them against noise."""
    p = points.sort_values("d").reset_index(drop=True)
    k = max(1, round(len(p) * top))
    if len(p) < 2 * k:
        return {"gold_peak": math.nan, "gold_top": math.nan, "proxy_peak": math.nan, "proxy_top": math.nan,
                "gold_drop": math.nan, "proxy_rise": math.nan, "n": len(p)}  # fmt: skip
    gold = p["gold_gain"].rolling(k).mean().to_numpy()
    proxy = p["proxy_gain"].rolling(k).mean().to_numpy()
    below = gold[k - 1 : len(p) - k]  # windows that end before the top window starts
    i = int(np.nanargmax(below)) + k - 1
    out = {"gold_peak": float(gold[i]), "gold_top": float(gold[-1]), "proxy_peak": float(proxy[i]),
           "proxy_top": float(proxy[-1]), "d_peak": float(p["d"].iloc[i - k + 1 : i + 1].mean()),
           "d_top": float(p["d"].iloc[-k:].mean()), "n": len(p)}  # fmt: skip
    out["gold_drop"] = out["gold_peak"] - out["gold_top"]
    out["proxy_rise"] = out["proxy_top"] - out["proxy_peak"]
    return out


# ============================================================================================ the frontier grid
GROUP = ("reward.n_labels", "controller", "init_kl_coef", "target_kl")


def run_tails(points: pd.DataFrame, tail_fraction: float = 0.25) -> pd.DataFrame:
    """One row per run: the mean over its evaluations in the tail (the last `tail_fraction` of its evaluation steps,
    at least one) of kl_token, kl_seq, d and each score and gain, with its ids. `points`: :func:`eval_points`."""
    rows = []
    for run, g in points.sort_values("step").groupby("run", sort=False):
        tail = g.iloc[-max(1, math.ceil(tail_fraction * len(g))) :]
        ids = {c: g[c].iloc[0] for c in g.columns if c in (*GROUP, "seed")}
        vals = [c for c in g.columns if c in ("kl_token", "kl_seq", "d", "length") or c.endswith(("_gain",))]
        vals += [c for c in ("gold", "gold2", "proxy") if c in g]
        rows.append({"run": run, **ids, **{c: float(tail[c].mean()) for c in vals}, "evals": len(tail)})
    return pd.DataFrame(rows)


def frontier_table(tails: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per proxy size × controller × β₀ (× target): n seeds and, for KL per token and per response and every score
    and gain, the mean over seeds with its Student-t interval (kl_research.analysis.stats.t_interval)."""
    from kl_research.analysis.stats import t_interval

    keys = [c for c in GROUP if c in tails]
    metrics = [c for c in ("kl_token", "kl_seq", "d", "gold", "gold2", "proxy", "gold_gain", "gold2_gain", "proxy_gain")
               if c in tails]  # fmt: skip
    rows = []
    for key, g in tails.groupby(keys, dropna=False):
        row = {**dict(zip(keys, key, strict=True)), "n": int(g["seed"].nunique())}
        for m in metrics:
            mean, lo, hi, _, _ = t_interval(g[m].to_numpy(float), level)
            row.update({f"{m}_mean": mean, f"{m}_lo": lo, f"{m}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def fits_over_seeds(
    points: pd.DataFrame, score: str = "gold", level: float = 0.95
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gao's RL form fitted per proxy size and seed, on every evaluation point of that seed's fixed-β runs (Gao et
    al. fit over the KL a run passes through, whatever its β); then per proxy size the mean of α, β, KL* and
    R(d*) over seeds with a Student-t interval, and how many seeds' fits have no interior peak (β ≤ 0: still
    rising), which the KL* interval leaves out and the table says. Returns (per seed, per proxy size)."""
    from kl_research.analysis.stats import t_interval

    fixed = points[points["controller"] == "fixed"] if "controller" in points else points
    per_seed = []
    for (n, seed), g in fixed.groupby(["reward.n_labels", "seed"]):
        per_seed.append({"reward.n_labels": n, "seed": seed, "score": score, **fit_gao(g["d"], g[f"{score}_gain"])})
    per_seed = pd.DataFrame(per_seed)
    rows = []
    for n, g in per_seed.groupby("reward.n_labels"):
        row = {
            "reward.n_labels": n,
            "score": score,
            "seeds": len(g),
            "seeds_without_peak": int(g["d_peak"].isna().sum()),
        }
        for m in ("alpha", "beta", "kl_peak", "gain_peak", "r2"):
            mean, lo, hi, _, _ = t_interval(g[m].to_numpy(float), level)
            row.update({f"{m}_mean": mean, f"{m}_lo": lo, f"{m}_hi": hi})
        rows.append(row)
    return per_seed, pd.DataFrame(rows)


def load_points(dirs: Sequence[str | Path], n_key: str = "reward.n_labels") -> pd.DataFrame:
    """:func:`eval_points` of every completed run under the sweep dirs, with the proxy size (`reward.n_labels`) from
    each run's config. Runs are named `<sweep dir>/<run dir>` (two sweeps may name runs alike)."""
    from kl_research.analysis.runs import attach_config, load_configs, load_curves

    frames = []
    for d in dirs:
        curves = attach_config(load_curves(d, completed_only=True), load_configs(d), keys=[n_key])
        if not curves.empty:
            pts = eval_points(curves, by=[n_key])
            frames.append(pts.assign(run=Path(d).name + "/" + pts["run"].astype(str)))
    if not frames:
        raise ValueError(f"no completed runs with a gold evaluation under {list(map(str, dirs))}")
    return pd.concat(frames, ignore_index=True)


def reward_model_table(cache: str | Path, n_key: str = "reward.n_labels") -> pd.DataFrame:
    """Every learned RM under a reward-model cache dir (`<cache_dir>/reward_model`, its meta.json): n, held-out
    agreement with the gold (Pearson, Spearman, pairwise accuracy), best epoch, build time, thread count, dir."""
    import json

    rows = []
    for meta in sorted(Path(cache).glob("learned-*/meta.json")):
        m = json.loads(meta.read_text())
        test = {f"test_{k}": m["test"][k] for k in ("pearson", "spearman", "accuracy")}
        rows.append({n_key: m["n_labels"], **test, "best_epoch": m.get("best_epoch"),
                     "build_seconds": m.get("build_seconds"), "threads": m.get("threads"),
                     "dir": meta.parent.name})  # fmt: skip
    return pd.DataFrame(rows).sort_values(n_key) if rows else pd.DataFrame(columns=[n_key, "test_pearson"])


def write_samples(dirs: Sequence[str | Path], tails: pd.DataFrame, out: Path, prompts: int = 3) -> int:
    """<out>/samples/n<n>_<controller>_b<β>[_tau<τ>].md per cell of :func:`run_tails`: each seed's answers at its
    last evaluation to the same first held-out prompts (eval_samples.jsonl), with proxy, gold and second gold scores:
    what the proxy's exploit looks like. Returns the number of files written."""
    from kl_research.analysis.runs import last_eval_samples

    answers = last_eval_samples(dirs)
    written = 0
    keys = [k for k in GROUP if k in tails]
    for key, g in tails.groupby(keys):
        ids = dict(zip(keys, key, strict=True))
        runs = [(int(s), answers[r]) for r, s in sorted(zip(g["run"], g["seed"], strict=True), key=lambda x: x[1])
                if r in answers]  # fmt: skip
        if not runs:
            continue
        name = f"n{ids['reward.n_labels']}_{ids['controller']}_b{ids['init_kl_coef']:g}"
        name += "" if ids["controller"] == "fixed" else f"_tau{ids['target_kl']:g}"
        lines = [f"# proxy n = {ids['reward.n_labels']}, {ids['controller']}, β₀ {ids['init_kl_coef']:g}: answers "
                 "to held-out prompts at the last evaluation", ""]  # fmt: skip
        for i in range(min(prompts, *(len(a) for _, a in runs))):
            lines += [f"## prompt {i + 1}: “{runs[0][1][i]['prompt']}”", "",
                      "| seed | response | proxy | gold (VADER) | gold2 (AFINN) |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for seed, a in runs:
                text = a[i]["response"].replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {seed} | {text} | {a[i]['proxy_reward']:+.2f} | {a[i]['gold_reward']:+.2f} | "
                             f"{a[i]['gold2_reward']:+.2f} |")  # fmt: skip
            lines.append("")
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "samples" / f"{name}.md").write_text("\n".join(lines))
        written += 1
    return written


# ================================================================= the grid's registered tests (docs/gold.md)
# Fixed before the grid's runs, from the pilot (seed 0, another draw of the n = 350 RM): the gold's peak window and
# its fall window in d = √KL per response (nats½), and G2/G3's equivalence margin. Not estimated from the data tested.
PEAK_WINDOW = (2.0, 4.0)
FALL_FROM = 7.0
NO_FALL_MARGIN = 0.05
REGISTERED = (  # (hypothesis, proxy size, kind): "fall" H1 drop > 0; "no_fall" H1 drop < margin
    ("G1", 350, "fall"),
    ("G2", 500, "no_fall"),
    ("G3", 2000, "no_fall"),
)


def window_drops(
    points: pd.DataFrame, peak: tuple[float, float] = PEAK_WINDOW, fall_from: float = FALL_FROM
) -> pd.DataFrame:
    """Per proxy size × seed, over that seed's fixed-β evaluation points (all βs pooled): for gold, gold2 and proxy,
    the mean gain in the peak window (peak[0] ≤ d ≤ peak[1]) and in the fall window (d ≥ fall_from), their
    difference ``<score>_drop`` = peak − fall (> 0: the score falls from the peak window to the largest KL; for the
    proxy, < 0 is a rise) and how many points each window holds. A window with no point gives NaN."""
    fixed = points[points["controller"] == "fixed"] if "controller" in points else points
    rows = []
    for (n, seed), g in fixed.groupby(["reward.n_labels", "seed"]):
        lo = g[(g["d"] >= peak[0]) & (g["d"] <= peak[1])]
        hi = g[g["d"] >= fall_from]
        row = {"reward.n_labels": n, "seed": seed, "points_peak": len(lo), "points_fall": len(hi)}
        for k in ("gold", "gold2", "proxy"):
            a = float(lo[f"{k}_gain"].mean()) if len(lo) else math.nan
            b = float(hi[f"{k}_gain"].mean()) if len(hi) else math.nan
            row.update({f"{k}_peak_window": a, f"{k}_fall_window": b, f"{k}_drop": a - b})
        rows.append(row)
    return pd.DataFrame(rows)


def _one_sided(x: np.ndarray, against: float, greater: bool) -> dict[str, float]:
    """One-sample Student t of mean(x) against a constant, one-sided (H1: mean > against if greater, else <), with
    the matching 90 % two-sided interval of the mean (so the test rejects at 0.05 ⇔ the bound clears `against`)."""
    from scipy import stats

    from kl_research.analysis.stats import t_interval

    mean, lo, hi, sd, n = t_interval(x, 0.90)
    out = {"seeds": n, "estimate": mean, "lo": lo, "hi": hi, "p": math.nan}
    if n < 2:
        return out
    t = (mean - against) / max(sd / math.sqrt(n), 1e-300)
    out["p"] = float(stats.t.sf(t, n - 1) if greater else stats.t.cdf(t, n - 1))
    return out


def registered_tests(
    drops: pd.DataFrame, registered: Sequence[tuple[str, int, str]] = REGISTERED, margin: float = NO_FALL_MARGIN,
    alpha: float = 0.05,
) -> pd.DataFrame:  # fmt: skip
    """The grid's hypotheses on the gold drop (:func:`window_drops`), Holm-corrected over the registered family (one
    not yet testable counts as p = 1); beside each,
    the proxy's and the second gold's drop over the same seeds with their 90 % intervals (reported, not tested).
    A hypothesis whose proxy size has fewer than 2 seeds with points in both windows gets no p and no verdict."""
    from statsmodels.stats.multitest import multipletests

    rows = []
    for name, n, kind in registered:
        g = drops[drops["reward.n_labels"] == n]
        x = g["gold_drop"].to_numpy(float)
        res = _one_sided(x, 0.0, True) if kind == "fall" else _one_sided(x, margin, False)
        method = ("one-sided one-sample t over seeds, H1 gold drop > 0" if kind == "fall" else
                  f"one-sided one-sample t over seeds, H1 gold drop < {margin:g} (TOST's upper half)")  # fmt: skip
        row = {"hypothesis": name, "reward.n_labels": n, "metric": "gold_drop", **res, "method": method + "; Holm"}
        for k in ("proxy", "gold2"):
            other = _one_sided(g[f"{k}_drop"].to_numpy(float), 0.0, True)
            row.update({f"{k}_drop": other["estimate"], f"{k}_drop_lo": other["lo"], f"{k}_drop_hi": other["hi"]})
        rows.append(row)
    out = pd.DataFrame(rows)
    ok = out["p"].notna().to_numpy()
    # Holm over the whole registered family: a test that cannot be run yet counts as p = 1 (conservative: it never
    # makes another test's adjustment smaller); its own p_adj stays empty
    adj = multipletests(out["p"].fillna(1.0).to_numpy(float), alpha=alpha, method="holm")[1]
    out["p_adj"] = np.where(ok, adj, math.nan)
    out["verdict"] = np.where(~ok, "no verdict (< 2 seeds with points in both windows)",
                              np.where(out["p_adj"] < alpha, "rejected H0", "not rejected"))  # fmt: skip
    return out


def equal_kl_gold(tails: pd.DataFrame, score: str = "gold_gain") -> pd.DataFrame:
    """The controller stage's comparison (docs/gold.md): each controller run's tail `score` minus what the same
    seed's fixed-β runs (same proxy size) reach at the run's tail KL per token, by a PCHIP in log KL through that
    seed's fixed-β tails (monotone, no overshoot between βs; NaN outside their KL range: no extrapolation)."""
    from scipy.interpolate import PchipInterpolator

    fixed, ctl = tails[tails["controller"] == "fixed"], tails[tails["controller"] != "fixed"]
    rows = []
    for _, r in ctl.iterrows():
        f = fixed[(fixed["reward.n_labels"] == r["reward.n_labels"]) & (fixed["seed"] == r["seed"])]
        f = f.sort_values("kl_token")
        x = np.log(f["kl_token"].to_numpy(float))
        at = math.nan
        if len(f) >= 2 and np.all(np.diff(x) > 0) and x[0] <= math.log(r["kl_token"]) <= x[-1]:
            at = float(PchipInterpolator(x, f[score].to_numpy(float))(math.log(r["kl_token"])))
        rows.append({**{k: r[k] for k in ("run", "reward.n_labels", "controller", "target_kl", "seed", "kl_token")},
                     score: r[score], f"fixed_{score}": at, "difference": r[score] - at})  # fmt: skip
    return pd.DataFrame(rows)
