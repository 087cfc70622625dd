"""Protocol v2 (docs/results.md "Protocol v2: pre-registration"): the analysis as a pipeline of named stages, each a
short function with one output, reading its rules from the committed `conf/analysis/protocol.yaml`.

    curves ──stationarity──> per-run halves          (which tails are steady states)
    curves ──run_scores────> one row per run × target (primary + secondary metrics, stationarity merged)
    scores ──cells─────────> one row per cell          (mean, Student-t interval, n, stationary)
    fixed-β scores ──fit_frontier──> per-seed PCHIP fits ──tuned_beta──> β*(τ); ──reward_at_kl──> equal-KL reward
    scores ──hypothesis_tests──> tests.csv rows ──adjust──> raw and Holm/BH-adjusted p

Stages take and return pandas frames; nothing here reads or writes files except `load_protocol`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kl_research.analysis.control import score_runs
from kl_research.analysis.stats import t_interval

PROTOCOL_FILE = Path(__file__).resolve().parents[2] / "conf" / "analysis" / "protocol.yaml"


# ===================================================================================================== rules
def load_protocol(path: str | Path = PROTOCOL_FILE) -> dict[str, Any]:
    """The pre-registered rules as a plain dict (conf/analysis/protocol.yaml)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


# ============================================================================================ stationarity
def tail_halves(values: np.ndarray, tail_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The tail (last ⌈tail_fraction·n⌉ values) split into its first and second half (the middle value, for an odd
    tail, goes to neither)."""
    n_tail = max(2, math.ceil(tail_fraction * len(values)))
    tail = values[-n_tail:]
    h = len(tail) // 2
    return tail[:h], tail[-h:]


def run_stationarity(g: pd.DataFrame, rules: Mapping[str, Any], length: int | None = None) -> dict[str, Any]:
    """One run's stationarity (rows sorted by step), judged on its first `length` rollouts (all if None):
    mean KL and reward of the tail's halves, |log KL ratio|, |Δ reward|, and whether both are within the rules."""
    g = g if length is None else g[g["step"] <= length]
    kl1, kl2 = tail_halves(g["kl/exact"].to_numpy(float), rules["tail_fraction"])
    r1, r2 = tail_halves(g["reward/mean"].to_numpy(float), rules["tail_fraction"])
    log_ratio = float(abs(math.log(kl2.mean() / kl1.mean()))) if kl1.mean() > 0 and kl2.mean() > 0 else math.inf
    reward_diff = float(abs(r2.mean() - r1.mean()))
    # diagnostics beside the rule (not part of it): the tail's OLS slopes per 100 rollouts and their standard errors
    n_tail = max(2, math.ceil(rules["tail_fraction"] * len(g)))
    tail = g.iloc[-n_tail:]
    slopes = {}
    for name, y in (
        ("reward", tail["reward/mean"].to_numpy(float)),
        ("log_kl", np.log(tail["kl/exact"].to_numpy(float))),
    ):
        fit = _slope(tail["step"].to_numpy(float), y)
        slopes.update({f"{name}_slope_per_100": 100 * fit[0], f"{name}_slope_se": 100 * fit[1]})
    signed = math.log(kl2.mean() / kl1.mean()) if kl1.mean() > 0 and kl2.mean() > 0 else math.nan
    return {
        "length": int(g["step"].max()),
        "kl_log_ratio_signed": float(signed),
        "reward_diff_signed": float(r2.mean() - r1.mean()),
        "kl_first_half": float(kl1.mean()),
        "kl_second_half": float(kl2.mean()),
        "kl_log_ratio": log_ratio,
        "reward_first_half": float(r1.mean()),
        "reward_second_half": float(r2.mean()),
        "reward_diff": reward_diff,
        "stationary": bool(log_ratio <= rules["kl_log_ratio_max"] and reward_diff <= rules["reward_diff_max"]),
        **slopes,
    }


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """OLS slope of y on x and its standard error (NaN for fewer than 3 points or non-finite y)."""
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return math.nan, math.nan
    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc**2).sum())
    resid = y - y.mean() - b * xc
    return b, float(math.sqrt((resid**2).sum() / (len(x) - 2) / (xc**2).sum()))


