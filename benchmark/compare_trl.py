"""Our PPO step against TRL's, alternating the two processes so that both see the same machine.

    python benchmark/compare_trl.py --shape gpt2-mid --rounds 2 --steps 2 --out results/perf.json

Each round runs `python -m benchmark.bench` and then `benchmark/bench_trl.sh` (TRL 0.11.4 in .venv-trl) with the
same shape and work; the first round also takes the floors (bare HF calls, and the GEMMs alone). This shared VM
drifts by ±15% over minutes, so a ratio is only meaningful between runs taken side by side: the ratio is the
median over rounds of (TRL step / our score + advantages + update) within each round. Appends every JSON line
to --out and prints one summary JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def offline_env() -> dict[str, str]:
    """This process's environment for a bench subprocess: no hub, no W&B network calls."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def emit(summary: dict, out: str | None) -> None:
    """Print the summary as one JSON line, and append it to `out` (after the per-run lines) when given."""
    line = json.dumps(summary)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, cwd=ROOT, env=offline_env(), check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--minibatch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append every JSON line here")
    ap.add_argument("--ours-arg", action="append", default=[], help="extra argument for our bench (repeatable), "
                    "e.g. --ours-arg=--compile-vocab or --ours-arg=--sampler=hf")  # fmt: skip
    a = ap.parse_args()
    common = ["--shape", a.shape, "--batch", str(a.batch), "--minibatch", str(a.minibatch)]
    common += ["--threads", str(a.threads), "--steps", str(a.steps)]
    ours_all, trl_all = [], []
    for r in range(a.rounds):
        floors = [] if r == 0 else ["--no-floors"]
        # TRL's step scores the policy itself: ours does the same (no logits taken from our sampler's steps), so the
        # ratio compares the same work
        like_trl = ["--no-score-from-sampler"]
        ours = run_json([sys.executable, "-m", "benchmark.bench", *common, *floors, *like_trl, *a.ours_arg])
        trl = run_json(["bash", "benchmark/bench_trl.sh", *common, *([] if r == 0 else ["--no-gemm-floor"])])
        ours_all.append(ours)
        trl_all.append(trl)
        print(
            f"round {r + 1}: ours {ours['seconds']['score_and_update']:.2f} s, TRL {trl['seconds']['step']:.2f} s",
            file=sys.stderr,
            flush=True,
        )
        if a.out:
            with open(a.out, "a") as f:
                for rec in (ours, trl):
                    f.write(json.dumps({**rec, "compare_round": r + 1}) + "\n")
    med = statistics.median
    ratios = [t["seconds"]["step"] / o["seconds"]["score_and_update"] for o, t in zip(ours_all, trl_all, strict=True)]
    first_o, first_t = ours_all[0], trl_all[0]
    our_gemm = first_o["gemm_floor_seconds"]["score"] + first_o["gemm_floor_seconds"]["update"]
    summary = {
        "bench": "compare_trl",
        "shape": a.shape,
        "batch_size": a.batch,
        "minibatch_size": a.minibatch,
        "rounds": a.rounds,
        "ours_args": a.ours_arg,
        "ours_score_and_update_s": [o["seconds"]["score_and_update"] for o in ours_all],
        "trl_step_s": [t["seconds"]["step"] for t in trl_all],
        "trl_over_ours": [round(x, 3) for x in ratios],
        "trl_over_ours_median": round(med(ratios), 3),
        "ours_gemm_floor_s": round(our_gemm, 4),
        "ours_gemm_gflop": round(first_o["gemm_gflop"]["score"] + first_o["gemm_gflop"]["update"], 1),
        "trl_gemm_floor_s": first_t["gemm_floor_seconds"]["step"],
        "trl_gemm_gflop": first_t["gemm_gflop"]["step"],
        # the best ratio any implementation of our arithmetic could reach against round 1's TRL step on this BLAS
        # (benchmark/perf_table.py shows the same bound against TRL's median step over the rounds)
        "trl_over_ours_gemm_floor": round(first_t["seconds"]["step"] / our_gemm, 3),
        "ours_seconds_round1": first_o["seconds"],
        "ours_floor_seconds": first_o["floor_seconds"],
        "ours_overhead": first_o["overhead"],
        "ours_gemm_floor_seconds": first_o["gemm_floor_seconds"],
        "generate_bare_trl_s": first_t["seconds"]["generate_bare"],
    }
    emit(summary, a.out)


if __name__ == "__main__":
    main()
