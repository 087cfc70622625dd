"""Two runs of the same sweep grid, job by job: how long each took and whether they computed the same thing.

    python -m benchmark.sweep_pairs A_DIR B_DIR [--kl-margin 0.005] [--reward-margin 0.02] [--out results/x.jsonl]

A_DIR and B_DIR are sweep directories (`<sweep.root>/<name>/<time>`, one run dir per job) of the same grid, e.g. the
before and after of a performance change, or `precision=fp32` and `precision=bf16`. Jobs are matched by name
(controller, target, seed). Prints, per side, the precision the jobs ran in and their median s/step (steps 11+);
then whether every matched pair has bit-identical trajectories (`kl/exact`, `reward/mean`, β and the gradient norm
at every step: a change meant to be numerically neutral must give True), and otherwise paired two-one-sided tests
(TOST, the protocol's `paired_test`) that the tail-mean KL and reward (last `--tail` of the steps) differ by less
than the margins. The margins are the reader's to choose; a TOST is an equivalence test at 5 % with a 90 % interval.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kl_research.analysis.protocol import paired_test

TRAJECTORY = ("kl/exact", "reward/mean", "kl/coef", "loss/grad_norm")


def load(sweep_dir: Path) -> dict[str, tuple[pd.DataFrame, dict]]:
    jobs = {}
    for summary in sorted(sweep_dir.glob("*/summary.json")):
        metrics = pd.read_json(summary.with_name("metrics.jsonl"), lines=True)
        jobs[summary.parent.name] = (metrics, json.loads(summary.read_text()))
    if not jobs:
        raise SystemExit(f"{sweep_dir}: no finished job (no */summary.json); pass a sweep's <root>/<name>/<time> dir")
    return jobs


def compare(a: Path, b: Path, tail: float, kl_margin: float, reward_margin: float) -> dict:
    ja, jb = load(a), load(b)
    names = sorted(set(ja) & set(jb))
    if not names:
        raise SystemExit(f"no job name in both {a} and {b}")
    out: dict = {"a": str(a), "b": str(b), "jobs": len(names), "tail": tail}
    for side, jobs in (("a", ja), ("b", jb)):
        out[f"{side}_precision"] = sorted({jobs[n][1].get("precision") for n in names})
        out[f"{side}_step_s"] = [round(float(jobs[n][0]["time/step_s"].iloc[10:].median()), 4) for n in names]
        out[f"{side}_wall_s"] = [round(float(jobs[n][1]["wall_time_s"]), 1) for n in names]
    cols = [c for c in TRAJECTORY if all(c in ja[n][0] and c in jb[n][0] for n in names)]
    out["identical"] = all(np.array_equal(ja[n][0][c].values, jb[n][0][c].values) for n in names for c in cols)
    out["compared_columns"] = cols

    def tail_mean(m: pd.DataFrame, col: str) -> float:
        return float(m[col].iloc[int(len(m) * (1 - tail)) :].mean())

    for metric, col, margin in (("kl", "kl/exact", kl_margin), ("reward", "reward/mean", reward_margin)):
        xa = np.array([tail_mean(ja[n][0], col) for n in names])
        xb = np.array([tail_mean(jb[n][0], col) for n in names])
        test = paired_test(xb, xa, "tost_paired", margin=margin)
        out[f"tail_{metric}"] = {"a": xa.round(5).tolist(), "b": xb.round(5).tolist(), "margin": margin,
                                 "b_minus_a": test, "equivalent": bool(test["p"] < 0.05)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--tail", type=float, default=0.25, help="the fraction of steps the tail means cover")
    ap.add_argument("--kl-margin", type=float, default=0.005, help="nats/token (10 %% of a 0.05 target)")
    ap.add_argument("--reward-margin", type=float, default=0.02)
    ap.add_argument("--out", type=Path, help="append the result as one JSON line")
    args = ap.parse_args(argv)
    res = compare(args.a, args.b, args.tail, args.kl_margin, args.reward_margin)
    res["at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    for side in ("a", "b"):
        step = np.array(res[f"{side}_step_s"])
        print(f"{side}: {res[side]}  precision {res[f'{side}_precision']}, median s/step per job "
              f"{step.min():.3f}-{step.max():.3f} (median {np.median(step):.3f})")  # fmt: skip
    print(f"{res['jobs']} matched jobs; trajectories ({', '.join(res['compared_columns'])}) identical: "
          f"{res['identical']}")  # fmt: skip
    if not res["identical"]:
        for metric in ("kl", "reward"):
            t = res[f"tail_{metric}"]
            d = t["b_minus_a"]
            print(f"tail {metric} (last {args.tail:.0%}), b - a: {d['estimate']:+.4f}, 90 % CI [{d['lo']:+.4f}, "
                  f"{d['hi']:+.4f}], TOST within ±{t['margin']:g}: p = {d['p']:.3g} "
                  f"({'equivalent' if t['equivalent'] else 'not shown equivalent'})")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