def stationarity(
    curves: pd.DataFrame, rules: Mapping[str, Any], lengths: Sequence[int | None] = (None,)
) -> pd.DataFrame:
    """Stage: one row per run × length, the run's identity columns beside run_stationarity's."""
    ids = ["run", "controller", "target_kl", "init_kl_coef", "seed"]
    rows = []
    for _, g in curves.groupby("run", sort=False):
        g = g.sort_values("step")
        for length in lengths:
            if length is not None and g["step"].max() < length:
                continue  # a run shorter than the length asked cannot be judged at it
            rows.append({**{c: g[c].iloc[0] for c in ids}, **run_stationarity(g, rules, length)})
    return pd.DataFrame(rows)


def cell_stationary(runs: pd.DataFrame, rules: Mapping[str, Any], level: float = 0.90) -> bool:
    """Whether a cell's tail is a steady state, by the protocol's `cell_rule`:
    - every_seed: every run passes run_stationarity's rule (its false-failure rate grows with the seed count);
    - mean_within: the cell's mean drift between the tail's halves is shown inside the tolerances: the `level`
      Student-t interval over runs of the signed log KL ratio inside ±kl_log_ratio_max and of the signed reward
      difference inside ±reward_diff_max (two one-sided tests at 5 %, as TOST). One run: its own rule."""
    rule = rules.get("cell_rule", "every_seed")
    if rule == "every_seed" or len(runs) < 2:
        return bool(runs["stationary"].all())
    if rule != "mean_within":
        raise ValueError(f"stationarity.cell_rule={rule!r} is invalid; allowed: every_seed, mean_within")
    for col, tol in (
        ("kl_log_ratio_signed", rules["kl_log_ratio_max"]),
        ("reward_diff_signed", rules["reward_diff_max"]),
    ):
        _, lo, hi, _, _ = t_interval(runs[col].to_numpy(float), level)
        if not (-tol <= lo and hi <= tol):
            return False
    return True


def choose_length(pilot: pd.DataFrame, lengths: Sequence[int], persistent: bool = False) -> int | None:
    """The shortest length at which every pilot run is stationary (pilot: `stationarity` rows of the runs in the
    needed β range at every length); None if no length passes. persistent=True: the shortest length from which every
    longer candidate passes too, so that a length which passes between two that fail (the halves of a short tail are
    too close to tell a slow drift from noise) is not taken."""
    ok = {int(n): bool(len(at)) and bool(at["stationary"].all()) for n, at in pilot.groupby("length")}
    ordered = sorted(int(n) for n in lengths)
    for i, length in enumerate(ordered):
        if ok.get(length, False) and (not persistent or all(ok.get(n, False) for n in ordered[i:])):
            return length
    return None


# ============================================================================================ per-run scores
def settle_censored(kl: np.ndarray, target: float, band: Sequence[float]) -> float:
    """The first rollout from which KL stays in band × target to the end; a run that is out of band at its last
    rollout never settled and counts at n + 1 (censored, never dropped)."""
    inside = (kl >= band[0] * target) & (kl <= band[1] * target)
    if not inside[-1]:
        return float(len(kl) + 1)
    outside = np.flatnonzero(~inside)
    return float(outside[-1] + 2 if len(outside) else 1)


def run_scores(
    curves: pd.DataFrame, protocol: Mapping[str, Any], targets: Sequence[float] | None = None
) -> pd.DataFrame:
    """Stage: one row per run × the target it is judged against (fixed runs against every target): the existing
    control metrics, plus the protocol's log-ratio tracking error, censored settle step, response length, distinct-2
    and the run's stationarity."""
    rules = protocol["stationarity"]
    band = protocol["metrics"]["settle"]["band"]
    scores = score_runs(curves, targets=targets, tail_fraction=rules["tail_fraction"])
    extra = []
    for run, g in curves.groupby("run", sort=False):
        g = g.sort_values("step")
        n_tail = max(1, math.ceil(rules["tail_fraction"] * len(g)))
        tail = g.iloc[-n_tail:]
        row = {"run": run, **run_stationarity(g, rules)}
        row["response_length"] = float(tail["response/length"].mean()) if "response/length" in g else math.nan
        ev = g["eval/distinct_2"].dropna() if "eval/distinct_2" in g else pd.Series(dtype=float)
        row["distinct_2"] = float(ev.iloc[-1]) if len(ev) else math.nan
        row["_kl"] = g["kl/exact"].to_numpy(float)
        extra.append(row)
    extra = pd.DataFrame(extra).drop(columns=["length"])
    out = scores.merge(extra, on="run", how="left")
    out["log_ratio_error"] = np.abs(np.log(out["kl"] / out["target_kl"]))
    out["settle_censored"] = [settle_censored(k, t, band) for k, t in zip(out["_kl"], out["target_kl"], strict=True)]
    out["never_settled"] = out["settle_censored"] > out["steps"]
    return out.drop(columns=["_kl"])


