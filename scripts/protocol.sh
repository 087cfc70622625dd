#!/bin/bash
# Protocol v2 (docs/results.md "Protocol v2: pre-registration", conf/analysis/protocol.yaml): every sweep, resumable,
# from a clean clone so that edits to a working tree cannot change jobs that start later. Stages, in order:
#   tuning   the dense fixed-β frontier on the tuning seeds (PPO), T rollouts
#   tuned    β*(τ) from it (scripts/make_protocol.py --tuning) → results/protocol/tuning/tuned_betas.json
#   eval     on the evaluation seeds, one seed block after another (deviation 3): adaptive and pid_ci at the five
#            targets (β₀ 0.5); the fixed arms (β*(τ), and β*(τ)·{0.1, 10} at 0.02 and 0.1); the misspecification arm
#            (adaptive and pid_ci from β₀ = β*(τ)·{0.1, 10} at 0.02 and 0.1). SEEDS="1000 1001" runs some blocks only
#            then the seed's static β₀ 0.5 (deviation 6)
#   seedstatic  the seed's static β₀ 0.5 alone, for blocks that ran before deviation 6 (SEEDS="1000 1001")
#   collect  compact the finished evaluation runs into <repo>/results/protocol/runs/ and run the analysis
#   (pid and the GRPO subset were registered and are not run: protocol.yaml, deviation 3)
# Usage:
#   git clone <repo> /work/protocol && cd /work/protocol
#   setsid nohup bash scripts/protocol.sh tuning > protocol.log 2>&1 &        # re-run the same to resume
#   bash scripts/protocol.sh tuned <repo>                                       # writes <repo>/results/protocol/tuning
#   setsid nohup bash scripts/protocol.sh eval <repo> > protocol.log 2>&1 &    # reads its tuned_betas.json
#   bash scripts/protocol.sh collect <repo>                                     # writes <repo>/results/protocol
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline} PYTHONPATH=$PWD
T=${T:-400}  # the job length chosen after the stationarity pilot (conf/analysis/protocol.yaml deviations: 1)
# precision pinned to fp32: what precision=auto resolved to on the tuning sweep's CPU (AMD EPYC, no AMX); on an AMX
# Xeon auto may pick bf16, and the evaluation arms must differ from the tuning frontier in seed only (deviation 5)
EVERY="steps=$T eval_every=100 checkpoint_every=50 precision=fp32"
# √2 apart from 0.125 to 4 (KL ~0.4 to ~0.005 at 400 rollouts by the pilot: β 0.1 → 0.51, β 10 → 0.002), and 0.1
BETAS=${BETAS:-0.1,0.125,0.1768,0.25,0.3536,0.5,0.7071,1,1.414,2,2.828,4}
TUNING="[500,501,502]"
EVAL="[1000,1001,1002,1003,1004]"

betas_from() {  # tuned β*(τ) for the targets and the misspecified decades at 0.02 and 0.1 (not the seed's 0.5: deviation 3)
  python - "$1" <<'PY'
import json, sys
b = {float(k): v for k, v in json.load(open(sys.argv[1])).items()}
fixed = sorted({round(v, 4) for v in b.values()} | {round(b[t] * f, 4) for t in (0.02, 0.1) for f in (0.1, 10)})
print(",".join(f"{x:g}" for x in fixed))
for t in (0.02, 0.1):
    for f in (0.1, 10):
        print(f"{t:g}:{b[t] * f:.4g}")
PY
}

seed_static() {  # deviation 6: fixed β₀ = 0.5, the seed's static β (H4), judged against every target
  python sweep.py sweep=frontier sweep.name="protocol_seed_s$1" "sweep.fixed_betas=[0.5]" "sweep.seeds=[$1]" $EVERY \
    || echo "!!! protocol_seed_s$1 failed"
}

