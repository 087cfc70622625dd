"""The algorithms behind the trainer's loop, each as three pieces: which prompts a rollout draws, the advantages of
its tokens, and the loss of a minibatch. `policy_update` runs the epochs × minibatches of any of them.

- `PPO` (algo=ppo, the default): one response per drawn prompt; GAE over per-token rewards with a value head; the
  clipped surrogate + vf_coef · clipped value loss.
- `GRPO` (algo=grpo): G responses per prompt; advantage (score − group mean)/(group std + ε) on every response token;
  no value head; the clipped surrogate.

Both put the KL in the same places, by `ppo.kl_mode` and `ppo.kl_penalty` (kl.SEQUENCE_GRADIENT says what each pair
differentiates), with β from the same controllers:
- a loss term β·KL per position (loss and sequence modes), differentiated through the current policy;
- the score-function half of ∇KL_seq through the advantages, never whitened (sequence mode: −β·Σ_{t>s} exact KL_t;
  reward mode: −β·k1 per token in PPO's rewards, or its γ = 1 return Σ_{t>=s} k1_t in GRPO's advantages).
tests/test_kl_sequence.py differentiates exactly `advantages` and `loss` over enumerated responses, for both.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from kl_research import ppo, vocab_kernel
from kl_research.kl import masked_mean, tempered, token_kl
from kl_research.policy import PolicyWithValue

Tensors = dict[str, torch.Tensor]


def uses_exact_kl_loss(pcfg: DictConfig) -> bool:
    """The exact KL as a loss term (kl_mode=loss or sequence with kl_penalty=exact): the rollout keeps the
    reference's full log-probs for every minibatch."""
    return pcfg.kl_mode in ("loss", "sequence") and pcfg.kl_penalty == "exact"


class Algorithm:
    """What differs between policy-gradient algorithms in this trainer. Subclasses set `name` and `value_head`."""

    name: str = ""
    value_head: bool = True  # the policy has a value head, and the rollout and the loss use its values

    def __init__(self, pcfg: DictConfig, acfg: DictConfig | None = None) -> None:
        self.pcfg, self.acfg = pcfg, acfg

    def prompt_indices(self, n_prompts: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size,) indices into the prompt pool for one rollout."""
        return torch.randint(n_prompts, (self.pcfg.batch_size,), generator=generator)

    def advantages(self, batch: Tensors, scores: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages (B, R), value targets (B, R) or None without a value head)."""
        raise NotImplementedError

    def loss(
        self,
        logprobs: torch.Tensor,
        values: torch.Tensor | None,
        mb: Tensors,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
        beta: float | torch.Tensor,
    ) -> tuple[torch.Tensor, Tensors]:
        """(the minibatch's loss, its parts for the logs). logprobs: (b, R, V) log-softmax of the current policy.
        The vocabulary's share (log π(y), and the exact KL per position when the KL loss needs it) is
        `stats_of_logprobs`, which `policy_update` reaches through `vocab_stats` (compiled or not)."""
        ref = mb["ref_logprobs"] if uses_exact_kl_loss(self.pcfg) else None
        logp, kl_pos = stats_of_logprobs(logprobs, mb["response"], ref)
        return self.loss_from_stats(logp, kl_pos, values, mb, advantages, returns, beta)

    def loss_from_stats(
        self,
        logp: torch.Tensor,
        kl_pos: torch.Tensor | None,
        values: torch.Tensor | None,
        mb: Tensors,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
        beta: float | torch.Tensor,
    ) -> tuple[torch.Tensor, Tensors]:
        """The loss from per-token numbers only: logp = log π(y) (b, R) of the current policy and kl_pos the exact
        KL(π‖π_ref) at each position (b, R), None unless the KL loss is the exact one."""
        raise NotImplementedError

    # ---- the KL, shared by every algorithm
    def kl_loss(self, kl_pos: torch.Tensor | None, logp: torch.Tensor, mb: Tensors) -> torch.Tensor:
        """The per-position KL loss term of kl_mode=loss|sequence (0 with kl_mode=reward), before β."""
        pcfg, mask = self.pcfg, mb["mask"]
        if uses_exact_kl_loss(pcfg):
            return masked_mean(kl_pos, mask)  # = ppo.exact_kl_loss(logprobs, ref_logprobs, mask)
        if pcfg.kl_mode == "loss" and pcfg.kl_penalty == "k2":
            return ppo.k2_kl_loss(logp, mb["ref_logp"], mask)
        if pcfg.kl_mode == "loss" and pcfg.kl_penalty == "k3":
            return ppo.k3_kl_loss(logp, mb["ref_logp"], mask)
        return torch.zeros((), dtype=logp.dtype, device=logp.device)

    def kl_credit(self, batch: Tensors, to_go: torch.Tensor) -> torch.Tensor:
        """A per-token KL credit minus its leave-one-out baseline (ppo.kl_baseline=loo), or as is (none)."""
        if self.pcfg.kl_baseline == "loo":
            return to_go - ppo.leave_one_out_baseline(to_go, batch["mask"])
        return to_go