# ======================================================================================================= cells
CELL_METRICS = (
    "log_ratio_error", "reward", "kl", "tracking_error", "in_band", "settle_censored", "overshoot", "iae",
    "ppl_change", "response_length", "distinct_2", "final_beta", "kl_log_ratio", "reward_diff",
    "judge_reward", "gold_reward", "gold2_reward",
)  # fmt: skip
CELL_ID = ["arm", "controller", "target_kl", "init_kl_coef"]


def cells(scores: pd.DataFrame, protocol: Mapping[str, Any], level: float = 0.95) -> pd.DataFrame:
    """Stage: one row per arm × target × β₀: n, every CELL_METRICS mean with its Student-t interval, runs that never
    settled, `stationary` (every run's tail passed) and `holds` (the 95 % upper bound of the mean log-ratio error ≤
    the rule; NaN for a transient cell: no verdict is drawn from it)."""
    limit = protocol["metrics"]["hold"]["log_ratio_max"]
    rows = []
    keys = [k for k in CELL_ID if k in scores]
    for key, g in scores.groupby(keys, sort=True, dropna=False):
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["n"] = int(g["seed"].nunique())
        for m in CELL_METRICS:
            if m in g:
                mean, lo, hi, _, _ = t_interval(g[m].to_numpy(float), level)
                row.update({f"{m}_mean": mean, f"{m}_lo": lo, f"{m}_hi": hi})
        row["never_settled"] = int(g["never_settled"].sum())
        row["stationary"] = cell_stationary(g.drop_duplicates("run"), protocol["stationarity"])
        row["stationary_every_seed"] = bool(g["stationary"].all())
        # one-sided 95 % upper bound = the upper end of the two-sided 90 % interval
        upper = t_interval(g["log_ratio_error"].to_numpy(float), 1 - 2 * (1 - level))[2]
        row["log_ratio_error_upper"] = upper
        row["holds"] = bool(upper <= limit) if row["stationary"] and not math.isnan(upper) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# ==================================================================================================== frontier
def fit_frontier(fixed: pd.DataFrame) -> dict[int, dict[str, Any]]:
    """Stage: per tuning seed, monotone PCHIP fits of log KL_tail against log β and of tail reward against log KL
    (fixed: one row per fixed-β run, columns init_kl_coef, seed, kl, reward; ≥ 2 βs per seed)."""
    from scipy.interpolate import PchipInterpolator

    fits = {}
    for seed, g in fixed.groupby("seed"):
        g = g.groupby("init_kl_coef", as_index=False)[["kl", "reward"]].mean().sort_values("init_kl_coef")
        if len(g) < 2:
            continue
        log_b, log_kl = np.log(g["init_kl_coef"].to_numpy(float)), np.log(g["kl"].to_numpy(float))
        by_kl = np.argsort(log_kl)
        fits[int(seed)] = {
            "log_kl_of_log_beta": PchipInterpolator(log_b, log_kl, extrapolate=False),
            "reward_of_log_kl": PchipInterpolator(log_kl[by_kl], g["reward"].to_numpy(float)[by_kl], extrapolate=False),
            "log_beta_range": (float(log_b.min()), float(log_b.max())),
            "log_kl_range": (float(log_kl.min()), float(log_kl.max())),
        }
    return fits


def tuned_beta(fits: Mapping[int, Mapping[str, Any]], target: float, grid: int = 2001) -> float:
    """β*(τ): where the tuning seeds' mean PCHIP fit of log KL vs log β crosses log τ (NaN if τ is outside the
    range every seed's fit covers)."""
    lo = max(f["log_beta_range"][0] for f in fits.values())
    hi = min(f["log_beta_range"][1] for f in fits.values())
    x = np.linspace(lo, hi, grid)
    mean_log_kl = np.mean([f["log_kl_of_log_beta"](x) for f in fits.values()], axis=0)
    y = math.log(target)
    if not (mean_log_kl.min() <= y <= mean_log_kl.max()):
        return math.nan
    order = np.argsort(mean_log_kl)  # KL falls with β: interpolate x as a function of the (sorted) mean log KL
    return float(math.exp(np.interp(y, mean_log_kl[order], x[order])))


