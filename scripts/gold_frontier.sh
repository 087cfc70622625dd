#!/bin/bash
# Issue 30: reward over-optimisation (Gao, Schulman & Hilton 2022, arXiv 2210.10760) on the embedded default. The fixed-β
# frontier (conf/sweep/frontier.yaml: 6 β × 5 seeds) trained on a learned proxy RM of each size n (reward=learned,
# reward.n_labels), with the gold (VADER) and the second gold (AFINN) measured beside the proxy on held-out prompts at
# every eval step (docs/gold.md). 6 β × 5 seeds × 3 n = 90 jobs in one sweep dir, named <β>_<seed>_n_labels=<n>; the
# three reward models are built once each, before any job (conf/sweep.yaml's callbacks), and cached.
#   bash scripts/gold_frontier.sh                              # the whole grid (here: 2 jobs × 1 thread at a time)
#   bash scripts/gold_frontier.sh sweep.seeds=[0,1] steps=60   # any extra override, as for sweep.py
#   bash scripts/gold_frontier.sh pilot                        # the pilot first: scripts/gold_pilot.py reads it
# Analysis (per proxy size; runs of two sizes must not be pooled): docs/gold.md, "Reading a gold sweep".
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if [ "${1:-}" = pilot ]; then
  # the pilot (issue 30: "size the grid from a pilot that shows the proxy can be over-optimised"): two low fixed β
  # under the two cheap proxies, one seed, 300 rollouts, a gold evaluation every 20; read by scripts/gold_pilot.py
  # (NS / BETAS / NAME change the proxy sizes, the βs and the sweep's name: the second pilot, weaker proxies, was
  # NS=30,100 BETAS=0.01 NAME=gold_pilot_weak)
  shift
  python sweep.py sweep=frontier sweep.name="${NAME:-gold_pilot}" reward=learned reward.n_labels="${NS:-500,2000}" \
    "sweep.fixed_betas=[${BETAS:-0.01,0.05}]" "sweep.seeds=[0]" steps=300 eval_every=20 checkpoint_every=50 "$@"
  exit
fi
python sweep.py sweep=frontier sweep.name=gold_frontier reward=learned reward.n_labels=500,2000,8000 "$@"
