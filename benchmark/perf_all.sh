#!/usr/bin/env bash
# Every number in results/perf.md, from one run: ours vs TRL (alternating, with floors) at three shapes, then the
# cost table. ~55 min on the 2-core VM (53 min in session 4); run it on an otherwise idle machine (check `uptime`).
#   bash benchmark/perf_all.sh [results/perf_runs.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/perf_runs.jsonl}
: > "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
python benchmark/compare_trl.py --shape tiny --rounds 3 --steps 3 --out "$OUT"
python benchmark/compare_trl.py --shape gpt2-mid --rounds 2 --steps 2 --out "$OUT"
python benchmark/compare_trl.py --shape gpt2-small --batch 64 --minibatch 16 --rounds 2 --steps 1 --out "$OUT"
python benchmark/compare_trl.py --shape gpt2-small --batch 16 --minibatch 4 --rounds 1 --steps 2 --out "$OUT"
for B in 16 32 64; do for R in 12 24 48; do  # the cost table (tiny shape, minibatch = batch / 4)
  python -m benchmark.bench --batch "$B" --minibatch $((B / 4)) --response-len "$R" --threads 2 --steps 2 \
    --no-floors >> "$OUT"
done; done
python benchmark/perf_table.py "$OUT"