def reward_at_kl(fits: Mapping[int, Mapping[str, Any]], kl: float) -> np.ndarray:
    """Each tuning seed's PCHIP reward at this KL (NaN where a seed's frontier does not reach it): the values whose
    Student-t interval is the frontier's reward at equal KL, the fit's uncertainty over seeds included."""
    return np.array([float(f["reward_of_log_kl"](math.log(kl))) for f in fits.values()])


def frontier_table(
    fixed: pd.DataFrame, fits: Mapping[int, Mapping[str, Any]], targets: Sequence[float]
) -> pd.DataFrame:
    """Stage: per β, the tuning seeds' KL and reward (mean, interval); per target, β*(τ) and the frontier's reward
    at KL = τ with its interval over seeds."""
    rows = []
    for beta, g in fixed.groupby("init_kl_coef"):
        row = {"kind": "beta", "init_kl_coef": float(beta), "n": int(g["seed"].nunique())}
        for m in ("kl", "reward", "kl_log_ratio", "reward_diff"):
            mean, lo, hi, _, _ = t_interval(g[m].to_numpy(float))
            row.update({f"{m}_mean": mean, f"{m}_lo": lo, f"{m}_hi": hi})
        row["stationary"] = bool(g["stationary"].all())
        rows.append(row)
    for t in targets:
        mean, lo, hi, _, n = t_interval(reward_at_kl(fits, t))
        rows.append({"kind": "target", "target_kl": t, "tuned_beta": tuned_beta(fits, t), "n": n,
                     "reward_mean": mean, "reward_lo": lo, "reward_hi": hi})  # fmt: skip
    return pd.DataFrame(rows)


# ======================================================================================================== arms
def _match_beta(beta: float, candidates: Mapping[float, float], rel: float = 0.01) -> float | None:
    """The key of `candidates` (τ → β) whose β equals `beta` within a relative 1 % (βs are rounded in commands)."""
    for tau, b in candidates.items():
        if not math.isnan(b) and abs(math.log(beta / b)) <= rel:
            return tau
    return None


def assign_arms(scores: pd.DataFrame, tuned: Mapping[float, float], protocol: Mapping[str, Any]) -> pd.DataFrame:
    """Stage: name every scored row's arm and keep only the rows the protocol compares.

    - a targeted controller at the seed's β₀ (0.5): arm = the controller; at β₀ = β*(τ)·factor of its own τ
      (the misspecification arm): arm = f"{controller}@x{factor:g}"
    - fixed at β*(τ), judged against that τ: static_tuned; fixed at β*(τ)·factor against τ: fixed_beta0@x{factor}
    - fixed at the seed's β₀ = 0.5 against every target: static_seed
    """
    h2 = protocol["hypotheses"]["H2"]
    h2_targets = [float(t) for t in h2["targets"]]
    rows = []
    for _, r in scores.iterrows():
        tau, beta = float(r["target_kl"]), float(r["init_kl_coef"])
        star = tuned.get(tau, math.nan)
        # β₀ misspecified by a decade, only at the misspecification arm's targets (a fixed run can be that arm at one
        # target and the tuned static at another: β does not depend on the target)
        factors = [float(f) for f in h2["beta0_factors"]] if any(math.isclose(tau, t) for t in h2_targets) else []
        if r["controller"] != "fixed":
            hit = [f for f in factors if not math.isnan(star) and abs(math.log(beta / (star * f))) <= 0.01]
            arm = f"{r['controller']}@x{hit[0]:g}" if hit else r["controller"] if beta == 0.5 else None
        elif _match_beta(beta, {tau: star}) is not None:
            arm = "static_tuned"
        elif any(not math.isnan(star) and abs(math.log(beta / (star * f))) <= 0.01 for f in factors):
            f = next(f for f in factors if abs(math.log(beta / (star * f))) <= 0.01)
            arm = f"fixed_beta0@x{f:g}"
        elif beta == 0.5:
            arm = "static_seed"
        else:
            arm = None
        if arm is not None:
            rows.append({**r.to_dict(), "arm": arm})
    return pd.DataFrame(rows)


