"""The pilot runs behind the PPO and controller defaults (docs/controllability.md), as one markdown table.

    python scripts/pilot_table.py results/pilots > results/pilots/table.md
    python scripts/pilot_table.py results/smollm2/pilots "model=smollm2, sequence mode, fixed β, 2 threads" > ...

Each results/pilots/<name>/ holds the run's metrics.jsonl and the exact `python train.py ...` command (every setting
that differs from today's defaults is spelled out in it, so rerunning the command reproduces the run).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

KEYS = (
    "model=",
    "algo=",
    "algo.group_size",
    "ppo.batch_size",
    "ppo.minibatch_size",
    "ppo.kl_mode",
    "ppo.kl_penalty",
    "ppo.lr",
    "ppo.epochs",
    "controller=",
    "controller.init_kl_coef",
    "controller.target_kl",
    "controller.horizon",
    "controller.kp",
    "controller.kd",
    "controller.error_clip",
    "steps",
)


def settings(command: str) -> str:
    parts = [p for p in command.split() if p.startswith(KEYS)]
    return " ".join(p.replace("controller.", "").replace("ppo.", "") for p in parts)


def row(run: Path) -> str:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl/exact"] for r in recs]
    tail = kl[-max(1, math.ceil(0.25 * len(kl))) :]
    approx = sum(r["policy/approx_kl"] for r in recs) / len(recs)
    beta = recs[-1]["kl/coef_next"]
    cmd = (run / "command.txt").read_text().strip()
    return (
        f"| {run.name} | {settings(cmd)} | {kl[1]:.3g} | {approx:.3g} | {sum(tail) / len(tail):.3g} "
        f"[{min(tail):.3g}, {max(tail):.3g}] | {beta:.3g} |"
    )


def main(root: str, beyond: str = "loss mode, exact KL, batch 64, minibatch 16, 24 tokens, 1 thread") -> None:
    runs = sorted(p for p in Path(root).iterdir() if (p / "metrics.jsonl").exists())
    print(
        f"| run | settings (beyond: {beyond}) | KL after update 1 | mean approx-KL per rollout | tail KL mean "
        "[min, max] (last 25 %) | final β |"
    )
    print("|---|---|---|---|---|---|")
    for run in runs:
        print(row(run))


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["results/pilots"]))
