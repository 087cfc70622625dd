"""One job of KL-controlled policy-gradient fine-tuning: rollout → score → KL → advantages → update → controller → log.

`train(cfg, out_dir)` is the whole job; `train.py` (Hydra) and `sweep.py` (submitit) both call it. The algorithm
(algo=ppo|grpo) sits behind kl_research.algos' small interface; the rollout is kl_research.rollout's, checkpoints are
kl_research.checkpoint's. Everything a job writes lives under out_dir: metrics.jsonl, summary.json, curves.png,
checkpoints/, policy/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kl_research import vocab_kernel
from kl_research.algos import Algorithm, build_algorithm, policy_update, uses_exact_kl_loss
from kl_research.analysis.control import BAND, UNTARGETED
from kl_research.checkpoint import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    atomic_save,
    check_resumable,
    load_checkpoint,
    run_dir_lock,
)
from kl_research.config import validate
from kl_research.controllers import KLController, build_controller
from kl_research.decode import fast_sampler_reason, uses_fast_sampler
from kl_research.gpt2 import use_plain_trunk
from kl_research.kl import ESTIMATORS, masked_mean, masked_sum, token_kl
from kl_research.policy import PolicyWithValue, compile_trunks, disable_dropout
from kl_research.precision_probe import Workload, auto_precision
from kl_research.rollout import rollout
from kl_research.runlog import RunLogger, plot_curves, summarize
from kl_research.runtime import (
    PrecisionChoice,
    autocast,
    onednn_fp32_reason,
    peak_memory_mb,
    resolve_cache_dir,
    resolve_compile_vocab,
    resolve_device,
    resolve_onednn_fp32,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_allocator,
    setup_threads,
    use_onednn_fp32,
)

log = logging.getLogger(__name__)


def make_optimizer(policy: torch.nn.Module, pcfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (no weight decay). The fused kernel on CPU/CUDA: same update up to fp rounding, ~10x less time
    than the per-tensor loop torch uses on CPU by default (measured; 16 optimizer steps per PPO step)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(policy.parameters(), lr=pcfg.lr, eps=pcfg.adam_eps, weight_decay=0.0, fused=fused)


# ------------------------------------------------------------------------------------------- drift watch
def new_drift_state() -> dict[str, Any]:
    """The drift diagnostic's state (checkpointed as ``drift``): steps that warned, the last warning's kind (``ok``
    when none), the recent KL signals and how many rollouts in a row after the grace the window mean has been out
    of the band."""
    return {"warnings": 0, "state": "ok", "window": [], "out_of_band": 0}


def watch_drift(
    drift: dict[str, Any], kl: float, rollout: int, controller: KLController, window: int, grace: int, patience: int
) -> str | None:
    """The seed's drift diagnostic, made to warn only on a problem the controller cannot fix by itself. Updates
    ``drift`` (:func:`new_drift_state`) in place with rollout ``rollout``'s (1-based) KL signal, read after the
    controller's update; returns the warning to log on the step a problem starts, else None.

    The mean KL of the last ``window`` rollouts is judged against the band [0.5, 2] × target only after ``grace``
    rollouts (rollout 1 is sampled from π = π_ref: KL 0 by construction; then KL rises at the update's pace while β
    moves at the controller's). A step counts as drift (``drift["warnings"]`` += 1) when the mean is out of the band
    and either β sits at the bound that would correct it (at ``kl_coef_max`` with KL above the band, at
    ``kl_coef_min`` below it: the controller can do no more), or the mean has been out of the band for ``patience``
    rollouts in a row (the controller is too slow for the run). A controller that does not aim at the target
    (``fixed``) is never judged against it.
    """
    drift["window"] = (drift["window"] + [kl])[-window:]
    if controller.name in UNTARGETED or rollout <= grace:
        return None
    recent, target, beta = float(np.mean(drift["window"])), controller.target_kl, controller.value
    lo, hi = BAND
    side = "high" if recent > hi * target else "low" if recent < lo * target else None
    drift["out_of_band"] = drift["out_of_band"] + 1 if side else 0
    bound = getattr(controller, "kl_coef_max" if side == "high" else "kl_coef_min", None)
    at_bound = side is not None and bound is not None and math.isclose(beta, bound, rel_tol=1e-9)
    state = "at_bound" if at_bound else "out_of_band" if drift["out_of_band"] >= patience else "ok"
    started, drift["state"] = state != drift["state"], state
    if state == "ok":
        return None
    drift["warnings"] += 1
    if not started:
        return None
    ratio = f"recent mean KL {recent:.3g} nats/token is {recent / target:.2g}x the target {target:g}"
    if at_bound and side == "high":
        return (
            f"KL drift: β is at its upper bound {bound:g} and the {ratio}: the controller cannot raise β further; "
            "lower ppo.lr (the per-rollout step) or raise controller.kl_coef_max"
        )
    if at_bound:
        return (
            f"KL drift: β is at its lower bound {bound:g} and the {ratio}: the controller cannot lower β further and "
            "the update does not move π that far; raise ppo.lr, lower controller.kl_coef_min or lower the target"
        )
    faster = (
        "shorten controller.horizon"
        if hasattr(controller, "horizon")
        else "raise controller.gain or set controller.relative_error=true"
        if hasattr(controller, "gain")
        else "use a controller that moves β faster"
    )
    if side == "high":
        return (
            f"KL drift: the {ratio}, above {hi:g}x for {patience} rollouts while β reached {beta:.3g}: the controller "
            f"is too slow for this run; {faster}, or lower ppo.lr"
        )
    return (
        f"KL drift: the {ratio}, below {lo:g}x for {patience} rollouts while β reached {beta:.3g}: the policy does "
        f"not reach the target in this job; {faster}, raise ppo.lr, run more steps or lower the target"
    )


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
    """Run (or resume, or return the summary of a finished) job in out_dir, as the only process there."""
    validate(cfg)  # every range check, before anything heavy is loaded
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(out):
        return _train(cfg, out)


def _train(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """The job's stages: set up (or resume), then one `Job.step` per rollout, then `Job.finish`."""
    summary_path = out / "summary.json"
    if summary_path.exists():
        log.info("%s already holds a finished run; returning its summary", out)
        return json.loads(summary_path.read_text())
    job = Job.setup(cfg, out)
    logger = RunLogger(cfg, out, job.resolved, name=run_name(cfg), resume=job.start_step > 0)
    console = contextlib.ExitStack()
    try:
        logger.replay(job.history)  # a resumed W&B run sees only new steps; metrics.jsonl is rewritten whole
        # On a terminal: a tqdm bar, with log lines (drift warnings, ...) printed above it instead of through it.
        # Without one (submitit/SLURM job logs, the sweep report's log tails): no carriage returns, a plain
        # progress line every 5 % of the job instead.
        tty = sys.stderr.isatty()
        if tty:
            console.enter_context(logging_redirect_tqdm())
        total, first = cfg.steps, job.start_step
        bar = tqdm(range(first, total), initial=first, total=total, desc=run_name(cfg), disable=not tty)
        progress_every = max(1, total // 20)
        for step in bar:
            rec, samples = job.step(step)
            logger.log(rec)
            last = step + 1 == total
            if (step + 1) % cfg.wandb.samples_every == 0 or last:
                logger.samples(step + 1, samples[:8])
            if job.gold is not None and "eval/gold_reward" in rec:  # this step's gold evaluation, a few prompts
                logger.eval_samples(step + 1, job.gold.last_samples)
            kl = f"{rec['kl/' + cfg.ppo.kl_signal]:.4f}/{job.target:g}"
            bar.set_postfix(reward=f"{rec['reward/mean']:+.3f}", kl=kl, beta=f"{rec['kl/coef']:.4g}", refresh=False)
            if not tty and ((step + 1) % progress_every == 0 or last):
                log.info(
                    "step %d/%d: reward %+.3f, KL %s nats/token, β %.4g, %.2f s/step",
                    *(step + 1, total, rec["reward/mean"], kl, rec["kl/coef"], rec["time/step_s"]),
                )
            if (step + 1) % cfg.checkpoint_every == 0 or last:
                job.save_checkpoint(step + 1)
        summary = job.finish()
        logger.summary(summary)
        tmp = summary_path.with_suffix(".tmp")  # written last: its presence means the job finished
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, summary_path)
        if not cfg.keep_checkpoints:  # after summary.json: a kill before this point still resumes
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            log.info("keep_checkpoints=false: deleted %s (a finished run is never resumed)", out / "checkpoints")
        return summary
    finally:
        console.close()
        logger.finish()


@dataclass
class Job:
    """Everything one job holds between rollouts: models, data, reward, controller, RNG streams, the history."""

    cfg: DictConfig
    out: Path
    resolved: dict
    device: torch.device
    algo: Algorithm
    ref_model: torch.nn.Module
    tokenizer: Any
    policy: PolicyWithValue
    optimizer: torch.optim.Optimizer
    prompts_all: torch.Tensor  # (N, P) the prompt pool
    choice: PrecisionChoice  # the precision this run's steps use
    started: PrecisionChoice  # the choice made when the run started (what checkpoints keep)
    eval_texts: list[str]
    reward_fn: Any
    controller: KLController
    prompt_gen: torch.Generator
    shuffle_gen: torch.Generator
    start_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    drift: dict[str, Any] = field(default_factory=new_drift_state)
    ppl_ref: float | None = None
    gold: Any = None  # kl_research.gold.GoldEval: the gold scorers on held-out prompts at eval steps (None: off)
    judge: Any = None  # AFINN on every rollout's responses (reward/judge; gold.rollout_judge): never trained on
    elapsed_before: float = 0.0
    fused_vocab: bool | str = True  # the update's vocabulary work: "kernel" | True (torch ops) | False (autograd)
    onednn_fp32: bool = False  # the fp32 GEMMs (head; an fp32 trunk's) through oneDNN (the onednn_fp32 key, resolved)
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def target(self) -> float:
        return self.controller.target_kl

    @property
    def amp(self):
        return autocast(self.device, self.choice.precision)

    @property
    def compile_vocab(self) -> bool:
        return resolve_compile_vocab(self.cfg.get("compile_vocab", "auto"), self.device)[0]

    @property
    def score_from_sampler(self) -> bool:
        # configs written before the key have none: false, so a resumed old run keeps its trajectory
        return bool(self.cfg.get("score_from_sampler", False))

    @property
    def sampler(self) -> str:
        return self.cfg.get("sampler", "auto")  # configs written before the key have none: auto

    # ---------------------------------------------------------------------------------------------- set up
    @classmethod
    def setup(cls, cfg: DictConfig, out: Path) -> Job:
        """Models, data, reward, controller; then the checkpoint's state if there is one."""
        # Deferred imports: these modules pull in transformers/datasets (seconds), not needed to validate.
        from kl_research.data import build_prompts, eval_subset, load_corpus
        from kl_research.gold import GoldEval
        from kl_research.reference import load_reference
        from kl_research.reward_model import build_job_reward

        resolved = OmegaConf.to_container(cfg, resolve=True)
        threads = setup_threads(cfg.threads)
        setup_allocator()
        device = resolve_device(cfg.device)
        pcfg = cfg.ppo
        log.info("run %s in %s on %s (%d threads)", run_name(cfg), out, device, threads)
        ckpt = load_checkpoint(out)
        if ckpt is not None:
            check_resumable(ckpt, resolved, out)

        ref_model, tokenizer = load_reference(cfg)
        # seeded after the reference is in hand: building it (first run on a fresh cache) draws from the global RNG,
        # and a job must sample the same tokens whether its reference was built now or loaded from the cache
        seed_everything(cfg.seed)
        disable_dropout(ref_model)
        ref_model.to(device).eval().requires_grad_(False)
        algo = build_algorithm(cfg)
        detach = bool(pcfg.detach_value_head)
        policy = PolicyWithValue.from_reference(ref_model, detach_value_head=detach, value_head=algo.value_head)
        policy.to(device).eval()  # dropout is off anyway; eval() also keeps HF from any train-only behaviour
        optimizer = make_optimizer(policy, pcfg, device)
        corpus = load_corpus(cfg.data)
        prompts_all = build_prompts(corpus.train, tokenizer, cfg.data.prompt_tokens, cfg.data.num_prompts, cfg.seed)
        # the scoring pass's and the update's forward (and the probe's, which times them): plain ops where they apply
        fast_trunk = bool(cfg.get("fast_trunk", True))  # configs written before the key have none: the default
        why_not = use_plain_trunk(policy.lm, fast_trunk)
        use_plain_trunk(ref_model, fast_trunk)
        log.info("fast_trunk=%s → %s", fast_trunk, "plain ops (kl_research/gpt2.py)" if fast_trunk and why_not is None
                 else f"transformers' forward{f' ({why_not})' if why_not else ''}")  # fmt: skip
        # configs written before the key have none: false (MKL's GEMM, their trajectory); auto keeps a checkpoint's
        onednn, why = resolve_onednn_fp32(cfg.get("onednn_fp32", False), device)
        kept = bool(ckpt.get("onednn_fp32", onednn)) if ckpt is not None else onednn
        if kept != onednn and cfg.get("onednn_fp32") == "auto" and (not kept or onednn_fp32_reason() is None):
            onednn, why = kept, f"auto: kept from the checkpoint (steps 1-{ckpt['step']} ran with it)"
        use_onednn_fp32(policy.lm, onednn)  # before the precision probe, which times the job's GEMMs
        use_onednn_fp32(ref_model, onednn)
        log.info("onednn_fp32=%s → %s", cfg.get("onednn_fp32", False), why)
        sampler = cfg.get("sampler", "auto")
        reason = fast_sampler_reason(policy.lm)
        if sampler == "fast" and reason is not None:  # before the precision probe, which samples with it
            raise ValueError(f"sampler='fast' is invalid for this model: {reason}; allowed: sampler=auto or hf")
        # the trunk's precision, on the eager policy (the probe restores the global RNG and leaves the weights alone)
        fast = uses_fast_sampler(policy.lm, sampler)
        choice, started = run_precision(
            cfg, device, policy, Workload.of_job(cfg, policy.lm, prompts_all.shape[1]), ckpt
        )
        log.info("precision=%s → %s: %s", cfg.precision, choice.precision, choice.reason)
        log.info("sampler=%s → %s", sampler, "fast (static KV cache, kl_research/decode.py)" if fast else "hf generate")
        log.info("compile_vocab=%s → %s", cfg.get("compile_vocab", "auto"), resolve_compile_vocab(
            cfg.get("compile_vocab", "auto"), device)[1])  # fmt: skip
        # configs written before the key have none, and `true` then: the torch-ops version, their trajectory
        cache_dir = resolve_cache_dir(cfg.get("cache_dir"))  # the kernel's build and the reference's perplexity
        fused_vocab, why = vocab_kernel.resolve_fused_vocab(cfg.get("fused_vocab", True), device, cache_dir)
        kept = ckpt.get("fused_vocab", fused_vocab) if ckpt is not None else fused_vocab
        if kept != fused_vocab and cfg.get("fused_vocab") == "auto" and (kept != "kernel" or vocab_kernel.loaded()):
            fused_vocab, why = kept, f"auto: kept from the checkpoint (steps 1-{ckpt['step']} ran with it)"
        log.info("fused_vocab=%s → %s", cfg.get("fused_vocab", True), why)
        if cfg.compile:  # scoring and the update run through the compiled trunk; generation stays eager (KV cache)
            compile_trunks(cfg.compile, policy.lm, ref_model)
            log.info("torch.compile(%s) of the scoring/update trunk: the first rollout and update compile", cfg.compile)
        job = cls(
            cfg=cfg,
            out=out,
            resolved=resolved,
            device=device,
            algo=algo,
            ref_model=ref_model,
            tokenizer=tokenizer,
            policy=policy,
            optimizer=optimizer,
            prompts_all=prompts_all,
            choice=choice,
            started=started,
            eval_texts=eval_subset(corpus.heldout, cfg.data.eval_texts),
            reward_fn=build_job_reward(cfg, device),  # reward=learned: the learned RM (built once, cached)
            controller=build_controller(cfg.controller),
            prompt_gen=torch.Generator().manual_seed(cfg.seed),
            shuffle_gen=torch.Generator().manual_seed(cfg.seed + 1),
        )
        job.fused_vocab, job.onednn_fp32 = fused_vocab, onednn
        job.gold = GoldEval.of(cfg, corpus.heldout, tokenizer)
        if cfg.get("gold") is not None and cfg.gold.get("rollout_judge", False):
            from kl_research.rewards import AfinnReward

            job.judge = AfinnReward(include_prompt=False)
        if ckpt is not None:
            job.resume(ckpt)
        if job.ppl_ref is None:  # the same number for every job with this reference: cached
            job.ppl_ref = job.evaluate_ppl(ref_model, cache_dir=cache_dir)
        job.t_start = time.perf_counter()
        return job

    def resume(self, ckpt: dict) -> None:
        """Continue exactly where the checkpoint's run stopped: weights, optimizer, controller, RNG streams."""
        self.policy.load_state_dict(ckpt["policy"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.controller.load_state_dict(ckpt["controller"])
        self.prompt_gen.set_state(ckpt["prompt_gen"])
        self.shuffle_gen.set_state(ckpt["shuffle_gen"])
        set_rng_state(ckpt["rng"])
        self.start_step, self.history = ckpt["step"], ckpt["history"]
        self.drift = {**new_drift_state(), **ckpt["drift"]}  # a checkpoint from before a key existed lacks it
        self.ppl_ref, self.elapsed_before = ckpt["ppl_ref"], ckpt["elapsed_s"]
        log.info("resumed from a checkpoint at step %d of %d (β = %.4g)", self.start_step, self.cfg.steps, self.beta)
        ran = (ckpt.get("device_type", self.device.type), ckpt.get("precision", self.choice.precision))
        if ran != (self.device.type, self.choice.precision):
            log.warning(
                "resumed on %s with a %s trunk; steps 1-%d ran on %s with a %s trunk (device=auto and precision=auto "
                "resolve per machine): from here the trajectory is not bit-identical to an uninterrupted run",
                *(self.device.type, self.choice.precision, self.start_step, *ran),
            )
        if ckpt.get("fused_vocab", self.fused_vocab) != self.fused_vocab:  # auto: the kernel where it builds
            log.warning(
                "resumed with fused_vocab resolved to %s; steps 1-%d ran with %s (fused_vocab=auto resolves per "
                "machine): from here the trajectory is not bit-identical to an uninterrupted run",
                *(self.fused_vocab, self.start_step, ckpt["fused_vocab"]),
            )
        if bool(ckpt.get("onednn_fp32", False)) != self.onednn_fp32:  # auto: oneDNN on a non-Intel AVX-512 CPU
            log.warning(
                "resumed with onednn_fp32 resolved to %s; steps 1-%d ran with %s (onednn_fp32=auto resolves per "
                "machine): the fp32 GEMMs' last bits may differ from an uninterrupted run's from here",
                *(self.onednn_fp32, self.start_step, bool(ckpt.get("onednn_fp32", False))),
            )

    @property
    def beta(self) -> float:
        return self.controller.value

    def evaluate_ppl(self, model, cache_dir: Path | None = None) -> float:
        """Held-out perplexity of `model` on the job's eval texts; through the cache in cache_dir when given (for a
        model that does not change: the reference)."""
        from kl_research.evaluate import cached_heldout_perplexity, heldout_perplexity

        kw = {"batch_size": 32, "max_length": self.cfg.data.eval_max_length, "device": self.device}
        if cache_dir is not None:
            return cached_heldout_perplexity(model, self.tokenizer, self.eval_texts, cache_dir=cache_dir, **kw)
        return heldout_perplexity(model, self.tokenizer, self.eval_texts, **kw)

    # ------------------------------------------------------------------------------------------- one step
    def step(self, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One rollout and its update. Returns (the step's record, one sample per sequence: prompt, response, task
        score, exact KL of the response in nats (kl_seq) and per response token (kl_token), length in tokens)."""
        cfg, pcfg = self.cfg, self.cfg.ppo
        t0 = time.perf_counter()
        idx = self.algo.prompt_indices(len(self.prompts_all), self.prompt_gen)
        prompts = self.prompts_all[idx].to(self.device)
        beta = self.beta  # the β this rollout's penalty uses

        # a. rollout: generate, then one scoring pass each for policy (+values) and reference
        batch = rollout(
            self.policy,
            self.ref_model,
            prompts,
            response_length=pcfg.response_length,
            temperature=pcfg.temperature,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            amp=self.amp,
            keep_ref_logprobs=uses_exact_kl_loss(pcfg),
            sampler=self.sampler,
            score_from_sampler=self.score_from_sampler,
            kernel=self.fused_vocab == "kernel",  # resolve_fused_vocab gives "kernel" on a CPU only
        )
        t_rollout = time.perf_counter()
        # b. task score on the decoded response (up to and including EOS; special tokens dropped)
        texts_p, responses, scores = self.score(prompts, batch)
        # c. KL: every estimator for the record, the configured one for the penalty and the signal
        kls = self.measure_kl(batch, step)
        # d. advantages (the algorithm's, with the KL mode's share) and the update's epochs
        advantages, returns = self.algo.advantages(batch, scores, beta)
        self.policy.train()
        upd = policy_update(
            self.algo, self.policy, self.optimizer, batch, advantages, returns, prompts.shape[1], self.amp,
            self.shuffle_gen, beta, self.compile_vocab, self.fused_vocab,
        )  # fmt: skip
        self.policy.eval()
        # e. exactly one controller update per rollout: per-token batch KL, n_steps = sequences. Not after rollout 1:
        # it is sampled from π = π_ref (the policy starts as the reference), so its KL is 0 by construction and
        # carries no information; fed to a controller it would read as a −100 % error.
        signal = kls[pcfg.kl_signal]
        if step > 0:
            self.controller.update(signal, pcfg.batch_size)
        drift = watch_drift(self.drift, signal, step + 1, self.controller, cfg.drift_window, cfg.drift_grace,
                            cfg.drift_patience)  # fmt: skip
        if drift is not None:
            log.warning(drift)

        mask = batch["mask"]
        n_tokens = int(mask.sum())
        step_s = time.perf_counter() - t0
        value = {"loss/value": upd["vf"], "loss/value_clipfrac": upd["vclipfrac"]} if "vf" in upd else {}
        rec: dict[str, Any] = {
            "step": step + 1,
            "samples": (step + 1) * pcfg.batch_size,
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()),
            **({"reward/judge": float(self.judge(texts_p, responses).mean())} if self.judge is not None else {}),
            **{f"kl/{k}": v for k, v in kls.items()},
            "kl/target": self.target,
            "kl/coef": beta,
            "kl/coef_next": self.beta,
            "kl/error": (signal - self.target) / self.target,
            "kl/drift_warnings": self.drift["warnings"],
            "policy/entropy": float(masked_mean(batch["entropy"], mask)),
            "policy/approx_kl": upd["approx_kl"],
            "policy/approx_kl_last_epoch": upd["approx_kl_last_epoch"],
            "policy/epochs": upd["epochs"],
            "loss/kl": upd["kl"],
            "policy/clipfrac": upd["clipfrac"],
            "loss/policy": upd["pg"],
            **value,
            "loss/grad_norm": upd["gnorm"],
            "response/length": n_tokens / pcfg.batch_size,
            "time/step_s": step_s,
            "time/rollout_s": t_rollout - t0,
            "throughput/tokens_per_s": n_tokens / step_s,
            **peak_memory_mb(self.device),
        }
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            from kl_research.evaluate import distinct_n

            rec["eval/ppl_heldout"] = self.evaluate_ppl(self.policy.lm)
            rec["eval/ppl_ref"] = self.ppl_ref
            rec["eval/distinct_2"] = distinct_n(responses, 2)
            if self.gold is not None:  # gold and proxy on held-out prompts: logged only, in a fork of the RNG
                rec.update(self.gold(self.policy.lm, self.ref_model, self.reward_fn, self.amp))
        self.history.append(rec)
        kl_seq, length = masked_sum(batch["exact_kl"], mask).tolist(), mask.sum(-1).tolist()  # (B,) nats, tokens
        samples = [
            {"prompt": p, "response": r, "reward": x, "kl_seq": k, "kl_token": k / max(n, 1), "length": n}
            for p, r, x, k, n in zip(texts_p, responses, scores.tolist(), kl_seq, length, strict=True)
        ]
        return rec, samples

    def score(self, prompts: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[list[str], list[str], torch.Tensor]:
        """(prompt texts, response texts, task scores (B,)): the response up to and including EOS, specials dropped."""
        tok = self.tokenizer
        texts_p = tok.batch_decode(prompts, skip_special_tokens=True)
        responses = [
            tok.decode(r[m], skip_special_tokens=True)
            for r, m in zip(batch["response"].cpu(), batch["mask"].cpu(), strict=True)
        ]
        return texts_p, responses, self.reward_fn(texts_p, responses).to(self.device)

    def measure_kl(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """The batch's KL in nats per response token by every estimator and exactly (kl/<name> in the logs)."""
        mask = batch["mask"]
        kls = {e: float(masked_mean(token_kl(batch["logp"], batch["ref_logp"], e), mask)) for e in ESTIMATORS}
        kls["exact"] = float(masked_mean(batch["exact_kl"], mask))
        if not all(math.isfinite(v) for v in kls.values()):
            raise FloatingPointError(f"non-finite KL at step {step + 1}: {kls}; the last good checkpoint is kept")
        return kls

    # ------------------------------------------------------------------------------------------ save, end
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save_checkpoint(self, step: int) -> None:
        atomic_save(
            {
                "step": step,
                "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "controller": self.controller.state_dict(),
                "prompt_gen": self.prompt_gen.get_state(),
                "shuffle_gen": self.shuffle_gen.get_state(),
                "rng": rng_state(),
                "history": self.history,
                "drift": self.drift,
                "ppl_ref": self.ppl_ref,
                "elapsed_s": self.elapsed(),
                "device_type": self.device.type,
                "precision": self.choice.precision,
                "fused_vocab": self.fused_vocab,  # as resolved: "kernel" | True | False
                "onednn_fp32": self.onednn_fp32,  # as resolved
                "precision_choice": self.started.record(),  # how it was chosen when the run started
                "config": self.resolved,
            },
            self.out / CHECKPOINT,
            keep_previous=self.out / PREVIOUS_CHECKPOINT,
        )

    def finish(self) -> dict[str, Any]:
        """The final policy (+ value head), the summary and the curves figure. Returns the summary."""
        from safetensors.torch import save_file

        wall = self.elapsed()
        out, cfg = self.out, self.cfg
        self.policy.lm.save_pretrained(out / "policy")
        self.tokenizer.save_pretrained(out / "policy")
        if self.policy.v_head is not None:
            save_file(self.policy.v_head.state_dict(), str(out / "policy" / "value_head.safetensors"))
        memory = {k.removeprefix("memory/"): v for k, v in peak_memory_mb(self.device).items()}
        summary = {**summarize(self.history, cfg, wall), "device": str(self.device), **self.choice.record(), **memory}
        summary["onednn_fp32"] = self.onednn_fp32  # the fp32 GEMMs' library as resolved (oneDNN or torch's BLAS)
        rm_meta = getattr(self.reward_fn, "meta", None)  # reward=learned: the proxy's own agreement with the gold
        if rm_meta is not None:
            summary.update({f"proxy_test_{k}": rm_meta["test"][k] for k in ("pearson", "spearman", "accuracy")})
            summary["proxy_n_labels"] = rm_meta["n_labels"]
        plot_curves(self.history, self.target, out / "curves.png", title=run_name(cfg))
        log.info(
            "done: reward %.3f, KL %.4g (target %g), tracking error %.2f, β %.4g, ppl %.2f (ref %.2f), %.0f s",
            *(summary["reward"], summary["kl"], self.target, summary["tracking_error"], summary["final_beta"]),
            *(summary["ppl_final"], summary["ppl_ref"], wall),
        )
        return summary
