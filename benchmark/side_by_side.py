"""Sweep throughput on one machine: several bench jobs at once, each with its own torch thread count.

    python benchmark/side_by_side.py --layouts 1x2 2x1 2x2 --rounds 2 --out results/side_by_side.jsonl

A layout JxT starts J copies of `python -m benchmark.bench --threads T --no-floors` at the same moment (tiny
default shape, batch 64, unless told otherwise; seeds differ) and reports each job's median seconds per PPO step
and the machine's throughput, Σ over jobs of 1 / (seconds per step), in PPO steps per minute. On this 2-core VM:
2x1 is what a sweep does here (the local launcher runs cores ÷ cpus_per_task jobs, each with
threads = cpus_per_task = 1; on SLURM, threads = $SLURM_CPUS_PER_TASK), 2x2 is what torch's default of all cores
per process would do, 1x2 is one job alone. Layouts alternate over rounds, because the VM drifts over minutes.
Prints one summary JSON line; --out appends every job's record and the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from compare_trl import ROOT, emit, offline_env


def run_layout(jobs: int, threads: int, bench_args: list[str]) -> dict:
    env = offline_env()
    env.pop("OMP_NUM_THREADS", None)  # the bench sets torch's threads itself (--threads)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmark.bench", *bench_args, "--threads", str(threads), "--seed", str(j)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for j in range(jobs)
    ]
    recs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"bench job failed (exit {p.returncode})")
        recs.append(json.loads(out.strip().splitlines()[-1]))
    step_s = [r["seconds"]["total"] for r in recs]
    return {
        "layout": f"{jobs}x{threads}",
        "jobs": jobs,
        "threads_per_job": threads,
        "step_s": [round(s, 3) for s in step_s],
        "steps_per_min": round(sum(60.0 / s for s in step_s), 2),
        "wall_s": round(time.perf_counter() - t0, 1),
        "records": recs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["1x2", "2x1", "2x2"], help="JOBSxTHREADS")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--minibatch", type=int, default=None, help="default: conf/ppo/default.yaml")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    layouts = [tuple(int(x) for x in lay.split("x")) for lay in a.layouts]
    bench_args = ["--shape", a.shape, "--batch", str(a.batch), "--steps", str(a.steps), "--no-floors"]
    if a.minibatch:
        bench_args += ["--minibatch", str(a.minibatch)]
    results: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        for jobs, threads in layouts if r % 2 == 0 else layouts[::-1]:
            res = run_layout(jobs, threads, bench_args)
            results.setdefault(res["layout"], []).append(res)
            print(
                f"round {r + 1} {res['layout']}: s/step per job {res['step_s']}, {res['steps_per_min']} steps/min",
                file=sys.stderr,
                flush=True,
            )
            if a.out:
                with open(a.out, "a") as f:
                    for rec in res["records"]:
                        f.write(json.dumps({**rec, "layout": res["layout"], "layout_round": r + 1}) + "\n")
    summary = {
        "bench": "side_by_side",
        "shape": a.shape,
        "batch_size": a.batch,
        "cores": os.cpu_count(),
        "layouts": {
            k: {
                "step_s": [v["step_s"] for v in vs],
                "steps_per_min": [v["steps_per_min"] for v in vs],
                "steps_per_min_median": statistics.median(v["steps_per_min"] for v in vs),
            }
            for k, vs in results.items()
        },
    }
    emit(summary, a.out)


if __name__ == "__main__":
    main()
