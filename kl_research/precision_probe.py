"""precision=auto on a CPU: time the trunk's work of a PPO step in fp32 and under bf16 autocast, keep the faster.

Whether a bf16 trunk pays on a CPU depends on the CPU *and* on the model's shape, so it is measured, not assumed.
On an Intel Xeon with AMX the tiny default's update was slower in bf16 (1.20-1.23 s vs 0.92-1.03 s fp32, batch 64,
2 threads) while gpt2-mid was 1.28x faster; since the CPU attention runs in fp32 under a bf16 trunk (policy._kl_sdpa)
the tiny default's whole step there is 1.11-1.23x faster in bf16 at 1 thread and this probe said 1.18x, under MARGIN;
with the head's backward GEMMs in bf16 too (policy.head_linear) it says 1.22x and picks bf16 (docs/performance.md).
On AVX2-only CPUs bf16 is ~8-20x slower at every size.

The probe times the real policy on random tokens of the run's shapes (its weights are not changed, its gradients are
cleared and the global RNG state is restored afterwards, so the run's trajectory does not depend on it):
- the update: forward + backward of `policy.score` on (minibatch, prompt + response) tokens, fp32 log-softmax;
- the scoring: an inference forward on (batch, prompt + response) tokens;
- the generation: `generate` of response_len tokens for (batch, prompt) tokens with the KV cache, as the rollout.
A step's model work is `updates` (= epochs x minibatches) of the first, 2 of the second (policy and reference) and
one of the third. fp32 and bf16 alternate after a warm-up round, and the medians are compared: bf16 is chosen only
when the step is at least MARGIN (1.2x) faster. The probe costs in proportion to what it has to tell apart (`done`):
one timed round when the answer is far from the margin either way (bf16 ≥ 1.25x slower or ≥ 1.8x faster), at least
3 and then up to a BUDGET_S of rounds when it is close (the tiny default on a Zen 5 CPU probes 1.10-1.15x).
(Generation matters: at the tiny default on a Zen 5 CPU the trunk passes alone are 1.15x faster in bf16, generation
not at all, and a whole training step 1.0-1.09x.)

An x86 CPU with AVX2 but neither AVX-512 nor AMX is not probed at all: it has no bf16 arithmetic, a bf16 trunk
measured 7.5-20x slower there at every size, and the probe of a 135 M-parameter model at 1 thread took 165 s to say
so (`without_bf16_hardware`; the choice's source is then "cpu").

The decision and its numbers are cached as JSON, one file per key, under <cache dir>/precision/: the key is the CPU
(model name, the flags that decide bf16 matmul speed), the torch version, the thread count, the model's shape and
the step's shapes. The file is written to a temp name and renamed into place, so jobs side by side never read a
half-written one (two jobs that start together may both probe; the last rename wins, both valid). An unreadable or
mismatched file is probed again and replaced, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kl_research.decode import uses_fast_sampler
from kl_research.rollout import sample_responses
from kl_research.runtime import BF16_FLAGS, PrecisionChoice, cpu_features, onednn_fp32_on, rng_state, set_rng_state

log = logging.getLogger(__name__)

# bf16 must be ≥ 20 % faster on the probe's model work. The probe leaves out what bf16 does not speed up (the reward,
# the fp32 KL and loss maths, the optimizer), so its ratio overstates the step's: at the tiny default on a Zen 5 CPU a
# 1.10-1.14x probe was a whole-step 0.96-1.09x (noise). The bench's gpt2-mid shape probed 1.32x there (once, ad hoc);
# on an AMX Xeon its score + update measured 1.28x faster in bf16 (issue 13), a gain worth taking.
MARGIN = 1.20
FORMAT = 5  # bump when the probe's procedure or what it times changes: older cache files are then ignored (4: the
# CPU attention runs in fp32 under a bf16 trunk, policy._kl_sdpa, which changed bf16's speed; 5: the head's backward
# GEMMs run in bf16 under a bf16 trunk, policy.head_linear)
WARMUP = 1  # rounds before timing (the first bf16 call builds oneDNN primitives; the second is warm)
REPS = (3, 15)  # timed rounds when the answer is close to MARGIN: at least 3, at most 15, fewer once BUDGET_S is spent
BUDGET_S = 3.0
DECISIVE = 1.5  # one timed round decides when fp32/bf16 is this factor outside MARGIN, either way


# runtime.BF16_FLAGS but AVX2: x86 features with which bf16 runs natively (AMX tiles, AVX-512 BF16) or is at least
# converted in vector registers (AVX-512F); a CPU with none of them is not probed (see without_bf16_hardware).
BF16_CAPABLE = tuple(f for f in BF16_FLAGS if f != "avx2")


def without_bf16_hardware(cpu: dict[str, Any]) -> str | None:
    """Why precision=auto picks fp32 without a probe on this CPU (`runtime.cpu_features()`), or None when it must
    measure. An x86 CPU with AVX2 but neither AVX-512 nor AMX has no bf16 arithmetic: autocast converts every bf16
    operand to fp32 and back, and the trunk has measured 7.5x slower (SmolLM2-135M, 1 thread) to 8-20x slower (the
    tiny default up to GPT-2 small) on the AMD EPYC Zen 3 this project runs on. The probe would only confirm it, at a
    price that grows with the model: 165 s of a 60-rollout SmolLM2 job's ~19 min on that CPU. Other architectures
    (ARM, which may have bf16 dot products) and every AVX-512 or AMX CPU are measured."""
    if cpu.get("arch") not in ("x86_64", "AMD64") or cpu.get("amx") or any(f in cpu["flags"] for f in BF16_CAPABLE):
        return None
    if "avx2" not in cpu["flags"]:
        return None  # an older or unknown x86 CPU: not what the rule was measured on
    return (
        f"no bf16 hardware on this CPU ({cpu['model']}: AVX2, no AVX-512, no AMX), where a bf16 trunk measured "
        "7.5-20x slower: fp32 without a probe"
    )


def done(rounds: int, ratio: float, elapsed_s: float) -> bool:
    """Whether the probe has timed enough rounds: `rounds` timed so far, the current fp32/bf16 ratio of the step's
    medians, `elapsed_s` since it started. A ratio far outside MARGIN (≤ MARGIN/DECISIVE or ≥ MARGIN·DECISIVE) is
    decided by one round, as no round-to-round noise of a few percent could move it across; a close one takes REPS[0]
    rounds and then stops once BUDGET_S is spent, or at REPS[1]."""
    if rounds >= REPS[1]:
        return True
    if rounds >= 1 and (ratio <= MARGIN / DECISIVE or ratio >= MARGIN * DECISIVE):
        return True
    return rounds >= REPS[0] and elapsed_s > BUDGET_S


@dataclass(frozen=True)
class Workload:
    """The model work of one PPO step: `updates` forward+backward passes of (minibatch, prompt_len + response_len)
    tokens, `scoring_passes` inference forwards of (batch, prompt_len + response_len) tokens (policy and reference;
    the reference alone where the policy's numbers come from the fast sampler, `score_from_sampler`), and generating
    response_len tokens for (batch, prompt_len) prompts."""

    batch: int
    minibatch: int
    updates: int
    prompt_len: int
    response_len: int
    sampler: str = "auto"  # the `sampler` key: the probe times the generation the run will do
    scoring_passes: int = 2

    @classmethod
    def of(cls, pcfg: Any, prompt_len: int, sampler: str = "auto", scoring_passes: int = 2) -> Workload:
        """The workload of a `ppo` config group with prompts of prompt_len tokens."""
        minibatches = pcfg.batch_size // pcfg.minibatch_size
        updates = pcfg.epochs * minibatches
        return cls(
            pcfg.batch_size, pcfg.minibatch_size, updates, prompt_len, pcfg.response_length, sampler, scoring_passes
        )

    @classmethod
    def of_job(cls, cfg: Any, lm: torch.nn.Module, prompt_len: int) -> Workload:
        """A job's workload (train.Job.setup): with the fast sampler and score_from_sampler the policy's rollout
        numbers come from the sampler's steps, so one scoring pass (the reference's), else two."""
        sampler = cfg.get("sampler", "auto")
        passes = 1 if uses_fast_sampler(lm, sampler) and cfg.get("score_from_sampler", False) else 2
        return cls.of(cfg.ppo, prompt_len, sampler, passes)

    def __str__(self) -> str:
        T = self.prompt_len + self.response_len
        return (
            f"{self.updates} fwd+bwd of {self.minibatch}×{T} tokens + {self.scoring_passes} scoring fwd of "
            f"{self.batch}×{T} + generating {self.batch}×{self.response_len}"
        )


def decide(fp32_s: float, bf16_s: float, margin: float = MARGIN) -> str:
    """bf16 if its step is at least `margin` times faster than fp32's, else fp32."""
    return "bf16" if fp32_s >= margin * bf16_s else "fp32"


