"""Statistics across seeds: Student-t intervals, Welch's test, per-cell statistics, the fixed-β frontier, the KL
estimators' bias against the exact KL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from kl_research.analysis.control import ESTIMATORS, METRICS
from kl_research.analysis.runs import POOL_KEYS


# ================================================================================================ statistics
def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float, float, int]:
    """(mean, lower, upper, sd, n): the mean of the values and its Student-t interval,
    mean ± t_{(1+level)/2, n−1} · sd / √n (sd with ddof = 1). NaNs are dropped first. n < 2: the bounds and sd
    are NaN (one seed has no spread to estimate: no interval is honest); no values: everything NaN, n = 0.

    This replaces the percentile bootstrap of earlier versions: with 3 seeds a bootstrap of the mean returns
    the seeds' minimum and maximum (docs/sweeps.md), far narrower than the uncertainty of a 3-sample mean."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan, 1
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, sd, n


def welch(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Welch's t-test of mean(a) − mean(b) (unequal variances) and the difference's Student-t interval with
    Welch–Satterthwaite degrees of freedom: ``diff``, ``lo``, ``hi``, ``df``, ``t``, ``p`` (two-sided). The
    interval excludes 0 exactly when p < 1 − level. NaNs dropped; fewer than 2 values on either side: all NaN
    (``diff`` still given). Both samples constant: p = 0 if the means differ, 1 if not."""
    from scipy import stats

    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    out = dict.fromkeys(["diff", "lo", "hi", "df", "t", "p"], math.nan)
    if len(x) and len(y):
        out["diff"] = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return out
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    if se == 0:
        p = 0.0 if out["diff"] != 0 else 1.0
        return {
            **out,
            "lo": out["diff"],
            "hi": out["diff"],
            "df": math.inf,
            "t": math.copysign(math.inf, out["diff"]) if p == 0 else 0.0,
            "p": p,
        }
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    t = out["diff"] / se
    half = float(stats.t.ppf((1 + level) / 2, df)) * se
    return {
        **out,
        "lo": out["diff"] - half,
        "hi": out["diff"] + half,
        "df": float(df),
        "t": float(t),
        "p": float(2 * stats.t.sf(abs(t), df)),
    }


CELL_KEYS = ["controller", "target_kl", "init_kl_coef"]


def _stat_columns(row: dict, prefix: str, values: pd.Series | np.ndarray, level: float) -> None:
    mean, lo, hi, sd, n = t_interval(np.asarray(values, dtype=float), level)
    row[f"{prefix}_mean"], row[f"{prefix}_lo"], row[f"{prefix}_hi"], row[f"{prefix}_sd"], row[f"{prefix}_n"] = (
        mean,
        lo,
        hi,
        sd,
        n,
    )


def _pool_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in POOL_KEYS if k in df.columns]


def cell_stats(
    scores: pd.DataFrame, metrics: Sequence[str] = METRICS, by: Sequence[str] = (), level: float = 0.95
) -> pd.DataFrame:
    """Per cell (controller, target, β₀, each :data:`POOL_KEYS` column present — runs that differ in
    ``ppo.kl_mode`` or ``ppo.kl_penalty`` are never pooled —, and ``by``, e.g. a swept ``ppo.lr``): ``n`` (runs),
    ``n_seeds`` (distinct seeds) and, for each metric, ``<m>_mean``, ``<m>_lo``, ``<m>_hi`` (the 95 % Student-t
    interval of the mean across seeds, :func:`t_interval`; NaN with one seed), ``<m>_sd`` and ``<m>_n`` (seeds
    with a value: ``settle_step`` is NaN for a run that did not settle, so its mean is over the settled runs and
    ``settled_mean`` is the fraction that settled). ``scores`` is :func:`score_runs`' frame, so ``fixed`` has one
    cell per β × target."""
    keys = [*CELL_KEYS, *_pool_keys(scores), *by]
    metrics = [m for m in metrics if m in scores.columns]
    rows = []
    for key, g in scores.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key, strict=True))
        row["n"] = len(g)
        row["n_seeds"] = g["seed"].nunique() if "seed" in g else len(g)
        for m in metrics:
            _stat_columns(row, m, g[m].astype(float), level)
        rows.append(row)
    cols = [*keys, "n", "n_seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "lo", "hi", "sd", "n"))]
    return pd.DataFrame(rows, columns=cols)


FRONTIER_METRICS = (
    "reward", "kl", "ppl_change", "kl_step2", "approx_kl_mean", "proxy_reward", "gold_reward", "gold2_reward",
    "judge_reward",
)  # fmt: skip


def frontier(scores: pd.DataFrame, controller: str = "fixed", level: float = 0.95) -> pd.DataFrame:
    """The reward–KL frontier of the fixed-β runs: per β₀ (and :data:`POOL_KEYS` setting), ``n``/``n_seeds`` and
    mean, 95 % Student-t interval and sd across seeds of tail reward, tail KL, Δ perplexity, ``kl_step2`` and
    ``approx_kl_mean`` (the per-rollout update size), and the held-out proxy and gold rewards where the runs logged
    them (docs/gold.md), plus ``steps`` (the runs' length), sorted by KL. These do not depend on the scoring target:
    each run counts once."""
    runs = scores[scores["controller"] == controller].drop_duplicates("run")
    keys = ["init_kl_coef", *_pool_keys(runs)]
    metrics = [m for m in FRONTIER_METRICS if m in runs]
    rows = []
    for key, g in runs.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(keys, key, strict=True)), "n": len(g), "n_seeds": g["seed"].nunique()}
        row["init_kl_coef"] = float(row["init_kl_coef"])
        row["steps"] = int(g["steps"].max()) if "steps" in g and g["steps"].notna().any() else math.nan
        for m in metrics:
            _stat_columns(row, m, g[m].astype(float), level)
        rows.append(row)
    cols = [*keys, "n", "n_seeds", "steps", *(f"{m}_{s}" for m in metrics for s in ("mean", "lo", "hi", "sd", "n"))]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values("kl_mean").reset_index(drop=True)


def frontier_at(front: pd.DataFrame, kl: float, column: str = "reward_mean") -> float:
    """``column`` of the frontier interpolated at ``kl``, linearly in log KL between the two fixed-β points that
    bracket it; NaN outside the frontier's KL range or with fewer than two points (no extrapolation)."""
    f = front.dropna(subset=["kl_mean", column])
    f = f[f["kl_mean"] > 0].sort_values("kl_mean")
    if len(f) < 2 or not (f["kl_mean"].iloc[0] <= kl <= f["kl_mean"].iloc[-1]) or kl <= 0:
        return math.nan
    return float(np.interp(np.log(kl), np.log(f["kl_mean"].to_numpy()), f[column].to_numpy()))


def estimator_bias(
    curves: pd.DataFrame,
    estimators: Sequence[str] = ESTIMATORS,
    reference: str = "exact",
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Bias and spread of each sampled estimator's batch KL against the exact one, on the logged per-step
    metrics (``kl/<estimator>`` against ``kl/<reference>``: per-token means over each rollout, both on the same
    tokens), pooled over every (run, step), or per group ``by`` (e.g. ``["controller", "target_kl"]``). A fixed
    run counts once. Columns: ``n`` (steps), ``runs``, ``exact_mean``, ``estimate_mean``, ``bias`` = mean of
    (estimate − exact), ``rel_bias`` = bias / mean exact, ``diff_sd`` (sd of the difference across steps: the
    batch-level spread, not the per-token one; steps of a run are correlated), ``rmse``, ``ratio_median``
    (median per-step estimate / exact, over steps with exact > 0)."""
    ref = f"kl/{reference}"
    rows = []
    groups = curves.groupby(list(by), sort=True, dropna=False) if by else [((), curves)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for e in estimators:
            col = f"kl/{e}"
            if col not in g:
                continue
            sub = g[[col, ref, "run"]].dropna()
            d = sub[col] - sub[ref]
            pos = sub[sub[ref] > 0]
            exact_mean = float(sub[ref].mean())
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "estimator": e,
                    "n": len(sub),
                    "runs": sub["run"].nunique(),
                    "exact_mean": exact_mean,
                    "estimate_mean": float(sub[col].mean()),
                    "bias": float(d.mean()),
                    "rel_bias": float(d.mean() / exact_mean) if exact_mean else math.nan,
                    "diff_sd": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
                    "rmse": float(np.sqrt((d**2).mean())),
                    "ratio_median": float((pos[col] / pos[ref]).median()) if len(pos) else math.nan,
                }
            )
    return pd.DataFrame(rows)
