"""Protocol v2's analysis stages (kl_research/analysis/protocol.py) on synthetic runs whose answers are known:
stationarity and the job length, the censored settle step, the frontier's tuned β and equal-KL reward, paired tests
(t, one-sided t, TOST) and the Holm / Benjamini-Hochberg corrections, all read from conf/analysis/protocol.yaml."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kl_research.analysis import protocol as P


@pytest.fixture(scope="module")
def protocol():
    return P.load_protocol()


def curve(kl: np.ndarray, reward: np.ndarray | None = None, **ids) -> pd.DataFrame:
    n = len(kl)
    ids = {"run": "r", "controller": "adaptive", "target_kl": 0.2, "init_kl_coef": 0.5, "seed": 0, **ids}
    reward = np.full(n, 0.3) if reward is None else reward
    return pd.DataFrame({**ids, "step": np.arange(1, n + 1), "kl/exact": kl, "reward/mean": reward,
                         "response/length": 20.0, "kl/coef_next": 0.3})  # fmt: skip


def test_the_committed_protocol_names_disjoint_seed_sets_and_every_rule_the_stages_read(protocol):
    seeds = protocol["seeds"]
    sets = [set(seeds[k]) for k in ("pilot", "tuning", "evaluation")]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert not (sets[2] & set(range(5)))  # no evaluation seed was used by the earlier results (seeds 0-4)
    for key in ("tail_fraction", "kl_log_ratio_max", "reward_diff_max", "lengths"):
        assert key in protocol["stationarity"]
    assert protocol["multiplicity"]["primary"]["method"] == "holm"


def test_a_flat_tail_is_stationary_a_rising_one_is_not(protocol):
    rules = protocol["stationarity"]
    rng = np.random.default_rng(0)
    flat = 0.2 * np.exp(rng.normal(0, 0.05, 200))
    assert P.run_stationarity(curve(flat), rules)["stationary"]
    rising = np.linspace(0.1, 0.4, 200)  # the tail's halves differ by ~20 %: > the 10 % rule
    st = P.run_stationarity(curve(rising), rules)
    assert not st["stationary"] and st["kl_log_ratio"] > rules["kl_log_ratio_max"]
    drifting_reward = P.run_stationarity(curve(flat, np.linspace(0.2, 0.5, 200)), rules)
    assert not drifting_reward["stationary"] and drifting_reward["reward_diff"] > rules["reward_diff_max"]


def test_the_chosen_length_is_the_shortest_at_which_every_run_has_settled(protocol):
    """KL rises until rollout 220 then stays: lengths whose tail (last 25 %) overlaps the rise fail."""
    rules = protocol["stationarity"]
    kl = np.minimum(np.arange(1, 401) / 220, 1.0) * 0.2
    runs = pd.concat([curve(kl, run="a", seed=900), curve(kl * 1.1, run="b", seed=901)])
    st = P.stationarity(runs, rules, rules["lengths"])
    # T = 250: tail 188-250, halves within 8 %; T = 200: tail 151-200, still rising (halves 15 % apart)
    assert P.choose_length(st, rules["lengths"]) == 250
    assert not st[st["length"] == 200]["stationary"].any()
    assert P.choose_length(st, rules["lengths"], persistent=True) == 250  # and every longer length passes too


def test_a_length_that_passes_between_two_that_fail_is_not_persistent():
    rows = [
        {"run": "a", "length": n, "stationary": ok} for n, ok in ((150, True), (200, False), (250, True), (300, True))
    ]
    st = pd.DataFrame(rows)
    assert P.choose_length(st, [150, 200, 250, 300]) == 150
    assert P.choose_length(st, [150, 200, 250, 300], persistent=True) == 250
    st.loc[st["length"] == 300, "stationary"] = False
    assert P.choose_length(st, [150, 200, 250, 300], persistent=True) is None


def test_settle_step_counts_a_run_that_never_settles_at_n_plus_1(protocol):
    band = protocol["metrics"]["settle"]["band"]
    assert P.settle_censored(np.array([0.0, 0.05, 0.2, 0.2]), 0.2, band) == 3  # in band from rollout 3 on
    assert P.settle_censored(np.array([0.0, 0.2, 0.2, 0.9]), 0.2, band) == 5  # out at the end: never settled


def test_tuned_beta_and_the_equal_kl_reward_recover_a_known_frontier():
    """KL = 0.02/β and reward linear in log KL, with seed noise: β*(τ) = 0.02/τ and the equal-KL reward lies in its
    interval, from PCHIP fits per seed."""
    rng = np.random.default_rng(1)
    rows = []
    for s in (500, 501, 502):
        for b in np.geomspace(0.05, 10, 16):
            kl = 0.02 / b * math.exp(rng.normal(0, 0.02))
            rows.append({"seed": s, "init_kl_coef": b, "kl": kl, "reward": 0.1 + 0.05 * math.log(0.02 / b / 0.001)})
    fits = P.fit_frontier(pd.DataFrame(rows))
    for tau in (0.01, 0.05, 0.2):
        assert P.tuned_beta(fits, tau) == pytest.approx(0.02 / tau, rel=0.03)
        assert np.nanmean(P.reward_at_kl(fits, tau)) == pytest.approx(0.1 + 0.05 * math.log(tau / 0.001), abs=2e-3)
    assert math.isnan(P.tuned_beta(fits, 5.0))  # outside what the frontier spans: no β* is claimed


def test_paired_tests_match_scipy_and_tost_needs_the_interval_inside_the_margin():
    rng = np.random.default_rng(2)
    base = rng.normal(0.3, 0.1, 5)  # large seed-to-seed spread, shared by both arms (the same prompts)
    a, b = base + 0.01 + rng.normal(0, 0.002, 5), base
    t = P.paired_test(a, b, "t_paired")
    assert t["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert t["p"] < 0.01 < stats.ttest_ind(a, b, equal_var=False).pvalue  # pairing is what finds it
    one = P.paired_test(a, b, "t_paired_greater")
    assert one["p"] == pytest.approx(t["p"] / 2)
    eq = P.paired_test(a, b, "tost_paired", margin=0.02)
    assert eq["p"] < 0.05 and -0.02 < eq["lo"] and eq["hi"] < 0.02
    far = P.paired_test(base + 0.03, b, "tost_paired", margin=0.02)
    assert far["p"] > 0.5  # a difference beyond the margin is not "equivalent"
    noisy = P.paired_test(base + rng.normal(0, 0.05, 5), b, "tost_paired", margin=0.02)
    assert noisy["p"] > 0.05  # and p > 0.05 of a t-test is not equivalence either: the noise forbids the claim


def arms_frame(protocol, shift: dict[str, float], seeds=(1000, 1001, 1002, 1003, 1004), stationary=True):
    rng = np.random.default_rng(3)
    base = {s: rng.normal(0.3, 0.05) for s in seeds}
    rows = []
    for arm in ("adaptive", "pid", "pid_ci", "static_tuned"):
        for t in protocol["targets"]:
            for s in seeds:
                rows.append({"arm": arm, "target_kl": t, "seed": s, "stationary": stationary, "run": f"{arm}{t}{s}",
                             "kl_log_ratio_signed": rng.normal(0, 0.02), "reward_diff_signed": rng.normal(0, 0.005),
                             "reward": base[s] + shift.get(arm, 0.0) + rng.normal(0, 0.002),
                             "judge_reward": base[s] + 2 * shift.get(arm, 0.0) + rng.normal(0, 0.002),
                             "log_ratio_error": 0.05 + rng.normal(0, 0.01)})  # fmt: skip
    return pd.DataFrame(rows)


def test_hypothesis_tests_pair_by_seed_and_holm_corrects_the_primary_family(protocol):
    df = arms_frame(protocol, {"pid_ci": 0.005})
    tests = P.adjust(P.hypothesis_tests(df, protocol, protocol["targets"]), protocol)
    assert set(tests.columns) >= {
        "comparison",
        "metric",
        "target_kl",
        "n",
        "estimate",
        "lo",
        "hi",
        "p",
        "p_adj",
        "method",
    }
    h1 = tests[tests["hypothesis"] == "H1"]
    assert len(h1) == 2 * 5 and (h1["n"] == 5).all()  # adaptive and pid_ci; pid is not run (deviation 3)
    assert (h1["p"] < 0.05).all()  # every arm within ±0.02 of static_tuned: TOST rejects both one-sided nulls
    prim = tests[(tests["family"] == "primary") & (tests["n"] > 0)]  # an arm without runs is never in the family
    assert tests.loc[tests["n"] == 0, "p_adj"].isna().all()
    holm = stats.false_discovery_control  # (not Holm: only to show the column is not BH)
    expected = np.minimum(1, np.maximum.accumulate(np.sort(prim["p"]) * (len(prim) - np.arange(len(prim)))))
    assert np.allclose(np.sort(prim["p_adj"]), expected)
    assert not np.allclose(np.sort(prim["p_adj"]), np.sort(holm(prim["p"].to_numpy())))
    assert prim["method"].str.contains(f"Holm over {len(prim)} tests").all()
    # H5, the judge (AFINN) beside the reward: secondary, BH within it, never in the primary family
    h5 = tests[tests["hypothesis"] == "H5"]
    assert len(h5) == 2 * 5 and (h5["family"] == "secondary").all() and (h5["metric"] == "judge").all()
    assert h5["method"].str.contains("Benjamini-Hochberg over 10 tests").all()
    assert np.allclose(h5.loc[h5["comparison"] == "pid_ci − static_tuned", "estimate"], 0.01, atol=0.003)
    # runs from before reward/judge existed: the rows say so and are not tested
    old = P.hypothesis_tests(df.drop(columns=["judge_reward"]), protocol, protocol["targets"])
    assert (old.loc[old["hypothesis"] == "H5", "method"] == "judge_reward not logged by these runs").all()


def test_cell_stationarity_by_the_mean_drift_does_not_punish_more_seeds(protocol):
    """mean_within: a cell whose mean drift is shown inside ±tolerance is stationary although one of its 10 seeds
    fails the per-seed rule by noise; a cell whose mean drifts is not, however many seeds it has."""
    rules = {**protocol["stationarity"], "cell_rule": "mean_within"}
    rng = np.random.default_rng(5)
    noise = pd.DataFrame({"run": [f"r{i}" for i in range(10)], "kl_log_ratio_signed": rng.normal(0, 0.03, 10),
                          "reward_diff_signed": rng.normal(0, 0.009, 10)})  # fmt: skip
    noise.loc[0, "reward_diff_signed"] = 0.025  # one seed over the per-seed tolerance by noise
    noise["stationary"] = (noise["kl_log_ratio_signed"].abs() <= 0.1) & (noise["reward_diff_signed"].abs() <= 0.02)
    assert not noise["stationary"].all()
    assert not P.cell_stationary(noise, {**rules, "cell_rule": "every_seed"})
    assert P.cell_stationary(noise, rules)
    drifting = noise.assign(reward_diff_signed=noise["reward_diff_signed"] + 0.025)
    assert not P.cell_stationary(drifting, rules)
    with pytest.raises(ValueError, match="cell_rule='any' is invalid"):
        P.cell_stationary(noise, {**rules, "cell_rule": "any"})


def test_a_transient_cell_is_reported_but_left_out_of_the_family(protocol):
    df = arms_frame(protocol, {})
    drifting = (df["arm"] == "adaptive") & (df["target_kl"] == 0.2)
    df.loc[drifting, "stationary"] = False  # every run's halves disagree ...
    df.loc[drifting, "reward_diff_signed"] = 0.04  # ... and so does the cell's mean (either cell rule)
    tests = P.adjust(P.hypothesis_tests(df, protocol, protocol["targets"]), protocol)
    tr = tests[tests["transient"]]
    assert len(tr) and tr["p"].notna().all() and tr["p_adj"].isna().all()
    assert (tr["target_kl"] == 0.2).all() and tr["comparison"].str.contains("adaptive").all()
    assert tests.loc[~tests["transient"] & (tests["family"] == "primary") & (tests["n"] > 0), "p_adj"].notna().all()
    # the post hoc sensitivity column: the same Holm with the transient rows kept, so a larger family and p_adj ≥
    prim = tests[(tests["family"] == "primary") & (tests["n"] > 0)]
    p = np.sort(prim["p"].to_numpy())
    holm = np.minimum(1, np.maximum.accumulate(p * (len(p) - np.arange(len(p)))))
    assert np.allclose(np.sort(prim["p_adj_all_cells"]), holm)
    kept = prim[~prim["transient"]]
    assert (kept["p_adj_all_cells"] >= kept["p_adj"] - 1e-12).all() and (kept["p_adj_all_cells"] > kept["p_adj"]).any()
    assert prim.loc[prim["transient"], "p_adj_all_cells"].notna().all()


def write_run(root, name: str, controller: str, target: float, beta: float, seed: int, kl_level: float, reward: float):
    """A finished run dir as the trainer leaves it (summary.json ids, metrics.jsonl curve): KL rises to kl_level
    by rollout 40 and stays there (with seed noise); reward follows."""
    import json

    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed * 7 + int(beta * 1000))
    lines = []
    for s in range(1, 121):
        kl = kl_level * min(1.0, (s - 1) / 40) * math.exp(rng.normal(0, 0.03))
        rec = {"step": s, "kl/exact": kl, "reward/mean": reward * min(1.0, s / 40) + rng.normal(0, 0.003),
               "response/length": 20.0, "kl/coef_next": beta}  # fmt: skip
        if s % 60 == 0:
            rec["eval/distinct_2"] = 0.95
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    answers = [{"step": 120, "prompt": f"prompt {i}", "response": f"{controller} β{beta:g} s{seed} #{i}",
                "gold_reward": reward, "gold2_reward": reward / 2, "proxy_reward": reward}
               for i in range(8)]  # fmt: skip
    (d / "eval_samples.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    ids = {"controller": controller, "target_kl": target, "init_kl_coef": beta, "seed": seed}
    (d / "summary.json").write_text(json.dumps(ids))


def test_make_protocol_runs_the_pipeline_from_run_dirs(tmp_path, protocol, monkeypatch):
    """The driver end to end on synthetic run dirs: the tuning frontier gives β*(τ) = 0.02/τ, the tuned static arm
    is found by its β, and the tables carry the columns the issue asks for."""
    import importlib.util

    from kl_research.analysis.runs import ID_COLUMNS  # noqa: F401  (the ids summary.json must hold)

    spec = importlib.util.spec_from_file_location(
        "make_protocol", P.PROTOCOL_FILE.parents[2] / "scripts/make_protocol.py"
    )
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    for seed in protocol["seeds"]["tuning"]:
        for beta in np.geomspace(0.07, 4.0, 12):
            write_run(tmp_path / "tuning", f"f{beta:.3f}_{seed}", "fixed", 0.05, float(beta), seed, 0.02 / beta,
                      0.1 + 0.05 * math.log(0.02 / beta / 0.001))  # fmt: skip
    fits, tuned = mp.tuning_stage([str(tmp_path / "tuning")], protocol, tmp_path / "out" / "tuning")
    assert tuned[0.02] == pytest.approx(1.0, rel=0.05) and tuned[0.2] == pytest.approx(0.1, rel=0.05)
    for seed in protocol["seeds"]["evaluation"]:
        for t in protocol["targets"]:
            for c in ("adaptive", "pid_ci", "pid"):
                write_run(tmp_path / "eval", f"{c}_{t}_{seed}", c, t, 0.5, seed, t, 0.1 + 0.05 * math.log(t / 0.001))
            b = round(tuned[t], 4)
            write_run(tmp_path / "eval", f"static_{t}_{seed}", "fixed", t, b, seed, 0.02 / b,
                      0.1 + 0.05 * math.log(0.02 / b / 0.001))  # fmt: skip
    # the misspecification arm: controllers from β₀ = β*(τ)·{0.1, 10} reach τ; fixed β₀ runs exist where a static run
    # has that β (β*(0.02)·0.1 = β*(0.2), β*(0.1)·10 = β*(0.01)), and their KL is 0.02/β₀, a decade off τ
    for seed in protocol["seeds"]["evaluation"]:
        for t in (0.02, 0.1):
            for f in (0.1, 10.0):
                for c in ("adaptive", "pid_ci"):  # named as the grid's runs, in their own sweep dir (as sweeps do)
                    write_run(tmp_path / f"misspec_{t}_{f:g}", f"{c}_{t}_{seed}", c, t, round(tuned[t] * f, 4), seed,
                              t, 0.1 + 0.05 * math.log(t / 0.001))  # fmt: skip
    evals = [str(tmp_path / "eval"), *(str(tmp_path / f"misspec_{t}_{f:g}") for t in (0.02, 0.1) for f in (0.1, 10.0))]
    mp.eval_stage(evals, protocol, fits, tuned, tmp_path / "out")
    figures = ("cells.png", "tests.png", "misspecification.png", "equal_kl.png")
    assert all((tmp_path / "out" / f).stat().st_size > 0 for f in figures)
    # samples: per cell, each seed's answer to the same held-out prompts; the misspecified arm's file has its own runs
    text = (tmp_path / "out" / "samples" / "adaptive@x10_tau0.02.md").read_text()
    assert text.count("| 100") == 4 * 5 and "s1004 #3" in text and "adaptive β10" in text and "β0.5" not in text
    assert "fixed β1.0015 s1000 #0" in (tmp_path / "out" / "samples" / "static_tuned_tau0.02.md").read_text()
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    tests = pd.read_csv(tmp_path / "out" / "tests.csv")
    assert {"n", "stationary", "holds"} <= set(cells.columns)
    assert {"adaptive", "pid", "pid_ci", "static_tuned"} <= set(cells["arm"])
    assert cells["stationary"].all() and (cells["n"] == 5).all()
    # β*(0.2) = β*(0.02)/10 and β*(0.01) = 10·β*(0.1) here: those static runs are also the fixed-β₀ arm of H2, at
    # H2's targets only
    misspec = cells[cells["arm"].str.startswith("fixed_beta0")]
    assert set(zip(misspec["arm"], misspec["target_kl"], strict=True)) == {
        ("fixed_beta0@x0.1", 0.02),
        ("fixed_beta0@x10", 0.1),
    }
    assert list(tests.columns[:10]) == ["comparison", "metric", "target_kl", "n", "estimate", "lo", "hi", "p", "p_adj",
                                        "method"]  # fmt: skip
    # deviation 3 took pid out: its comparisons are listed as registered and not run, never tested (the pid runs
    # written above are ignored, not tested); H2's controller arms have no runs here, so those rows say so
    h1 = tests[tests["hypothesis"] == "H1"]
    assert set(h1["comparison"]) == {"adaptive − static_tuned", "pid_ci − static_tuned"}
    assert len(h1) == 10 and (h1["p_adj"] < 0.05).all()  # same reward by construction: TOST shows equivalence
    assert not tests["comparison"].str.contains(r"\bpid\b(?!_ci)", regex=True).any()
    h2 = tests[tests["hypothesis"] == "H2"]
    assert len(h2) == 8
    ran = h2[h2["n"] > 0]  # the two (τ, β₀) with a fixed β₀ run; the other two rows say "no runs of an arm"
    assert set(zip(ran["target_kl"], ran["comparison"].str.extract(r"@x(\S+) ")[0], strict=True)) == {
        (0.02, "0.1"), (0.1, "10")}  # fmt: skip
    assert (h2.loc[h2["n"] == 0, "method"] == "no runs of an arm").all()
    # fixed β₀ is a decade off τ (e = log 10), the controllers sit on it: H2 holds, after Holm
    assert np.allclose(ran["estimate"], math.log(10), atol=0.1) and (ran["p_adj"] < 0.05).all()
    text = (tmp_path / "out" / "results.md").read_text()
    assert text.count(": equivalent") == 10 and "Interim" not in text
    # the headline numbers are the tables': the controllers sit on τ, fixed β₀ a decade off it either way
    ranges = dict(re.findall(r"(misspecified|β\*/10|10 β\*) ([\d.]+-[\d.]+)×", text))
    lo_hi = {k: [float(x) for x in v.split("-")] for k, v in ranges.items()}
    assert set(lo_hi) == {"misspecified", "β*/10", "10 β*"}, text[:600]
    assert 0.95 < lo_hi["misspecified"][0] <= lo_hi["misspecified"][1] < 1.05
    assert lo_hi["β*/10"] == pytest.approx([10, 10], rel=0.05) and lo_hi["10 β*"] == pytest.approx([0.1, 0.1], rel=0.05)
    assert "H1 pid − static_tuned (reward) at 0.01, 0.02, 0.05, 0.1, 0.2" in text and "GRPO subset" in text
    # a seed block half run: every test on fewer than the design's seeds is interim, with no verdict
    for t in protocol["targets"]:
        (tmp_path / "eval" / f"pid_ci_{t}_1004" / "summary.json").unlink()
    mp.eval_stage(evals, protocol, fits, tuned, tmp_path / "out2")
    text = (tmp_path / "out2" / "results.md").read_text()
    assert (
        "Interim" in text and text.count("interim (n = 4 of 5): no verdict") == 5 + 10
    )  # pid_ci: H1 (5 targets), H3 (2 metrics × 5)
    assert text.count(": equivalent") == 5  # adaptive's H1 rows keep n = 5
    # the protocol notebook reads exactly these tables and executes without an error
    run_protocol_notebook(tmp_path / "out", monkeypatch)


PROTOCOL_NOTEBOOK = P.PROTOCOL_FILE.parents[2] / "notebooks" / "protocol.ipynb"


def run_protocol_notebook(out, monkeypatch):
    import nbtools

    monkeypatch.setenv("PROTOCOL_DIR", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbtools.execute(PROTOCOL_NOTEBOOK)
    (cell,) = [c for c in nb.cells if "tests" in c.metadata.get("tags", [])]
    shown = "".join(o["data"].get("text/plain", "") for o in cell.outputs if o.output_type == "display_data")
    assert "adaptive − static_tuned" in shown and "Holm" in shown and "p_adj_all_cells" in shown
    (cell,) = [c for c in nb.cells if "samples" in c.metadata.get("tags", [])]
    assert any("answers to the same held-out prompts" in str(o.get("data", "")) for o in cell.outputs)


def test_committed_protocol_notebook_has_no_outputs_and_a_parameters_cell():
    import nbtools

    code = nbtools.committed_code_cells(PROTOCOL_NOTEBOOK)
    assert [t for c in code for t in c.metadata.get("tags", [])].count("parameters") == 1


def test_compact_runs_refuses_a_sweep_stopped_before_its_jobs_made_run_dirs(tmp_path):
    """A seed block stopped at the next block's launch leaves multirun/protocol_grid_s<next>/ with sweep.json and no
    run dir; `protocol.sh collect` compacted it to an empty dir, which then entered the analysis as a sweep. A job that
    sweep.json lists without a run dir is unfinished, and a sweep without runs is refused."""
    import json
    import sys

    sys.path.insert(0, str(P.PROTOCOL_FILE.parents[2] / "scripts"))
    import compact_runs

    sweep = tmp_path / "protocol_grid_s1002"
    sweep.mkdir()
    jobs = [{"name": "adaptive_kl0.01_s1002", "overrides": []}, {"name": "pid_ci_kl0.01_s1002", "overrides": []}]
    (sweep / "sweep.json").write_text(json.dumps({"name": sweep.name, "jobs": jobs}))
    with pytest.raises(SystemExit, match=r"unfinished runs .*adaptive_kl0\.01_s1002, pid_ci_kl0\.01_s1002"):
        compact_runs.main([str(sweep), str(tmp_path / "out")])
    (sweep / "adaptive_kl0.01_s1002" / ".hydra").mkdir(parents=True)
    (sweep / "adaptive_kl0.01_s1002" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"unfinished runs .*: pid_ci_kl0\.01_s1002$"):
        compact_runs.main([str(sweep), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    (sweep / "sweep.json").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no runs in"):
        compact_runs.main([str(empty), str(tmp_path / "out")])


def test_a_later_deviation_can_put_a_dropped_arm_back():
    """Deviation 3 took pid and static_seed out; deviation 6 runs static_seed again. The registered file says so: H4's
    comparisons are tested (not listed as not run), pid's stay listed, and a run_again without a not_run changes
    nothing."""
    protocol = P.load_protocol()
    assert P.not_run_arms(protocol) == {"pid"}
    gone = P.registered_not_run(protocol, protocol["targets"])
    assert gone and all("pid" in {P._arm_base(c["first"]), P._arm_base(c["second"])} for c in gone)
    assert not any(c["hypothesis"] == "H4" for c in gone)
    dropped = {"deviations": [{"not_run": {"arms": ["pid", "static_seed"]}}]}
    assert P.not_run_arms(dropped) == {"pid", "static_seed"}
    assert P.not_run_arms({"deviations": [*dropped["deviations"], {"run_again": {"arms": ["static_seed", "x"]}}]}) == {
        "pid"
    }


def test_the_committed_protocol_results_reproduce_from_their_committed_runs(tmp_path):
    """results/protocol/ is what `protocol.sh collect` wrote: make_protocol.py run again today on the committed tuning
    runs and every committed evaluation block (in collect's order) gives the committed tables, number for number."""
    import subprocess
    import sys

    repo = P.PROTOCOL_FILE.parents[2]
    res = repo / "results" / "protocol"
    evals = [d for kind in ("grid", "fixed", "misspec", "seed") for d in sorted(res.glob(f"runs/protocol_{kind}_*"))]
    assert evals, "no committed evaluation block"
    args = [
        "--tuning",
        "results/protocol/tuning/runs",
        *(a for d in evals for a in ("--eval", str(d.relative_to(repo)))),
    ]
    subprocess.run([sys.executable, "scripts/make_protocol.py", *args, "--out", str(tmp_path)], cwd=repo, check=True,
                   capture_output=True)  # fmt: skip
    tables = ["cells.csv", "tests.csv", "misspecification.csv", "equal_kl.csv", "tuning/frontier.csv"]
    for table in tables:
        committed, again = pd.read_csv(res / table), pd.read_csv(tmp_path / table)
        pd.testing.assert_frame_equal(again, committed, check_exact=False, rtol=1e-9, obj=table)
    assert (tmp_path / "tuning" / "tuned_betas.json").read_text() == (res / "tuning" / "tuned_betas.json").read_text()
    assert (tmp_path / "results.md").read_text() == (res / "results.md").read_text()
    # and the committed tables are the design's: every evaluation block has the same arms
    cells = pd.read_csv(res / "cells.csv")
    assert cells["n"].nunique() == 1 and cells["n"].iloc[0] == len({d.name.rsplit("_s", 1)[1] for d in evals})
