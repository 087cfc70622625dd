"""kl_research.analysis (+ plots, scripts/make_results.py, notebooks/sweep_analysis.ipynb).

Fast tier: hand-computed expectations on synthetic curves and run dirs (bootstrap bounds, tracking metrics,
rescoring of fixed runs against every target, the verdict both ways, pid vs adaptive, the frontier, the
estimator bias), the W&B loader through a fake API, the results script, the committed notebook has no outputs.
Slow tier: a tiny real sweep, analysed by the library and by the executed notebook.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from kl_research import analysis as A
from kl_research.runlog import summarize

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "sweep_analysis.ipynb"


# ------------------------------------------------------------------------------------------------ helpers
def history(kl, reward, beta=0.2, beta_next=None, ppl=(100.0, 100.0)) -> list[dict]:
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


def synthetic_sweep(root: Path) -> Path:
    """fixed (β 0.2, logged target 0.05) × 2 seeds; adaptive at 0.02 and 0.1 × 2 seeds; one unfinished run."""
    sweep = root / "kl_grid" / "2030-01-01_00-00-00"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "kl_grid", "created": "2030-01-01T00:00:00"}))
    for s in (0, 1):
        write_run(sweep, f"fixed_s{s}", config("fixed", 0.05, 0.2, s), history([0.01, 0.03, 0.05, 0.06], 0.5 + s))
        for t in (0.02, 0.1):
            kl = [t / 4, t * 1.5, t * 1.1, t * (1 + 0.05 * s)]
            write_run(
                sweep, f"adaptive_kl{t:g}_s{s}", config("adaptive", t, 0.2, s), history(kl, [0.3, 0.3, 0.3, 0.6 + s])
            )
    write_run(sweep, "adaptive_kl0.1_s2", config("adaptive", 0.1, 0.2, 2), history([0.1], 0.0), complete=False)
    return sweep


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_interval_bounds_on_a_known_sample():
    # Resample means of {0, 1, 2, 3} (n = 4): mean = S/4 with S a sum of 4 uniform draws from {0..3}, 256
    # equally likely resamples. P(S ≤ 1) = 5/256 = 1.95 %, P(S ≤ 2) = 15/256 = 5.86 %: the 2.5th percentile is
    # S = 2, i.e. 0.5; by symmetry the 97.5th is S = 10, i.e. 2.5.
    mean, lo, hi = A.bootstrap_ci([0, 1, 2, 3], B=20_000, seed=0)
    assert (mean, lo, hi) == (1.5, 0.5, 2.5)
    # {0, 1}: resample means 0, ½, 1 with probabilities ¼, ½, ¼ → bounds 0 and 1.
    assert A.bootstrap_ci([0.0, 1.0], B=5000) == (0.5, 0.0, 1.0)
    # Deterministic for a fixed RNG seed; the level narrows the interval; NaNs dropped; degenerate cases.
    x = np.random.default_rng(1).normal(size=7)
    assert A.bootstrap_ci(x, B=999, seed=3) == A.bootstrap_ci(x, B=999, seed=3)
    m, lo95, hi95 = A.bootstrap_ci(x, B=4000)
    _, lo50, hi50 = A.bootstrap_ci(x, B=4000, level=0.5)
    assert lo95 < lo50 < m < hi50 < hi95 and m == pytest.approx(x.mean())
    assert A.bootstrap_ci([2.0, math.nan, 2.0]) == (2.0, 2.0, 2.0)
    assert A.bootstrap_ci([4.0]) == (4.0, 4.0, 4.0)
    assert all(math.isnan(v) for v in A.bootstrap_ci([]))


# ------------------------------------------------------------------------------------------------ scoring
def test_track_hand_computed():
    kl = [0.0, 0.05, 0.1, 0.2, 0.1, 0.09, 0.11, 0.1]  # 8 steps: tail = last 2
    r = A.track(kl, 0.1)
    assert r["tracking_error"] == pytest.approx((0.1 + 0.0) / 2)
    assert r["in_band"] == 1.0
    assert r["iae"] == pytest.approx(1 + 0.5 + 0 + 1 + 0 + 0.1 + 0.1 + 0)
    assert r["overshoot"] == pytest.approx(1.0)  # peak 0.2 = 2× target
    assert (r["settling_step"], r["settled"]) == (5.0, 1.0)  # within ±20 % from step 5 on (step 4 was 2×)
    r = A.track(kl, 0.05)  # the same curve against another target
    assert r["tracking_error"] == pytest.approx((1.2 + 1.0) / 2)
    assert r["in_band"] == 0.5  # 0.11 > 2 × 0.05, 0.1 = 2 × 0.05 is inside
    assert r["overshoot"] == pytest.approx(3.0)
    assert (r["settling_step"], r["settled"]) == (9.0, 0.0)  # never settled: censored at last step + 1
    r = A.track([0.01, 0.02], 0.1)
    assert r["overshoot"] == pytest.approx(-0.8)  # never reached the target
    assert A.track([0.1, 0.1], 0.1, steps=[11, 12])["settling_step"] == 11.0


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
    assert row.iae == pytest.approx(0.9 + 0.7 + 0.5 + 0.4) and row.overshoot == pytest.approx(-0.4)
    # Target-free metrics are the same in every rescored row.
    assert row.reward == 0.5 and row.kl == pytest.approx(0.06) and row.final_beta == 0.2
    # Adaptive runs: own target only; the unfinished run is left out; every number equals its summary.json.
    adaptive = scores[scores.controller == "adaptive"]
    assert len(adaptive) == 4 and not adaptive.rescored.any()
    summaries = A.load_summaries(sweep).set_index("run")
    for r in adaptive.itertuples():
        s = summaries.loc[r.run]
        for k in ("reward", "kl", "tracking_error", "in_band", "iae", "final_beta", "ppl_change"):
            assert getattr(r, k) == s[k], (r.run, k)
    # Against its own logged target a fixed run's scores equal its summary.json too.
    own = A.score_runs(curves[curves.controller == "fixed"], targets=[0.05]).set_index("run")
    for k in ("tracking_error", "in_band", "iae"):
        assert own.loc["fixed_s1", k] == summaries.loc["fixed_s1", k]
    # A frontier sweep (fixed runs only): scored at the logged target.
    alone = A.score_runs(curves[curves.controller == "fixed"])
    assert list(alone.target_kl) == [0.05, 0.05]


def test_cells_have_bootstrap_intervals_per_controller_target_beta(tmp_path):
    scores = A.score_runs(A.load_curves(synthetic_sweep(tmp_path), completed_only=True))
    cells = A.cell_stats(scores, B=2000).set_index(["controller", "target_kl"])
    assert set(cells.index) == {("adaptive", 0.02), ("adaptive", 0.1), ("fixed", 0.02), ("fixed", 0.1)}
    c = cells.loc[("fixed", 0.1)]
    assert c["n"] == 2 and c["reward_mean"] == 1.0 and (c["reward_lo"], c["reward_hi"]) == (0.5, 1.5)
    c = cells.loc[("adaptive", 0.02)]
    assert c["tracking_error_mean"] == pytest.approx(0.025) and c["tracking_error_lo"] == pytest.approx(0.0)


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
    cells = A.cell_stats(A.score_runs(verdict_curves()), B=3000)
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


def test_verdict_against_the_frontier_and_closest_static_beta():
    frames = [verdict_curves()]
    for s in range(3):  # a second fixed β at KL 0.04, reward 0.8
        frames.append(curve(f"fixed_b1_s{s}", "fixed", 0.05, 1.0, s, history([0.04] * 8, 0.8)))
    scores = A.score_runs(pd.concat(frames, ignore_index=True))
    cells = A.cell_stats(scores, B=2000)
    front = A.frontier(scores, B=2000)
    assert list(front.init_kl_coef) == [1.0, 0.2] and list(front.n) == [3, 3]  # by KL; each run once
    assert front.kl_mean.tolist() == pytest.approx([0.04, 0.2])
    # Frontier interpolated in log KL: at √(0.04·0.2) half-way between the rewards 0.8 and 1.02.
    assert A.frontier_at(front, math.sqrt(0.04 * 0.2)) == pytest.approx(0.91)
    assert math.isnan(A.frontier_at(front, 0.3)) and math.isnan(A.frontier_at(front.iloc[:1], 0.1))
    v = A.verdict(cells, front=front).set_index("target_kl")
    assert v.loc[0.05, "on_or_above_frontier"] and pd.isna(v.loc[0.2, "on_or_above_frontier"])
    closest = A.verdict(cells, static_beta="closest").set_index("target_kl")
    assert closest.loc[0.05, "static_beta"] == 1.0 and closest.loc[0.2, "static_beta"] == 0.2


def test_pid_vs_adaptive_overshoot_settling_at_equal_reward():
    frames = []
    for s in range(3):
        pid = [0.05, 0.1, 0.1, 0.1, 0.1, 0.1 + 0.001 * s, 0.1, 0.1]  # settles at step 2, no overshoot
        ada = [0.05, 0.15, 0.2, 0.15, 0.13, 0.11 + 0.001 * s, 0.11, 0.11]  # peak 2×, within ±20 % from step 6
        frames.append(curve(f"pid_kl0.1_s{s}", "pid", 0.1, 0.2, s, history(pid, 1.0 + 0.01 * s)))
        frames.append(curve(f"adaptive_kl0.1_s{s}", "adaptive", 0.1, 0.2, s, history(ada, 1.01 + 0.01 * s)))
    cells = A.cell_stats(A.score_runs(pd.concat(frames, ignore_index=True)), B=2000)
    c = A.compare_controllers(cells, "pid", "adaptive").iloc[0]
    assert c.a_overshoot_mean == pytest.approx((0 + 0.01 + 0.02) / 3) and c.b_overshoot_mean == pytest.approx(1.0)
    assert c.a_settling_step_mean == 2.0 and c.b_settling_step_mean == 6.0
    assert c.a_tracking_error_mean == pytest.approx(0.0) and c.b_tracking_error_mean == pytest.approx(0.1)
    assert c.equal_reward and c.lower_tracking_error and c.lower_overshoot and c.settles_sooner
    assert c.a_better_at_equal_reward
    r = A.compare_controllers(cells, "adaptive", "pid").iloc[0]  # the other way round: nothing holds
    assert r.equal_reward and not (r.lower_tracking_error or r.lower_overshoot or r.settles_sooner)
    assert "pid better at equal reward: 1/1" in A.verdict_text(A.verdict(cells), A.compare_controllers(cells))


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
    a_w, a_l = A.analyse(w, B=500), A.analyse(local, B=500)
    pd.testing.assert_frame_equal(a_w.cells, a_l.cells, check_dtype=False)
    assert a_w.text == a_l.text
    # Unfinished runs on request; wandb.Api() is used when no api is given.
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda: FakeApi(fake_wandb_runs(sweep)))
    all_runs = A.load_wandb("ent/proj", "g", completed_only=False, config=True)
    assert all_runs.curves.run.nunique() == 7 and "ppo.lr" in all_runs.curves
    assert not all_runs.curves.loc[all_runs.curves.run == "adaptive_kl0.1_s2", "completed"].any()


# ------------------------------------------------------------------------------------------------ outputs
def test_make_results_writes_tables_plots_and_verdict(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_results
    finally:
        sys.path.remove(str(REPO / "scripts"))
    sweep = synthetic_sweep(tmp_path)
    out = tmp_path / "results"
    md = make_results.main([str(sweep), "--out", str(out), "--B", "500"])
    names = {p.name for p in out.iterdir()}
    for f in ("results.md", "verdict.csv", "verdict.json", "cells.csv", "scores.csv", "frontier.csv", "summaries.csv"):
        assert f in names
    for f in ("estimators.csv", "summaries.json", "command.txt", "versions.json", "curves.png", "frontier.png"):
        assert f in names
    verdict = json.loads((out / "verdict.json").read_text())
    a = A.analyse(A.load_sweep(sweep), B=500)
    assert verdict["text"] == a.text and len(verdict["rows"]) == 2
    assert a.text in md.read_text()
    assert "make_results.py" in (out / "command.txt").read_text()
    assert json.loads((out / "versions.json").read_text())["pandas"] == pd.__version__
    assert len(pd.read_csv(out / "summaries.csv")) == 6


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    tags = [t for c in code for t in c.metadata.get("tags", [])]
    assert tags.count("parameters") == 1 and tags.count("verdict") == 1
    assert "SWEEP_DIR" in code[0].source


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_tiny_real_sweep_analysed_and_notebook_executes(tmp_path, monkeypatch):
    """fixed + adaptive at one target × 2 seeds × 4 PPO steps, then the library and the notebook on it."""
    from nbclient import NotebookClient
    from test_sweep import only_sweep_dir, run_sweep

    t0 = time.time()
    grid = ["sweep.controllers=[fixed,adaptive]", "sweep.targets=[0.05]", "sweep.seeds=[0,1]", "steps=4"]
    r = run_sweep(tmp_path, *grid, "sweep.name=ana", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = only_sweep_dir(tmp_path, "ana")
    t_sweep = time.time() - t0

    a = A.analyse(A.load_sweep(sweep_dir), B=1000)
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
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    (cell,) = [c for c in nb.cells if "verdict" in c.metadata.get("tags", [])]
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    assert "the seed's claim" in text and str(sweep_dir) in nb.cells[2].outputs[0]["text"]
    assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))
    print(f"tiny sweep {t_sweep:.0f} s, notebook {time.time() - t1:.0f} s")
    assert os.environ["SWEEP_DIR"] == str(sweep_dir)


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
