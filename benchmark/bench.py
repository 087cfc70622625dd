"""Time PPO steps of the real trainer and print one JSON line.

    python -m benchmark.bench                                  # tiny shape (conf/model/tiny.yaml), batch 64
    python -m benchmark.bench --shape gpt2-small --batch 8     # GPT-2-small shape, random init
    python -m benchmark.bench --shape gpt2-mid --threads 2 --steps 3 --warmup 1

One step = `rollout.rollout` (generate with the KV cache, then one scoring pass each for policy + values and
reference) → synthetic task score + shaped rewards + GAE + whitening (the `ppo` functions train() calls) →
`algos.policy_update` (epochs × minibatches). The generation time is taken around `policy.lm.generate` inside
the real rollout; scoring = rollout − generation. Models are random-init GPT-2s (no download); EOS is
disabled so every response has exactly `response_len` tokens and every step does the same work.

Floors, timed in the same process on the same tokens: the model's bare `generate` (same sampling kwargs),
a bare inference forward of policy and reference (`lm(seqs).logits`), and a bare forward+backward+AdamW
step per minibatch (`lm(seqs, labels=seqs).loss`, epochs × minibatches). `overhead` = ours / floor.

`--kl-noise` instead measures the bf16 KL noise floor: the per-token batch KL (exact and k1) of a policy
moved slightly from the reference, on the same sampled rollouts, with the trunk in bf16 autocast vs fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Random-init shapes. "tiny" is read from conf/model/tiny.yaml (the embedded default reference); the GPT-2 shapes are
# GPT2Config arguments; "smollm2" is SmolLM2-135M's LlamaConfig (model=smollm2's converted config.json: 30 layers,
# width 576, 9 heads with 3 KV heads, SwiGLU 1536, vocabulary 49,152, tied embeddings), so the real LM's step is
# timed on both sides of the TRL comparison with the same random weights.
SHAPES: dict[str, dict[str, Any]] = {
    "gpt2-mid": {"n_layer": 6, "n_head": 8, "n_embd": 512, "vocab_size": 50257, "n_positions": 1024},
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024},
    "smollm2": {
        "arch": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
}
PAD = 0


DIMS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")


# The embedded default reference is a GPT-2 with exact GELU (reference.GPT2_ACTIVATION; GPT-2's own default is the
# tanh approximation "gelu_new"). The bench's tiny shape is that model on both sides of the TRL comparison; the
# literal is repeated here because this module must import without our dependencies in TRL's venv
# (tests/test_bench.py checks that the two agree).
TINY_ACTIVATION = "gelu"


def model_shape(shape: str) -> dict[str, Any]:
    """The GPT2Config arguments of a bench shape. Plain YAML and torch only: benchmark/bench_trl.py imports this in
    TRL's own venv (no hydra there), so the peer is timed on exactly these shapes."""
    if shape == "tiny":
        import yaml

        m = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml").read_text())
        return {**{k: int(m[k]) for k in DIMS}, "activation_function": TINY_ACTIVATION}
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}; valid: tiny, {', '.join(SHAPES)}")
    return dict(SHAPES[shape])


def context_len(dims: dict[str, Any]) -> int:
    """The context length of a bench shape's dims (GPT-2: n_positions, Llama: max_position_embeddings)."""
    return int(dims.get("n_positions") or dims["max_position_embeddings"])


def random_lm(dims: dict[str, Any], **extra):
    """A random-init causal LM of a bench shape: GPT2LMHeadModel or, for "arch": "llama", LlamaForCausalLM. Also
    imported by benchmark/bench_trl.py in TRL's venv (transformers 4.46 there)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    d = {k: v for k, v in dims.items() if k != "arch"}
    if dims.get("arch") == "llama":
        return LlamaForCausalLM(LlamaConfig(**d, **extra))
    return GPT2LMHeadModel(GPT2Config(**d, **extra))


def build_models(shape: str, seed: int = 0):
    """(reference, policy) — a random-init LM of the shape and PolicyWithValue.from_reference(it), as train()."""
    from kl_research.policy import PolicyWithValue, disable_dropout, fp32_attention_on_cpu, fuse_activations

    torch.manual_seed(seed)
    dims = model_shape(shape)
    ref = random_lm(dims, bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    ref.generation_config.eos_token_id = None
    ref.generation_config.bos_token_id = None
    disable_dropout(ref)
    fuse_activations(ref)  # as the trainer's loader does (reference._finish): GPT-2's gelu_new as one kernel
    fp32_attention_on_cpu(ref)  # and its attention (fp32 q/k/v under a bf16 trunk on a CPU)
    ref.eval().requires_grad_(False)
    policy = PolicyWithValue.from_reference(ref)
    policy.eval()
    return ref, policy, dims


class _Timer:
    """Wraps a callable; records the wall time of each call (used around policy.lm.generate)."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - t)


