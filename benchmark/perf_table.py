"""Markdown tables for results/perf.md from the JSON lines that benchmark/perf_all.sh wrote.

python benchmark/perf_table.py results/perf_runs.jsonl
"""

from __future__ import annotations

import json
import sys
from statistics import median


def f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def main(path: str) -> None:
    recs = [json.loads(line) for line in open(path) if line.strip()]
    summaries = [r for r in recs if r.get("bench") == "compare_trl"]
    ours_r1 = [r for r in recs if r.get("bench") == "ppo_step" and r.get("compare_round") == 1]
    trl_r1 = [r for r in recs if r.get("bench") == "trl_ppo_step" and r.get("compare_round") == 1]
    cost = [r for r in recs if r.get("bench") == "ppo_step" and "compare_round" not in r]

    print("## Against TRL (rounds alternate ours / TRL; ratio = median over rounds)\n")
    print(
        "TRL / ours GEMMs alone (TRL's median step over our GEMMs timed alone): the ratio an implementation of our "
        "arithmetic with zero cost outside its GEMMs would reach. Ours ÷ ours GEMMs alone: our median step over that "
        "bound.\n"
    )
    print(
        "| shape | batch (mb) | ours: score+adv+update, s | TRL `step`, s | TRL / ours | ours GEMMs alone, s "
        "| TRL GEMMs alone, s | GEMM GFLOP ours / TRL | TRL / ours GEMMs alone | ours ÷ ours GEMMs alone |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        print(
            f"| {s['shape']} | {s['batch_size']} ({s['minibatch_size']}) "
            f"| {', '.join(f(x) for x in s['ours_score_and_update_s'])} "
            f"| {', '.join(f(x) for x in s['trl_step_s'])} | **{f(s['trl_over_ours_median'])}×** "
            f"| {f(s['ours_gemm_floor_s'])} | {f(s['trl_gemm_floor_s'])} "
            f"| {f(s['ours_gemm_gflop'], 0)} / {f(s['trl_gemm_gflop'], 0)} "
            f"| {f(median(s['trl_step_s']) / s['ours_gemm_floor_s'])}× "
            f"| {f(median(s['ours_score_and_update_s']) / s['ours_gemm_floor_s'])} |"
        )

    print("\n## Per phase, with floors (round 1 of each comparison; seconds per PPO step)\n")
    print(
        "| shape | batch (mb) | generate | score | update | total | floors gen / score / update "
        "| ours ÷ floor gen / score / update | GEMMs alone score / update | GEMM GFLOP/s score / update | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ours_r1:
        s, fl, ov, gm = r["seconds"], r["floor_seconds"], r["overhead"], r["gemm_floor_seconds"]
        rate = r["gemm_gflop_per_s"]
        print(
            f"| {r['shape']} | {r['batch_size']} ({r['minibatch_size']}) | {f(s['generate'])} | {f(s['score'])} "
            f"| {f(s['update'])} | {f(s['total'])} | {f(fl['generate'])} / {f(fl['score'])} / {f(fl['update'])} "
            f"| {f(ov['generate'])} / {f(ov['score'])} / {f(ov['update'])} | {f(gm['score'])} / {f(gm['update'])} "
            f"| {f(rate['score'], 0)} / {f(rate['update'], 0)} | {r['peak_rss_mb'] / 1024:.1f} GB |"
        )
    print(
        "\nThroughput (round 1): "
        + "; ".join(
            f"{r['shape']} B={r['batch_size']}: {r['gen_tokens_per_s']:.0f} generated tok/s, "
            f"{r['train_tokens_per_s']:.0f} trained tok/s"
            for r in ours_r1
        )
    )
    print(
        "\nTRL bare generate (round 1): "
        + "; ".join(f"{r['shape']} B={r['batch_size']}: {f(r['seconds']['generate_bare'])} s" for r in trl_r1)
    )

    if cost:
        print("\n## How the cost grows (tiny shape, 2 threads, 4 epochs, minibatch = batch/4; seconds per step)\n")
        print("| batch | response tokens | generate | score | update | total | gen tok/s | trained tok/s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in cost:
            s = r["seconds"]
            print(
                f"| {r['batch_size']} | {r['response_len']} | {f(s['generate'], 3)} | {f(s['score'], 3)} "
                f"| {f(s['update'], 3)} | {f(s['total'], 3)} | {r['gen_tokens_per_s']:.0f} "
                f"| {r['train_tokens_per_s']:.0f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/perf_runs.jsonl")
