"""GPT-2's blocks in plain tensor ops (kl_research/gpt2.py): the scoring pass's and the update's forward through them
(`fast_trunk`) gives transformers' numbers bit for bit, forward and gradients, in fp32 and under a bf16 trunk, and runs
only where it implements the model."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kl_research import gpt2
from kl_research.policy import ATTENTION, PolicyWithValue, disable_dropout, fp32_attention_on_cpu, fuse_activations
from kl_research.runtime import onednn_fp32_reason


def gpt2_lm(seed: int = 0, **config) -> GPT2LMHeadModel:
    """A random GPT-2 loaded as the trainer loads one (reference._finish: fused tanh-GELU, our CPU attention)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_positions=40, n_embd=64, n_layer=3, n_head=4, **config)
    lm = GPT2LMHeadModel(cfg)
    disable_dropout(lm)
    fuse_activations(lm)
    fp32_attention_on_cpu(lm)
    return lm.eval()


def policy_pair(seed: int = 0, **config) -> tuple[PolicyWithValue, PolicyWithValue]:
    """Two identical policies (value head trained too), the second scoring through the plain trunk."""
    lm = gpt2_lm(seed, **config)
    hf, plain = PolicyWithValue.from_reference(lm), PolicyWithValue.from_reference(lm)
    with torch.no_grad():  # a nonzero value head, so that its gradient reaches the trunk
        for p in (*hf.v_head.parameters(), *plain.v_head.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    assert gpt2.use_plain_trunk(plain.lm) is None and plain.lm._kl_plain_trunk
    assert not getattr(hf.lm, "_kl_plain_trunk", False)
    return hf, plain


def loss_and_grads(
    policy: PolicyWithValue, ids: torch.Tensor, amp: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    policy.train()
    policy.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits, values = policy.score(ids, 5)
    loss = logits.log_softmax(-1)[..., 3].mean() + values.square().mean()
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in policy.named_parameters()}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "config",
    [{"activation_function": "gelu_new"}, {"activation_function": "gelu"}, {"scale_attn_by_inverse_layer_idx": True}],
    ids=["gelu_new", "gelu", "inverse_layer_scale"],
)
def test_plain_trunk_gives_transformers_numbers_and_gradients_bit_for_bit(amp, config):
    """score_lm through the plain trunk and through transformers' forward: the same logits and values and the same
    gradient of every parameter, to the bit (the same ops in the same order), in fp32 and under bf16 autocast."""
    hf, plain = policy_pair(**config)
    ids = torch.randint(3, 96, (6, 17), generator=torch.Generator().manual_seed(1))
    logits_hf, grads_hf = loss_and_grads(hf, ids, amp)
    logits_plain, grads_plain = loss_and_grads(plain, ids, amp)
    assert torch.equal(logits_hf, logits_plain)
    assert grads_hf.keys() == grads_plain.keys()
    for name, g in grads_hf.items():
        assert g is not None and torch.equal(g, grads_plain[name]), name
    # and the hidden states themselves, as base_model returns them, under inference mode
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        want = hf.lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
        assert torch.equal(gpt2.hidden_states(plain.lm, ids), want)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", [{"activation_function": "gelu"}, {"scale_attn_by_inverse_layer_idx": True}])
def test_plain_trunk_of_right_padded_batches_gives_transformers_numbers_at_the_real_positions(amp, config):
    """With an attention mask (right padding, as the held-out perplexity batches texts of several lengths) the plain
    trunk's hidden states at every real position are transformers' to the bit: no real position sees a pad, so
    causal attention is the masked one there. An unpadded row in the batch, and a batch without padding, too; a mask
    that is not right padding (left padding, a hole) is refused."""
    lm = gpt2_lm(**config)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 96, (7, 21), generator=gen)
    lens = torch.tensor([21, 4, 9, 21, 15, 2, 11])
    mask = (torch.arange(21)[None] < lens[:, None]).long()
    real = mask.bool()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        want = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = gpt2.hidden_states(lm, ids, mask)
        assert torch.equal(got[real], want[real])
        full = torch.ones_like(mask)
        assert torch.equal(gpt2.hidden_states(lm, ids, full), lm.base_model(input_ids=ids).last_hidden_state)
    for bad in (mask.flip(1), torch.tensor([[1, 0, 1]]), torch.tensor([[0, 1, 1]])):
        with pytest.raises(ValueError, match="right padding"):
            gpt2.hidden_states(lm, ids[: len(bad), : bad.shape[1]], bad)


