"""What a sweep answers: controllability of the fixed-β frontier (first: can β reach every target?), the seed's claim
per target, band holding, pid against adaptive, their text, and :func:`analyse`, which computes it all once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kl_research.analysis.control import BAND, UNTARGETED, score_runs
from kl_research.analysis.runs import Sweep, attach_config, require_one_variant, select_runs
from kl_research.analysis.stats import cell_stats, estimator_bias, frontier, frontier_at, t_interval, welch

# A controller holds the band at a target when its tail-KL interval lies inside BAND × target and its mean tail
# in-band fraction is at least this (hold_band).
HOLD_IN_BAND = 0.8
# Controllers that track a target (hold_band).
TARGETED = ("adaptive", "pid", "exponential", "pid_ci")
# The target grid of docs/sweeps.md (nats/token) and the controllability checks on the fixed-β frontier: every
# target spanned with this margin on both sides; the frontier's range (tail KL at the smallest β at least margin × the
# largest target, at the largest β at most the smallest target / margin) follows from the targets asked.
GRID_TARGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
CONTROL_MARGIN = 2.0


# =================================================================================================== verdict


# ========================================================================================== controllability
@dataclass
class Controllability:
    """:func:`controllability`'s answer: ``table`` (one row per β), ``checks`` (one row per check: ``check``,
    ``required``, ``passed``, ``value``, ``rule``), ``spanned`` (the targets spanned with margin), ``text``."""

    table: pd.DataFrame
    checks: pd.DataFrame
    spanned: list[float]
    text: str
    margin: float = CONTROL_MARGIN

    @property
    def passed(self) -> bool:
        """Every required check passed (and there was a frontier to check)."""
        req = self.checks[self.checks["required"]] if len(self.checks) else self.checks
        return bool(len(req)) and bool(req["passed"].fillna(False).astype(bool).all())


def controllability(
    front: pd.DataFrame,
    targets: Sequence[float] | None = None,
    steps: int | None = None,
    margin: float = CONTROL_MARGIN,
    kl_at_smallest_beta: float | None = None,
    kl_at_largest_beta: float | None = None,
) -> Controllability:
    """docs/sweeps.md, "first show that the experiment can answer": from the fixed-β frontier (:func:`frontier`),
    per β (ascending) the tail KL and tail reward with their 95 % Student-t intervals, ``kl_step2`` and
    ``approx_kl_mean`` (means over seeds), and these checks, all computed on the means:

    - ``monotone``: tail KL non-increasing in β (every consecutive pair; the violations are listed).
    - ``smallest_beta``: tail KL at the smallest β ≥ ``kl_at_smallest_beta`` (default margin × the largest target:
      0.4 nats/token on the grid's 0.01-0.2).
    - ``largest_beta``: tail KL at the largest β ≤ ``kl_at_largest_beta`` (default the smallest target / margin:
      0.005 on the grid). Both follow from the targets asked, so a sweep of other targets (a real LM's 0.02 and
      0.05) is judged on the range it needs, not on the default grid's.
    - ``spans <t>`` for each target (default :data:`GRID_TARGETS`): some β with tail KL ≥ margin·t and some β
      with tail KL ≤ t/margin (margin 2: the target lies well inside the range β can reach).
    - ``job_length`` (only with ``steps``, the sweep's job length): every frontier β ran ``steps`` steps.
    - not required, for the reader (docs/kl-contract.md): ``first_update`` (largest mean ``kl_step2`` < smallest
      target: one update moves π by less than the smallest target) and ``update_size`` (largest mean
      ``approx_kl_mean`` < smallest target).

    A frontier with mixed :data:`POOL_KEYS` settings raises ValueError."""
    require_one_variant(front, "controllability")
    targets = sorted(float(t) for t in (GRID_TARGETS if targets is None else targets))
    if not targets:
        raise ValueError("controllability: no targets to check the frontier against")
    if kl_at_smallest_beta is None:
        kl_at_smallest_beta = margin * targets[-1]
    if kl_at_largest_beta is None:
        kl_at_largest_beta = targets[0] / margin
    f = front.sort_values("init_kl_coef").reset_index(drop=True)
    table = _controllability_table(f)
    if f.empty:
        text = "No fixed-β runs: the experiment's controllability is not shown (run `python sweep.py sweep=frontier`)."
        return Controllability(table, pd.DataFrame([], columns=list(_CHECK_COLUMNS)), [], text)
    spans = _span_checks(f, targets, margin)
    checks = [
        *_range_checks(f, kl_at_smallest_beta, kl_at_largest_beta),
        *spans,
        *_job_length_check(f, steps),
        *_update_checks(f, targets),
    ]
    spanned = [t for t, row in zip(targets, spans, strict=True) if row["passed"]]
    ctl = Controllability(table, pd.DataFrame(checks), spanned, "", margin)
    ctl.text = controllability_text(ctl, targets)
    return ctl


_CHECK_COLUMNS = ("check", "required", "passed", "value", "rule")


def _check(name: str, passed: Any, value: str, rule: str, required: bool = True) -> dict:
    """One row of :attr:`Controllability.checks`."""
    return {"check": name, "required": required, "passed": passed, "value": value, "rule": rule}


def _controllability_table(f: pd.DataFrame) -> pd.DataFrame:
    """The frontier's columns that :attr:`Controllability.table` shows, one row per β (those the frontier has)."""
    cols = [
        "init_kl_coef",
        "n_seeds",
        "steps",
        "kl_mean",
        "kl_lo",
        "kl_hi",
        "kl_sd",
        "reward_mean",
        "reward_lo",
        "reward_hi",
        "reward_sd",
        "kl_step2_mean",
        "approx_kl_mean_mean",
    ]
    return f[[c for c in cols if c in f]].copy()


def _range_checks(f: pd.DataFrame, kl_at_smallest_beta: float, kl_at_largest_beta: float) -> list[dict]:
    """The ``monotone``, ``smallest_beta`` and ``largest_beta`` check rows of a β-sorted, non-empty frontier."""
    beta, kl = f["init_kl_coef"].to_numpy(float), f["kl_mean"].to_numpy(float)
    bad = [
        f"β {beta[i]:g}→{beta[i + 1]:g}: {kl[i]:.3g}→{kl[i + 1]:.3g}" for i in range(len(f) - 1) if kl[i + 1] > kl[i]
    ]
    return [
        _check(
            "monotone",
            len(f) >= 2 and not bad,
            "; ".join(bad) or f"{len(f)} β values, no increase",
            "tail KL non-increasing in β (means)",
        ),
        _check(
            "smallest_beta",
            bool(kl[0] >= kl_at_smallest_beta),
            f"β {beta[0]:g}: {kl[0]:.3g}",
            f"tail KL at the smallest β ≥ {kl_at_smallest_beta:g}",
        ),
        _check(
            "largest_beta",
            bool(kl[-1] <= kl_at_largest_beta),
            f"β {beta[-1]:g}: {kl[-1]:.3g}",
            f"tail KL at the largest β ≤ {kl_at_largest_beta:g}",
        ),
    ]


def _span_checks(f: pd.DataFrame, targets: Sequence[float], margin: float) -> list[dict]:
    """One ``spans <t>`` check row per target, in the targets' order: some β ≥ margin·t and some ≤ t/margin."""
    beta, kl = f["init_kl_coef"].to_numpy(float), f["kl_mean"].to_numpy(float)
    rows = []
    for t in targets:
        above, below = beta[kl >= margin * t], beta[kl <= t / margin]
        ok = bool(len(above) and len(below))
        value = (
            f"≥{margin:g}×: β {', '.join(f'{b:g}' for b in above) or 'none'}; "
            f"≤{1 / margin:g}×: β {', '.join(f'{b:g}' for b in below) or 'none'}"
        )
        rows.append(
            _check(
                f"spans {t:g}", ok, value, f"some β with tail KL ≥ {margin:g}×{t:g} and some with ≤ {t:g}/{margin:g}"
            )
        )
    return rows


def _job_length_check(f: pd.DataFrame, steps: int | None) -> list[dict]:
    """The ``job_length`` check row (every β ran ``steps`` steps); none without ``steps`` or a steps column."""
    if steps is None or "steps" not in f:
        return []
    short = f[f["steps"] != steps]
    return [
        _check(
            "job_length",
            short.empty,
            ", ".join(f"β {b:g}: {s:g}" for b, s in zip(short["init_kl_coef"], short["steps"], strict=True))
            or f"all {steps}",
            f"every β ran the sweep's {steps} steps",
        )
    ]


def _update_checks(f: pd.DataFrame, targets: Sequence[float]) -> list[dict]:
    """The not-required ``first_update`` and ``update_size`` check rows, for the columns the frontier has."""
    smallest = targets[0] if targets else math.nan
    rows = []
    for name, col, what in (
        ("first_update", "kl_step2_mean", "KL after the first update (step 2)"),
        ("update_size", "approx_kl_mean_mean", "mean approx-KL per rollout"),
    ):
        if col in f and f[col].notna().any():
            worst = float(f[col].max())
            rows.append(
                _check(
                    name,
                    bool(worst < smallest),
                    f"max over β {worst:.3g}",
                    f"{what} < smallest target {smallest:g}",
                    required=False,
                )
            )
    return rows


def controllability_text(c: Controllability, targets: Sequence[float]) -> str:
    """The controllability checks as sentences, every number from ``c``."""
    t = c.table
    by = c.checks.set_index("check")
    seeds = _seed_range(t["n_seeds"]) if "n_seeds" in t else "?"

    def said(name: str) -> str:
        return "yes" if bool(by.loc[name, "passed"]) else "**no**"

    lines = [
        f"**Controllability of the fixed-β frontier**: {len(t)} β values ({_join(t['init_kl_coef'])}), "
        f"{seeds} seed(s) each, tail KL in nats/token, 95 % Student-t intervals over seeds:",
        f"- tail KL non-increasing in β (means): {said('monotone')} ({by.loc['monotone', 'value']})",
        f"- {by.loc['smallest_beta', 'rule']}: {said('smallest_beta')} ({by.loc['smallest_beta', 'value']}); "
        f"{by.loc['largest_beta', 'rule']}: {said('largest_beta')} ({by.loc['largest_beta', 'value']})",
    ]
    missed = [x for x in targets if x not in c.spanned]
    req = c.checks[c.checks["required"]] if len(c.checks) else c.checks
    failed = [str(x) for x in req.loc[~req["passed"].fillna(False).astype(bool), "check"]] if len(req) else []
    lines.append(
        f"- targets spanned with a {c.margin:g}× margin on both sides: {len(c.spanned)}/{len(targets)} "
        f"({_join(c.spanned)}); not spanned: {_join(missed)}"
    )
    if "job_length" in by.index:
        lines.append(
            f"- frontier runs as long as the sweep's jobs: {said('job_length')} ({by.loc['job_length', 'value']})"
        )
    for name in ("first_update", "update_size"):
        if name in by.index:
            lines.append(f"- {by.loc[name, 'rule']}: {said(name)} ({by.loc[name, 'value']})")
    lines.append(
        f"- **the experiment {'can' if c.passed else 'cannot'} answer its question at every target** "
        f"({'every required check passes' if c.passed else 'failed: ' + ', '.join(failed)}); a controller can "
        f"only be judged at a target β can reach with margin: {_join(c.spanned)}."
    )
    return "\n".join(lines)


def _join(values: Iterable[float]) -> str:
    return ", ".join(f"{x:g}" for x in values) or "none"


def _seed_range(n: pd.Series) -> str:
    n = n.dropna()
    if n.empty:
        return "0"
    lo, hi = int(n.min()), int(n.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


# =================================================================================================== verdict
def _pick_static(
    cells: pd.DataFrame, target: float, beta0: float, baseline: str, static_beta: str | float
) -> tuple[pd.Series | None, str]:
    """The baseline cell at ``target``: β₀ equal to the controller's (``matched``), the fixed β whose tail KL is
    nearest the target in log ratio (``closest``: a static β tuned for that target), or a given β."""
    cand = cells[(cells["controller"] == baseline) & np.isclose(cells["target_kl"], target)]
    if cand.empty:
        return None, f"no {baseline} runs"
    if static_beta == "matched":
        cand = cand[np.isclose(cand["init_kl_coef"], beta0)]
        if cand.empty:
            return None, f"no {baseline} run with β={beta0:g} (the controller's β₀)"
        return cand.iloc[0], ""
    if static_beta == "closest":
        pos = cand[cand["kl_mean"] > 0]
        if pos.empty:
            return None, "no fixed run with KL > 0"
        return pos.iloc[int(np.argmin(np.abs(np.log(pos["kl_mean"].to_numpy() / target))))], ""
    cand = cand[np.isclose(cand["init_kl_coef"], float(static_beta))]
    return (cand.iloc[0], "") if len(cand) else (None, f"no {baseline} run with β={float(static_beta):g}")


_EVIDENCE = (
    "reward",
    "tracking_error",
    "kl",
    "in_band",
    "iae",
    "overshoot",
    "settle_step",
    "settled",
    "settling_step",
    "ppl_change",
)


def _evidence(prefix: str, cell: pd.Series | None, cols: Sequence[str]) -> dict[str, float]:
    out = {f"{prefix}n": cell["n"] if cell is not None else 0}
    out[f"{prefix}n_seeds"] = cell.get("n_seeds", cell["n"]) if cell is not None else 0
    for m in cols:
        for s in ("mean", "lo", "hi", "sd"):
            key = f"{m}_{s}"
            out[f"{prefix}{key}"] = float(cell[key]) if cell is not None and key in cell else math.nan
    return out


def verdict(
    cells: pd.DataFrame,
    controller: str = "adaptive",
    baseline: str = "fixed",
    static_beta: str | float = "matched",
    front: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The seed's claim, per target: does ``controller`` reach similar or better reward than the static β while
    keeping KL closer to the target? Computed from :func:`cell_stats`' numbers (95 % Student-t intervals across
    seeds), one row per (target, controller β₀), whichever way it falls:

    - ``reward_similar_or_better``: the controller's mean reward ≥ the lower bound of the static run's 95 %
      interval (inside that interval, or above it).
    - ``kl_closer``: the controller's mean tracking error < the lower bound of the static run's interval (below
      it: lower by more than the static runs' own uncertainty).
    - ``claim_holds``: both.
    - ``on_or_above_frontier`` (only with ``front``, :func:`frontier`, of ≥ 2 β): the controller's mean reward ≥
      the frontier's lower reward bound interpolated at the controller's mean KL; NA outside the frontier.

    A static cell with fewer than 2 seeds has no interval: both tests are False and ``note`` says why. The
    static run (``static_beta``): ``matched`` (the fixed run with the controller's β₀: what one gets without
    control), ``closest`` (the fixed β whose KL is nearest that target: a static β tuned per target, a fair
    but harder baseline; needs a frontier sweep) or a number. Evidence columns: ``<metric>_{mean,lo,hi,sd}`` for
    the controller, ``static_<metric>_…`` for the static run, ``n``/``static_n`` runs, ``note`` when a cell is
    missing (then all booleans are False). Mixed :data:`POOL_KEYS` settings raise ValueError.
    """
    require_one_variant(cells, "verdict")
    rows = []
    ctl = cells[cells["controller"] == controller].sort_values(["target_kl", "init_kl_coef"])
    for _, c in ctl.iterrows():
        t, beta0 = float(c["target_kl"]), float(c["init_kl_coef"])
        s, note = _pick_static(cells, t, beta0, baseline, static_beta)
        row: dict[str, Any] = {
            "target_kl": t,
            "controller": controller,
            "init_kl_coef": beta0,
            "static_beta": float(s["init_kl_coef"]) if s is not None else math.nan,
            **_evidence("", c, _EVIDENCE),
            **_evidence("static_", s, _EVIDENCE),
        }
        if s is not None and (math.isnan(row["static_reward_lo"]) or math.isnan(row["static_tracking_error_lo"])):
            note = f"{baseline} cell has {int(row['static_n'])} seed(s): no interval"
        ok = s is not None
        row["reward_similar_or_better"] = bool(ok and row["reward_mean"] >= row["static_reward_lo"])
        row["kl_closer"] = bool(ok and row["tracking_error_mean"] < row["static_tracking_error_lo"])
        row["claim_holds"] = row["reward_similar_or_better"] and row["kl_closer"]
        if front is not None:
            lo = frontier_at(front, row["kl_mean"], "reward_lo")
            row["frontier_reward_at_kl"] = frontier_at(front, row["kl_mean"], "reward_mean")
            row["on_or_above_frontier"] = pd.NA if math.isnan(lo) else bool(row["reward_mean"] >= lo)
        row["note"] = note
        rows.append(row)
    return pd.DataFrame(rows)


BAND_EVIDENCE = ("kl", "in_band", "settle_step", "settled", "overshoot", "tracking_error", "reward", "ppl_change")


def hold_band(
    cells: pd.DataFrame, controllers: Sequence[str] = TARGETED, min_in_band: float = HOLD_IN_BAND
) -> pd.DataFrame:
    """Per target and controller (and β₀): does it *hold the band*? Defined as: the 95 % Student-t interval of
    its tail KL across seeds lies inside [0.5, 2] × target (``kl_interval_in_band``) AND the mean tail in-band
    fraction is ≥ ``min_in_band`` (0.8; ``mostly_in_band``). ``holds_band``: both; False with one seed (no
    interval; ``note`` says so). Evidence per cell: ``<m>_{mean,lo,hi,sd}`` for tail KL, in-band fraction, settle
    step (mean over the runs that settled, ``settled_mean`` = the fraction that did), overshoot, tail tracking
    error, reward and Δ perplexity; ``n``, ``n_seeds``. Mixed :data:`POOL_KEYS` settings raise ValueError."""
    require_one_variant(cells, "hold_band")
    rows = []
    sub = cells[cells["controller"].isin(controllers)].sort_values(["target_kl", "controller", "init_kl_coef"])
    for _, c in sub.iterrows():
        t = float(c["target_kl"])
        row: dict[str, Any] = {"target_kl": t, "controller": c["controller"], "init_kl_coef": float(c["init_kl_coef"])}
        row.update(_evidence("", c, BAND_EVIDENCE))
        row["kl_interval_in_band"] = bool(row["kl_lo"] >= BAND[0] * t and row["kl_hi"] <= BAND[1] * t)
        row["mostly_in_band"] = bool(row["in_band_mean"] >= min_in_band)
        row["holds_band"] = row["kl_interval_in_band"] and row["mostly_in_band"]
        row["note"] = "" if not math.isnan(row["kl_lo"]) else f"{int(row['n'])} seed(s): no interval"
        rows.append(row)
    return pd.DataFrame(rows)


COMPARE_METRICS = ("reward", "tracking_error", "in_band", "overshoot", "settle_step", "kl", "iae", "ppl_change")


def compare_controllers(
    scores: pd.DataFrame,
    a: str = "pid",
    b: str = "adaptive",
    metrics: Sequence[str] = COMPARE_METRICS,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """``a`` against ``b`` at each target they share (same β₀), run by run (``scores``, :func:`score_runs`' frame:
    one row per run). Per metric: each side's mean, 95 % Student-t interval and sd (``a_<m>_mean`` …,
    ``b_<m>_…``), the difference a − b with its Welch interval (``diff_<m>``, ``diff_<m>_lo``, ``diff_<m>_hi``)
    and Welch's two-sided p (``p_<m>``), ``significant_<m>`` = p < ``alpha`` (5 %; False when either side has
    fewer than 2 seeds). ``settle_step`` is compared over the runs that settled (``a_settled_mean``: the
    fraction). Booleans, each a significant difference in the direction named:

    - ``equal_reward``: the reward difference is *not* significant (both sides with ≥ 2 seeds);
    - ``lower_tracking_error``, ``lower_overshoot``, ``settles_sooner``: ``a``'s mean is significantly lower;
    - ``a_better_at_equal_reward``: equal reward and lower tracking error.

    ``n_a``, ``n_b``: the seeds on each side. Mixed :data:`POOL_KEYS` settings raise ValueError."""
    if "run" not in scores:
        raise TypeError("compare_controllers takes score_runs' per-run frame (one row per run), not cell_stats'")
    require_one_variant(scores[scores["controller"].isin([a, b])], "compare_controllers")
    metrics = [m for m in metrics if m in scores]
    rows = []
    sa_all, sb_all = scores[scores["controller"] == a], scores[scores["controller"] == b]
    for (t, beta0), ga in sa_all.groupby(["target_kl", "init_kl_coef"], sort=True):
        gb = sb_all[np.isclose(sb_all["target_kl"], t) & np.isclose(sb_all["init_kl_coef"], beta0)]
        row: dict[str, Any] = {
            "target_kl": float(t),
            "a": a,
            "b": b,
            "init_kl_coef": float(beta0),
            "n_a": int(ga["seed"].nunique()),
            "n_b": int(gb["seed"].nunique()),
        }
        for m in [*metrics, "settled"]:
            if m not in scores:
                continue
            for side, g in (("a", ga), ("b", gb)):
                mean, lo, hi, sd, _ = t_interval(g[m].astype(float))
                row[f"{side}_{m}_mean"], row[f"{side}_{m}_lo"], row[f"{side}_{m}_hi"], row[f"{side}_{m}_sd"] = (
                    mean,
                    lo,
                    hi,
                    sd,
                )
            if m == "settled":
                continue
            w = welch(ga[m].astype(float), gb[m].astype(float))
            row[f"diff_{m}"], row[f"diff_{m}_lo"], row[f"diff_{m}_hi"], row[f"p_{m}"] = (
                w["diff"],
                w["lo"],
                w["hi"],
                w["p"],
            )
            row[f"significant_{m}"] = bool(not math.isnan(w["p"]) and w["p"] < alpha)

        def lower(m: str, row: dict = row) -> bool:
            return bool(row.get(f"significant_{m}", False) and row[f"diff_{m}"] < 0)

        ok = len(gb) > 0
        row["equal_reward"] = bool(ok and not math.isnan(row.get("p_reward", math.nan)) and row["p_reward"] >= alpha)
        row["lower_tracking_error"] = lower("tracking_error")
        row["lower_overshoot"] = lower("overshoot")
        row["settles_sooner"] = lower("settle_step")
        row["a_better_at_equal_reward"] = row["equal_reward"] and row["lower_tracking_error"]
        row["note"] = "" if ok else f"no {b} runs"
        rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================================ verdict text
NAMES = {
    "reward": "reward",
    "tracking_error": "tail tracking error",
    "in_band": "tail in-band fraction",
    "overshoot": "overshoot",
    "settle_step": "settle step",
    "kl": "tail KL",
    "iae": "IAE",
    "ppl_change": "Δ perplexity",
}


def _targets(df: pd.DataFrame, mask: pd.Series) -> str:
    return ", ".join(f"{t:g}" for t in df.loc[mask, "target_kl"]) or "none"


def _claim_lines(v: pd.DataFrame) -> list[str]:
    c = v["controller"].iloc[0]
    n = len(v)
    betas = ", ".join(f"{b:g}" for b in sorted(set(v["static_beta"].dropna())))
    lines = [
        f"**{c} vs static β ({betas or 'none'})**, {n} target(s), {_seed_range(v['n_seeds'])} seed(s) per cell "
        f"(static: {_seed_range(v['static_n_seeds'])}), 95 % Student-t intervals over seeds:",
        f"- reward similar or better (mean ≥ static's lower bound): {int(v['reward_similar_or_better'].sum())}/{n} "
        f"(targets: {_targets(v, v['reward_similar_or_better'])})",
        f"- KL closer to target (tracking error below static's interval): {int(v['kl_closer'].sum())}/{n} "
        f"(targets: {_targets(v, v['kl_closer'])})",
    ]
    if "on_or_above_frontier" in v:
        known = v["on_or_above_frontier"].notna()
        above = v["on_or_above_frontier"].fillna(False).astype(bool)
        lines.append(
            f"- on or above the fixed-β frontier at its KL: {int(above.sum())}/{int(known.sum())} targets inside "
            f"the frontier's KL range (targets: {_targets(v, above)})"
        )
    notes = v.loc[v["note"].astype(bool), ["target_kl", "note"]]
    for t, note in notes.itertuples(index=False):
        lines.append(f"- target {t:g}: not decidable ({note})")
    held = int(v["claim_holds"].sum())
    word = "holds" if held == n else "does not hold" if held == 0 else "holds only partly"
    lines.append(f"- **the seed's claim {word}: at {held}/{n} target(s)** (targets: {_targets(v, v['claim_holds'])})")
    return lines


def _band_lines(band: pd.DataFrame) -> list[str]:
    lines = [
        f"**Holding the band**: a controller holds the band at a target when the 95 % Student-t interval of its "
        f"tail KL lies inside [{BAND[0]:g}, {BAND[1]:g}] × target and its mean tail in-band fraction is "
        f"≥ {HOLD_IN_BAND:g}:"
    ]
    for c, g in band.groupby("controller", sort=False):
        n = len(g)
        held = g["holds_band"].astype(bool)
        settled = g["settled_mean"].fillna(0)
        lines.append(
            f"- {c} ({_seed_range(g['n_seeds'])} seed(s)): holds the band at {int(held.sum())}/{n} target(s) "
            f"(targets: {_targets(g, held)}); KL interval inside the band at "
            f"{int(g['kl_interval_in_band'].sum())}/{n}, "
            f"in-band fraction ≥ {HOLD_IN_BAND:g} at {int(g['mostly_in_band'].sum())}/{n}; every seed settled in the "
            f"band at {int((settled >= 1).sum())}/{n} (targets: {_targets(g, settled >= 1)})"
        )
    return lines


def _fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _compare_lines(cmp: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    a, b, m = cmp["a"].iloc[0], cmp["b"].iloc[0], len(cmp)
    seeds = f"{_seed_range(cmp['n_a'])} vs {_seed_range(cmp['n_b'])} seeds"
    lines = [
        f"**{a} vs {b}**, {m} target(s), {seeds} per cell; Welch's t-test per metric, significant at "
        f"{alpha:.0%} (a difference below what {seeds} can resolve is reported as not significant):",
    ]
    metrics = [k for k in NAMES if f"p_{k}" in cmp]
    for _, r in cmp.iterrows():
        sig = [k for k in metrics if r[f"significant_{k}"]]
        if r["note"]:
            lines.append(f"- target {r['target_kl']:g}: not compared ({r['note']})")
            continue
        if math.isnan(r.get("p_reward", math.nan)):
            lines.append(f"- target {r['target_kl']:g}: not tested (fewer than 2 seeds on a side)")
            continue
        parts = [
            f"{NAMES[k]} {'lower' if r[f'diff_{k}'] < 0 else 'higher'} for {a} ({r[f'a_{k}_mean']:.3g} vs "
            f"{r[f'b_{k}_mean']:.3g}, {_fmt_p(r[f'p_{k}'])})"
            for k in sig
        ]
        rest = [NAMES[k] for k in metrics if k not in sig and not math.isnan(r[f"p_{k}"])]
        lines.append(
            f"- target {r['target_kl']:g}: significant: {'; '.join(parts) or 'none'}; not significant: "
            f"{', '.join(rest) or 'none'}"
        )
    lines += [
        f"- equal reward (no significant reward difference): {int(cmp['equal_reward'].sum())}/{m} "
        f"(targets: {_targets(cmp, cmp['equal_reward'])})",
        f"- significantly lower tracking error: {int(cmp['lower_tracking_error'].sum())}/{m} "
        f"(targets: {_targets(cmp, cmp['lower_tracking_error'])}); lower overshoot: "
        f"{int(cmp['lower_overshoot'].sum())}/{m}; settles sooner in the band: {int(cmp['settles_sooner'].sum())}/{m}",
        f"- {a} better at equal reward: {int(cmp['a_better_at_equal_reward'].sum())}/{m} "
        f"(targets: {_targets(cmp, cmp['a_better_at_equal_reward'])})",
    ]
    return lines


def verdict_text(v: pd.DataFrame, cmp: pd.DataFrame | None = None, band: pd.DataFrame | None = None) -> str:
    """The verdict as sentences, every count and number from the frames (:func:`verdict`,
    :func:`compare_controllers`, :func:`hold_band`), whichever way they fall."""
    lines = (
        _claim_lines(v)
        if not v.empty
        else ["No verdict on the seed's claim: the sweep has no cell of the controller (or no static runs)."]
    )
    if band is not None and not band.empty:
        lines += ["", *_band_lines(band)]
    if cmp is not None and not cmp.empty:
        lines += ["", *_compare_lines(cmp)]
    return "\n".join(lines)


@dataclass
class Analysis:
    """Everything the notebook and scripts/make_results.py show, computed once (:func:`analyse`)."""

    sweep: Sweep
    scores: pd.DataFrame
    cells: pd.DataFrame
    frontier: pd.DataFrame
    estimators: pd.DataFrame
    estimators_by_cell: pd.DataFrame
    verdict: pd.DataFrame
    pid_vs_adaptive: pd.DataFrame
    text: str
    controllability: Controllability | None = None
    band: pd.DataFrame | None = None


def analyse(
    sweep: Sweep,
    static_beta: str | float = "matched",
    score: Callable[..., pd.DataFrame] = score_runs,
    select: Mapping[str, Any] | None = None,
    level: float = 0.95,
) -> Analysis:
    """Scores, cells, frontier, controllability, band holding, estimator study, verdicts and their text for a
    loaded sweep. The runs' :data:`POOL_KEYS` settings come from their configs; a sweep that mixes them raises
    ValueError unless ``select`` (e.g. ``{"ppo.kl_mode": "loss"}``) keeps one."""
    scores = select_runs(attach_config(score(sweep.curves), sweep.configs), select)
    require_one_variant(scores, "analyse")
    runs = set(scores["run"])
    curves = sweep.curves[sweep.curves["run"].isin(runs)] if select else sweep.curves
    cells = cell_stats(scores, level=level)
    front = frontier(scores, level=level)
    tracked = scores.loc[~scores["controller"].isin(UNTARGETED)]
    targets = sorted({float(t) for t in tracked["target_kl"].dropna()}) or None
    steps = int(tracked["steps"].max()) if len(tracked) else None
    v = verdict(cells, static_beta=static_beta, front=front if len(front) >= 2 else None)
    cmp = compare_controllers(scores)
    band = hold_band(cells)
    return Analysis(
        sweep=sweep,
        scores=scores,
        cells=cells,
        frontier=front,
        estimators=estimator_bias(curves),
        estimators_by_cell=estimator_bias(curves, by=["controller", "target_kl"]),
        verdict=v,
        pid_vs_adaptive=cmp,
        text=verdict_text(v, cmp, band),
        controllability=controllability(front, targets, steps),
        band=band,
    )
