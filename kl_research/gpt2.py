"""GPT-2's blocks in plain tensor ops: the one implementation the fast sampler decodes with (kl_research/decode.py) and
the scoring pass and the PPO update run their full-sequence forward through (`plain_trunk`, the `fast_trunk` key).

The ops are transformers' own, in its order (GPT2Block: layer norm, Conv1D's addmm, SDPA, the residual adds, the
model's activation module), over the live modules' weights, so the numbers are transformers' bit for bit, forward and
backward, fp32 and under bf16 autocast (tests/test_gpt2.py). What goes is the Python around them (module calls, the
attention interface's dispatch, the causal-mask helper, the output dataclasses): ~1.5 ms of a ~10.5 ms forward of a
(16, 30) minibatch at the tiny default on one CPU thread (docs/performance.md). Forward hooks on the blocks' modules do
not fire here, as they do not in the decode loop.

The attention is what `policy._kl_sdpa` computes: SDPA, with q/k/v upcast to fp32 and autocast off around it on a CPU
under autocast (torch's CPU flash kernel is ~5× slower in bf16), transformers' SDPA call unchanged elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from kl_research.runtime import onednn_fp32_on, onednn_linear

# The attentions whose numbers `causal_attend` reproduces: ours (policy.ATTENTION, registered there: SDPA with the
# CPU's fp32 upcast) and transformers' SDPA.
SDPA_ATTENTIONS = ("kl_sdpa", "sdpa")

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unsupported_reason(lm: nn.Module) -> str | None:
    """None if this module's GPT-2 blocks can run here; otherwise why not (its config's options we do not implement)."""
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "gpt2":
        return f"model_type {getattr(cfg, 'model_type', None)!r} (kl_research/gpt2.py implements gpt2 only)"
    if cfg.reorder_and_upcast_attn or getattr(cfg, "add_cross_attention", False):
        return "reorder_and_upcast_attn / cross-attention (not implemented by kl_research/gpt2.py)"
    return None


def attention_scale(cfg, layer: int) -> float:
    """GPT-2's attention scaling at block `layer` (0-based), as transformers' GPT2Attention computes it: 1/√head_dim
    with scale_attn_weights, further divided by layer + 1 with scale_attn_by_inverse_layer_idx (Stanford CRFM's
    GPT-2s set it). A sampler that left the second out would not sample from the model the scoring pass scores."""
    scale = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= float(layer + 1)
    return scale


def conv1d(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """transformers' Conv1D on (N, in): x @ W + b with W (in, out); wb = (W, b)."""
    return torch.addmm(wb[1], x, wb[0])