def versions() -> dict[str, Any]:
    import transformers

    from kl_research.runtime import cpu_features

    cpu = cpu_features()
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],  # runtime.BF16_FLAGS present: amx_tile, avx512_bf16, ...
        "amx": cpu["amx"],  # AMX tiles (bf16 matmuls in hardware); whether bf16 pays is what precision=auto measures
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = str(torch.version.cuda)
    return out


def sync_device(device: torch.device) -> None:
    """Wait for the GPU's queued work before a clock is read (CUDA runs asynchronously); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def bench(
    shape: str = "tiny",
    batch_size: int = 64,
    prompt_len: int = 16,
    response_len: int = 24,
    epochs: int | None = None,
    minibatch_size: int | None = None,
    warmup: int = 1,
    steps: int = 3,
    threads: int | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    floors: bool = True,
    seed: int = 0,
    compile: bool | str = False,
    sampler: str = "auto",
    compile_vocab: bool = False,
    workload: str = "trl",
    fused_vocab: bool | str = "auto",
    score_from_sampler: bool = True,
    fast_trunk: bool = True,
    onednn_fp32: bool | str = "auto",
) -> dict[str, Any]:
    """Median seconds per PPO step of the real trainer, split by phase, plus floors. Returns the JSON record.
    sampler: the trainer's `sampler` key (auto: the fast decode loop for GPT-2 shapes, generate otherwise).
    compile_vocab: the trainer's key (the update's vocabulary work through torch.compile; its compilation falls in the
    warm-up step, reported as warmup_seconds). workload: "trl" (TRL's classic step: −β·k1 in the reward, 4 epochs) or
    "train" (the trainer's defaults: sequence + exact KL, conf/ppo/default.yaml's epochs). fused_vocab: the trainer's
    key, auto | kernel | true | false (the exact-KL loss's hand-fused backward, as the C kernel or in torch ops;
    "trl" has no exact-KL loss, so it changes nothing there).
    score_from_sampler: the trainer's key (the policy's rollout logits and values from the fast sampler's steps).
    fast_trunk: the trainer's key (scoring and the update's forward in kl_research/gpt2.py's plain ops; the floors stay
    transformers' own calls). onednn_fp32: the trainer's key, auto | true | false (the fp32 GEMMs, the head's and an
    fp32 trunk's, through oneDNN; the bare-HF floors stay transformers' own calls)."""
    from kl_research.gpt2 import use_plain_trunk
    from kl_research.runtime import (
        autocast,
        peak_memory_mb,
        resolve_cache_dir,
        resolve_device,
        resolve_onednn_fp32,
        setup_allocator,
        setup_threads,
        use_onednn_fp32,
    )
    from kl_research.train import make_optimizer
    from kl_research.vocab_kernel import resolve_fused_vocab

    cfg = _bench_config(batch_size, response_len, precision, epochs, minibatch_size, workload)
    pcfg = cfg.ppo
    n_threads = setup_threads(threads)
    malloc_tuned = setup_allocator()
    dev = resolve_device(device)
    ref, policy, dims = build_models(shape, seed)
    ref.to(dev)
    policy.to(dev)
    onednn_fp32 = resolve_onednn_fp32(onednn_fp32, dev)[0]  # as the trainer resolves it
    for lm in (policy.lm, ref):
        use_plain_trunk(lm, fast_trunk)
        use_onednn_fp32(lm, onednn_fp32)
    fused_vocab = resolve_fused_vocab(fused_vocab, dev, resolve_cache_dir(None))[0]  # as the trainer resolves it
    choice = _precision_choice(cfg, policy, dev, precision, prompt_len)
    amp = autocast(dev, choice.precision)  # the record says what ran, and why (precision_source, precision_reason)
    _compile_and_check(compile, policy, ref, dims, prompt_len + response_len)
    optimizer = make_optimizer(policy, pcfg, dev)
    gen = torch.Generator().manual_seed(seed)
    shuffle_gen = torch.Generator().manual_seed(seed + 1)
    prompts = torch.randint(1, dims["vocab_size"], (batch_size, prompt_len), generator=gen).to(dev)
    kernel = fused_vocab == "kernel"  # the rollout's per-token numbers too, as the trainer's (CPU only, as resolved)
    roll = _trainer_rollout(policy, ref, prompts, pcfg, amp, response_len, sampler, score_from_sampler, kernel)
    with _timed_samplers(policy) as timers:
        step = functools.partial(
            _ppo_step, roll, prompts, policy, optimizer, pcfg, amp, gen, shuffle_gen, timers, compile_vocab, dev,
            fused_vocab,
        )  # fmt: skip
        warmup_s, runs = _run_steps(step, warmup, steps)
        med = _medians(runs)
        cpu = med.pop("cpu")  # process CPU seconds (all threads) per step: ≈ threads × total when the cores are ours
        rss = peak_memory_mb(torch.device("cpu"))["memory/peak_rss_mb"]  # the process's, as a run logs it
        rec = {
            **_record_head(shape, dims, policy, pcfg, batch_size, prompt_len, response_len, warmup, steps),
            **choice.record(),
            **_record_body(compile, timers, compile_vocab, workload, pcfg, warmup_s, med, cpu, runs),
            "fused_vocab": fused_vocab,
            "score_from_sampler": score_from_sampler,
            "fast_trunk": fast_trunk,
            "onednn_fp32": onednn_fp32,
            **_record_rates(med, pcfg, batch_size, prompt_len, response_len, rss, dev, n_threads, malloc_tuned),
        }
    if floors:
        rec.update(
            _floor_fields(
                policy, ref, prompts, response_len, pcfg, roll, optimizer, shuffle_gen, amp, med, warmup, steps, seed
            )
        )
    return rec


def _bench_config(
    batch_size: int, response_len: int, precision: str, epochs: int | None, minibatch_size: int | None, workload: str
):
    """The trainer's composed config for the benchmark's workload (its batch, response length, precision, epochs)."""
    from kl_research.reference import compose_config

    # The benchmark workload is the classic PPO step TRL 0.11 runs (benchmark/bench_trl.py): −β·k1 in the reward and 4
    # epochs, whatever the training defaults are (they moved to the exact-KL loss and 2 epochs for controllability).
    overrides = [f"ppo.batch_size={batch_size}", f"ppo.response_length={response_len}", f"precision={precision}"]
    if workload == "trl":
        overrides += ["ppo.kl_mode=reward", "ppo.kl_penalty=k1", f"ppo.epochs={4 if epochs is None else epochs}"]
    elif epochs is not None:
        overrides.append(f"ppo.epochs={epochs}")
    if minibatch_size is not None:
        overrides.append(f"ppo.minibatch_size={minibatch_size}")
    return compose_config(overrides)


def _precision_choice(cfg, policy, dev: torch.device, precision: str, prompt_len: int):
    """The precision choice (runtime.resolve_precision) as the trainer makes it for this shape and workload."""
    from kl_research.precision_probe import Workload, auto_precision
    from kl_research.reference import resolve_cache_dir
    from kl_research.runtime import resolve_precision

    # precision=auto as the trainer resolves it: bf16 on CUDA; on a CPU the cached probe of this shape and workload
    return resolve_precision(
        dev,
        precision,
        probe=lambda: auto_precision(
            policy, Workload.of(cfg.ppo, prompt_len), dev, resolve_cache_dir(cfg.get("cache_dir"))
        ),
    )


def _compile_and_check(compile: bool | str, policy, ref, dims: dict[str, Any], seq_len: int) -> None:
    """None; compiles the trunks when asked, raises ValueError when prompt + response exceed the context."""
    if compile:
        from kl_research.policy import compile_trunks

        compile_trunks(compile, policy.lm, ref)
    if seq_len > context_len(dims):
        raise ValueError(f"prompt_len + response_len = {seq_len} > context {context_len(dims)}")


def _trainer_rollout(
    policy,
    ref,
    prompts: torch.Tensor,
    pcfg,
    amp,
    response_len: int,
    sampler: str,
    score_from_sampler: bool = True,
    kernel: bool = False,
):
    """The trainer's rollout on these prompts as a no-argument callable (EOS off: every response has R tokens)."""
    from kl_research.algos import uses_exact_kl_loss
    from kl_research.rollout import rollout

    return functools.partial(
        rollout,
        policy,
        ref,
        prompts,
        response_length=response_len,
        temperature=pcfg.temperature,
        eos_token_id=None,
        pad_token_id=PAD,
        amp=amp,
        keep_ref_logprobs=uses_exact_kl_loss(pcfg),
        sampler=sampler,
        score_from_sampler=score_from_sampler,
        kernel=kernel,
    )


@contextlib.contextmanager
def _timed_samplers(policy):
    """(generate's timer, the fast sampler's timer), installed in their place while the context lasts."""
    import kl_research.rollout as rollout_module

    timer = _Timer(policy.lm.generate)
    policy.lm.generate = timer  # instance attribute: rollout() calls it as policy.lm.generate(...)
    fast_timer = _Timer(rollout_module.sample)  # the fast sampler, which rollout() calls by its module-level name
    rollout_module.sample = fast_timer
    try:
        yield timer, fast_timer
    finally:
        policy.lm.generate = timer.fn
        rollout_module.sample = fast_timer.fn


def _ppo_step(
    roll,
    prompts,
    policy,
    optimizer,
    pcfg,
    amp,
    gen,
    shuffle_gen,
    timers,
    compile_vocab: bool,
    dev: torch.device,
    fused_vocab: bool | str = True,
) -> dict[str, float]:
    """One PPO step's seconds per phase (and its process CPU seconds): rollout of prompts, advantages, update."""
    from kl_research.algos import PPO, policy_update

    B, P = prompts.shape
    timer, fast_timer = timers
    sync_device(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    batch = roll()
    sync_device(dev)
    t1 = time.perf_counter()
    scores = torch.randn(B, generator=gen).to(dev)  # synthetic task score (the reward model is not timed)
    advantages, returns = PPO(pcfg).advantages(batch, scores, 0.1)
    sync_device(dev)
    t2 = time.perf_counter()
    policy.train()
    policy_update(PPO(pcfg), policy, optimizer, batch, advantages, returns, P, amp, shuffle_gen, 0.1, compile_vocab,
                  fused_vocab)  # fmt: skip
    policy.eval()
    sync_device(dev)
    t3 = time.perf_counter()
    if timer.times and fast_timer.times:
        raise RuntimeError("one rollout called both samplers")
    g = (fast_timer.times or timer.times)[-1]
    return {
        "cpu": time.process_time() - c0,
        "generate": g,
        "score": t1 - t0 - g,
        "advantages": t2 - t1,
        "update": t3 - t2,
        "total": t3 - t0,
    }


def _run_steps(step, warmup: int, steps: int) -> tuple[float, list[dict[str, float]]]:
    """(the warm-up's seconds, each timed step's phases): warmup untimed steps, then steps timed ones."""
    t_warm = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t_warm  # includes torch.compile's compilation with --compile
    return warmup_s, [step() for _ in range(steps)]


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median over the steps of each phase, plus score_and_update (score + advantages + update)."""
    med = {k: _median([r[k] for r in runs]) for k in runs[0]}
    med["score_and_update"] = _median([r["score"] + r["advantages"] + r["update"] for r in runs])
    return med


def _record_head(shape: str, dims, policy, pcfg, B: int, P: int, R: int, warmup: int, steps: int) -> dict:
    """The record's first fields: what was benchmarked (shape, size, batch, lengths, epochs, steps)."""
    return {
        "bench": "ppo_step",
        "shape": shape,
        "model": dims,
        "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
        "batch_size": B,
        "prompt_len": P,
        "response_len": R,
        "epochs": pcfg.epochs,
        "minibatch_size": pcfg.minibatch_size,
        "warmup": warmup,
        "steps": steps,
    }


def _record_body(compile, timers, compile_vocab: bool, workload: str, pcfg, warmup_s, med, cpu, runs) -> dict:
    """The record's fields after the precision's: the step's settings and its seconds (medians and every step's)."""
    return {
        "compile": compile,
        "sampler": "fast" if timers[1].times else "hf",
        "compile_vocab": compile_vocab,
        "workload": workload,
        "kl_mode": pcfg.kl_mode,
        "warmup_seconds": round(warmup_s, 2),
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "cpu_seconds_per_step": round(cpu, 4),
        "seconds_all": {k: [round(r[k], 4) for r in runs] for k in runs[0] if k != "cpu"},
    }


def _record_rates(med, pcfg, B: int, P: int, R: int, rss: float, dev, n_threads: int, malloc_tuned) -> dict:
    """The record's last fields: tokens per second, peak memory, threads, device and versions."""
    return {
        "gen_tokens_per_s": round(B * R / med["generate"], 1),
        "train_tokens_per_s": round(pcfg.epochs * B * (P + R) / med["update"], 1),
        "step_tokens_per_s": round(B * R / med["total"], 1),
        "peak_rss_mb": round(rss, 1),
        **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)} if dev.type == "cuda" else {}),
        "threads": n_threads,
        "malloc_tuned": malloc_tuned,
        "device": str(dev),
        "versions": versions(),
    }


