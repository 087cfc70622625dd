#!/usr/bin/env bash
# Issue 31's "where the researcher feels it", for any two commits in one block on one machine: each side from its own
# clean clone, in the order A B B A (a VM's slow drift then falls on both sides):
#   1. `python train.py` as the README writes it (2 threads here, precision=auto): wall and median s/step of steps 11+;
#   2. the 10-job sweep (adaptive, pid x 5 seeds at target 0.05; 2 jobs x 1 thread, precision=auto) through
#      benchmark/sweep_ab.sh (its own clones in $WORK/sweep): wall, then the job-by-job comparison
#      (benchmark/sweep_pairs.py: per-job s/step, identical trajectories or paired TOSTs);
#   3. the issue's bench row (`python -m benchmark.bench --shape tiny --batch 64 --threads 2`, with floors), A then B;
#      (SKIP_SWEEP=1 skips it: a change that no sweep job runs, e.g. one that touches fp32 only where the sweep's
#      1-thread jobs pick bf16);
#   4. `benchmark/compare_trl.py --shape tiny --rounds 2` from each side (TRL 0.11.4 in .venv-trl; SKIP_TRL=1 skips;
#      VENV=$PWD/.venv-trl has both sides use this checkout's venv instead of building one in each clone).
# Each side warms up first (the reference model and the precision probes are cached), so no timed run builds them.
# Run from the repo root on an otherwise idle machine (~50 min on the 2-core Intel Xeon when A is the code before
# issue 31); record the CPU it prints. Everything lands in $WORK (printed); the summary lines go to stdout.
#
#   bash benchmark/before_after.sh f97eb0b HEAD                  # before issue 31's work against now
#   EXTRA="steps=12" SKIP_TRL=1 bash benchmark/before_after.sh HEAD HEAD     # a smoke test of the script (~10 min)
#   EXTRA_B="gold.prompts=0" bash benchmark/before_after.sh f97eb0b HEAD     # the same work on both sides (A has no gold)
set -euo pipefail
REF_A=$1 REF_B=$2
EXTRA=${EXTRA:-}  # more overrides for every train.py run and sweep job
EXTRA_A=${EXTRA_A:-} EXTRA_B=${EXTRA_B:-}  # and for one side's train.py runs and sweep jobs only
WORK=${WORK:-$(mktemp -d /tmp/before_after.XXXX)}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
repo=$(pwd)
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'); A=$(git rev-parse --short "$REF_A") B=$(git rev-parse --short "$REF_B"); in $WORK; $(date -u +%FT%TZ); EXTRA=$EXTRA EXTRA_A=$EXTRA_A EXTRA_B=$EXTRA_B"
for side in A B; do
  ref=REF_$side
  git clone -q "$repo" "$WORK/$side" && git -C "$WORK/$side" checkout -q "$(git rev-parse "${!ref}")"
done
now() { date +%s.%N; }
since() { python -c "print(round($(now) - $1, 1))"; }
for side in A B; do  # warm-up: the reference, the 1- and 2-thread precision probes
  (cd "$WORK/$side" && python train.py steps=2 threads=1 wandb.mode=disabled hydra.run.dir="$WORK/warm1_$side" \
    > "$WORK/warm1_$side.log" 2>&1 && python train.py steps=2 wandb.mode=disabled hydra.run.dir="$WORK/warm2_$side" \
    > "$WORK/warm2_$side.log" 2>&1)
done
train_run() {  # side round
  local s0 dir=$WORK/train_$1$2 side_extra=EXTRA_$1
  s0=$(now)
  # shellcheck disable=SC2086  # EXTRA is word-split on purpose
  (cd "$WORK/$1" && python train.py wandb.mode=disabled hydra.run.dir="$dir" $EXTRA ${!side_extra} > "$dir.log" 2>&1)
  python - "$dir" "$1" "$2" "$(since "$s0")" <<'PY'
import json
import sys

import pandas as pd

d, side, r, wall = sys.argv[1:]
m = pd.read_json(f"{d}/metrics.jsonl", lines=True)
s = json.load(open(f"{d}/summary.json"))
print(f"train.py {side} round {r}: wall {wall} s, {len(m)} steps, median s/step (steps 11+) "
      f"{m['time/step_s'].iloc[10:].median():.4f}, precision {s.get('precision')} ({s.get('precision_source')})")
PY
}
train_run A 1; train_run B 1; train_run B 2; train_run A 2
if [ -z "${SKIP_SWEEP:-}" ]; then
  PRECISION_A=auto PRECISION_B=auto WORK="$WORK/sweep" EXTRA="$EXTRA" EXTRA_A="$EXTRA_A" EXTRA_B="$EXTRA_B" \
    bash "$repo/benchmark/sweep_ab.sh" "$REF_A" "$REF_B"
fi
for side in A B; do
  (cd "$WORK/$side" && python -m benchmark.bench --shape tiny --batch 64 --threads 2 > "$WORK/bench_$side.json" \
    2> "$WORK/bench_$side.err")
  python - "$WORK/bench_$side.json" "$side" <<'PY'
import json
import sys

d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
s, g = d["seconds"], d.get("gemm_floor_seconds", {})
print(f"bench {sys.argv[2]}: generate {s['generate']}, score {s['score']}, update {s['update']}, total {s['total']} s; "
      f"GEMMs alone {g}; precision {d.get('precision')}, sampler {d.get('sampler')}")
PY
done
if [ -z "${SKIP_TRL:-}" ]; then
  for side in A B; do
    (cd "$WORK/$side" && python benchmark/compare_trl.py --shape tiny --rounds 2 --out "$WORK/trl_$side.jsonl" \
      > "$WORK/trl_$side.out" 2> "$WORK/trl_$side.err")
    python -c "import json, sys; d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); \
print(f\"compare_trl {sys.argv[2]}: TRL / ours {d['trl_over_ours']} (median {d['trl_over_ours_median']})\")" \
      "$WORK/trl_$side.out" "$side"
  done
fi