# ======================================================================================================= tests
def paired_test(a: np.ndarray, b: np.ndarray, kind: str, margin: float | None = None, level: float = 0.95) -> dict:
    """Paired test of mean(a − b) over matched seeds. kind: t_paired (two-sided), t_paired_greater (H1: a − b > 0),
    tost_paired (equivalence within ±margin: p = the larger of the two one-sided p; its interval is the 1 − 2α one,
    so equivalence at α ⇔ the interval inside ±margin). Returns estimate, lo, hi, p, n, sd."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[~np.isnan(d)]
    n = len(d)
    out = {"n": n, "estimate": float(d.mean()) if n else math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    conf = 1 - 2 * (1 - level) if kind == "tost_paired" else level
    half = float(stats.t.ppf((1 + conf) / 2, df)) * se
    out.update(lo=out["estimate"] - half, hi=out["estimate"] + half, sd=sd)
    if se == 0:
        se = 1e-300  # identical differences: the test is decided by the sign of the (margin-shifted) mean
    if kind == "t_paired":
        out["p"] = float(2 * stats.t.sf(abs(out["estimate"]) / se, df))
    elif kind == "t_paired_greater":
        out["p"] = float(stats.t.sf(out["estimate"] / se, df))
    elif kind == "tost_paired":
        if margin is None:
            raise ValueError("tost_paired needs a margin")
        p_low = stats.t.sf((out["estimate"] + margin) / se, df)  # H0: mean ≤ −margin
        p_high = stats.t.cdf((out["estimate"] - margin) / se, df)  # H0: mean ≥ +margin
        out["p"] = float(max(p_low, p_high))
    else:
        raise ValueError(f"unknown paired test {kind!r}")
    return out


# tracking and reward: the primary metrics; judge: AFINN of the same rollouts' responses (reward/judge, amendment 4)
METRIC_COLUMN = {"tracking": "log_ratio_error", "reward": "reward", "judge": "judge_reward"}
METHOD_NAME = {
    "t_paired": "paired t (two-sided), seeds matched",
    "t_paired_greater": "paired t (one-sided, first − second > 0), seeds matched",
    "tost_paired": "TOST on the paired difference, margin ±{margin:g}; interval 90 %",
}


def _comparisons(protocol: Mapping[str, Any], targets: Sequence[float]) -> list[dict[str, Any]]:
    """Every pre-registered comparison as (hypothesis, first arm, second arm, metric, target, test, margin, family)."""
    out = []
    for name, h in protocol["hypotheses"].items():
        metrics = h.get("metrics", [h.get("metric", "reward")])
        taus = targets if h.get("targets", "all") == "all" else [float(t) for t in h["targets"]]
        pairs = [(a, b) for a, b in h["arms"]]
        if name == "H2":  # one comparison per β₀ factor: controller@xf against fixed_beta0@xf
            pairs = [(f"{b}@x{f:g}", f"{a}@x{f:g}") for a, b in pairs for f in h["beta0_factors"]]
        for a, b in pairs:
            for m in metrics:
                for t in taus:
                    out.append({"hypothesis": name, "first": a, "second": b, "metric": m, "target_kl": float(t),
                                "test": h["test"], "margin": h.get("margin"),
                                "family": h.get("family", "primary")})  # fmt: skip
    return out


def not_run_arms(protocol: Mapping[str, Any]) -> set[str]:
    """The registered arms that a deviation (its `not_run.arms`) took out of the runs, less those a later deviation
    put back (its `run_again.arms`)."""
    devs = protocol.get("deviations", [])
    gone = {a for d in devs for a in (d.get("not_run") or {}).get("arms", [])}
    return gone - {a for d in devs for a in (d.get("run_again") or {}).get("arms", [])}


def _arm_base(arm: str) -> str:
    """'pid@x10' → 'pid': the controller behind a misspecification arm's name."""
    return arm.split("@", 1)[0]


def registered_not_run(protocol: Mapping[str, Any], targets: Sequence[float]) -> list[dict[str, Any]]:
    """Every pre-registered comparison with an arm that a deviation took out: listed in the report, never tested
    (and so never in a family)."""
    gone = not_run_arms(protocol)
    return [c for c in _comparisons(protocol, targets) if {_arm_base(c["first"]), _arm_base(c["second"])} & gone]


