#!/bin/bash
# Issue 21 part 4: the replication on SmolLM2-135M (experiment=smollm2: PPO's step sized by the pilots in
# results/smollm2/pilots), analysed exactly as results/sweep is. Three sweeps, 23 jobs of 60 rollouts, 3.9 h on 2 cores
# as measured (2 jobs x 1 thread, a median 17.5 s per rollout each; the pilots' 14.8 s had promised ~2.9 h):
#   - adaptive and pid at a low and a high target (0.02, 0.05) x 3 seeds, horizon 64 (batch 16 moves β per rollout as
#     horizon 256 does at batch 64);
#   - the static β₀ arm (fixed β 0.5, the controllers' β₀) x 3 seeds, its own sweep: the fixed controller has no
#     horizon key, so it cannot share the grid's command line;
#   - the fixed-β frontier: β 0.01, 0.05, 0.2, 10 x 2 seeds (with the static arm, 5 β).
# Usage (from a clean clone, so that edits to a working tree cannot change jobs that start later):
#   git clone <repo> /work/clone_smol && cd /work/clone_smol
#   setsid nohup bash scripts/smollm2_replication.sh > smollm2.log 2>&1 &     # re-run the same to resume
#   bash scripts/smollm2_replication.sh collect <repo>/results/smollm2        # once every job is done
# `collect` copies each run's metrics.jsonl, summary.json, .hydra/*.yaml and first 4 samples of each logged step (and
# each sweep's sweep.json, which holds its command lines) to <dest>/{runs,static_runs,frontier_runs}
# (scripts/compact_runs.py) and runs scripts/make_results.py on those copies.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
SWEEPS=(smollm2_grid:runs smollm2_static:static_runs smollm2_frontier:frontier_runs)

if [ "${1:-run}" = run ]; then
  export PYTHONPATH=$PWD
  python -m kl_research.reference model=smollm2 data.eval_texts=8 > /dev/null  # fetch + convert once, before jobs race
  python sweep.py experiment=smollm2 sweep.name=smollm2_grid 'sweep.controllers=[adaptive,pid]' \
    'sweep.targets=[0.02,0.05]' 'sweep.seeds=[0,1,2]' controller.horizon=64
  python sweep.py experiment=smollm2 sweep=frontier sweep.name=smollm2_static 'sweep.fixed_betas=[0.5]' \
    'sweep.seeds=[0,1,2]'
  python sweep.py experiment=smollm2 sweep=frontier sweep.name=smollm2_frontier 'sweep.fixed_betas=[0.01,0.05,0.2,10]' \
    'sweep.seeds=[0,1]'
  echo "all three sweeps done: bash $0 collect <repo>/results/smollm2"
elif [ "$1" = collect ] && [ $# -eq 2 ]; then
  dest=$(mkdir -p "$2" && cd "$2" && pwd)
  repo=$(cd "$dest/../.." && pwd)  # <repo>/results/smollm2 -> <repo>
  for pair in "${SWEEPS[@]}"; do
    name=${pair%%:*} sub=${pair#*:}
    src=$(ls -d multirun/"$name"/*/ | sort | tail -1)
    python scripts/compact_runs.py "$src" "$dest/$sub"  # refuses an unfinished run
  done
  cd "$repo"
  rel=${dest#"$repo"/}
  python scripts/make_results.py "$rel/runs" --frontier "$rel/static_runs" --frontier "$rel/frontier_runs" --out "$rel"
else
  echo "usage: bash $0 [run] | bash $0 collect <repo>/results/smollm2" >&2
  exit 2
fi
