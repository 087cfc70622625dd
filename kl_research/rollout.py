"""One rollout: sample responses with the KV cache, then score the policy (+ values) and the reference once each.

Sampling is exactly softmax(logits/T) (no top-k/top-p, docs/kl-contract.md), and the per-token numbers every KL mode and
estimator needs come from one log-softmax per model (`token_stats`).
"""

from __future__ import annotations

from typing import Any

import torch

from kl_research import ppo, vocab_kernel
from kl_research.decode import sample, uses_fast_sampler
from kl_research.kl import tempered
from kl_research.policy import PolicyWithValue, score_lm

VOCAB_CHUNK = 1 << 17  # elements of (rows, V) per chunk of token_stats: ~0.5 MB, inside one core's L2


def vocab_row_chunks(n: int, vocab: int) -> list[slice]:
    """Slices of n rows, each ≤ VOCAB_CHUNK elements of a (rows, vocab) tensor (at least one row): the scoring pass's
    per-token work over the vocabulary (`token_stats`) runs chunk by chunk so that a chunk's temporaries stay
    in L2 between its passes (2-core Intel Xeon with AMX, 1 thread: 28.9 → 21.8 ms per rollout with ~8 MB chunks →
    one sequence of 24 × 4096; docs/performance.md). The update's fused function (`ppo._LogpExactKL`) is not chunked:
    there it measured slower (its saved π and d are full-size writes either way)."""
    rows = max(1, VOCAB_CHUNK // vocab)
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


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
    few sequences at a time (`vocab_row_chunks`: one sequence of 24 × 4096) so that the (b, R, V) temporaries
    stay in L2 between passes instead of full-batch.
    ref_logprobs_out: an optional (B, R, V) fp32 buffer that receives log π_ref (the KL-loss mode needs it).
    """
    B, R, V = logits.shape
    out = torch.empty(4, B, R, dtype=torch.float32, device=logits.device)
    for c in vocab_row_chunks(B, R * V):  # whole sequences, ~0.5 MB per temporary
        lp = torch.log_softmax(tempered(logits[c], temperature), dim=-1)  # (b, R, V) log π
        ref_z = tempered(ref_logits[c], temperature)
        if ref_logprobs_out is not None:  # log π_ref written in place into the buffer (a copy less per chunk)
            ref_lp = torch.ops.aten._log_softmax.out(ref_z, -1, False, out=ref_logprobs_out[c])
        else:
            ref_lp = torch.log_softmax(ref_z, dim=-1)  # (b, R, V) log π_ref
        idx = response[c].unsqueeze(-1)  # (b, R, 1)
        out[0, c] = lp.gather(-1, idx).squeeze(-1)
        out[1, c] = ref_lp.gather(-1, idx).squeeze(-1)
        p = lp.exp()
        out[3, c] = -(p * lp).sum(-1)  # entropy
        out[2, c] = (p * lp.sub_(ref_lp)).sum(-1)  # Σ_v π(v)·(log π(v) − log π_ref(v)); lp spent
    return out[0], out[1], out[2], out[3]


def sampling_kwargs(
    prompts: torch.Tensor, temperature: float, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int
) -> dict[str, Any]:
    """`generate` settings that sample exactly from softmax(logits/T): no top-k, no top-p, no min_new_tokens
    (docs/kl-contract.md, "PPO and controllability": any logits processor makes the sampling distribution differ
    from the one the log-probs are scored with; a response that is only EOS is fine, its mask has one token)."""
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


def sample_responses(
    lm: torch.nn.Module,
    prompts: torch.Tensor,
    *,
    response_length: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    sampler: str = "auto",
    scores_out: dict[str, torch.Tensor] | None = None,
    kernel: bool = False,
) -> torch.Tensor:
    """(B, P + R') sampled from softmax(logits/T) after equal-length prompts (B, P), R' ≤ response_length.
    sampler: "fast" (kl_research.decode: static KV cache, plain tensor ops; GPT-2 architectures), "hf" (`generate`),
    "auto" (fast where the model allows it, else hf). Both draw exactly from softmax(logits/T), token for token the
    same under one seed (tests/test_decode.py). Call under torch.inference_mode (and the trunk's autocast).
    scores_out: filled by the fast sampler only (decode.sample), left empty by `generate`. kernel: the fast sampler
    draws through kl_research/vocab_kernel.py (decode.sample's `kernel`)."""
    if uses_fast_sampler(lm, sampler):
        return sample(
            lm, prompts, max_new_tokens=response_length, temperature=temperature,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, scores_out=scores_out, kernel=kernel,
        )  # fmt: skip
    return lm.generate(
        input_ids=prompts, **sampling_kwargs(prompts, temperature, response_length, eos_token_id, pad_token_id)
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
    sampler: str = "auto",
    score_from_sampler: bool = False,
    kernel: bool = False,
) -> dict[str, torch.Tensor]:
    """Sample responses with the KV cache, then score policy (+values) and reference once each.

    prompts: (B, P) token ids, all of length P. Returns response ids (B, R), mask (B, R), and fp32 logp, ref_logp,
    values (B, R; absent without a value head), exact KL, entropy (B, R); with keep_ref_logprobs also the
    reference's full-vocabulary log-probs (B, R, V), which the exact-KL loss reuses in every minibatch.
    sampler: see `sample_responses`. score_from_sampler: take the policy's logits and values from the fast sampler's
    decoding steps (decode.sample's scores_out: the same numbers as the policy's scoring pass, to fp32 rounding,
    tests/test_decode.py) instead of running that pass; only the reference is then scored. It applies where the fast
    sampler ran and decoded all R positions (not every sequence ended early); otherwise the scoring pass runs.
    kernel: the per-token numbers from kl_research/vocab_kernel.py's C loop (`fused_vocab` resolved to "kernel") instead
    of `token_stats`'s torch ops (the same numbers to fp32 rounding, tests/test_vocab_kernel.py), and the fast
    sampler's draws from its `sample_rows` (the same tokens).
    """
    B, P = prompts.shape
    scores: dict[str, torch.Tensor] | None = {} if score_from_sampler else None
    with amp:
        seqs = sample_responses(
            policy.lm,
            prompts,
            response_length=response_length,
            temperature=temperature,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            sampler=sampler,
            scores_out=scores,
            kernel=kernel,
        )  # (B, P + R'), R' <= R when every sequence stopped early; fmt: skip
    from_sampler = bool(scores) and seqs.shape[1] == P + response_length
    if seqs.shape[1] < P + response_length:  # pad to a fixed R so every rollout has one shape
        pad = torch.full((B, P + response_length - seqs.shape[1]), pad_token_id, dtype=seqs.dtype, device=seqs.device)
        seqs = torch.cat([seqs, pad], 1)
    response = seqs[:, P:]  # (B, R)
    mask = ppo.response_mask(response, eos_token_id)  # (B, R)
    with amp:
        if from_sampler:
            logits, values = scores["logits"], None  # (B, R, V) fp32
            if policy.v_head is not None:  # the value head in fp32 on the final hidden states, as score_lm
                with torch.autocast(logits.device.type, enabled=False):
                    values = policy.v_head(scores["hidden"]).view(B, response_length)  # (B, R)
        else:
            logits, values = policy.score(seqs, P)  # (B, R, V), (B, R)
        ref_logits, _ = score_lm(ref_model, seqs, P)  # (B, R, V)
    ref_logprobs = torch.empty_like(ref_logits) if keep_ref_logprobs else None
    stats = vocab_kernel.token_stats if kernel else token_stats
    logp, ref_logp, exact_kl, entropy = stats(logits, ref_logits, response, temperature, ref_logprobs)
    extra = {"ref_logprobs": ref_logprobs} if keep_ref_logprobs else {}
    if values is not None:  # a policy without a value head (algo=grpo) has none
        extra["values"] = values
    return {
        **extra,
        "seqs": seqs,
        "response": response,
        "mask": mask,
        "logp": logp,
        "ref_logp": ref_logp,
        "exact_kl": exact_kl,
        "entropy": entropy,
    }
