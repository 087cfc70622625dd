#!/usr/bin/env bash
# The peer: classic TRL PPO (trl 0.11.x PPOTrainer.step + AutoModelForCausalLMWithValueHead) on the same
# random-init GPT-2 shapes as `python -m benchmark.bench`, in its own venv (TRL 0.11 needs transformers 4.4x).
#   bash benchmark/bench_trl.sh --shape gpt2-mid --threads 2        # args go to benchmark/bench_trl.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-trl}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "from trl import PPOTrainer" 2>/dev/null; then
  python -m venv "$VENV"
  # torch pinned to the project's version: an unpinned torch pulls the CUDA build (GBs); with the CPU wheel in
  # pip's find-links (here /opt/wheels) `2.13.0+cpu` sorts above `2.13.0` and is taken
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q "trl==0.11.4" "transformers==4.46.3" "accelerate==1.1.1" "datasets<4" rich
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
exec "$VENV/bin/python" benchmark/bench_trl.py "$@"