def onednn_conv1d(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`conv1d` through oneDNN's fp32 GEMM (the `onednn_fp32` key on an fp32 trunk), forward and backward: a linear
    over Wᵀ (its weight is (out, in)); IEEE fp32, the sums in oneDNN's order instead of MKL's (tests/test_gpt2.py)."""
    return onednn_linear(x, wb[0].t(), wb[1])


def block_weights(lm: nn.Module, dtype: torch.dtype | None = None) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per block, the (W, b) of the attention's qkv and output projections and of the MLP's two layers; cast to
    `dtype` when given (the decode loop casts once per call what autocast would cast at every decoding step: the same
    rounding as autocast's own cast), else the parameters themselves (autocast casts them, as for transformers')."""

    def wb(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return (conv.weight, conv.bias) if dtype is None else (conv.weight.to(dtype), conv.bias.to(dtype))

    return [[wb(c) for c in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)] for b in lm.transformer.h]


def blocks(
    lm: nn.Module, x: torch.Tensor, weights: list[list[tuple[torch.Tensor, torch.Tensor]]], attend: Attend
) -> torch.Tensor:
    """x (B, T, C), the embeddings of T positions, through every block (before ln_f). attend(layer, q, k, v) → (B, H,
    T, D): the attention of those positions' queries, each (B, H, T, D) (`causal_attend` for a full sequence; the
    decode loop's writes the K/V cache and attends over it)."""
    cfg = lm.config
    H, eps = cfg.n_head, cfg.layer_norm_epsilon
    b, t, c = x.shape
    # an fp32 trunk's GEMMs through oneDNN where the model says so (runtime.use_onednn_fp32); under autocast, or with
    # weights cast for it, addmm (autocast picks its dtype and library)
    fp32 = x.dtype == weights[0][0][0].dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
    proj = onednn_conv1d if fp32 and onednn_fp32_on(lm) else conv1d
    for i, blk in enumerate(lm.transformer.h):
        w_qkv, w_proj, w_fc, w_out = weights[i]
        h = F.layer_norm(x, (c,), blk.ln_1.weight, blk.ln_1.bias, eps)
        q, k, v = proj(h.view(b * t, c), w_qkv).view(b, t, 3, H, c // H).permute(2, 0, 3, 1, 4).unbind(0)
        a = attend(i, q, k, v).transpose(1, 2).reshape(b * t, c)
        x = x + proj(a, w_proj).view(b, t, c)
        h = F.layer_norm(x, (c,), blk.ln_2.weight, blk.ln_2.bias, eps)
        x = x + proj(blk.mlp.act(proj(h.view(b * t, c), w_fc)), w_out).view(b, t, c)
    return x


def causal_attend(lm: nn.Module) -> Attend:
    """Causal self-attention over a whole sequence, as `policy._kl_sdpa` runs transformers' SDPA for it (no mask: the
    sequences are unpadded, or right-padded, where no real position sees a pad: `hidden_states`)."""
    scales = [attention_scale(lm.config, i) for i in range(lm.config.n_layer)]

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        amp = torch.is_autocast_enabled("cpu")
        if q.device.type == "cpu" and (q.dtype != torch.float32 or amp):
            with torch.autocast("cpu", enabled=False):
                a = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scales[i])
            return a if amp else a.to(q.dtype)  # a model held in bf16 without autocast keeps its dtype, as _kl_sdpa
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scales[i])

    return attend


def plain_trunk_reason(lm: nn.Module) -> str | None:
    """None if `hidden_states` gives this model's transformers forward (`lm.base_model(ids).last_hidden_state`);
    otherwise why not: another architecture or option, an attention other than SDPA (ours or transformers'), or a
    dropout that could be active (the plain ops have none; the trainer sets every dropout to 0)."""
    reason = unsupported_reason(lm)
    if reason is not None:
        return reason
    if lm.config._attn_implementation not in SDPA_ATTENTIONS:
        return f"attention {lm.config._attn_implementation!r} (the plain trunk runs SDPA)"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in lm.modules()):
        return "a dropout with p > 0 (the plain trunk has none)"
    return None


def hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' `lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state` (B, T, C),
    in the same ops (the module docstring): unpadded sequences, or right-padded ones with their (B, T) mask (the
    held-out perplexity's batches). Under right padding no real position attends to a pad (its keys are all earlier,
    all real), so causal attention gives the real positions transformers' numbers (bit for bit on a CPU, where both
    run the same SDPA kernel: tests/test_gpt2.py; on CUDA another kernel may pick up the mask); the pads' own outputs
    are not. A mask that is not right padding is refused. Differentiable; call only where
    `plain_trunk_reason(lm)` is None."""
    if attention_mask is not None:
        real = attention_mask.bool()
        if (real[:, 1:] & ~real[:, :-1]).any() or not real[:, 0].all():
            raise ValueError("hidden_states: attention_mask must be right padding (each row 1 … 1 0 … 0, from 1)")
    tr = lm.transformer
    t = input_ids.shape[1]
    x = tr.wte(input_ids) + tr.wpe(torch.arange(t, device=input_ids.device))
    x = blocks(lm, x, block_weights(lm), causal_attend(lm))
    return F.layer_norm(x, (x.shape[-1],), tr.ln_f.weight, tr.ln_f.bias, lm.config.layer_norm_epsilon)


def use_plain_trunk(lm: nn.Module, on: bool = True) -> str | None:
    """Route `policy.score_lm`'s trunk for this model through `hidden_states` (on) or transformers' forward (off).
    Returns None when set as asked, else why the plain trunk cannot run this model (the forward stays transformers')."""
    reason = plain_trunk_reason(lm) if on else None
    lm._kl_plain_trunk = on and reason is None
    return reason