def test_the_plain_trunk_is_what_score_lm_runs_when_set(monkeypatch):
    """The flag routes score_lm (policy and reference) through gpt2.hidden_states, and off leaves transformers'."""
    calls = []
    real = gpt2.hidden_states
    monkeypatch.setattr(gpt2, "hidden_states", lambda lm, ids: calls.append(ids.shape) or real(lm, ids))
    hf, plain = policy_pair()
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        hf.score(ids, 4)
        assert calls == []
        plain.score(ids, 4)
    assert calls == [(2, 8)]  # the last token is not fed
    assert gpt2.use_plain_trunk(plain.lm, on=False) is None and not plain.lm._kl_plain_trunk


@pytest.mark.skipif(onednn_fp32_reason() is not None, reason=f"no oneDNN here: {onednn_fp32_reason()}")
def test_onednn_fp32_runs_an_fp32_plain_trunk_through_onednn_and_leaves_autocast_alone():
    """use_onednn_fp32 on an fp32 plain trunk: each block's four GEMMs and their backward's two each run in oneDNN (no
    aten GEMM left but the value head's), with transformers' logits, values and gradients to fp32 rounding (the sums
    in oneDNN's order); the sampler's steps too; under bf16 autocast the trunk stays autocast's addmm."""
    from test_head import OneDNNCalls

    from kl_research.decode import sample
    from kl_research.runtime import use_onednn_fp32

    hf, plain = policy_pair()
    use_onednn_fp32(plain.lm, True)
    ids = torch.randint(3, 96, (6, 17), generator=torch.Generator().manual_seed(1))
    logits_hf, grads_hf = loss_and_grads(hf, ids, False)
    with OneDNNCalls() as calls:
        logits, grads = loss_and_grads(plain, ids, False)
    n_layer = plain.lm.config.n_layer
    assert calls.onednn == 3 * (4 * n_layer + 1)  # forward + 2 backward GEMMs, 4 per block and the head
    assert calls.aten == 3  # the value head's forward and backward (the input's grad and the weight's)
    torch.testing.assert_close(logits, logits_hf, rtol=1e-5, atol=1e-5)
    for name, g in grads_hf.items():  # fp32 rounding (measured ~3e-7 of each gradient's norm), not bf16's ~1e-3
        assert (grads[name] - g).norm() <= 1e-5 * g.norm(), name
    torch.manual_seed(3)
    plain.eval()
    with OneDNNCalls() as calls:
        sample(plain.lm, ids[:, :5], max_new_tokens=4, temperature=1.0, eos_token_id=None, pad_token_id=0)
    assert calls.onednn == 4 * (4 * n_layer + 1) and calls.aten == 0  # prefill + 3 steps' blocks, 4 heads
    with OneDNNCalls() as calls:
        loss_and_grads(plain, ids, True)
    assert calls.onednn == 1  # the head's fp32 forward; its backward and the trunk are bf16 under autocast


def test_plain_trunk_refuses_what_it_does_not_implement():
    assert ATTENTION in gpt2.SDPA_ATTENTIONS and gpt2.plain_trunk_reason(gpt2_lm()) is None
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert "llama" in gpt2.use_plain_trunk(llama) and not llama._kl_plain_trunk
    eager = gpt2_lm()
    eager.set_attn_implementation("eager")
    assert "eager" in gpt2.plain_trunk_reason(eager)
    dropout = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2))  # the default p = 0.1
    fp32_attention_on_cpu(dropout)
    assert "dropout" in gpt2.plain_trunk_reason(dropout)
    upcast = gpt2_lm(reorder_and_upcast_attn=True)
    assert "reorder_and_upcast_attn" in gpt2.plain_trunk_reason(upcast)


def test_plain_trunk_of_a_model_held_in_bf16_without_autocast():
    """A model whose weights are bf16 (no autocast): the attention in fp32 and its output cast back, as _kl_sdpa does,
    so the plain trunk gives transformers' hidden states to the bit, in bf16."""
    lm = gpt2_lm().to(torch.bfloat16)
    assert gpt2.plain_trunk_reason(lm) is None
    ids = torch.randint(3, 96, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
        got = gpt2.hidden_states(lm, ids)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
