"""The policy: a causal LM with a scalar value head on its last hidden state (shared trunk, as TRL's
AutoModelForCausalLMWithValueHead), and one scoring pass that returns exactly what PPO needs."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from kl_research import gpt2
from kl_research.runtime import onednn_fp32_on, onednn_linear


def disable_dropout(model: nn.Module) -> None:
    """PPO ratios must be 1 at the first minibatch: no dropout anywhere (policy and reference)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def fuse_activations(model: nn.Module) -> int:
    """Swap GPT-2's `gelu_new` for torch's fused tanh-GELU (transformers' GELUTanh). The same function (outputs
    differ by ≤ 2e-7): `gelu_new` is written as ~8 elementwise ops, each a pass over the (B, T, 4H) activations
    forward and backward; the fused kernel is one pass each way. Measured on the tiny shape (4×128, batch 64,
    2 threads, interleaved A/B): PPO update 1.19 → 1.04 s, rollout 0.63 → 0.58 s. Returns the number swapped."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


ATTENTION = "kl_sdpa"  # the attention every loaded model runs (fp32_attention_on_cpu)


def _kl_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with a reduced-precision q/k/v upcast to fp32 on a CPU.

    Under a bf16 trunk (precision=bf16 autocast) the projections hand SDPA bf16 tensors; torch's CPU flash kernel in
    bf16 is ~5× slower forward+backward than in fp32 at these shapes (0.87 → 4.5 ms per layer per (16, 4, 31, 32)
    minibatch on a 2-core Intel Xeon with AMX, 1 thread; docs/performance.md), and its backward was 131 ms of a
    ~0.9 s bf16 PPO step there. Upcast, the same kernel takes 0.95 ms and the attention's softmax is fp32 (the
    GEMMs around it stay bf16 under autocast). On CUDA, or in fp32, this is transformers' SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    amp = torch.is_autocast_enabled("cpu")
    if query.device.type != "cpu" or (query.dtype == torch.float32 and not amp):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    # CPU autocast lists SDPA among its bf16 ops: it would cast the fp32 q/k/v straight back, so it is off here
    with torch.autocast("cpu", enabled=False):
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # under autocast the next projection casts for itself; a model held in bf16 without autocast gets its dtype back
    return (out, weights) if amp else (out.to(dtype), weights)


def fp32_attention_on_cpu(model: PreTrainedModel) -> bool:
    """Point the model's attention at `_kl_sdpa` (registered once with transformers' AttentionInterface). Returns
    False, leaving the model alone, for a model whose attention does not go through that interface or that does
    not run SDPA (an explicit eager / flash choice is kept)."""
    from transformers import AttentionInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _kl_sdpa)
    if model.config._attn_implementation not in ("sdpa", ATTENTION) or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(ATTENTION)
    return model.config._attn_implementation == ATTENTION


class FP32Head(nn.Linear):
    """The vocabulary projection in fp32 whatever the autocast: `generate` samples from these logits, and the
    scoring pass (score_lm) computes its log-probs in fp32 too, so sampling draws from the π that is scored
    (docs/kl-contract.md: a bf16 head during generation would sample from another distribution)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(x.float(), self.weight.float(), bias)


def fp32_head(lm: PreTrainedModel) -> bool:
    """Make the LM's output projection an FP32Head in place (same parameters, same state_dict). False if the output
    embedding is not a plain nn.Linear (then it is left alone)."""
    head = lm.get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = FP32Head
        return True
    return isinstance(head, FP32Head)


