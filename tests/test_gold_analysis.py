"""The gold-vs-proxy analysis (kl_research.analysis.gold): Gao et al.'s RL form recovered from known curves, its peak,
the evaluation points' KL per response, and the over-optimisation reading. Synthetic runs with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kl_research.analysis import gold as G


def test_gao_fit_recovers_alpha_beta_and_the_peak():
    rng = np.random.default_rng(0)
    d = np.linspace(0.2, 6.0, 40)
    alpha, beta = 0.3, 0.2
    gain = G.gao_curve(alpha, beta, d) + rng.normal(0, 0.005, d.size)
    fit = G.fit_gao(d, gain)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.01) and fit["beta"] == pytest.approx(beta, abs=0.01)
    d_star = math.exp(alpha / beta - 1)  # dR/dd = α − β·log d − β = 0
    assert fit["d_peak"] == pytest.approx(d_star, rel=0.05) and fit["kl_peak"] == pytest.approx(d_star**2, rel=0.1)
    # R(d*) = d*·(α − β·log d*) = β·d*, and it is the maximum of the fitted curve
    grid = np.linspace(0.01, 10, 5000)
    assert fit["gain_peak"] == pytest.approx(G.gao_curve(fit["alpha"], fit["beta"], grid).max(), rel=1e-3)
    assert fit["r2"] > 0.99 and fit["n"] == 40


def test_a_gold_that_never_turns_has_no_peak():
    d = np.linspace(0.1, 3.0, 20)
    fit = G.fit_gao(d, 0.2 * d + 0.05 * d * np.log(d))  # β < 0: still rising at every d
    assert fit["beta"] < 0 and math.isnan(fit["d_peak"]) and math.isnan(fit["kl_peak"])


def _curves(kl_token: float, length: float, steps: int = 60, every: int = 20) -> pd.DataFrame:
    rows = []
    for s in range(1, steps + 1):
        r = {"run": "r", "step": s, "kl/exact": kl_token * s / steps, "response/length": length, "seed": 0,
             "controller": "fixed", "init_kl_coef": 0.05, "target_kl": 0.05, "reward.n_labels": 500}  # fmt: skip
        if s % every == 0:
            r.update({"eval/gold_reward": 0.1 + s / 1000, "eval/gold2_reward": 0.0, "eval/proxy_reward": s / 100})
            if s == every:
                r.update({"eval/gold_reward_ref": 0.1, "eval/gold2_reward_ref": 0.0, "eval/proxy_reward_ref": 0.0})
        rows.append(r)
    return pd.DataFrame(rows)


def test_eval_points_carry_the_kl_of_a_whole_response_and_gains_over_the_reference():
    pts = G.eval_points(_curves(kl_token=0.3, length=20.0), window=1, by=["reward.n_labels"])
    assert list(pts["step"]) == [20, 40, 60]
    assert np.allclose(pts["kl_seq"], 0.3 * np.array([20, 40, 60]) / 60 * 20.0)  # per token × tokens per response
    assert np.allclose(pts["d"], np.sqrt(pts["kl_seq"]))
    assert np.allclose(pts["gold_gain"], np.array([20, 40, 60]) / 1000) and (pts["reward.n_labels"] == 500).all()
    with pytest.raises(ValueError, match="eval/gold_reward"):
        G.eval_points(_curves(0.3, 20.0).drop(columns=["eval/gold_reward"]))


def test_overoptimised_sees_the_gold_fall_while_the_proxy_rises():
    d = np.linspace(0.1, 6.0, 40)
    turning = pd.DataFrame({"d": d, "gold_gain": G.gao_curve(0.3, 0.2, d), "proxy_gain": 0.1 * d})
    r = G.overoptimised(turning)
    assert r["gold_drop"] > 0.05 and r["proxy_rise"] > 0.1 and r["d_peak"] < r["d_top"]
    rising = turning.assign(gold_gain=0.05 * d)
    assert G.overoptimised(rising)["gold_drop"] < 0


def test_gold_pilot_script_reads_runs_per_proxy_size(tmp_path):
    """scripts/gold_pilot.py on two synthetic runs (proxy n = 30 and 500) and an RM cache: one summary row per n with
    its RM's test Pearson, the over-optimisation reading (the n = 30 run's gold falls while its proxy rises) and the
    figure."""
    import importlib.util
    import itertools
    import json

    import yaml

    runs = tmp_path / "sweep"
    for (n, gold_slope), seed in itertools.product(((30, -0.01), (500, 0.1)), (0, 1)):
        d = runs / f"fixed_b0.01_s{seed}_n_labels={n}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"reward": {"n_labels": n}, "seed": seed}))
        recs = []
        for s in range(1, 101):
            r = {"step": s, "kl/exact": 0.02 * s, "response/length": 20.0}
            if s % 10 == 0:
                kl_seq = 0.02 * s * 20
                r.update({"eval/gold_reward": gold_slope * kl_seq**0.5, "eval/gold2_reward": 0.0,
                          "eval/proxy_reward": 0.1 * kl_seq**0.5})  # fmt: skip
                if s == 10:
                    r.update({"eval/gold_reward_ref": 0.0, "eval/gold2_reward_ref": 0.0, "eval/proxy_reward_ref": 0.0})
            recs.append(r)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "summary.json").write_text(json.dumps({"controller": "fixed", "target_kl": 0.05, "init_kl_coef": 0.01,
                                                    "seed": seed}))  # fmt: skip
        answer = {"step": 100, "prompt": "p", "response": f"n{n} s{seed} | it it", "proxy_reward": 1.0,
                  "gold_reward": 0.0, "gold2_reward": 0.0}  # fmt: skip
        (d / "eval_samples.jsonl").write_text(json.dumps(answer) + "\n")
        rm = tmp_path / "rm" / f"learned-{n}"
        rm.mkdir(parents=True, exist_ok=True)
        test = {"pearson": n / 1000, "spearman": 0.0, "accuracy": 0.5}
        (rm / "meta.json").write_text(json.dumps({"n_labels": n, "test": test, "best_epoch": 1, "build_seconds": 1.0}))
    script = Path(G.__file__).resolve().parents[2] / "scripts" / "gold_pilot.py"
    spec = importlib.util.spec_from_file_location("gold_pilot", script)
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    gp.main([str(runs), "--out", str(tmp_path / "out"), "--rm-cache", str(tmp_path / "rm")])
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("reward.n_labels")
    assert list(summary.index) == [30, 500] and summary.loc[500, "test_pearson"] == 0.5
    assert summary.loc[30, "oo_gold_drop"] > 0 and summary.loc[30, "oo_proxy_rise"] > 0
    assert summary.loc[500, "oo_gold_drop"] < 0  # still rising at the largest KL
    assert (tmp_path / "out" / "pilot.png").stat().st_size > 0
    # make_gold.py, the grid's analysis, on the same runs: two seeds per proxy size give intervals
    script = Path(G.__file__).resolve().parents[2] / "scripts" / "make_gold.py"
    spec = importlib.util.spec_from_file_location("make_gold", script)
    mg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mg)
    mg.main([str(runs), "--out", str(tmp_path / "grid"), "--rm-cache", str(tmp_path / "rm")])
    front = pd.read_csv(tmp_path / "grid" / "frontier.csv").set_index("reward.n_labels")
    assert (front["n"] == 2).all() and (front["gold_gain_lo"] <= front["gold_gain_mean"]).all()
    assert front.loc[500, "gold_gain_mean"] > 0 > front.loc[30, "gold_gain_mean"]
    fit = pd.read_csv(tmp_path / "grid" / "fit_gold.csv").set_index("reward.n_labels")
    assert list(fit["seeds"]) == [2, 2]
    text = (tmp_path / "grid" / "samples" / "n30_fixed_b0.01.md").read_text()
    assert "| 0 | n30 s0 \\| it it | +1.00 | +0.00 | +0.00 |" in text and "n30 s1" in text
    assert (tmp_path / "grid" / "gold.png").stat().st_size > 0


def _grid_points(seeds=(0, 1, 2)) -> pd.DataFrame:
    """Evaluation points of a synthetic gold grid: per proxy size a known Gao curve (n = 200 peaks, n = 2000 still
    rises), per seed a small shift of α, three β each giving a run that walks out along d."""
    rng = np.random.default_rng(1)
    rows = []
    truth = {200: (0.3, 0.2), 2000: (0.3, -0.02)}
    for n, (alpha, beta) in truth.items():
        for seed in seeds:
            a = alpha + 0.01 * (seed - 1)
            for b0, d_max in ((0.01, 8.0), (0.05, 5.0), (0.2, 2.0)):
                for k, d in enumerate(np.linspace(0.3, d_max, 10)):
                    gold = float(gao_curve_safe(a, beta, d)) + rng.normal(0, 0.003)
                    rows.append({"run": f"n{n}_b{b0}_s{seed}", "reward.n_labels": n, "controller": "fixed",
                                 "init_kl_coef": b0, "target_kl": 0.05, "seed": seed, "step": 20 * (k + 1), "d": d,
                                 "kl_seq": d**2, "kl_token": d**2 / 20, "length": 20.0, "gold": 0.1 + gold,
                                 "gold_gain": gold, "proxy": 0.1 + 0.1 * d, "proxy_gain": 0.1 * d,
                                 "gold2": 0.0, "gold2_gain": 0.0})  # fmt: skip
    return pd.DataFrame(rows)


def gao_curve_safe(a, b, d):
    return G.gao_curve(a, b, np.array([d]))[0]


def test_fits_over_seeds_recover_the_peak_and_count_seeds_without_one():
    per_seed, table = G.fits_over_seeds(_grid_points())
    assert len(per_seed) == 2 * 3 and set(table["reward.n_labels"]) == {200, 2000}
    peaked = table.set_index("reward.n_labels").loc[200]
    kl_star = math.exp(2 * 0.3 / 0.2 - 2)  # KL* = d*² = exp(2α/β − 2) at the middle seed's α
    assert peaked["kl_peak_lo"] < kl_star < peaked["kl_peak_hi"] and peaked["seeds_without_peak"] == 0
    assert peaked["alpha_lo"] < 0.3 < peaked["alpha_hi"]
    rising = table.set_index("reward.n_labels").loc[2000]
    assert rising["seeds_without_peak"] == 3 and math.isnan(rising["kl_peak_mean"])


def test_run_tails_and_the_frontier_table_average_the_tail_then_the_seeds():
    pts = _grid_points()
    tails = G.run_tails(pts, tail_fraction=0.2)  # the last 2 of 10 evaluations
    r = tails.set_index("run").loc["n200_b0.01_s1"]
    last2 = pts[pts["run"] == "n200_b0.01_s1"].sort_values("step").tail(2)
    assert r["d"] == pytest.approx(last2["d"].mean()) and r["evals"] == 2
    front = G.frontier_table(tails)
    row = front[(front["reward.n_labels"] == 200) & (front["init_kl_coef"] == 0.01)].iloc[0]
    assert row["n"] == 3
    three = tails[(tails["reward.n_labels"] == 200) & (tails["init_kl_coef"] == 0.01)]["gold_gain"]
    assert row["gold_gain_mean"] == pytest.approx(three.mean())
    assert row["gold_gain_lo"] < row["gold_gain_mean"] < row["gold_gain_hi"]


def _window_points(n: int, gold, seeds=(1, 2, 3), noise: float = 0.01) -> pd.DataFrame:
    """Fixed-β evaluation points of one proxy size: per seed, d from 1 to 9 over four βs, gold_gain = gold(d) + noise,
    the proxy rising with d."""
    rng = np.random.default_rng(n)
    rows = []
    for seed in seeds:
        for beta, ds in ((0.3, [1.0, 1.5, 2.2]), (0.1, [1.8, 2.6, 3.4]), (0.03, [2.5, 4.5, 6.0]),
                         (0.01, [3.0, 7.2, 8.8])):  # fmt: skip
            for d in ds:
                g = gold(d) + rng.normal(0, noise)
                rows.append({"reward.n_labels": n, "seed": seed, "controller": "fixed", "init_kl_coef": beta, "d": d,
                             "gold_gain": g, "gold2_gain": g, "proxy_gain": 0.05 * d})  # fmt: skip
    return pd.DataFrame(rows)


def test_the_registered_tests_see_a_fall_and_no_fall_and_say_when_they_cannot_tell():
    peaked = _window_points(350, lambda d: G.gao_curve(0.12, 0.05, d))  # peak at d* = e^1.4 ≈ 4.1, falls after
    rising = _window_points(500, lambda d: 0.1 * d)  # aligned proxy: gold rises with d
    one_seed = _window_points(2000, lambda d: 0.1 * d, seeds=(1,))
    drops = G.window_drops(pd.concat([peaked, rising, one_seed]))
    # the windows are the registered ones: 2 ≤ d ≤ 4 (peak) against d ≥ 7 (fall), each seed's βs pooled
    row = drops[(drops["reward.n_labels"] == 350) & (drops["seed"] == 1)].iloc[0]
    assert row["points_peak"] == 5 and row["points_fall"] == 2
    p = peaked[peaked["seed"] == 1]
    want = p[(p.d >= 2) & (p.d <= 4)].gold_gain.mean() - p[p.d >= 7].gold_gain.mean()
    assert row["gold_drop"] == pytest.approx(want) and row["proxy_drop"] < 0  # the proxy rises
    tests = G.registered_tests(drops).set_index("hypothesis")
    assert tests.loc["G1", "verdict"] == "rejected H0" and tests.loc["G1", "estimate"] > 0
    assert tests.loc["G2", "verdict"] == "rejected H0" and tests.loc["G2", "hi"] < G.NO_FALL_MARGIN  # no fall
    assert tests.loc["G3", "verdict"].startswith("no verdict") and math.isnan(tests.loc["G3", "p"])
    # Holm over the registered family of three, G3 (not testable yet) counted as p = 1: the smaller p times 3,
    # the larger times 2 (but never below the first); G3's own p_adj stays empty
    p1, p2 = tests.loc["G1", "p"], tests.loc["G2", "p"]
    assert min(tests.loc["G1", "p_adj"], tests.loc["G2", "p_adj"]) == pytest.approx(min(1, 3 * min(p1, p2)))
    assert max(tests.loc["G1", "p_adj"], tests.loc["G2", "p_adj"]) == pytest.approx(
        min(1, max(3 * min(p1, p2), 2 * max(p1, p2)))
    )
    assert math.isnan(tests.loc["G3", "p_adj"])
    # a gold that rises everywhere does not pass as a fall, and one that falls does not pass as "no fall"
    swapped = G.registered_tests(drops, registered=(("G1", 500, "fall"), ("G2", 350, "no_fall")))
    assert (swapped["verdict"] == "not rejected").all()


def test_equal_kl_gold_reads_the_same_seeds_fixed_frontier_at_the_controllers_kl():
    rows = []
    for seed in (1, 2):
        for beta, kl in ((0.3, 0.05), (0.1, 0.1), (0.03, 0.3), (0.01, 1.0)):
            rows.append({"run": f"f{beta}_{seed}", "reward.n_labels": 350, "controller": "fixed", "init_kl_coef": beta,
                         "target_kl": 0.0, "seed": seed, "kl_token": kl, "gold_gain": math.log(kl) + seed})  # fmt: skip
    # on the frontier (gold = log KL + seed there too), above it by 0.1, and outside its KL range
    rows.append({"run": "a1", "reward.n_labels": 350, "controller": "adaptive", "init_kl_coef": 0.1, "target_kl": 0.2,
                 "seed": 1, "kl_token": 0.2, "gold_gain": math.log(0.2) + 1})  # fmt: skip
    rows.append({"run": "a2", "reward.n_labels": 350, "controller": "adaptive", "init_kl_coef": 0.1, "target_kl": 0.2,
                 "seed": 2, "kl_token": 0.5, "gold_gain": math.log(0.5) + 2 + 0.1})  # fmt: skip
    rows.append({"run": "a3", "reward.n_labels": 350, "controller": "pid_ci", "init_kl_coef": 0.1, "target_kl": 2.0,
                 "seed": 1, "kl_token": 2.0, "gold_gain": 0.0})  # fmt: skip
    eq = G.equal_kl_gold(pd.DataFrame(rows)).set_index("run")
    # PCHIP in log KL through points on a line in log KL is that line: exact at any KL between them
    assert eq.loc["a1", "difference"] == pytest.approx(0.0, abs=1e-12)
    assert eq.loc["a2", "difference"] == pytest.approx(0.1, abs=1e-12)  # seed 2's frontier, not seed 1's
    assert math.isnan(eq.loc["a3", "fixed_gold_gain"])  # beyond the frontier's KL: no extrapolation


def test_the_controller_stage_targets_follow_the_registered_rule():
    """gold_targets.py: KL* from the pooled Gao fit at n = 350, over 24 tokens; τ = KL*·{1/2, 1, 2} to 2 significant
    digits; β₀ log-interpolated on the frontier's (KL, β); no interior peak → no targets."""
    import importlib.util

    script = Path(G.__file__).resolve().parents[2] / "scripts" / "gold_targets.py"
    spec = importlib.util.spec_from_file_location("gold_targets", script)
    gt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gt)
    alpha, beta = 0.12, 0.05  # d* = e^(α/β − 1) = e^1.4, KL* = e^2.8 ≈ 16.4 nats per response, 0.685 per token
    pts = _window_points(350, lambda d: G.gao_curve(alpha, beta, d), noise=0.0)
    front = pd.DataFrame(
        {
            "reward.n_labels": 350,
            "controller": "fixed",
            "init_kl_coef": [0.01, 0.1, 1.0],
            "kl_token_mean": [4.0, 0.4, 0.04],
        }
    )  # fmt: skip  (β ∝ 1/KL on this frontier)
    fit, rows = gt.targets(pts, front, 350)
    kl_star = math.exp(2 * (alpha / beta - 1)) / 24
    assert fit["kl_peak"] / 24 == pytest.approx(kl_star, rel=1e-6)
    assert [t for t, _ in rows] == [float(f"{kl_star * k:.2g}") for k in (0.5, 1, 2)] == [0.34, 0.69, 1.4]
    assert [b for _, b in rows] == pytest.approx([0.04 / t for t, _ in rows], rel=0.01)
    _, none = gt.targets(_window_points(350, lambda d: 0.1 * d, noise=0.0), front, 350)
    assert none == []