case "${1:-}" in
  tuning)
    python sweep.py sweep=frontier sweep.name=protocol_tuning "sweep.fixed_betas=[$BETAS]" "sweep.seeds=$TUNING" $EVERY
    ;;
  tuned)
    src=$(ls -d multirun/protocol_tuning/*/ | sort | tail -1)
    python scripts/compact_runs.py "$src" "$2/results/protocol/tuning/runs"
    (cd "$2" && python scripts/make_protocol.py --tuning results/protocol/tuning/runs --out results/protocol)
    ;;
  eval)
    # deviation 3 (conf/analysis/protocol.yaml): adaptive, pid_ci and the tuned static only, in seed blocks: every arm
    # of one evaluation seed before the next seed, so that wherever the runs stop every comparison is paired
    tuned="$2/results/protocol/tuning/tuned_betas.json"
    mapfile -t lines < <(betas_from "$tuned")
    for seed in ${SEEDS:-1000 1001 1002 1003 1004}; do
      cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
      echo "=== evaluation seed $seed: $(date -u +%FT%TZ) on $cpu"
      echo "$seed,$(date -u +%FT%TZ),\"$cpu\",$(nproc)" >> protocol_cpus.csv  # collect → results/protocol/cpus.csv
      # a sweep with a failed job says so in its report and here, and the block goes on (re-running resumes it)
      python sweep.py sweep.name="protocol_grid_s$seed" 'sweep.controllers=[adaptive,pid_ci]' \
        'sweep.targets=[0.01,0.02,0.05,0.1,0.2]' "sweep.seeds=[$seed]" $EVERY || echo "!!! protocol_grid_s$seed failed"
      python sweep.py sweep=frontier sweep.name="protocol_fixed_s$seed" "sweep.fixed_betas=[${lines[0]}]" \
        "sweep.seeds=[$seed]" $EVERY || echo "!!! protocol_fixed_s$seed failed"
      for pair in "${lines[@]:1}"; do
        tau=${pair%%:*} b0=${pair#*:}
        # kl_coef_max 100: β₀ = 10·β*(0.02) may lie above the grid's bound of 10, which would clamp it at once (the
        # misspecification arm is compared with fixed β₀, which has no bound; β never nears 100 here)
        python sweep.py sweep.name="protocol_misspec_${tau}_${b0}_s$seed" 'sweep.controllers=[adaptive,pid_ci]' \
          "sweep.targets=[$tau]" "controller.init_kl_coef=$b0" controller.kl_coef_max=100 "sweep.seeds=[$seed]" \
          $EVERY || echo "!!! protocol_misspec_${tau}_${b0}_s$seed failed"
      done
      seed_static "$seed"
    done
    ;;
  seedstatic)
    # deviation 6: the seed's static β₀ 0.5 (H4) for blocks that ran before it was restored (SEEDS="1000 1001")
    for seed in ${SEEDS:?SEEDS=\"1000 1001\" names the blocks to catch up}; do seed_static "$seed"; done
    ;;
  collect)
    # every finished evaluation sweep → <repo>/results/protocol/runs/<sweep name>, then the analysis from all of them
    # (an unfinished sweep is left out, saying so: compact_runs refuses runs without summary.json)
    # blocks run from different clones (one per session), so the analysis reads every block already committed in
    # <repo>, not only this clone's multirun/, and cpus.csv gains this clone's rows instead of being replaced
    for src in multirun/protocol_{grid,fixed,misspec,seed}_*; do
      [ -d "$src" ] || continue
      dest="results/protocol/runs/$(basename "$src")"
      python scripts/compact_runs.py "$(ls -d "$src"/*/ | sort | tail -1)" "$2/$dest" || echo "left out: $src (unfinished)"
    done
    evals=()
    for dest in "$2"/results/protocol/runs/protocol_{grid,fixed,misspec,seed}_*; do
      [ -d "$dest" ] && evals+=(--eval "results/protocol/runs/$(basename "$dest")")
    done
    cpus="$2/results/protocol/cpus.csv"
    if [ -f protocol_cpus.csv ]; then
      { [ -f "$cpus" ] && tail -n +2 "$cpus"; cat protocol_cpus.csv; } | sort -u > cpus.tmp
      { echo "seed,started,cpu,cores"; cat cpus.tmp; } > "$cpus" && rm cpus.tmp
    fi
    (cd "$2" && python scripts/make_protocol.py --tuning results/protocol/tuning/runs "${evals[@]}" --out results/protocol)
    ;;
  *)
    echo "usage: bash $0 tuning | tuned <repo> | eval <repo> | seedstatic | collect <repo>" >&2
    exit 2
    ;;
esac
