"""Under a bf16 trunk on a CPU the attention runs in fp32 (policy._kl_sdpa, and the fast sampler's own loop): torch's
CPU flash kernel is ~5× slower in bf16 than in fp32 at these shapes (docs/performance.md), and CPU autocast lists
SDPA among its bf16 ops, so an upcast alone would be cast straight back. In fp32 nothing changes."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kl_research.decode import sample
from kl_research.policy import ATTENTION, PolicyWithValue, fp32_attention_on_cpu


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4, activation_function="gelu",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every F.scaled_dot_product_attention call's (query dtype, output dtype): the output's dtype is what the kernel
    really computed in (under autocast a call with fp32 inputs still runs, and returns, bf16)."""
    calls: list[tuple[torch.dtype, torch.dtype]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        out = real(q, k, v, *args, **kwargs)
        calls.append((q.dtype, out.dtype))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_a_bf16_trunk_scores_and_trains_with_fp32_attention(sdpa_calls):
    """Scoring forward and the update's backward under bf16 autocast: every attention call computes in fp32, while
    the GEMMs around it stay bf16 (the trunk's hidden state into the fp32 head is bf16). Without the switch,
    transformers' SDPA computes in bf16: the test tells the two apart."""
    lm = gpt2()
    assert fp32_attention_on_cpu(lm) and lm.config._attn_implementation == ATTENTION
    policy = PolicyWithValue.from_reference(lm)
    assert policy.lm.config._attn_implementation == ATTENTION  # the policy, a copy, inherits it
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    seen = {}
    hook = policy.lm.transformer.h[-1].mlp.c_proj.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, values = policy.score(ids, 4)
    (logits.logsumexp(-1).mean() + values.mean()).backward()
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the trunk's GEMMs are bf16
    assert logits.dtype == torch.float32
    assert len(sdpa_calls) == 2 and all(c == (torch.float32, torch.float32) for c in sdpa_calls), sdpa_calls
    assert all(p.grad is not None for p in policy.lm.transformer.h[0].attn.parameters())

    sdpa_calls.clear()
    plain = gpt2()
    plain.set_attn_implementation("sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        PolicyWithValue.from_reference(plain).score(ids, 4)
    assert sdpa_calls and all(out == torch.bfloat16 for _, out in sdpa_calls)


def test_the_fast_sampler_attends_in_fp32_under_a_bf16_trunk(sdpa_calls):
    """The decode loop's attention (prefill and every step) is fp32 too, as the scoring pass's it must match."""
    lm = gpt2(1)
    fp32_attention_on_cpu(lm)
    prompts = torch.randint(3, 64, (8, 5), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample(lm, prompts, max_new_tokens=6, temperature=1.0, eos_token_id=None, pad_token_id=0)
    assert len(sdpa_calls) == 2 * 6  # 2 layers × (prefill + 5 decoding steps)
    assert all(c == (torch.float32, torch.float32) for c in sdpa_calls), sdpa_calls


def test_in_fp32_the_attention_is_transformers_sdpa_bit_for_bit():
    """Outside autocast the switch changes nothing: the same logits to the bit as transformers' own SDPA; a Llama
    (SmolLM2's architecture) takes the switch too."""
    ids = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    a, b = gpt2(3), gpt2(3)
    assert fp32_attention_on_cpu(a) and b.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    llama = LlamaForCausalLM(cfg)
    assert fp32_attention_on_cpu(llama) and llama.config._attn_implementation == ATTENTION


def test_an_explicit_eager_attention_is_left_alone():
    lm = gpt2()
    lm.set_attn_implementation("eager")
    assert not fp32_attention_on_cpu(lm)
    assert lm.config._attn_implementation == "eager"


def test_a_model_held_in_bf16_without_autocast_keeps_its_dtype():
    """The upcast is undone where no autocast would cast for the next projection: a bf16 model runs, in bf16 out."""
    lm = gpt2(4)
    fp32_attention_on_cpu(lm)
    lm.to(torch.bfloat16)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = lm(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
