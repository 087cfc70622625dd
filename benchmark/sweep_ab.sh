#!/usr/bin/env bash
# Before/after of a whole 10-job sweep (adaptive, pid x 5 seeds at target 0.05; 2 jobs x 1 thread, as sweep.py runs
# on this machine), each side from its own clean clone, in the order A B B A (a VM's slow drift then falls on both
# sides), then the job-by-job comparison (benchmark/sweep_pairs.py: identical trajectories, or paired TOSTs).
# Run from the repo root on an otherwise idle machine (~30 min at the tiny default); record the CPU it prints.
#
#   bash benchmark/sweep_ab.sh fa8ad5e HEAD                         # precision=auto on both sides
#   PRECISION_A=fp32 PRECISION_B=bf16 bash benchmark/sweep_ab.sh HEAD HEAD
#   EXTRA_A="hydra.launcher.fork_server=false" bash benchmark/sweep_ab.sh HEAD HEAD    # one config switch, A off
set -euo pipefail
REF_A=$1 REF_B=$2
PA=${PRECISION_A:-auto} PB=${PRECISION_B:-auto}
EXTRA=${EXTRA:-}  # more overrides for every job, e.g. EXTRA="steps=3" for a smoke test
EXTRA_A=${EXTRA_A:-} EXTRA_B=${EXTRA_B:-}  # and for one side's sweeps only
WORK=${WORK:-$(mktemp -d /tmp/sweep_ab.XXXX)}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
repo=$(pwd)
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'); A=$REF_A precision=$PA, B=$REF_B precision=$PB; in $WORK"
for side in A B; do
  ref=REF_$side
  git clone -q "$repo" "$WORK/$side" && git -C "$WORK/$side" checkout -q "$(git rev-parse "${!ref}")"
done
run() {  # side round precision
  local dir=$WORK/$1 s e side_extra
  side_extra=EXTRA_$1
  s=$(date +%s.%N)
  # shellcheck disable=SC2086  # EXTRA is word-split on purpose
  (cd "$dir" && python sweep.py sweep.name="$1$2" sweep.fresh=true 'sweep.controllers=[adaptive,pid]' \
    'sweep.targets=[0.05]' 'sweep.seeds=[0,1,2,3,4]' wandb.mode=disabled sweep.report=false precision="$3" \
    sweep.root="$dir/sw" $EXTRA ${!side_extra} > "$dir/$1$2.log" 2>&1)
  e=$(date +%s.%N)
  echo "sweep $1 round $2 ($(git -C "$dir" rev-parse --short HEAD), precision=$3 ${!side_extra}): wall $(python -c "print(round($e - $s, 1))") s"
}
run A 1 "$PA"
run B 1 "$PB"
run B 2 "$PB"
run A 2 "$PA"
for r in 1 2; do
  python -m benchmark.sweep_pairs "$(ls -d "$WORK"/A/sw/A$r/*/)" "$(ls -d "$WORK"/B/sw/B$r/*/)" \
    --out "$WORK/pairs_$r.jsonl"
done
