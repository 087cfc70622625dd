"""benchmark/sweep_pairs.py: two runs of one grid matched job by job; identical trajectories are told apart from
different ones, and different ones get a paired equivalence test of their tail means."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from benchmark.sweep_pairs import compare


def fake_sweep(root, shift: float = 0.0, noise: float = 0.0, precision: str = "fp32", seed: int = 0):
    rng = np.random.default_rng(seed)
    for s in range(6):
        d = root / f"pid_kl0.05_s{s}"
        d.mkdir(parents=True)
        steps = np.arange(1, 41)
        kl = 0.05 * (1 - np.exp(-steps / 8)) + shift + noise * rng.standard_normal(40)
        m = pd.DataFrame({"step": steps, "kl/exact": kl, "reward/mean": 0.1 + 0.001 * steps, "kl/coef": 0.5 / steps,
                          "loss/grad_norm": 1.0, "time/step_s": 0.6})  # fmt: skip
        m.to_json(d / "metrics.jsonl", orient="records", lines=True)
        (d / "summary.json").write_text(json.dumps({"precision": precision, "wall_time_s": 30.0}))
    return root


def test_identical_runs_are_identical_and_a_shifted_run_is_not_equivalent(tmp_path):
    a = fake_sweep(tmp_path / "a")
    same = compare(a, fake_sweep(tmp_path / "b"), 0.25, kl_margin=0.005, reward_margin=0.02)
    assert same["identical"] and same["jobs"] == 6 and same["b_precision"] == ["fp32"]
    near = compare(a, fake_sweep(tmp_path / "c", noise=1e-4, seed=1), 0.25, kl_margin=0.005, reward_margin=0.02)
    assert not near["identical"] and near["tail_kl"]["equivalent"]
    far = compare(a, fake_sweep(tmp_path / "d", shift=0.01, noise=1e-4), 0.25, kl_margin=0.005, reward_margin=0.02)
    assert not far["identical"] and not far["tail_kl"]["equivalent"]
    assert abs(far["tail_kl"]["b_minus_a"]["estimate"] - 0.01) < 1e-3
