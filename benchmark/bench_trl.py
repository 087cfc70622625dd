"""The peer: classic TRL PPO (trl 0.11.x `PPOTrainer.step`, `AutoModelForCausalLMWithValueHead`) on the same
random-init GPT-2 shapes as `python -m benchmark.bench`. Runs inside .venv-trl (see benchmark/bench_trl.sh).

Same work as our step: batch 64, 16-token queries, 24-token responses (fixed length), 4 PPO epochs,
minibatch 16, gradient clipping at 1.0, no dropout anywhere, fp32, CPU (`--device auto --precision bf16`: a GPU
with accelerate's bf16 autocast, for benchmark/gpu_check.sh). `PPOTrainer.step` gets the query and
response tensors and synthetic scores; it scores policy+values and reference once each, then trains.
Generation is timed apart, as the bare `generate` of the policy's LM (the same call our floor times) and as
TRL's own `PPOTrainer.generate`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmark.bench import SHAPES, model_shape, random_lm, sync_device  # noqa: E402  (torch + YAML only: runs in TRL's venv)

PAD = 0


def word_tokenizer(vocab_size: int):
    """An in-memory tokenizer (ids only; TRL needs one for padding) — nothing is downloaded."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t0")
    return hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--response-len", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--minibatch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "auto"), help="auto: accelerate's choice (a GPU)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: accelerate's autocast")
    ap.add_argument("--no-gemm-floor", dest="gemm_floor", action="store_false", help="skip the GEMM floor")
    a = ap.parse_args()

    import transformers
    import trl
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dims = model_shape(a.shape)
    dropout = {} if dims.get("arch") == "llama" else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    lm = random_lm(dims, **dropout, pad_token_id=PAD)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(lm, summary_dropout_prob=0.0)
    tokenizer = word_tokenizer(dims["vocab_size"])
    config = PPOConfig(
        batch_size=a.batch,
        mini_batch_size=a.minibatch,
        ppo_epochs=a.epochs,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        max_grad_norm=1.0,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        adap_kl_ctrl=True,
        init_kl_coef=0.1,
        kl_penalty="kl",
        seed=a.seed,
        log_with=None,
        accelerator_kwargs={"cpu": a.device == "cpu", "mixed_precision": "bf16" if a.precision == "bf16" else "no"},
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)  # ref = create_reference_model
    B, P, R = a.batch, a.prompt_len, a.response_len
    g = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(1, dims["vocab_size"], (B, P), generator=g).to(trainer.current_device)
    gen_kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=R, min_new_tokens=R)

    def bare_generate():
        with torch.inference_mode():
            mask = torch.ones_like(prompts)
            out = model.pretrained_model.generate(
                input_ids=prompts, attention_mask=mask, pad_token_id=PAD, use_cache=True, **gen_kwargs
            )
        return out[:, P:].clone()

    def trl_generate():
        return trainer.generate(list(prompts), batch_size=B, return_prompt=False, pad_token_id=PAD, **gen_kwargs)

    sync = functools.partial(sync_device, trainer.current_device)

    def timed(fn, n):
        ts, out = [], None
        for _ in range(n):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            ts.append(time.perf_counter() - t)
        return ts, out

    timed(bare_generate, a.warmup)
    gen_ts, responses = timed(bare_generate, a.steps)
    timed(trl_generate, a.warmup)
    trl_gen_ts, _ = timed(trl_generate, a.steps)
    queries, resp = list(prompts), list(responses)

    def step():
        scores = list(torch.randn(B, generator=g))
        trainer.step(queries, resp, scores)

    timed(step, a.warmup)
    step_ts, _ = timed(step, a.steps)
    gemm = None
    if a.gemm_floor:  # the GEMMs one more step dispatches, each timed alone (benchmark/gemm.py: torch only)
        from benchmark.gemm import GemmRecorder, gemm_fields, gemm_floor

        with GemmRecorder() as recorder:
            step()
        gemm = gemm_floor(recorder.calls)
    med = statistics.median
    rec = {
        "bench": "trl_ppo_step",
        "shape": a.shape,
        "model": dims,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch_size": B,
        "prompt_len": P,
        "response_len": R,
        "epochs": a.epochs,
        "minibatch_size": a.minibatch,
        "warmup": a.warmup,
        "steps": a.steps,
        "seconds": {
            "step": round(med(step_ts), 4),
            "generate_bare": round(med(gen_ts), 4),
            "generate_trl": round(med(trl_gen_ts), 4),
        },
        "seconds_all": {"step": [round(t, 4) for t in step_ts]},
        "train_tokens_per_s": round(a.epochs * B * (P + R) / med(step_ts), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
        "device": str(trainer.current_device),
        "precision": a.precision,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **({"gpu": torch.cuda.get_device_name()} if trainer.current_device.type == "cuda" else {}),
        },
    }
    if gemm is not None:
        rec.update(gemm_fields({"step": gemm}))
        rec["gemm_top_step"] = gemm["by_shape"][:6]
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