class PolicyWithValue(nn.Module):
    """The policy LM and, for PPO, a scalar value head on its last hidden state (value_head=False: none, as GRPO)."""

    def __init__(self, lm: PreTrainedModel, detach_value_head: bool = False, value_head: bool = True):
        super().__init__()
        self.lm = lm
        # True: the value head reads a detached trunk, so the value loss trains the head alone and never moves π
        self.detach_value_head = detach_value_head
        self.v_head: nn.Linear | None = None
        if value_head:
            hidden = lm.config.get_text_config().hidden_size
            self.v_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.v_head.weight)
            nn.init.zeros_(self.v_head.bias)

    @classmethod
    def from_reference(
        cls, reference: PreTrainedModel, detach_value_head: bool = False, value_head: bool = True
    ) -> PolicyWithValue:
        lm = copy.deepcopy(reference)
        disable_dropout(lm)
        fp32_head(lm)
        lm.requires_grad_(True)
        return cls(lm, detach_value_head, value_head)

    def score(
        self, input_ids: torch.Tensor, prompt_len: int, with_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and values at the positions that predict the response tokens.

        input_ids: (B, P + R) prompt followed by response (prompts all have length P, no padding).
        Returns logits (B, R, V) and values (B, R) in fp32 (None without a value head): position t is the state
        before response token t. Causal attention: tokens after EOS cannot affect earlier positions, so no mask needed.
        """
        return score_lm(
            self.lm,
            input_ids,
            prompt_len,
            self.v_head if with_values else None,
            detach_values=self.detach_value_head,
        )


def compile_trunks(mode: bool | str, *lms: PreTrainedModel) -> None:
    """compile_trunk on each model for the `compile` key / `bench --compile` value: "default" (or True) is
    torch.compile's default mode; any other string is passed as its `mode` (reduce-overhead: CUDA graphs)."""
    kw = {} if mode is True or mode == "default" else {"mode": mode}
    for lm in lms:
        compile_trunk(lm, **kw)


def compile_trunk(lm: PreTrainedModel, **compile_kwargs) -> None:
    """torch.compile the full-sequence trunk pass that scoring and the PPO update run through `score_lm`.

    Generation keeps the eager model: with the KV cache its shapes change at every decoding step. Scoring and the
    update see fixed shapes, (B, P+R−1) and (minibatch, P+R−1), so with `dynamic=False` each mode compiles once.
    The model's parameters and state_dict are untouched (the compiled function is a plain attribute).
    """
    base = lm.base_model

    def trunk(input_ids: torch.Tensor) -> torch.Tensor:
        return base(input_ids=input_ids, use_cache=False).last_hidden_state

    lm._compiled_trunk = torch.compile(trunk, **{"dynamic": False, **compile_kwargs})


class _HeadLinear(torch.autograd.Function):
    """x Wᵀ + b in fp32 (the logits; its GEMM through oneDNN with onednn), its backward's two GEMMs in grad_dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, grad_dtype, onednn):
        ctx.save_for_backward(x, weight)
        ctx.grad_dtype, ctx.has_bias = grad_dtype, bias is not None
        return onednn_linear(x, weight, bias) if onednn else nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        low = grad.to(ctx.grad_dtype)  # (N, V)
        grad_x = (low @ weight.to(ctx.grad_dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = (low.t() @ x.to(ctx.grad_dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (V, C)
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # fp32: a sum over N
        return grad_x, grad_w, grad_b, None, None


def head_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grad_dtype: torch.dtype | None,
    onednn: bool = False,
) -> torch.Tensor:
    """The vocabulary projection x Wᵀ + b (x (N, C), W (V, C), all fp32): F.linear's numbers in the forward, always
    (onednn: through oneDNN's fp32 GEMM, runtime.onednn_linear; IEEE fp32 too, last bits at most in another order).

    grad_dtype (the autocast dtype under a bf16 trunk, else None): the backward's two GEMMs, ∂L/∂x = G W and
    ∂L/∂W = Gᵀ x over the (N, V) logit gradient G, run in that dtype, as autocast runs every trunk layer's backward;
    the gradients come back in fp32. The logits, the log-probs and the KL the controller sees stay the fp32
    projection's (the rule of score_lm); only the gradient is rounded, as the trunk's already is. On a CPU with AMX
    these two GEMMs are ~4× faster in bf16 than in fp32 (docs/performance.md). None: fp32 backward GEMMs (oneDNN's
    with onednn, else autograd's F.linear).
    """
    low = grad_dtype is not None and grad_dtype != torch.float32
    if low and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _HeadLinear.apply(x, weight, bias, grad_dtype, onednn)
    return onednn_linear(x, weight, bias) if onednn else nn.functional.linear(x, weight, bias)


def score_lm(
    lm: PreTrainedModel,
    input_ids: torch.Tensor,
    prompt_len: int,
    v_head: nn.Module | None = None,
    detach_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the trunk once, project only the R response-predicting positions to the vocabulary.

    The last token is not fed: its output would predict a token after the response, and under causal attention
    no earlier position sees it, so dropping it changes no number we use and saves 1/(P+R) of the trunk's work.
    """
    trunk = getattr(lm, "_compiled_trunk", None)  # set by compile_trunk
    ids = input_ids[:, :-1]
    if trunk is not None:
        hidden = trunk(ids)
    elif getattr(lm, "_kl_plain_trunk", False):  # set by gpt2.use_plain_trunk (the fast_trunk key)
        hidden = gpt2.hidden_states(lm, ids)
    else:
        hidden = lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
    B, R = hidden.shape[0], hidden.shape[1] - prompt_len + 1
    # One contiguous (B·R, H) matrix: on the strided slice (B, R, H), F.linear may take a batched matmul with
    # the (H, V) weight expanded B times when the weight requires grad (seen in a profile at 64×24×50257; in an
    # A/B timing the gain was small, 0.80 → 0.74 s, within this VM's noise).
    hidden = hidden[:, prompt_len - 1 :].reshape(B * R, -1).float()  # (B·R, H)
    device_type = hidden.device.type
    # under a bf16 trunk the head's backward GEMMs take the trunk's dtype, as every autocast layer's do (head_linear)
    grad_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    # The vocabulary projection and the value head run in fp32 even under bf16 autocast: KL targets of
    # 0.01 nats/token need log-probs far more precise than bf16 logits (8 bits of mantissa).
    with torch.autocast(device_type, enabled=False):
        head = lm.get_output_embeddings()
        bias = None if head.bias is None else head.bias.float()
        logits = head_linear(hidden, head.weight.float(), bias, grad_dtype, onednn_fp32_on(lm)).view(B, R, -1)
        if v_head is not None:
            values = v_head(hidden.detach() if detach_values else hidden).view(B, R)  # (B, R)
        else:
            values = None
    return logits, values  # logits (B, R, V) fp32
