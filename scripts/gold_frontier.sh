#!/bin/bash
# Issue 30: reward over-optimisation (Gao, Schulman & Hilton 2022, arXiv 2210.10760) on the embedded default. The fixed-β
# frontier (conf/sweep/frontier.yaml: 6 β × 5 seeds) trained on a learned proxy RM of each size n (reward=learned,
# reward.n_labels), with the gold (VADER) and the second gold (AFINN) measured beside the proxy on held-out prompts at
# every eval step (docs/gold.md). 6 β × 5 seeds × 3 n = 90 jobs in one sweep dir, named <β>_<seed>_n_labels=<n>; the
# three reward models are built once each, before any job (conf/sweep.yaml's callbacks), and cached.
#   bash scripts/gold_frontier.sh                              # the whole grid (here: 2 jobs × 1 thread at a time)
#   bash scripts/gold_frontier.sh sweep.seeds=[0,1] steps=60   # any extra override, as for sweep.py
#   bash scripts/gold_frontier.sh pilot                        # the pilot first: scripts/gold_pilot.py reads it
#   bash scripts/gold_frontier.sh grid                         # the grid the pilot sized (docs/gold.md), after it
#   bash scripts/gold_frontier.sh controllers                  # then the controllers around its gold peak
# Analysis (per proxy size; runs of two sizes must not be pooled): docs/gold.md, "Reading a gold sweep".
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
cache=$(python -c "from kl_research.runtime import resolve_cache_dir; print(resolve_cache_dir(None))")/reward_model

rms_from_repo() {  # the committed RMs (results/gold/reward_models/) into the cache, where one is not there yet
  mkdir -p "$cache"
  for rm in results/gold/reward_models/learned-*/; do
    [ -d "$rm" ] && [ ! -e "$cache/$(basename "$rm")/meta.json" ] && cp -r "$rm" "$cache/" && echo "RM from the repo: $rm"
  done
  return 0  # a cached RM ends the loop on a false test: under set -e that status must not end the script
}
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
if [ "${1:-}" = grid ]; then
  # the registered grid (docs/gold.md, "The grid: pre-registration"): n ∈ {350, 500, 2000} × fixed β ∈ {0.01, 0.03,
  # 0.1, 0.3} × fresh seeds 1-3 (the pilot used seed 0), 300 rollouts, a gold evaluation every 20, fp32 pinned. The
  # reward models are part of the experiment: their training texts are π_ref's samples, which differ between CPU
  # kinds, so the same n gives a different RM on another machine. The RMs the grid used are committed under
  # results/gold/reward_models/ and copied into the cache before any stage runs, so that the controller stage (and a
  # reader's rerun) trains on the very proxies the grid measured.
  shift
  rms_from_repo
  python sweep.py sweep=frontier sweep.name="${NAME:-gold_grid}" reward=learned reward.n_labels="${NS:-350,500,2000}" \
    "sweep.fixed_betas=[${BETAS:-0.01,0.03,0.1,0.3}]" "sweep.seeds=[1,2,3]" steps=300 eval_every=20 \
    checkpoint_every=50 precision=fp32 "$@"
  # keep the RMs this grid trained on (meta.json's key names n; the dir name hashes the whole key)
  python - "$cache" "${NS:-350,500,2000}" <<'PY'
import json, pathlib, shutil, sys
cache, ns = pathlib.Path(sys.argv[1]), {int(n) for n in sys.argv[2].split(",")}
out = pathlib.Path("results/gold/reward_models")
for meta in sorted(cache.glob("learned-*/meta.json")):
    if json.loads(meta.read_text())["key"]["reward"]["n_labels"] in ns and not (out / meta.parent.name).exists():
        shutil.copytree(meta.parent, out / meta.parent.name)
        print("RM kept:", out / meta.parent.name)
PY
  exit
fi
if [ "${1:-}" = controllers ]; then
  # the controller stage (docs/gold.md, registered before the grid): adaptive and pid_ci at KL*·{1/2, 1, 2} from the
  # grid's pooled n = 350 Gao fit, β₀ from its frontier, seeds 1-3, the same evaluations; one sweep per target
  # (β₀ differs). Needs results/gold/points.csv and frontier.csv (make_gold.py on the grid) and the committed RMs.
  shift
  rms_from_repo
  # a command substitution, not `< <(...)`: a process substitution's exit status is lost, so a fit without a peak
  # (gold_targets.py exits 1) would end this stage silently with status 0
  if ! targets=$(python scripts/gold_targets.py results/gold --n 350); then
    echo "gold_frontier.sh controllers: no targets (gold_targets.py above says why); the stage does not run" >&2
    exit 1
  fi
  mapfile -t rows <<< "$targets"
  for row in "${rows[@]}"; do
    read -r tau b0 <<< "$row"
    python sweep.py sweep.name="gold_controllers_tau${tau}" reward=learned reward.n_labels=350 \
      'sweep.controllers=[adaptive,pid_ci]' "sweep.targets=[$tau]" "controller.init_kl_coef=$b0" \
      controller.kl_coef_max=100 "sweep.seeds=[1,2,3]" steps=300 eval_every=20 checkpoint_every=50 precision=fp32 \
      "$@" || echo "!!! gold_controllers_tau${tau} failed"
  done
  exit
fi
python sweep.py sweep=frontier sweep.name=gold_frontier reward=learned reward.n_labels=500,2000,8000 "$@"
