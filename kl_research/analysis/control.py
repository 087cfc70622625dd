"""Control metrics of one run's KL curve (tracking error, in-band fraction, IAE, settle step, overshoot, ...) and the
per-run scores of a sweep (:func:`score_runs`). kl_research.runlog's summary.json uses the same function, so the run
and the analysis can never disagree; this module imports nothing of the project.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kl_research.analysis.runs import ID_COLUMNS

TAIL_FRACTION = 0.25  # summaries and scores average the last 25 % of steps (docs/sweeps.md)
# Controllers whose β does not depend on target_kl: scored against every target (docs/sweeps.md).
UNTARGETED = ("fixed",)
# The band of docs/sweeps.md: KL in [0.5, 2] × target (in-band fraction, settle step, holding the band), and the
# tighter ±20 % band of the older ``settling_step``.
BAND = (0.5, 2.0)
SETTLE_BAND = 0.2
# Per-run metrics of score_runs, in table order. Lower is better for reward, in_band and settled excepted.
METRICS = [
    "reward",
    "kl",
    "tracking_error",
    "in_band",
    "iae",
    "settle_step",
    "settled",
    "overshoot",
    "settling_step",
    "kl_step2",
    "approx_kl_mean",
    "ppl_change",
    "final_beta",
    "gold_reward",
    "gold2_reward",
    "proxy_reward",
    "judge_reward",
]
# The gold evaluation's metrics (kl_research.gold, docs/gold.md): column -> the eval key it averages. They are logged at
# eval steps only, so a run's score is the mean of its evaluations inside the tail window (the last step always
# evaluates); NaN for a run without them. A frame of runs none of which logged them has no such columns.
GOLD_METRICS = {
    "gold_reward": "eval/gold_reward",
    "gold2_reward": "eval/gold2_reward",
    "proxy_reward": "eval/proxy_reward",
    "judge_reward": "reward/judge",  # AFINN of the training rollouts' responses, every step (gold.rollout_judge)
}
ESTIMATORS = ("k1", "k2", "k3", "seed")


# ========================================================================================= per-run scoring
def control_metrics(
    kl: Sequence[float] | np.ndarray,
    target: float,
    steps: Sequence[int] | np.ndarray | None = None,
    approx_kl: Sequence[float] | np.ndarray | None = None,
    tail_fraction: float = TAIL_FRACTION,
    band: tuple[float, float] = BAND,
    settle_band: float = SETTLE_BAND,
) -> dict[str, Any]:
    """The control metrics of one run (docs/sweeps.md) from its per-step KL (``kl/exact``, in step order) and a
    ``target``: the one function behind both a run's summary.json (:func:`kl_research.runlog.summarize`) and
    :func:`score_runs` (which rescores each ``fixed`` run against every target with it). Pure: arrays in, dict out.

    With n steps, step numbers ``steps`` (default 1..n), tail = the last max(1, ⌈tail_fraction·n⌉) steps,
    e_t = |KL_t − target| / target and the band = [band[0], band[1]] × target ([0.5, 2] × target):

    - ``tracking_error``: mean of e_t over the tail (relative, so comparable across targets).
    - ``in_band``: fraction of tail steps with KL_t inside the band (ends included).
    - ``iae``: Σ e_t over *all* steps (integrated absolute error, dt = one rollout; grows with the run length).
    - ``settle_step``: the first step from which KL stays inside the band until the end (every later step in
      band too); NaN if the last step is outside the band. ``settled``: whether it is in band at the last step
      (bool). Step 1 has KL = 0 (the policy starts as its reference), so the earliest possible is step 2.
    - ``overshoot``: max over the steps at and after the first step with KL_t ≥ target of KL_t / target − 1;
      0 if KL never reaches the target.
    - ``settling_step``: the tighter settling of earlier reports, kept for comparison: the first step from
      which e_t ≤ settle_band (±20 %) until the end, censored at last step + 1 if the last step is outside.
    - ``kl_step2``: KL at step 2, the KL the first PPO update produced (rollout 1 is sampled from the
      reference); NaN if the run has no step 2. ``approx_kl_mean``: mean of ``approx_kl`` (the logged
      ``policy/approx_kl``: the per-rollout update size) over the run, NaN if not given. Both are target-free:
      they show whether one rollout's update is small against the smallest target (docs/kl-contract.md).
    """
    kl = np.asarray(kl, dtype=float)
    n = len(kl)
    keys = ["tracking_error", "in_band", "iae", "settle_step", "settled", "overshoot", "settling_step"]
    if n == 0:
        return {**dict.fromkeys(keys, math.nan), "settled": False, "kl_step2": math.nan, "approx_kl_mean": math.nan}
    steps = np.arange(1, n + 1) if steps is None else np.asarray(steps)
    n_tail = max(1, math.ceil(tail_fraction * n))
    rel = np.abs(kl - target) / target
    in_band = (kl >= band[0] * target) & (kl <= band[1] * target)
    settled = bool(in_band[-1])
    if settled:
        outside = np.flatnonzero(~in_band)
        settle_step = float(steps[outside[-1] + 1] if len(outside) else steps[0])
    else:
        settle_step = math.nan
    reached = np.flatnonzero(kl >= target)
    overshoot = float(kl[reached[0] :].max() / target - 1) if len(reached) else 0.0
    tight = rel <= settle_band
    if tight[-1]:
        outside = np.flatnonzero(~tight)
        settling = float(steps[outside[-1] + 1] if len(outside) else steps[0])
    else:
        settling = float(steps[-1] + 1)
    at2 = np.flatnonzero(steps == 2)
    ak = np.asarray(approx_kl, dtype=float) if approx_kl is not None else np.array([])
    ak = ak[~np.isnan(ak)]
    return {
        "tracking_error": float(rel[-n_tail:].mean()),
        "in_band": float(in_band[-n_tail:].mean()),
        "iae": float(rel.sum()),
        "settle_step": settle_step,
        "settled": settled,
        "overshoot": overshoot,
        "settling_step": settling,
        "kl_step2": float(kl[at2[0]]) if len(at2) else math.nan,
        "approx_kl_mean": float(ak.mean()) if len(ak) else math.nan,
    }


track = control_metrics  # the name earlier notebooks used


def tail_eval_mean(values: Sequence[float] | np.ndarray, n_tail: int) -> float:
    """Mean of the evaluations among the last `n_tail` steps' values of a metric logged at eval steps only (NaN or
    absent elsewhere); NaN if none of those steps evaluated. runlog.summarize and score_runs both use it."""
    v = np.asarray(values, dtype=float)[-n_tail:] if n_tail > 0 else np.array([])
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else math.nan


def _run_metrics(g: pd.DataFrame, tail_fraction: float) -> dict[str, float]:
    """The target-free metrics of one run's curve (rows sorted by step), as runlog.summarize computes them."""
    n = len(g)
    n_tail = max(1, math.ceil(tail_fraction * n))
    out = {
        "steps": n,
        "reward": float(np.mean(g["reward/mean"].to_numpy(float)[-n_tail:])) if "reward/mean" in g else math.nan,
        "kl": float(np.mean(g["kl/exact"].to_numpy(float)[-n_tail:])),
        "final_beta": float(g["kl/coef_next"].iloc[-1]) if "kl/coef_next" in g else math.nan,
        "ppl_change": math.nan,
    }
    if "eval/ppl_heldout" in g:
        ev = g.dropna(subset=["eval/ppl_heldout"])
        if len(ev):
            out["ppl_change"] = float(ev["eval/ppl_heldout"].iloc[-1] / ev["eval/ppl_ref"].iloc[-1] - 1)
    for name, key in GOLD_METRICS.items():  # the tail's evaluations (NaN for a run without them in this frame)
        if key in g:
            out[name] = tail_eval_mean(g[key].to_numpy(float), n_tail)
    return out


