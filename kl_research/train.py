"""One PPO job with KL control: rollout → score → shaped rewards → GAE → PPO epochs → controller → log.

`train(cfg, out_dir)` is the whole job; `train.py` (Hydra) and `sweep.py` (submitit) both call it.
Everything it writes lives under out_dir: metrics.jsonl, summary.json, curves.png, checkpoints/, policy/.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import pickle
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kl_research import ppo
from kl_research.config import validate
from kl_research.controllers import KLController, build_controller
from kl_research.kl import ESTIMATORS, masked_mean, tempered, token_kl
from kl_research.policy import PolicyWithValue, compile_trunks, disable_dropout, score_lm
from kl_research.precision_probe import Workload, auto_precision
from kl_research.runlog import RunLogger, plot_curves, summarize
from kl_research.runtime import (
    PrecisionChoice,
    autocast,
    resolve_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_allocator,
    setup_threads,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"
PREVIOUS_CHECKPOINT = "checkpoints/previous.pt"  # the one before last.pt, kept for a last.pt that cannot be read
LOCK_FILE = ".lock"
# Keys whose change does not change the trajectory: a restart may differ in these and still resume.
RESUMABLE_DIFFS = ("steps", "wandb", "threads", "checkpoint_every", "sweep")


# ------------------------------------------------------------------------------------------- checkpoint
@contextlib.contextmanager
def run_dir_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on <out>/.lock while the job runs: two copies of a job in one run dir (a sweep re-run
    while the jobs of a killed sweep process still run, the same hydra.run.dir twice) would interleave checkpoints and
    metrics. The second copy fails at once, naming the holder; the lock dies with its process (SIGKILL included)."""
    fh = open(out / LOCK_FILE, "a+")  # held open on purpose: the lock lives as long as the file
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "a process that did not say"
        fh.close()
        raise RuntimeError(
            f"{out} is in use by another copy of this job ({holder}); wait for it to finish or stop it, then run the "
            "same command again: it resumes from the last checkpoint"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


def atomic_save(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """Write obj to path through a temporary file and a rename. With keep_previous, the file that was at path
    becomes keep_previous first: a path later found unreadable (a disk fault, a full disk) still has a fallback."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)


def load_checkpoint(out: Path) -> dict | None:
    """The newest readable checkpoint of the run in out, or None if it has none.

    Loaded with weights_only=True: tensors, numbers, strings and containers only, so a checkpoint can never run code
    (a pickle with a __reduce__ is refused, naming the file). If last.pt cannot be read (truncated, corrupt), the
    previous checkpoint is used with a warning naming the bad file; the run then repeats the steps after it, on the
    same seeded trajectory. If neither can be read, a clear error names both.
    """
    last, previous = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    if not last.exists() and not previous.exists():
        return None
    errors = []
    for path in (last, previous):
        if not path.exists():
            continue
        try:
            # to the CPU first: the RNG states must be CPU byte tensors; load_state_dict copies weights and optimizer
            # state onto the device (and a checkpoint written on a GPU resumes on a CPU-only machine too)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise RuntimeError(
                    f"refusing to load {path}: it holds objects other than tensors, numbers and strings, which a "
                    f"checkpoint of this project never does and which could run code when unpickled. Delete it (and "
                    f"{previous.name} if that is also foreign) to start the run over. torch said: {e}"
                ) from None
            errors.append(f"{path}: {type(e).__name__}: {e}")
            continue
        except Exception as e:  # truncated zip, EOF, ...: unreadable, not foreign
            errors.append(f"{path}: {type(e).__name__}: {e}")
            continue
        log.info("loaded checkpoint %s (step %d)", path, ckpt["step"])
        if errors:
            log.warning(
                "checkpoint %s cannot be read (%s); resuming from the previous one, %s (step %d)",
                last,
                errors[0].split(": ", 1)[1],
                path,
                ckpt["step"],
            )
        return ckpt
    raise RuntimeError(
        "no readable checkpoint in "
        f"{out / 'checkpoints'}: {'; '.join(errors)}. Delete the checkpoints/ folder to start the run over"
    )


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += config_diff(a[k], b[k], name + ".")
        elif a.get(k) != b.get(k):
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------------ rollout
def token_stats(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    response: torch.Tensor,
    temperature: float,
    ref_logprobs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log π(y), log π_ref(y), exact KL and entropy, each (B, R), from the (B, R, V) logits of π and π_ref.

    The same numbers as ppo.gather_logprobs, kl.exact_token_kl and ppo.entropy_from_logits (the same ops in
    the same order, row by row), but one log-softmax per model shared by all four instead of five, computed a
    few sequences at a time so that the (b, R, V) temporaries stay cache-sized (~8 MB) instead of full-batch.
    ref_logprobs_out: an optional (B, R, V) fp32 buffer that receives log π_ref (the KL-loss mode needs it).
    """
    B, R, V = logits.shape
    rows = max(1, (1 << 21) // (R * V))  # sequences per chunk
    out = torch.empty(4, B, R, dtype=torch.float32, device=logits.device)
    for s in range(0, B, rows):
        lp = torch.log_softmax(tempered(logits[s : s + rows], temperature), dim=-1)  # (b, R, V) log π
        ref_lp = torch.log_softmax(tempered(ref_logits[s : s + rows], temperature), dim=-1)  # (b, R, V) log π_ref
        if ref_logprobs_out is not None:
            ref_logprobs_out[s : s + rows] = ref_lp
        idx = response[s : s + rows].unsqueeze(-1)  # (b, R, 1)
        out[0, s : s + rows] = lp.gather(-1, idx).squeeze(-1)
        out[1, s : s + rows] = ref_lp.gather(-1, idx).squeeze(-1)
        p = lp.exp()
        out[3, s : s + rows] = -(p * lp).sum(-1)  # entropy
        out[2, s : s + rows] = (p * lp.sub_(ref_lp)).sum(-1)  # Σ_v π(v)·(log π(v) − log π_ref(v)); lp spent
    return out[0], out[1], out[2], out[3]


def sampling_kwargs(
    prompts: torch.Tensor, temperature: float, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int
) -> dict[str, Any]:
    """`generate` settings that sample exactly from softmax(logits/T): no top-k, no top-p, no min_new_tokens
    (RESEARCH.md §2, §4: any logits processor makes the sampling distribution differ from the one the log-probs are
    scored with; a response that is only EOS is fine, its mask has one token)."""
    return dict(
        attention_mask=torch.ones_like(prompts),  # prompts all have one length: no padding
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


@torch.inference_mode()
def rollout(
    policy: PolicyWithValue,
    ref_model: torch.nn.Module,
    prompts: torch.Tensor,
    *,
    response_length: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    amp,
    keep_ref_logprobs: bool = False,
) -> dict[str, torch.Tensor]:
    """Sample responses with the KV cache, then score policy (+values) and reference once each.

    prompts: (B, P) token ids, all of length P. Returns response ids (B, R), mask (B, R), and fp32
    logp, ref_logp, values (B, R), exact KL, entropy (B, R); with keep_ref_logprobs also the reference's
    full-vocabulary log-probs (B, R, V), which the exact-KL loss reuses in every minibatch.
    """
    B, P = prompts.shape
    with amp:
        seqs = policy.lm.generate(
            input_ids=prompts, **sampling_kwargs(prompts, temperature, response_length, eos_token_id, pad_token_id)
        )  # (B, P + R'), R' <= R when every sequence stopped early
    if seqs.shape[1] < P + response_length:  # pad to a fixed R so every rollout has one shape
        pad = torch.full((B, P + response_length - seqs.shape[1]), pad_token_id, dtype=seqs.dtype, device=seqs.device)
        seqs = torch.cat([seqs, pad], 1)
    response = seqs[:, P:]  # (B, R)
    mask = ppo.response_mask(response, eos_token_id)  # (B, R)
    with amp:
        logits, values = policy.score(seqs, P)  # (B, R, V), (B, R)
        ref_logits, _ = score_lm(ref_model, seqs, P)  # (B, R, V)
    ref_logprobs = torch.empty_like(ref_logits) if keep_ref_logprobs else None
    logp, ref_logp, exact_kl, entropy = token_stats(logits, ref_logits, response, temperature, ref_logprobs)
    extra = {"ref_logprobs": ref_logprobs} if keep_ref_logprobs else {}
    return {
        **extra,
        "seqs": seqs,
        "response": response,
        "mask": mask,
        "logp": logp,
        "ref_logp": ref_logp,
        "values": values,
        "exact_kl": exact_kl,
        "entropy": entropy,
    }


# ------------------------------------------------------------------------------------------------- update
def make_optimizer(policy: torch.nn.Module, pcfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (no weight decay). The fused kernel on CPU/CUDA: same update up to fp rounding, ~10x less time
    than the per-tensor loop torch uses on CPU by default (measured; 16 optimizer steps per PPO step)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(policy.parameters(), lr=pcfg.lr, eps=pcfg.adam_eps, weight_decay=0.0, fused=fused)


def uses_exact_kl_loss(pcfg: DictConfig) -> bool:
    """The exact KL as a loss term (kl_mode=loss or sequence with kl_penalty=exact): the rollout keeps the
    reference's full log-probs for every minibatch."""
    return pcfg.kl_mode in ("loss", "sequence") and pcfg.kl_penalty == "exact"


def advantages_and_returns(
    batch: dict[str, torch.Tensor], scores: torch.Tensor, beta: float, pcfg: DictConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards → GAE → (whitened) advantages, and the value targets. (B, R) each.

    kl_mode=reward: −β·k1 on every response token plus the score at the last one (lm-human-preferences, TRL); the
        value head learns the penalised return and the whole advantage is whitened.
    kl_mode=loss: the score alone; the KL acts through ppo_update's β·KL loss term instead (partial gradient).
    kl_mode=sequence: the score's advantage as in `loss`, plus the KL's score-function half, which `loss` lacks:
        −β·(Σ_{t>s} exact KL_t − baseline) at token s (ppo.kl_to_go; baseline: ppo.kl_baseline). That part is *not*
        whitened, exactly as the analytic β·KL loss term it completes is not: whitening the one and not the other
        would weigh the two halves of ∇KL_seq differently. The value head learns the score's return only.
    """
    mask = batch["mask"]
    if pcfg.kl_mode == "reward":
        kl_tokens = token_kl(batch["logp"], batch["ref_logp"], pcfg.kl_penalty)
    else:
        kl_tokens = torch.zeros_like(batch["logp"])
    rewards = ppo.shaped_rewards(scores, kl_tokens, beta, mask)
    if pcfg.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo.gae(rewards, batch["values"], mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, mask)
    if pcfg.kl_mode == "sequence":
        to_go = ppo.kl_to_go(batch["exact_kl"], mask)
        if pcfg.kl_baseline == "loo":
            to_go = to_go - ppo.leave_one_out_baseline(to_go, mask)
        advantages = advantages - beta * to_go
    return advantages, returns


def minibatch_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor,
    mb: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    returns: torch.Tensor,
    pcfg: DictConfig,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one minibatch: clipped policy loss + vf_coef · clipped value loss (+ β·KL term with
    kl_mode=loss|sequence). Returns (loss, its parts for the logs).

    logprobs: (b, R, V) log-softmax of the current policy (with grad); values: (b, R); mb: the rollout's tensors for
    these sequences (mask, response, logp, values, ref_logp, ref_logprobs with the exact KL); advantages, returns:
    (b, R). tests/test_kl_sequence.py differentiates exactly this function over enumerated sequences.
    """
    mask = mb["mask"]
    logp = logprobs.gather(-1, mb["response"].unsqueeze(-1)).squeeze(-1)  # (b, R)
    pg_loss, clipfrac, approx_kl = ppo.policy_loss(logp, mb["logp"], advantages, mask, pcfg.cliprange)
    vf_loss, vclipfrac = ppo.value_loss(values, mb["values"], returns, mask, pcfg.cliprange_value)
    if uses_exact_kl_loss(pcfg):
        kl_term = ppo.exact_kl_loss(logprobs, mb["ref_logprobs"], mask)
    elif pcfg.kl_mode == "loss":
        kl_term = ppo.k2_kl_loss(logp, mb["ref_logp"], mask)
    else:
        kl_term = torch.zeros((), dtype=logp.dtype, device=logp.device)
    loss = pg_loss + pcfg.vf_coef * vf_loss + beta * kl_term
    parts = {"pg": pg_loss, "vf": vf_loss, "kl": kl_term, "clipfrac": clipfrac, "vclipfrac": vclipfrac}
    return loss, {**parts, "approx_kl": approx_kl}


def ppo_update(
    policy: PolicyWithValue,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    returns: torch.Tensor,
    prompt_len: int,
    pcfg: DictConfig,
    amp,
    generator: torch.Generator,
    beta: float = 0.0,
) -> dict[str, float]:
    """epochs × minibatches of `minibatch_loss`, with gradient clipping.

    With ppo.target_approx_kl set, the epochs stop early once an epoch's mean approx-KL(π_old‖π) exceeds it.
    """
    B = batch["seqs"].shape[0]
    keys = ("pg", "vf", "kl", "clipfrac", "vclipfrac", "approx_kl", "gnorm")
    stats: dict[str, list[float]] = {k: [] for k in keys}
    per_seq = [k for k in ("mask", "response", "logp", "values", "ref_logp", "ref_logprobs") if k in batch]
    epoch_kl = 0.0
    epochs_run = 0
    for _ in range(pcfg.epochs):
        order = torch.randperm(B, generator=generator)
        epoch_approx = []
        for start in range(0, B, pcfg.minibatch_size):
            idx = order[start : start + pcfg.minibatch_size]
            with amp:
                logits, values = policy.score(batch["seqs"][idx], prompt_len)
            logprobs = torch.log_softmax(tempered(logits, pcfg.temperature), dim=-1)  # (b, R, V)
            mb = {k: batch[k][idx] for k in per_seq}
            loss, parts = minibatch_loss(logprobs, values, mb, advantages[idx], returns[idx], pcfg, beta)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite PPO loss (policy {parts['pg'].item()}, value {parts['vf'].item()}, KL "
                    f"{parts['kl'].item()}); stopping; the last good checkpoint is kept"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), pcfg.max_grad_norm)
            optimizer.step()
            for k, v in (*parts.items(), ("gnorm", gnorm)):
                stats[k].append(float(v.detach()))
            epoch_approx.append(stats["approx_kl"][-1])
        epochs_run += 1
        epoch_kl = float(np.mean(epoch_approx))
        if pcfg.target_approx_kl is not None and epoch_kl > pcfg.target_approx_kl:
            break
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["approx_kl_last_epoch"] = epoch_kl
    out["epochs"] = float(epochs_run)
    return out


# ---------------------------------------------------------------------------------------------------- job
def run_name(cfg: DictConfig) -> str:
    return cfg.wandb.name or f"{cfg.controller.name}_kl{cfg.controller.target_kl:g}_s{cfg.seed}"


def run_precision(
    cfg: DictConfig, device: torch.device, policy: PolicyWithValue, work: Workload, ckpt: dict | None
) -> tuple[PrecisionChoice, PrecisionChoice]:
    """(the precision this run's steps use, the choice made when the run started: what checkpoints keep).

    runtime.resolve_precision (precision=auto: bf16 on CUDA; on a CPU the cached probe of this machine and shape),
    except that a run resumed on the same kind of device keeps the precision its checkpoint ran with: it does not
    probe again, so a resumed run continues exactly the trajectory of an uninterrupted one.
    """
    if ckpt is not None and cfg.precision == "auto" and ckpt.get("device_type") == device.type and "precision" in ckpt:
        rec = ckpt.get("precision_choice") or {"precision_source": "unrecorded", "precision_reason": "not recorded"}
        started = PrecisionChoice(
            ckpt["precision"],
            rec["precision_source"],
            rec["precision_reason"],
            rec.get("precision_fp32_s"),
            rec.get("precision_bf16_s"),
        )
        reason = (
            f"kept from the checkpoint: steps 1-{ckpt['step']} ran with it and a resumed run does not probe again "
            f"(chosen by {started.source}: {started.reason})"
        )
        return PrecisionChoice(started.precision, "checkpoint", reason, started.fp32_s, started.bf16_s), started
    from kl_research.reference import resolve_cache_dir  # deferred: pulls in transformers/datasets

    cache_dir = resolve_cache_dir(cfg.get("cache_dir"))
    choice = resolve_precision(device, cfg.precision, probe=lambda: auto_precision(policy, work, device, cache_dir))
    return choice, choice


def train(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run (or resume, or return the summary of a finished) PPO job in out_dir, as the only process there."""
    validate(cfg)  # every range check, before anything heavy is loaded
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(out):
        return _train(cfg, out)


def _train(cfg: DictConfig, out: Path) -> dict[str, Any]:
    summary_path = out / "summary.json"
    if summary_path.exists():
        log.info("%s already holds a finished run; returning its summary", out)
        return json.loads(summary_path.read_text())

    # Deferred imports: these modules pull in transformers/datasets (seconds), not needed to validate.
    from kl_research.data import build_prompts, eval_subset, load_corpus
    from kl_research.evaluate import distinct_n, heldout_perplexity
    from kl_research.reference import load_reference
    from kl_research.rewards import build_reward

    resolved = OmegaConf.to_container(cfg, resolve=True)
    threads = setup_threads(cfg.threads)
    setup_allocator()
    device = resolve_device(cfg.device)
    pcfg = cfg.ppo
    log.info("run %s in %s on %s (%d threads)", run_name(cfg), out, device, threads)
    ckpt_path = out / CHECKPOINT
    ckpt = load_checkpoint(out)
    if ckpt is not None:
        diff = [
            k
            for k in config_diff(ckpt["config"], resolved)
            if not k.startswith(RESUMABLE_DIFFS) and not k.startswith("hydra")
        ]
        if diff:
            raise ValueError(
                f"{out} holds a checkpoint of a run with a different config (differs in: {', '.join(diff)}); "
                "use another output directory (hydra.run.dir=...) or delete the checkpoint"
            )

    # 1. models, data, reward
    ref_model, tokenizer = load_reference(cfg)
    # seeded after the reference is in hand: building it (first run on a fresh cache) draws from the global RNG,
    # and a job must sample the same tokens whether its reference was built now or loaded from the cache
    seed_everything(cfg.seed)
    disable_dropout(ref_model)
    ref_model.to(device).eval().requires_grad_(False)
    policy = PolicyWithValue.from_reference(ref_model, detach_value_head=pcfg.detach_value_head).to(device)
    policy.eval()  # dropout is off anyway; eval() also keeps HF from any train-only behaviour
    optimizer = make_optimizer(policy, pcfg, device)
    corpus = load_corpus(cfg.data)
    prompts_all = build_prompts(corpus.train, tokenizer, cfg.data.prompt_tokens, cfg.data.num_prompts, cfg.seed)
    P = prompts_all.shape[1]
    # the trunk's precision, on the eager policy (the probe restores the global RNG and leaves the weights alone)
    choice, started = run_precision(cfg, device, policy, Workload.of(pcfg, P), ckpt)
    precision = choice.precision
    amp = autocast(device, precision)
    log.info("precision=%s → %s: %s", cfg.precision, precision, choice.reason)
    if cfg.compile:  # scoring and the update run through the compiled trunk; generation stays eager (KV cache)
        compile_trunks(cfg.compile, policy.lm, ref_model)
        log.info("torch.compile(%s) of the scoring/update trunk: the first rollout and update compile", cfg.compile)
    eval_texts = eval_subset(corpus.heldout, cfg.data.eval_texts)
    reward_fn = build_reward(cfg.reward, device)
    controller: KLController = build_controller(cfg.controller)
    target = controller.target_kl
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_gen = torch.Generator().manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def evaluate_ppl(model) -> float:
        return heldout_perplexity(
            model, tokenizer, eval_texts, batch_size=32, max_length=cfg.data.eval_max_length, device=device
        )

    # 2. resume
    start_step, history, drift = 0, [], {"warnings": 0, "state": "ok", "window": []}
    ppl_ref = None
    elapsed_before = 0.0
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        controller.load_state_dict(ckpt["controller"])
        prompt_gen.set_state(ckpt["prompt_gen"])
        shuffle_gen.set_state(ckpt["shuffle_gen"])
        set_rng_state(ckpt["rng"])
        start_step, history, drift = ckpt["step"], ckpt["history"], ckpt["drift"]
        ppl_ref, elapsed_before = ckpt["ppl_ref"], ckpt["elapsed_s"]
        log.info("resumed from a checkpoint at step %d of %d (β = %.4g)", start_step, cfg.steps, controller.value)
        ran = (ckpt.get("device_type", device.type), ckpt.get("precision", precision))
        if ran != (device.type, precision):
            log.warning(
                "resumed on %s with a %s trunk; steps 1-%d ran on %s with a %s trunk (device=auto and precision=auto "
                "resolve per machine): from here the trajectory is not bit-identical to an uninterrupted run",
                device.type,
                precision,
                start_step,
                *ran,
            )
        ckpt = None  # its tensors are in the models now: free them for the run
    if ppl_ref is None:
        ppl_ref = evaluate_ppl(ref_model)

    def save_checkpoint(step: int) -> None:
        atomic_save(
            {
                "step": step,
                "policy": policy.state_dict(),
                "optimizer": optimizer.state_dict(),
                "controller": controller.state_dict(),
                "prompt_gen": prompt_gen.get_state(),
                "shuffle_gen": shuffle_gen.get_state(),
                "rng": rng_state(),
                "history": history,
                "drift": drift,
                "ppl_ref": ppl_ref,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                "device_type": device.type,
                "precision": precision,
                "precision_choice": started.record(),  # how it was chosen when the run started
                "config": resolved,
            },
            ckpt_path,
            keep_previous=out / PREVIOUS_CHECKPOINT,
        )

    # 3. the loop
    logger = RunLogger(cfg, out, resolved, name=run_name(cfg), resume=start_step > 0)
    t_start = time.perf_counter()
    console = contextlib.ExitStack()
    try:
        logger.replay(history)  # a resumed W&B run sees only new steps; metrics.jsonl is rewritten whole
        # On a terminal: a tqdm bar, with log lines (drift warnings, ...) printed above it instead of through it.
        # Without one (submitit/SLURM job logs, the sweep report's log tails): no carriage returns, a plain
        # progress line every 5 % of the job instead.
        tty = sys.stderr.isatty()
        if tty:
            console.enter_context(logging_redirect_tqdm())
        bar = tqdm(
            range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=run_name(cfg), disable=not tty
        )
        progress_every = max(1, cfg.steps // 20)
        for step in bar:
            t0 = time.perf_counter()
            idx = torch.randint(len(prompts_all), (pcfg.batch_size,), generator=prompt_gen)
            prompts = prompts_all[idx].to(device)
            beta = controller.value  # the β this rollout's penalty uses

            # 3a. rollout: generate, then one scoring pass each for policy (+values) and reference
            batch = rollout(
                policy,
                ref_model,
                prompts,
                response_length=pcfg.response_length,
                temperature=pcfg.temperature,
                eos_token_id=eos,
                pad_token_id=pad,
                amp=amp,
                keep_ref_logprobs=uses_exact_kl_loss(pcfg),
            )
            t_gen_score = time.perf_counter()
            mask = batch["mask"]

            # 3b. task score on the decoded response (up to and including EOS; special tokens dropped)
            texts_p = tokenizer.batch_decode(prompts, skip_special_tokens=True)
            responses = [
                tokenizer.decode(r[m], skip_special_tokens=True)
                for r, m in zip(batch["response"].cpu(), mask.cpu(), strict=True)
            ]
            scores = reward_fn(texts_p, responses).to(device)

            # 3c. KL: every estimator for the record, the configured one for the penalty and the signal
            kls = {e: float(masked_mean(token_kl(batch["logp"], batch["ref_logp"], e), mask)) for e in ESTIMATORS}
            kls["exact"] = float(masked_mean(batch["exact_kl"], mask))
            signal = kls[pcfg.kl_signal]
            if not all(math.isfinite(v) for v in kls.values()):
                raise FloatingPointError(f"non-finite KL at step {step + 1}: {kls}; the last good checkpoint is kept")

            # 3d. rewards (−β·k1 per token with kl_mode=reward, else the score alone), GAE, whitened advantages
            advantages, returns = advantages_and_returns(batch, scores, beta, pcfg)

            # 3e. PPO epochs (+ β·KL in the loss with kl_mode=loss)
            policy.train()
            upd = ppo_update(policy, optimizer, batch, advantages, returns, P, pcfg, amp, shuffle_gen, beta)
            policy.eval()

            # 3f. exactly one controller update per rollout: per-token batch KL, n_steps = sequences. Not after
            # rollout 1: it is sampled from π = π_ref (the policy starts as the reference), so its KL is 0 by
            # construction and carries no information; fed to a controller it would read as a −100 % error.
            if step > 0:
                controller.update(signal, pcfg.batch_size)

            # 3g. drift diagnostic (the seed's): recent-window mean KL outside [0.5, 2] × target
            drift["window"] = (drift["window"] + [signal])[-cfg.drift_window :]
            recent = float(np.mean(drift["window"]))
            state = "high" if recent > 2 * target else "low" if recent < 0.5 * target else "ok"
            if state != "ok":
                drift["warnings"] += 1
                if state != drift["state"]:
                    log.warning(
                        "KL drift: recent mean %.4g nats/token is %s (target %.4g): %s",
                        recent,
                        "above 2x" if state == "high" else "below 0.5x",
                        target,
                        "policy drifting" if state == "high" else "not learning enough",
                    )
            drift["state"] = state

            n_tokens = int(mask.sum())
            step_s = time.perf_counter() - t0
            rec: dict[str, Any] = {
                "step": step + 1,
                "samples": (step + 1) * pcfg.batch_size,
                "reward/mean": float(scores.mean()),
                "reward/std": float(scores.std()),
                **{f"kl/{k}": v for k, v in kls.items()},
                "kl/target": target,
                "kl/coef": beta,
                "kl/coef_next": controller.value,
                "kl/error": (signal - target) / target,
                "kl/drift_warnings": drift["warnings"],
                "policy/entropy": float(masked_mean(batch["entropy"], mask)),
                "policy/approx_kl": upd["approx_kl"],
                "policy/approx_kl_last_epoch": upd["approx_kl_last_epoch"],
                "policy/epochs": upd["epochs"],
                "loss/kl": upd["kl"],
                "policy/clipfrac": upd["clipfrac"],
                "loss/policy": upd["pg"],
                "loss/value": upd["vf"],
                "loss/value_clipfrac": upd["vclipfrac"],
                "loss/grad_norm": upd["gnorm"],
                "response/length": n_tokens / pcfg.batch_size,
                "time/step_s": step_s,
                "time/rollout_s": t_gen_score - t0,
                "throughput/tokens_per_s": n_tokens / step_s,
            }
            last = step + 1 == cfg.steps
            if (step + 1) % cfg.eval_every == 0 or last:
                rec["eval/ppl_heldout"] = evaluate_ppl(policy.lm)
                rec["eval/ppl_ref"] = ppl_ref
                rec["eval/distinct_2"] = distinct_n(responses, 2)
            history.append(rec)
            logger.log(rec)
            if (step + 1) % cfg.wandb.samples_every == 0 or last:
                logger.samples(step + 1, texts_p[:8], responses[:8], scores[:8].tolist())
            bar.set_postfix(
                reward=f"{rec['reward/mean']:+.3f}", kl=f"{signal:.4f}/{target:g}", beta=f"{beta:.4g}", refresh=False
            )
            if not tty and ((step + 1) % progress_every == 0 or last):
                log.info(
                    "step %d/%d: reward %+.3f, KL %.4g/%g nats/token, β %.4g, %.2f s/step",
                    step + 1,
                    cfg.steps,
                    rec["reward/mean"],
                    signal,
                    target,
                    beta,
                    step_s,
                )
            if (step + 1) % cfg.checkpoint_every == 0 or last:
                save_checkpoint(step + 1)

        # 4. the end: final policy, summary (written last: its presence means the job finished), curves
        wall = elapsed_before + time.perf_counter() - t_start
        policy.lm.save_pretrained(out / "policy")
        tokenizer.save_pretrained(out / "policy")
        from safetensors.torch import save_file

        save_file(policy.v_head.state_dict(), str(out / "policy" / "value_head.safetensors"))
        summary = {**summarize(history, cfg, wall), "device": str(device), **choice.record()}
        plot_curves(history, target, out / "curves.png", title=run_name(cfg))
        logger.summary(summary)
        tmp = summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, summary_path)
        log.info(
            "done: reward %.3f, KL %.4g (target %g), tracking error %.2f, β %.4g, ppl %.2f (ref %.2f), %.0f s",
            summary["reward"],
            summary["kl"],
            target,
            summary["tracking_error"],
            summary["final_beta"],
            summary["ppl_final"],
            summary["ppl_ref"],
            wall,
        )
        return summary
    finally:
        console.close()
        logger.finish()