def test_gold_frontier_controllers_stage_fails_loudly_without_a_peak(tmp_path):
    """The committed grid has no interior gold peak at n = 350 (docs/gold.md), so the registered controller stage must
    not run: `gold_frontier.sh controllers` exits non-zero and says so (it once exited 0, the targets script's failure
    lost inside a process substitution), and launches no sweep."""
    import os
    import subprocess

    repo = Path(G.__file__).resolve().parents[2]
    env = {**os.environ, "KL_RESEARCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    res = subprocess.run(
        ["bash", "scripts/gold_frontier.sh", "controllers", f"hydra.sweep.dir={tmp_path}/never"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "no interior gold peak at n = 350" in res.stdout + res.stderr
    assert "the stage does not run" in res.stderr
    assert not (tmp_path / "never").exists()


GOLD_DIR = Path(G.__file__).resolve().parents[2] / "results" / "gold"
GOLD_NOTEBOOK = GOLD_DIR.parents[1] / "notebooks" / "gold.ipynb"


def test_gold_is_any_other_metric_in_the_general_sweep_analysis():
    """The committed gold grid through the path every sweep takes (load_sweep → score_runs → frontier, grouped by
    proxy size) gives make_gold.py's frontier.csv: the same tail (the last quarter of the evaluations is the last 25 %
    of the steps' evaluations), the same means and Student-t intervals, for the gold, the second gold and the proxy."""
    import kl_research.analysis as A

    sweep = A.load_sweep(GOLD_DIR / "runs" / "gold_grid")
    scores = A.attach_config(A.score_runs(sweep.curves), sweep.configs, keys=[*A.POOL_KEYS, "reward.n_labels"])
    committed = pd.read_csv(GOLD_DIR / "frontier.csv")
    checked = 0
    for n, runs in scores.groupby("reward.n_labels"):
        front = A.frontier(runs)
        for _, r in front.iterrows():
            (c,) = committed[
                (committed["reward.n_labels"] == n) & np.isclose(committed["init_kl_coef"], r["init_kl_coef"])
            ].itertuples()
            for k in ("gold", "gold2", "proxy"):
                for stat in ("mean", "lo", "hi"):
                    assert r[f"{k}_reward_{stat}"] == pytest.approx(getattr(c, f"{k}_{stat}"), abs=1e-9), (n, k, stat)
            assert r["n"] == c.n == 3
            checked += 1
    assert checked == 8


def test_gold_notebook_runs_on_the_committed_grid(monkeypatch):
    import nbtools

    monkeypatch.setenv("GOLD_DIR", str(GOLD_DIR))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbtools.execute(GOLD_NOTEBOOK)

    def shown(tag):
        (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
        return "".join(str(o.get("data", "")) + o.get("text", "") for o in cell.outputs)

    assert "G2" in shown("tests") and "rejected H0" in shown("tests")
    assert "gold_reward_mean" in shown("general") and "gold_grid" in shown("general")
    assert "answers to held-out prompts" in shown("samples")


def test_committed_gold_notebook_has_no_outputs_and_a_parameters_cell():
    import nbtools

    code = nbtools.committed_code_cells(GOLD_NOTEBOOK)
    assert "parameters" in code[0].metadata.get("tags", [])