def score_runs(
    curves: pd.DataFrame,
    targets: Iterable[float] | None = None,
    kl_key: str = "kl/exact",
    tail_fraction: float = TAIL_FRACTION,
    untargeted: Sequence[str] = UNTARGETED,
    **track_kw: Any,
) -> pd.DataFrame:
    """One row per (run, target it is judged against), every metric recomputed from the run's curve.

    A run of a controller that tracks a target is scored against its own ``target_kl`` only. A run of an
    ``untargeted`` controller (``fixed``: β ignores the target) is scored against each of ``targets`` (default:
    every target of the sweep's other runs; its own logged target if there are none, as in a frontier sweep);
    ``logged_target_kl`` keeps the one it logged, ``rescored`` marks the rows against another target.
    Columns: the curve's non-metric columns (id, ``completed``, config), ``target_kl`` (the scoring target),
    ``steps`` and :data:`METRICS` (the :data:`GOLD_METRICS` where some run logged them). KL is ``kl_key``
    (``kl/exact``, docs/sweeps.md); see :func:`control_metrics`.
    """
    if curves.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, "logged_target_kl", "rescored", "steps", *METRICS])
    if targets is None:
        tracked = curves.loc[~curves["controller"].isin(untargeted), "target_kl"].dropna()
        targets = sorted({float(t) for t in tracked})
    targets = [float(t) for t in targets]
    keep = [c for c in curves.columns if "/" not in c and c not in ("step", "samples")]
    rows = []
    for _, g in curves.groupby("run", sort=False):
        g = g.sort_values("step")
        first = g.iloc[0]
        own = float(first["target_kl"])
        untracked = first["controller"] in untargeted
        base = {c: first[c] for c in keep}
        metrics = _run_metrics(g, tail_fraction)
        kl = g[kl_key].to_numpy(float)
        approx = g["policy/approx_kl"].to_numpy(float) if "policy/approx_kl" in g else None
        for t in targets if (untracked and targets) else [own]:
            scored = control_metrics(kl, t, g["step"].to_numpy(), approx, tail_fraction=tail_fraction, **track_kw)
            rows.append(
                {**base, "target_kl": t, "logged_target_kl": own, "rescored": bool(untracked), **metrics, **scored}
            )
    df = pd.DataFrame(rows)
    first_cols = [c for c in [*ID_COLUMNS, "logged_target_kl", "rescored", "steps", *METRICS] if c in df.columns]
    df = df[first_cols + [c for c in df.columns if c not in first_cols]]
    return df.sort_values(["controller", "target_kl", "init_kl_coef", "seed", "run"]).reset_index(drop=True)