class PPO(Algorithm):
    name = "ppo"
    value_head = True

    def advantages(self, batch: Tensors, scores: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rewards → GAE → (whitened) advantages, and the value targets. (B, R) each.

        kl_mode=reward: −β·k1 on every response token plus the score at the last one (lm-human-preferences, TRL); the
            value head learns the penalised return and the whole advantage is whitened.
        kl_mode=loss: the score alone; the KL acts through the β·KL loss term instead (partial gradient).
        kl_mode=sequence: the score's advantage as in `loss`, plus the KL's score-function half, which `loss` lacks:
            −β·(Σ_{t>s} exact KL_t − baseline) at token s (ppo.kl_to_go; baseline: ppo.kl_baseline). That part is
            *not* whitened, exactly as the analytic β·KL loss term it completes is not: whitening the one and not the
            other would weigh the two halves of ∇KL_seq differently. The value head learns the score's return only.
        """
        pcfg, mask = self.pcfg, batch["mask"]
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
            advantages = advantages - beta * self.kl_credit(batch, ppo.kl_to_go(batch["exact_kl"], mask))
        return advantages, returns

    def loss_from_stats(
        self,
        logp: torch.Tensor,
        kl_pos: torch.Tensor | None,
        values: torch.Tensor | None,
        mb: Tensors,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
        beta: float | torch.Tensor,
    ) -> tuple[torch.Tensor, Tensors]:
        """Clipped policy loss + vf_coef · clipped value loss (+ β·KL term with kl_mode=loss|sequence)."""
        pcfg, mask = self.pcfg, mb["mask"]
        pg_loss, clipfrac, approx_kl = ppo.policy_loss(logp, mb["logp"], advantages, mask, pcfg.cliprange)
        vf_loss, vclipfrac = ppo.value_loss(values, mb["values"], returns, mask, pcfg.cliprange_value)
        kl_term = self.kl_loss(kl_pos, logp, mb)
        loss = pg_loss + pcfg.vf_coef * vf_loss + beta * kl_term
        parts = {"pg": pg_loss, "vf": vf_loss, "kl": kl_term, "clipfrac": clipfrac, "vclipfrac": vclipfrac}
        return loss, {**parts, "approx_kl": approx_kl}


class GRPO(Algorithm):
    name = "grpo"
    value_head = False

    def prompt_indices(self, n_prompts: int, generator: torch.Generator) -> torch.Tensor:
        """batch_size / G distinct draws, each repeated G times in adjacent rows: one group per prompt."""
        G = self.acfg.group_size
        return torch.randint(n_prompts, (self.pcfg.batch_size // G,), generator=generator).repeat_interleave(G)

    def advantages(self, batch: Tensors, scores: torch.Tensor, beta: float) -> tuple[torch.Tensor, None]:
        """(score − group mean)/(group std + ε) on every response token, plus the KL's score-function half:
        −β·(Σ_{t>s} exact KL_t − baseline) with kl_mode=sequence, −β·(Σ_{t>=s} k1_t − baseline) with kl_mode=reward
        (the γ = 1 return of PPO's per-token −β·k1). The KL part is not normalised: β keeps its meaning."""
        pcfg, mask = self.pcfg, batch["mask"]
        group = ppo.group_advantages(scores, self.acfg.group_size, self.acfg.std_eps, self.acfg.scale_rewards)
        advantages = group.to(batch["logp"].dtype).unsqueeze(1) * mask
        if pcfg.kl_mode == "sequence":
            advantages = advantages - beta * self.kl_credit(batch, ppo.kl_to_go(batch["exact_kl"], mask))
        elif pcfg.kl_mode == "reward":
            k1 = token_kl(batch["logp"], batch["ref_logp"], pcfg.kl_penalty)
            advantages = advantages - beta * self.kl_credit(batch, ppo.reward_to_go(k1, mask))
        return advantages, None

    def loss_from_stats(
        self,
        logp: torch.Tensor,
        kl_pos: torch.Tensor | None,
        values: torch.Tensor | None,
        mb: Tensors,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
        beta: float | torch.Tensor,
    ) -> tuple[torch.Tensor, Tensors]:
        """Clipped policy loss (+ β·KL term with kl_mode=loss|sequence); token-level mean over the minibatch."""
        mask = mb["mask"]
        pg_loss, clipfrac, approx_kl = ppo.policy_loss(logp, mb["logp"], advantages, mask, self.pcfg.cliprange)
        kl_term = self.kl_loss(kl_pos, logp, mb)
        loss = pg_loss + beta * kl_term
        return loss, {"pg": pg_loss, "kl": kl_term, "clipfrac": clipfrac, "approx_kl": approx_kl}


ALGORITHMS: dict[str, type[Algorithm]] = {"ppo": PPO, "grpo": GRPO}


def build_algorithm(cfg: DictConfig) -> Algorithm:
    """The job's algorithm from `algo.name` (ppo when a config predates the key) and its `ppo` settings."""
    acfg = cfg.get("algo")
    name = acfg.name if acfg is not None else "ppo"
    return ALGORITHMS[name](cfg.ppo, acfg)


def vocab_stats(
    logits: torch.Tensor,
    response: torch.Tensor,
    temperature: float,
    ref_logprobs: torch.Tensor | None = None,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The update's whole share of work over the vocabulary, from the minibatch's (b, R, V) fp32 logits: log π(y)
    (b, R) at the response tokens and, given the reference's (b, R, V) log-probs, the exact KL(π‖π_ref) at each
    position (b, R). The same ops as `Algorithm.loss` on log_softmax(logits/T). One function, so that
    the `compile_vocab` key can compile it (forward and backward) into a few fused loops over V, not ~12 passes.
    fused (the `fused_vocab` key): with ref_logprobs, `ppo.logp_and_exact_kl`'s hand-written backward instead of
    autograd's (the same numbers; ~half the passes over V in eager mode)."""
    z = tempered(logits, temperature)
    if fused and ref_logprobs is not None:
        return ppo.logp_and_exact_kl(z, response, ref_logprobs)
    return stats_of_logprobs(torch.log_softmax(z, dim=-1), response, ref_logprobs)


def stats_of_logprobs(
    logprobs: torch.Tensor, response: torch.Tensor, ref_logprobs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y) (b, R) at the response tokens and, given the reference's log-probs, the exact KL per position (b, R),
    from the (b, R, V) log-probs of the current policy: what `Algorithm.loss` and `vocab_stats` both take."""
    logp = logprobs.gather(-1, response.unsqueeze(-1)).squeeze(-1)  # (b, R)
    kl_pos = None if ref_logprobs is None else ppo.exact_token_kl_of_logprobs(logprobs, ref_logprobs)
    return logp, kl_pos


_COMPILED_VOCAB_STATS = None


def compiled_vocab_stats():
    """vocab_stats through torch.compile (inductor; shapes fixed per minibatch, so it compiles once per run and is
    cached on disk by inductor for the next run). Built on first use."""
    global _COMPILED_VOCAB_STATS
    if _COMPILED_VOCAB_STATS is None:
        _COMPILED_VOCAB_STATS = torch.compile(vocab_stats, dynamic=False)
    return _COMPILED_VOCAB_STATS


def policy_update(
    algo: Algorithm,
    policy: PolicyWithValue,
    optimizer: torch.optim.Optimizer,
    batch: Tensors,
    advantages: torch.Tensor,
    returns: torch.Tensor | None,
    prompt_len: int,
    amp,
    generator: torch.Generator,
    beta: float = 0.0,
    compile_vocab: bool = False,
    fused_vocab: bool | str = False,
) -> dict[str, float]:
    """epochs × minibatches of the algorithm's loss, with gradient clipping. Returns each loss part's mean over the
    steps. compile_vocab: the per-token work over the vocabulary (`vocab_stats`) through torch.compile (it compiles
    the autograd version and takes precedence); fused_vocab: that work with its hand-fused backward, in torch ops
    (True) or as the C kernel ("kernel", kl_research/vocab_kernel.py: `vocab_kernel.load` first).

    With ppo.target_approx_kl set, the epochs stop early once an epoch's mean approx-KL(π_old‖π) exceeds it.
    """
    pcfg = algo.pcfg
    B = batch["seqs"].shape[0]
    stats: dict[str, list[float]] = {}
    per_seq = [k for k in ("mask", "response", "logp", "values", "ref_logp", "ref_logprobs") if k in batch]
    exact = uses_exact_kl_loss(pcfg)
    kernel = exact and fused_vocab == "kernel" and not compile_vocab  # reads the reference's rows in place
    if kernel:
        per_seq.remove("ref_logprobs")
    stats_fn = compiled_vocab_stats() if compile_vocab else functools.partial(vocab_stats, fused=bool(fused_vocab))
    epoch_kl = 0.0
    epochs_run = 0
    for _ in range(pcfg.epochs):
        order = torch.randperm(B, generator=generator)
        epoch_approx = []
        for start in range(0, B, pcfg.minibatch_size):
            idx = order[start : start + pcfg.minibatch_size]
            with amp:
                logits, values = policy.score(batch["seqs"][idx], prompt_len, with_values=algo.value_head)
            mb = {k: batch[k][idx] for k in per_seq}
            if kernel:
                z = tempered(logits, pcfg.temperature)
                logp, kl_pos = vocab_kernel.logp_and_exact_kl(z, mb["response"], batch["ref_logprobs"], idx)
            else:
                logp, kl_pos = stats_fn(logits, mb["response"], pcfg.temperature, mb["ref_logprobs"] if exact else None)
            ret = returns[idx] if returns is not None else None
            loss, parts = algo.loss_from_stats(logp, kl_pos, values, mb, advantages[idx], ret, beta)
            if not torch.isfinite(loss):
                named = ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())
                raise FloatingPointError(
                    f"non-finite {algo.name.upper()} loss ({named}); stopping; the last good checkpoint is kept"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), pcfg.max_grad_norm)
            optimizer.step()
            for k, v in (*parts.items(), ("gnorm", gnorm)):
                stats.setdefault(k, []).append(float(v.detach()))
            epoch_approx.append(stats["approx_kl"][-1])
        epochs_run += 1
        epoch_kl = float(np.mean(epoch_approx))
        if pcfg.target_approx_kl is not None and epoch_kl > pcfg.target_approx_kl:
            break
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in stats.items()}
    out["approx_kl_last_epoch"] = epoch_kl
    out["epochs"] = float(epochs_run)
    return out