def hypothesis_tests(arms: pd.DataFrame, protocol: Mapping[str, Any], targets: Sequence[float]) -> pd.DataFrame:
    """Stage: one row per pre-registered comparison, the two arms paired by seed: comparison, metric, target_kl, n,
    estimate, lo, hi, p, method, and `transient` (either cell failed stationarity: left out of the family)."""
    rows = []
    gone = not_run_arms(protocol)
    for c in _comparisons(protocol, targets):
        if {_arm_base(c["first"]), _arm_base(c["second"])} & gone:
            continue  # registered_not_run lists these
        col = METRIC_COLUMN[c["metric"]]
        sel = [
            arms[(arms["arm"] == arm) & np.isclose(arms["target_kl"], c["target_kl"])]
            for arm in (c["first"], c["second"])
        ]
        missing = "no runs of an arm" if any(s.empty for s in sel) else None
        if missing is None and (col not in arms or arms.loc[sel[0].index.union(sel[1].index), col].isna().all()):
            missing = f"{col} not logged by these runs"
        if missing:  # what the design asks and the runs lack: a row that says so, never tested
            rows.append({"hypothesis": c["hypothesis"], "comparison": f"{c['first']} − {c['second']}",
                         "metric": c["metric"], "target_kl": c["target_kl"], "n": 0, "estimate": math.nan,
                         "lo": math.nan, "hi": math.nan, "p": math.nan, "method": missing,
                         "family": c["family"], "transient": False})  # fmt: skip
            continue
        steady = [cell_stationary(s.drop_duplicates("run"), protocol["stationarity"]) for s in sel]
        a, b = (s.groupby("seed")[col].mean() for s in sel)
        common = a.index.intersection(b.index)
        res = paired_test(a.loc[common].to_numpy(), b.loc[common].to_numpy(), c["test"], c["margin"])
        # H2 is stated as e(fixed β₀) − e(controller) > 0: first is the fixed arm there, so the sign reads as stated
        rows.append({
            "hypothesis": c["hypothesis"], "comparison": f"{c['first']} − {c['second']}", "metric": c["metric"],
            "target_kl": c["target_kl"], **res,
            "method": METHOD_NAME[c["test"]].format(margin=c["margin"] or 0), "family": c["family"],
            "transient": not all(steady),
        })  # fmt: skip
    return pd.DataFrame(rows)


def adjust(tests: pd.DataFrame, protocol: Mapping[str, Any]) -> pd.DataFrame:
    """Stage: p_adj by the protocol's corrections: Holm over the primary family (stationary rows only; a transient
    row keeps its raw p and no p_adj), Benjamini-Hochberg within each secondary hypothesis × metric. The method
    column gains the correction's name and the family size. `p_adj_all_cells`, a post hoc sensitivity reading and
    not the registered one: the same corrections with the transient rows kept in their families."""
    from statsmodels.stats.multitest import multipletests

    out = tests.copy()
    mult = protocol["multiplicity"]
    names = {"holm": "Holm", "bh": "Benjamini-Hochberg", "fdr_bh": "Benjamini-Hochberg"}

    def corrected(usable: pd.Series) -> tuple[pd.Series, list[tuple[np.ndarray, str]]]:
        todo = [((out["family"] == "primary") & usable, mult["primary"]["method"])] + [
            (out.index.isin(g.index), mult["secondary"]["method"])
            for _, g in out[(out["family"] != "primary") & usable].groupby(["hypothesis", "metric"])
        ]
        p_adj = pd.Series(math.nan, index=out.index)
        done = []
        for mask, method in todo:
            mask = np.asarray(mask, bool)
            if mask.any():
                p = out.loc[mask, "p"].to_numpy(float)
                p_adj[mask] = multipletests(p, method="fdr_bh" if method == "bh" else method)[1]
                done.append((mask, method))
        return p_adj, done

    out["p_adj"], done = corrected(~out["transient"] & out["p"].notna())
    for mask, method in done:
        out.loc[mask, "method"] = out.loc[mask, "method"] + f"; {names[method]} over {int(mask.sum())} tests"
    # Post hoc, not registered (added 2026-12-07 before seed block 1004 existed): the same corrections with the
    # transient cells kept in their families, so that a reader sees which verdicts hinge on the stationarity rule.
    out["p_adj_all_cells"], _ = corrected(out["p"].notna())
    out.loc[out["transient"], "method"] = out.loc[out["transient"], "method"] + "; transient cell: not in the family"
    cols = ["comparison", "metric", "target_kl", "n", "estimate", "lo", "hi", "p", "p_adj", "method", "hypothesis",
            "family", "transient", "p_adj_all_cells"]  # fmt: skip
    return out[cols + [c for c in out.columns if c not in cols]]