def _floor_fields(
    policy, ref, prompts, R: int, pcfg, roll, optimizer, shuffle_gen, amp, med, warmup: int, steps: int, seed: int
) -> dict:
    """The record's floor fields: floor seconds, overhead (ours / floor), the GEMM floors and their share."""
    from benchmark.gemm import gemm_fields

    B = prompts.shape[0]
    n_mb = pcfg.epochs * -(-B // pcfg.minibatch_size)
    fl = floor_times(policy, ref, prompts, R, pcfg, n_mb, steps, warmup, amp, seed)
    out: dict[str, Any] = {"floor_seconds": {k: round(v, 4) for k, v in fl.items()}}
    out["overhead"] = {
        "generate": round(med["generate"] / fl["generate"], 3),
        "score": round(med["score"] / fl["score"], 3),
        "update": round(med["update"] / fl["update"], 3),
        "total": round(med["total"] / (fl["generate"] + fl["score"] + fl["update"]), 3),
    }
    gf = gemm_floors(roll, policy, prompts, R, pcfg, optimizer, shuffle_gen, amp)
    out.update(gemm_fields(gf))
    out["gemm_share"] = {  # fraction of our measured time that the GEMMs alone would take
        k: round(gf[k]["seconds"] / med[k], 3) for k in ("generate", "score", "update")
    }
    out["gemm_top_update"] = gf["update"]["by_shape"][:6]
    return out


def gemm_floors(roll, policy, prompts, R, pcfg, optimizer, shuffle_gen, amp) -> dict[str, dict[str, Any]]:
    """The GEMMs one step of the real trainer dispatches (benchmark.gemm), timed alone, per phase.

    Recorded on one extra step after the timed ones: the rollout, the bare `generate` alone (the same shapes:
    EOS is off, so generation always runs R steps), score = rollout − generate, and one `policy_update`.
    """
    from benchmark.gemm import GemmRecorder, gemm_floor
    from kl_research import ppo
    from kl_research.algos import PPO, policy_update
    from kl_research.rollout import sampling_kwargs

    B, P = prompts.shape
    with GemmRecorder() as rec_roll:
        batch = roll()
    with GemmRecorder() as rec_gen, torch.inference_mode(), amp:
        policy.lm.generate(input_ids=prompts, **sampling_kwargs(prompts, pcfg.temperature, R, None, PAD))
    mask = batch["mask"]
    advantages = ppo.masked_whiten(torch.randn(B, R, device=mask.device), mask)
    returns = torch.randn(B, R, device=mask.device)
    policy.train()
    with GemmRecorder() as rec_upd:
        policy_update(PPO(pcfg), policy, optimizer, batch, advantages, returns, P, amp, shuffle_gen)
    policy.eval()
    score_calls = rec_roll.calls - rec_gen.calls
    return {
        "generate": gemm_floor(rec_gen.calls),
        "score": gemm_floor(score_calls),
        "update": gemm_floor(rec_upd.calls),
    }


def floor_times(policy, ref, prompts, R, pcfg, n_minibatches, steps, warmup, amp, seed) -> dict[str, float]:
    """Median seconds of the bare HF calls doing the same work: generate, 2 forwards, forward+backward+AdamW."""
    from kl_research.rollout import sampling_kwargs

    lm = policy.lm
    B = prompts.shape[0]
    mb = pcfg.minibatch_size
    gen_kwargs = sampling_kwargs(prompts, pcfg.temperature, R, None, PAD)  # exactly the trainer's settings
    with torch.inference_mode():
        seqs = lm.generate(input_ids=prompts, **gen_kwargs)
    seqs = seqs.clone()  # a normal tensor (inference tensors cannot be saved for backward)
    opt = torch.optim.AdamW(lm.parameters(), lr=pcfg.lr, eps=pcfg.adam_eps, weight_decay=0.0)

    def gen_floor():
        with torch.inference_mode(), amp:
            lm.generate(input_ids=prompts, **gen_kwargs)

    def score_floor():
        with torch.inference_mode(), amp:
            lm(seqs)
            ref(seqs)

    def update_floor():
        lm.train()
        for i in range(n_minibatches):
            s = (i * mb) % B
            x = seqs[s : s + mb]
            with amp:
                loss = lm(x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        lm.eval()

    sync = functools.partial(sync_device, prompts.device)
    out = {}
    for name, fn in (("generate", gen_floor), ("score", score_floor), ("update", update_floor)):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        out[name] = _median(ts)
    return out


# ------------------------------------------------------------------------------------------ KL noise floor
def kl_noise_floor(
    shape: str = "tiny",
    batch_size: int = 64,
    prompt_len: int = 16,
    response_len: int = 24,
    move: float = 0.05,
    threads: int | None = None,
    seed: int = 0,
    ref_model=None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Batch KL (nats/token, exact and k1) of a moved policy vs its reference, fp32 vs bf16 trunk, same rollouts.

    The policy is the reference with every weight matrix perturbed by `move` × its own std (a stand-in for a few
    PPO steps). Rollouts are sampled once in fp32; both precisions score the same tokens.
    """
    from kl_research import ppo
    from kl_research.kl import exact_token_kl, masked_mean, token_kl
    from kl_research.policy import score_lm
    from kl_research.runtime import resolve_device, setup_threads

    n_threads = setup_threads(threads)
    dev = resolve_device(device)
    if ref_model is None:
        ref, policy, dims = build_models(shape, seed)
    else:
        from kl_research.policy import PolicyWithValue

        ref, dims = ref_model, {"vocab_size": ref_model.config.vocab_size}
        policy = PolicyWithValue.from_reference(ref)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in policy.lm.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * move)
    ref.to(dev).eval()
    policy.to(dev).eval()
    prompts = torch.randint(1, dims["vocab_size"], (batch_size, prompt_len), generator=g).to(dev)
    torch.manual_seed(seed)
    with torch.inference_mode():
        seqs = policy.lm.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=response_len,
            min_new_tokens=response_len,
            pad_token_id=PAD,
        )
    response = seqs[:, prompt_len:]
    mask = torch.ones_like(response, dtype=torch.bool)
    out: dict[str, Any] = {"bench": "kl_noise_floor", "shape": shape, "batch_size": batch_size, "move": move}
    for name, ctx in (
        ("fp32", contextlib.nullcontext()),
        ("bf16", torch.autocast(dev.type, dtype=torch.bfloat16)),
    ):
        with torch.inference_mode(), ctx:
            logits, _ = score_lm(policy.lm, seqs, prompt_len)
            ref_logits, _ = score_lm(ref, seqs, prompt_len)
        logp = ppo.gather_logprobs(logits, response, 1.0)
        ref_logp = ppo.gather_logprobs(ref_logits, response, 1.0)
        out[name] = {
            "exact": float(masked_mean(exact_token_kl(logits, ref_logits), mask)),
            "k1": float(masked_mean(token_kl(logp, ref_logp, "k1"), mask)),
            "logp": logp,
        }
    d_tok = (out["bf16"]["logp"] - out["fp32"]["logp"]).abs()
    for name in ("fp32", "bf16"):
        del out[name]["logp"]
    out["abs_err"] = {k: abs(out["bf16"][k] - out["fp32"][k]) for k in ("exact", "k1")}
    out["max_abs_err_token_logp"] = float(d_tok.max())
    out["threads"] = n_threads
    out["device"] = str(dev)
    out["versions"] = versions()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="tiny | gpt2-mid | gpt2-small | smollm2 (Llama 30×576)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--response-len", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=None, help="default: 4, as TRL's peer (benchmark/bench_trl.py)")
    ap.add_argument("--minibatch", type=int, default=None, help="default: conf/ppo/default.yaml")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: $SLURM_CPUS_PER_TASK, else all cores")
    ap.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (cuda when there is one)")
    ap.add_argument("--no-floors", action="store_true", help="skip the bare generate / forward / backward floors")
    ap.add_argument("--kl-noise", action="store_true", help="measure the bf16-vs-fp32 KL noise floor instead")
    ap.add_argument("--move", type=float, default=0.05, help="--kl-noise: weight perturbation (× weight std)")
    ap.add_argument(
        "--ref-path", default=None, help="--kl-noise: a saved causal LM as the reference (e.g. the tiny cache)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=False,
        help="torch.compile the scoring/update trunk; optional mode: default | reduce-overhead (CUDA graphs) | ...",
    )
    ap.add_argument("--sampler", default="auto", choices=("auto", "fast", "hf"), help="the trainer's `sampler` key")
    ap.add_argument("--compile-vocab", action="store_true", help="the trainer's compile_vocab=true")
    ap.add_argument("--workload", default="trl", choices=("trl", "train"), help="TRL's classic step or our defaults")
    ap.add_argument(
        "--fused-vocab", default="auto", choices=("auto", "kernel", "true", "false"), help="the trainer's fused_vocab"
    )
    ap.add_argument("--no-score-from-sampler", action="store_true", help="the trainer's score_from_sampler=false")
    ap.add_argument("--no-fast-trunk", action="store_true", help="the trainer's fast_trunk=false")
    ap.add_argument(
        "--onednn-fp32", default="auto", choices=("auto", "true", "false"), help="the trainer's onednn_fp32 key"
    )
    a = ap.parse_args(argv)
    if a.kl_noise:
        ref = None
        if a.ref_path:  # through the trainer's loader: its fused GELU and CPU attention (reference._finish)
            from kl_research.reference import load_pretrained

            ref = load_pretrained(a.ref_path)[0].eval().requires_grad_(False)
        rec = kl_noise_floor(a.shape, a.batch, a.prompt_len, a.response_len, a.move, a.threads, a.seed, ref, a.device)
        if a.ref_path:
            rec["shape"] = a.ref_path
    else:
        rec = bench(
            a.shape,
            a.batch,
            a.prompt_len,
            a.response_len,
            a.epochs,
            a.minibatch,
            a.warmup,
            a.steps,
            a.threads,
            a.precision,
            a.device,
            not a.no_floors,
            a.seed,
            a.compile,
            a.sampler,
            a.compile_vocab,
            a.workload,
            {"true": True, "false": False}.get(a.fused_vocab, a.fused_vocab),
            not a.no_score_from_sampler,
            not a.no_fast_trunk,
            {"true": True, "false": False}.get(a.onednn_fp32, a.onednn_fp32),
        )
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())
