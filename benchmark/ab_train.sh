#!/usr/bin/env bash
# A/B of `python train.py`'s steady step: alternate runs of two override sets, ROUNDS times, and print each run's
# median s/step over steps 11-STEPS (the metrics' time/step_s), with the CPU. Run from the repo root on an idle machine.
#
#   bash benchmark/ab_train.sh "fused_vocab=false" "fused_vocab=true"                  # 1 thread, as a sweep job
#   THREADS=2 ROUNDS=2 bash benchmark/ab_train.sh "fused_vocab=false" "fused_vocab=true"
set -euo pipefail
A=$1 B=$2
THREADS=${THREADS:-1} ROUNDS=${ROUNDS:-2} STEPS=${STEPS:-40}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
out=$(mktemp -d)
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), threads=$THREADS, steps=$STEPS, rounds=$ROUNDS"
for r in $(seq "$ROUNDS"); do
  for arm in A B; do
    ov=${!arm}
    dir="$out/${arm}_$r"
    # shellcheck disable=SC2086
    python train.py steps="$STEPS" threads="$THREADS" precision=fp32 eval_every=100000 $ov hydra.run.dir="$dir" \
      > "$dir.log" 2>&1
    python - "$dir/metrics.jsonl" "$r" "$ov" <<'PY'
import sys

import pandas as pd

m = pd.read_json(sys.argv[1], lines=True)
print(f"round {sys.argv[2]} {sys.argv[3]:<40s} median s/step (steps 11-{len(m)}): {m['time/step_s'].iloc[10:].median():.4f}")
PY
  done
done
rm -rf "$out"
