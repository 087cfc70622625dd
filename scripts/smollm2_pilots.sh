#!/bin/bash
# Issue 21 part 3: size PPO's step for SmolLM2-135M (model=smollm2). Each pilot is a fixed-β job whose first update
# must add less KL than the smallest target (0.01 nats/token); the table reads KL after update 1, the mean approx-KL
# per rollout and the tail KL. Two pilots at a time, one thread each; results/smollm2/pilots/<name>/ gets the run's
# metrics.jsonl and its exact command. Usage: bash scripts/smollm2_pilots.sh [name=overrides ...]
#   bash scripts/smollm2_pilots.sh                 # the lr ladder below
#   bash scripts/smollm2_pilots.sh "b1_30=controller.init_kl_coef=1 steps=30 ppo.lr=3e-5"   # one named pilot
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
OUT=results/smollm2/pilots
WORK=${PILOT_WORK:-/tmp/smollm2_pilots}
BASE="model=smollm2 threads=1 wandb.mode=disabled precision=fp32 eval_every=1000 checkpoint_every=1000 ppo.batch_size=16 ppo.minibatch_size=8 ppo.epochs=1 controller=fixed data.eval_texts=64"
if [ $# -eq 0 ]; then
  set -- "lr1e-6=controller.init_kl_coef=0.01 steps=8 ppo.lr=1e-6" "lr3e-6=controller.init_kl_coef=0.01 steps=8 ppo.lr=3e-6" \
         "lr1e-5=controller.init_kl_coef=0.01 steps=8 ppo.lr=1e-5" "lr3e-5=controller.init_kl_coef=0.01 steps=8 ppo.lr=3e-5"
fi
python -m kl_research.reference model=smollm2 data.eval_texts=8 > /dev/null  # fetch + convert once, before two jobs race for it
run() {
  local name=${1%%=*} overrides=${1#*=}
  local cmd="python train.py $BASE $overrides"
  mkdir -p "$OUT/$name" "$WORK"
  echo "$(date -u +%T) $name: $cmd"
  $cmd hydra.run.dir="$WORK/$name" > "$WORK/$name.log" 2>&1
  cp "$WORK/$name/metrics.jsonl" "$OUT/$name/"
  echo "$cmd" > "$OUT/$name/command.txt"
}
while [ $# -gt 0 ]; do
  run "$1" & if [ $# -gt 1 ]; then run "$2" & fi
  wait
  shift $(( $# > 1 ? 2 : 1 ))
done
python scripts/pilot_table.py "$OUT" "model=smollm2, sequence+exact, 24 tokens, 1 thread, fp32, 2 jobs at once" > "$OUT/table.md"
cat "$OUT/table.md"
