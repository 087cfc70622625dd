"""Fast sampling for GPT-2-architecture policies: a decode loop over a preallocated (static) KV cache in plain tensor
ops (GPT-2's blocks as kl_research/gpt2.py writes them, the same ones the scoring pass runs), with the sampling fused
into it.

Why (docs/performance.md, "Fast paths"): at the tiny default (4 layers × 128, batch 64, 24 new tokens) HF `generate`
took ~8× its GEMMs' time, most of it torch.multinomial's B·V random numbers per token and per-token machinery (logits
processors, stopping criteria, cache objects, the modules' Python). The GEMMs are the same here; what goes is most of
what surrounds them: one preallocated K/V buffer per layer written in place, and one softmax + an inverse-CDF draw per
token (`inverse_cdf_sample`: B random numbers). Measured: 0.29 → 0.11 s per rollout's generation, 2.6-3.4× its GEMMs.

The distribution is exactly the policy's at the scoring temperature: p = softmax(logits / T) computed in fp32 from an
fp32 vocabulary projection (the same as `policy.score_lm`), no top-k / top-p / min-length (docs/kl-contract.md).
After a sequence's EOS its later tokens are `pad_token_id`, as `generate` does, and the loop stops once every
sequence has ended. It draws from torch's global generator, so a checkpoint's RNG state resumes the same trajectory;
the draws differ from `generate`'s (inversion, not multinomial's exponential race), the distribution does not.

The weights are read from the live modules at each call (under autocast, cast once per call), so the optimizer's
in-place updates are seen.
Models this does not implement (e.g. Llama/SmolLM2) use HF `generate`: `fast_sampler_reason` says why.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from kl_research import vocab_kernel
from kl_research.gpt2 import attention_scale, block_weights, blocks, unsupported_reason
from kl_research.policy import head_linear
from kl_research.runtime import onednn_fp32_on


def fast_sampler_reason(lm: torch.nn.Module) -> str | None:
    """None if `sample` can generate for this LM; otherwise why not (the caller then uses HF `generate`)."""
    reason = unsupported_reason(lm)
    if reason is not None:
        return reason
    cfg = lm.config
    if lm.training and (cfg.attn_pdrop > 0 or cfg.resid_pdrop > 0 or cfg.embd_pdrop > 0):
        return "dropout active in training mode"
    return None


def uses_fast_sampler(lm: torch.nn.Module, sampler: str) -> bool:
    """Whether the `sampler` key ("auto" | "fast" | "hf") samples this LM with `sample` (else HF `generate`): "fast"
    always (`sample` refuses a model it cannot run, saying why), "auto" where `fast_sampler_reason` finds nothing."""
    return sampler == "fast" or (sampler == "auto" and fast_sampler_reason(lm) is None)


def inverse_cdf_sample(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs (B, V) by inversion: the token v with cdf[v−1] ≤ u·cdf[V−1] < cdf[v], u ~ U[0, 1)
    from torch's global generator. Exactly P(v) = probs[v]/Σ probs (a zero-probability token has an empty interval);
    the cumulative sum is in fp64 so that 4096-49152 terms add without losing the small probabilities' mass.

    `torch.multinomial` (what `generate` calls) draws one exponential per vocabulary entry and takes an argmax: at
    batch 64 × V 4096 that is 262 k random numbers per token, ~8 ms of a 1-thread CPU's time per decoding step,
    more than the step's GEMMs (a profile of the tiny default); inversion draws B."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


@torch.inference_mode()
def sample(
    lm: torch.nn.Module,
    prompts: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    scores_out: dict[str, torch.Tensor] | None = None,
    kernel: bool = False,
) -> torch.Tensor:
    """Sample up to max_new_tokens after equal-length prompts (B, P) from softmax(logits/T). Returns (B, P + R'),
    R' ≤ max_new_tokens (shorter when every sequence has ended), like `generate`'s output. scores_out: a dict that
    receives "logits" (B, R', V), each step's fp32 logits before the temperature, and "hidden" (B, R', C), the final
    hidden state (after ln_f) each was projected from: the numbers the scoring pass (policy.score_lm) computes for
    the sampled sequence, ended sequences' pads included (tests/test_decode.py), so that a rollout can take them
    instead of running it. kernel: each token's draw from the softmax by kl_research/vocab_kernel.py's C loop
    (`sample_rows`, load() first: the same uniforms and, to fp64 rounding of the cdf, the same tokens) instead of
    `inverse_cdf_sample`'s cumsum and search (~0.3 ms of ~4 ms per decoding step at the tiny default, 1 thread)."""
    reason = fast_sampler_reason(lm)
    if reason is not None:
        raise ValueError(f"the fast sampler cannot run this model: {reason}")
    cfg = lm.config
    tr = lm.transformer
    B, P = prompts.shape
    S = P + max_new_tokens
    if S > cfg.n_positions:
        raise ValueError(f"prompt {P} + {max_new_tokens} new tokens exceed the model's {cfg.n_positions} positions")
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    eps = cfg.layer_norm_epsilon
    device = prompts.device
    scales = [attention_scale(cfg, i) for i in range(cfg.n_layer)]
    # torch.autocast (bf16 trunk) decides the GEMMs' dtype as it does for HF's modules; the weights are cast once per
    # call (autocast keeps no cast weights under inference mode: a profile counted 41 casts of each per PPO step). The
    # attention runs as the scoring pass's (policy._kl_sdpa): on a CPU in fp32, so the cache is fp32 there; elsewhere
    # it takes the keys' dtype, set at the first write.
    amp_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    weights = block_weights(lm, amp_dtype)
    kcache: list[torch.Tensor | None] = [None] * cfg.n_layer
    vcache: list[torch.Tensor | None] = [None] * cfg.n_layer
    head_w = lm.get_output_embeddings().weight
    head_b = lm.get_output_embeddings().bias
    onednn = onednn_fp32_on(lm)  # the projection as score_lm's (runtime.use_onednn_fp32)
    inv_t = 1.0 / temperature
    cpu_amp = device.type == "cpu" and amp_dtype is not None
    cpu_fp32 = torch.autocast("cpu", enabled=False) if cpu_amp else contextlib.nullcontext()

    def layers(x: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, T, C) at positions start … start+T−1 through every block, the K/V written into the cache."""
        t = x.shape[1]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if kcache[i] is None:
                dtype = torch.float32 if device.type == "cpu" else k.dtype
                kcache[i] = k.new_empty(B, H, S, D, dtype=dtype)
                vcache[i] = k.new_empty(B, H, S, D, dtype=dtype)
            kc, vc = kcache[i], vcache[i]
            kc[:, :, start : start + t] = k
            vc[:, :, start : start + t] = v
            # one query row (decode) sees every cached position; the prompt (prefill) is causal within itself
            with cpu_fp32:  # CPU autocast would cast SDPA's inputs to bf16 (policy._kl_sdpa)
                return F.scaled_dot_product_attention(
                    q.to(kc.dtype), kc[:, :, : start + t], vc[:, :, : start + t], is_causal=t > 1, scale=scales[i]
                )  # (B, H, T, D)

        return blocks(lm, x, weights, attend)

    def next_token(x_last: torch.Tensor, t: int) -> torch.Tensor:
        """The sampled token ids (B,) from the last position's hidden state (B, C), the t-th response token's."""
        h = F.layer_norm(x_last, (x_last.shape[-1],), tr.ln_f.weight, tr.ln_f.bias, eps)
        with torch.autocast(device.type, enabled=False):  # the head and the softmax in fp32, as score_lm
            h = h.float()
            logits = head_linear(h, head_w.float(), None if head_b is None else head_b.float(), None, onednn)
            if scores_out is not None:
                if t == 0:
                    scores_out["logits"] = logits.new_empty(B, max_new_tokens, logits.shape[-1])
                    scores_out["hidden"] = h.new_empty(B, max_new_tokens, h.shape[-1])
                scores_out["logits"][:, t] = logits
                scores_out["hidden"][:, t] = h
            probs = torch.softmax(logits.mul_(inv_t) if inv_t != 1.0 else logits, dim=-1)
            return vocab_kernel.sample_rows(probs) if kernel else inverse_cdf_sample(probs)

    out = torch.full((B, S), pad_token_id, dtype=prompts.dtype, device=device)
    out[:, :P] = prompts
    pos = torch.arange(S, device=device)
    x = tr.wte(prompts) + tr.wpe(pos[:P])
    x = layers(x, 0)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    n = 0
    for t in range(max_new_tokens):
        tok = next_token(x[:, -1], t)
        if eos_token_id is not None:  # an ended sequence continues with pad, as generate does
            tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
            alive &= tok != eos_token_id
        out[:, P + t] = tok
        n = t + 1
        if t + 1 == max_new_tokens or (eos_token_id is not None and not bool(alive.any())):
            break
        x = layers(tr.wte(tok).unsqueeze(1) + tr.wpe(pos[P + t : P + t + 1]), P + t)
    if scores_out is not None:
        scores_out["logits"], scores_out["hidden"] = scores_out["logits"][:, :n], scores_out["hidden"][:, :n]
    return out[:, : P + n]