def probe_key(lm: torch.nn.Module, work: Workload) -> dict[str, Any]:
    """Everything the measured speed depends on: the CPU, torch, the thread count, the model's and the step's shapes."""
    cfg = lm.config.get_text_config()
    return {
        "format": FORMAT,
        "margin": MARGIN,
        "cpu": cpu_features(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {
            "type": cfg.model_type,
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "vocab": cfg.vocab_size,
            "params": sum(p.numel() for p in lm.parameters()),
        },
        "work": asdict(work),
        # the GEMM library the model's fp32 GEMMs run in (runtime.use_onednn_fp32): fp32's side of the ratio moves with
        # it; only when on, so that the keys (and cached decisions) of models without it stay what they were
        **({"onednn_fp32": True} if onednn_fp32_on(lm) else {}),
    }


def cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "precision" / f"{digest[:16]}.json"


def measure(policy: torch.nn.Module, work: Workload, device: torch.device) -> dict[str, Any]:
    """Seconds per step's model work in fp32 and in bf16 (medians), from alternating timed rounds on the policy.

    Returns {"fp32_s", "bf16_s", "probe_s", "rounds", "update_s": {p: s}, "score_s": {p: s}, "generate_s": {p: s}}."""
    gen = torch.Generator().manual_seed(0)
    T = work.prompt_len + work.response_len
    vocab = policy.lm.config.get_text_config().vocab_size
    pad = policy.lm.generation_config.pad_token_id or 0
    mb_ids = torch.randint(vocab, (work.minibatch, T), generator=gen).to(device)  # (mb, T)
    batch_ids = torch.randint(vocab, (work.batch, T), generator=gen).to(device)  # (B, T)
    prompts = batch_ids[:, : work.prompt_len].clone()  # (B, P), without the pad id (HF would warn about padding)
    prompts[prompts == pad] = (pad + 1) % vocab
    amps = {"fp32": contextlib.nullcontext(), "bf16": torch.autocast(device.type, dtype=torch.bfloat16)}

    def update(amp) -> None:  # as algos.policy_update: trunk under amp, log-softmax in fp32, backward
        with amp:
            logits, values = policy.score(mb_ids, work.prompt_len)
        loss = torch.log_softmax(logits, dim=-1).mean()
        (loss if values is None else loss + values.mean()).backward()

    def score(amp) -> None:  # as rollout's scoring pass
        with torch.inference_mode(), amp:
            policy.score(batch_ids, work.prompt_len)

    def generate(amp) -> None:  # as rollout's sampling (the same sampler), never stopped early by an EOS
        with torch.inference_mode(), amp:
            sample_responses(
                policy.lm, prompts, response_length=work.response_len, temperature=1.0, eos_token_id=None,
                pad_token_id=pad, sampler=work.sampler,
            )  # fmt: skip

    parts = {"update": update, "score": score, "generate": generate}
    times: dict[tuple[str, str], list[float]] = {(p, part): [] for p in amps for part in parts}

    def step_s() -> dict[str, float]:
        med = {k: statistics.median(v) for k, v in times.items()}
        n_up, n_score = work.updates, work.scoring_passes
        return {p: n_up * med[p, "update"] + n_score * med[p, "score"] + med[p, "generate"] for p in amps}

    rng = rng_state()
    t0 = time.perf_counter()
    try:
        for i in range(WARMUP + REPS[1]):
            for p, amp in amps.items():  # alternating: a change in the machine's load hits both alike
                for part, fn in parts.items():
                    t = time.perf_counter()
                    fn(amp)
                    if i >= WARMUP:
                        times[p, part].append(time.perf_counter() - t)
            rounds = i + 1 - WARMUP
            if rounds >= 1:
                now = step_s()
                if done(rounds, now["fp32"] / now["bf16"], time.perf_counter() - t0):
                    break
    finally:
        for prm in policy.parameters():
            prm.grad = None
        set_rng_state(rng)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = step_s()
    return {
        "fp32_s": step["fp32"],
        "bf16_s": step["bf16"],
        "probe_s": time.perf_counter() - t0,
        "rounds": len(times["fp32", "update"]),
        **{f"{part}_s": {p: med[p, part] for p in amps} for part in parts},
    }


def _read(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached record at path if it is complete and for this key; None (and why, logged) otherwise."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        ok = (
            rec["key"] == key
            and rec["precision"] == decide(rec["fp32_s"], rec["bf16_s"])
            and all(isinstance(rec[k], float) and rec[k] > 0 for k in ("fp32_s", "bf16_s", "probe_s"))
            and isinstance(rec["measured_at"], str)
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("precision probe cache %s is unreadable (%s: %s): probing again", path, type(e).__name__, e)
        return None
    if not ok:
        log.warning("precision probe cache %s does not hold a valid record for this key: probing again", path)
        return None
    return rec


def _write(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never a partial write


@contextlib.contextmanager
def _probe_lock(path: Path) -> Iterator[None]:
    """A file lock beside the cache file (filelock, as runtime.cached_build); where none can be made (a read-only
    cache) the probe runs unlocked."""
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as e:
        log.warning("precision probe: no lock beside %s (%s); probing without one", path, e)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def auto_precision(
    policy: torch.nn.Module, work: Workload, device: torch.device, cache_dir: str | Path
) -> PrecisionChoice:
    """precision=auto on a CPU: the cached decision for this machine and shape, else measure(...) it and cache it."""
    key = probe_key(policy.lm, work)
    why = without_bf16_hardware(key["cpu"])
    if why is not None:
        return PrecisionChoice("fp32", "cpu", why)
    path = cache_file(Path(cache_dir), key)
    rec = _read(path, key)
    source = "cache" if rec is not None else "probe"
    where = f"read from the cache {path} (measured {rec['measured_at']})" if rec is not None else ""
    if rec is None:
        # One probe per key across processes: the jobs of a local sweep start together, and each probing on its own
        # would time its trunk beside the others' probes and could decide differently near the margin, so that the
        # sweep's arms would differ in precision too. The others wait for the lock and read the first one's answer.
        with _probe_lock(path):
            rec = _read(path, key)
            if rec is not None:
                source, where = "cache", f"measured by another job at {path} ({rec['measured_at']})"
            else:
                m = measure(policy, work, device)
                rec = {
                    "key": key,
                    "precision": decide(m["fp32_s"], m["bf16_s"]),
                    **m,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "pid": os.getpid(),
                }
                try:
                    _write(path, rec)
                    where = f"cached in {path}"
                except OSError as e:  # a read-only cache: the run goes on, the next one probes again
                    log.warning("precision probe: could not cache the result in %s (%s)", path, e)
                    where = f"not cached ({type(e).__name__} writing {path})"
    fp32_s, bf16_s = rec["fp32_s"], rec["bf16_s"]
    ratio = fp32_s / bf16_s
    if rec["precision"] == "bf16":
        verdict = f"bf16 trunk {ratio:.2f}× faster (≥ {MARGIN:.2f}× needed)"
    elif ratio >= 1:
        verdict = f"bf16 trunk only {ratio:.2f}× faster (< the {MARGIN:.2f}× needed)"
    else:
        verdict = f"bf16 trunk {1 / ratio:.2f}× slower"
    n = key["threads"]
    reason = (
        f"{verdict} in a {rec['probe_s']:.1f} s probe (fp32 {fp32_s:.3g} s, bf16 {bf16_s:.3g} s per step's model "
        f"work: {work}; {n} thread{'s' if n != 1 else ''}, {key['cpu']['model']}), {where}"
    )
    return PrecisionChoice(rec["precision"], source, reason, fp32_s, bf16_s)


def main(argv: list[str] | None = None) -> None:
    """`python -m kl_research.precision_probe [--fresh] [overrides]`: what precision=auto picks for the configured
    model and ppo shapes on this machine (the trainer's threads rule), from the cache or, with --fresh or on a
    miss, a new probe; prints the decision, its numbers and the cache file."""
    import sys

    from kl_research.gpt2 import use_plain_trunk
    from kl_research.policy import PolicyWithValue, disable_dropout
    from kl_research.reference import compose_config, load_reference, resolve_cache_dir
    from kl_research.runtime import (
        resolve_device,
        resolve_onednn_fp32,
        resolve_precision,
        setup_allocator,
        setup_threads,
        use_onednn_fp32,
    )

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    args = sys.argv[1:] if argv is None else list(argv)
    if "-h" in args or "--help" in args:  # not a Hydra override: say what the command does, not fail in compose
        print(main.__doc__)
        return
    fresh = "--fresh" in args
    cfg = compose_config([a for a in args if a != "--fresh"])
    threads = setup_threads(cfg.threads)
    setup_allocator()
    device = resolve_device(cfg.device)
    ref_model, _ = load_reference(cfg)
    disable_dropout(ref_model)
    policy = PolicyWithValue.from_reference(ref_model, detach_value_head=cfg.ppo.detach_value_head).to(device).eval()
    # the model and the step as a job sets them up (train.Job.setup): the plain trunk, the GEMM library, the sampler
    use_plain_trunk(policy.lm, bool(cfg.get("fast_trunk", True)))
    use_onednn_fp32(policy.lm, resolve_onednn_fp32(cfg.get("onednn_fp32", False), device)[0])
    work = Workload.of_job(cfg, policy.lm, cfg.data.prompt_tokens)
    cache_dir = resolve_cache_dir(cfg.get("cache_dir"))
    if fresh:
        cache_file(cache_dir, probe_key(policy.lm, work)).unlink(missing_ok=True)
    choice = resolve_precision(device, cfg.precision, probe=lambda: auto_precision(policy, work, device, cache_dir))
    n = f"{threads} thread{'s' if threads != 1 else ''}"
    print(f"precision={cfg.precision} → {choice.precision} ({choice.source}, {n}): {choice.reason}")


if __name__ == "__main__":
    main()
