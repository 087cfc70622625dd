#!/usr/bin/env bash
# Issue 31's before/after, in one run on an otherwise idle machine (check `uptime`); every line is appended to
# results/fast_paths.jsonl and the CPU is recorded in each record. ~35 min on the 2-core VM.
#   before = sampler=hf compile_vocab=false (HF generate, eager vocabulary work); after = the defaults
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
OUT=${OUT:-results/fast_paths.jsonl}
CPU=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
note() { python -c "import json,sys; print(json.dumps({'bench': 'note', 'cpu': sys.argv[1], 'what': sys.argv[2]}))" "$CPU" "$1" >> "$OUT"; }
# 1. the bench table (TRL's classic step and our defaults), 2 threads, median of 3 steps, floors and GEMMs
for wl in trl train; do
  for args in "--sampler hf" "--sampler fast" "--sampler fast --compile-vocab"; do
    note "bench --workload $wl $args"
    python -m benchmark.bench --shape tiny --batch 64 --threads 2 --workload "$wl" $args >> "$OUT"
  done
done
# 2. python train.py's steady s/step (the default job, 2 threads): before, the fast sampler alone, both fast paths
for args in "sampler=hf compile_vocab=false" "compile_vocab=false" "compile_vocab=true"; do
  d=$(mktemp -d)
  note "train.py $args"
  /usr/bin/time -f '{"bench": "train_wall", "wall_s": %e}' python train.py threads=2 wandb.mode=disabled \
    hydra.run.dir="$d" $args 2>> "$OUT.time" > /dev/null
  tail -1 "$OUT.time" >> "$OUT"
  python - "$d" "$args" >> "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
steps = [r["time/step_s"] for r in rows[10:]]
print(json.dumps({"bench": "train_steady", "args": sys.argv[2], "median_step_s": statistics.median(steps),
                  "steps": len(rows), "wall_s": json.load(open(f"{sys.argv[1]}/summary.json")).get("elapsed_s")}))
PY
done
# 3. a 10-job sweep's wall time (2 jobs x 1 thread), before and after (both fast paths)
for args in "sampler=hf compile_vocab=false" "compile_vocab=true"; do
  note "sweep 10 jobs $args"
  start=$(date +%s.%N)
  python sweep.py sweep.name=fastpaths_$(date +%s) sweep.fresh=true 'sweep.controllers=[adaptive,pid]' \
    'sweep.targets=[0.05]' 'sweep.seeds=[0,1,2,3,4]' wandb.mode=disabled sweep.report=false $args > /dev/null 2>&1
  python -c "import json,sys; print(json.dumps({'bench': 'sweep10_wall', 'args': sys.argv[1], 'wall_s': round(float(sys.argv[3]) - float(sys.argv[2]), 1)}))" \
    "$args" "$start" "$(date +%s.%N)" >> "$OUT"
done
# 4. against TRL 0.11.4 (TRL's step vs our score + update), alternating processes
note "compare_trl tiny (after)"
python benchmark/compare_trl.py --shape tiny --rounds 3 --ours-arg=--compile-vocab --out "$OUT" > /dev/null
tail -1 "$OUT"
