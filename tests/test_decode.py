"""The fast sampler (kl_research/decode.py) draws from exactly the policy's softmax(logits/T): its logits are the
scoring pass's at every position, its draws have the scored distribution's frequencies, and k1's mean is still the
exact KL. HF `generate` stays the tested fallback (`sampler=hf`, and models the fast path does not cover:
tests/test_ppo.py checks its sampling the same way)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kl_research.decode import fast_sampler_reason, sample
from kl_research.policy import PolicyWithValue
from kl_research.rollout import rollout


def random_gpt2(vocab: int = 64, seed: int = 0, activation: str = "gelu_new", **config) -> GPT2LMHeadModel:
    """A small random GPT-2; a small vocabulary makes EOS frequent, so sequences end at different lengths."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=48, n_embd=64, n_layer=2, n_head=4, activation_function=activation,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, **config,
    )  # fmt: skip
    lm = GPT2LMHeadModel(cfg).eval()
    for p in lm.parameters():  # sharper logits than the default init, so temperature matters
        p.data.mul_(3.0) if p.dim() > 1 else None
    return lm


@pytest.mark.parametrize(
    ("temperature", "activation", "config"),
    [(1.0, "gelu", {}), (0.7, "gelu_new", {}), (1.0, "gelu_new", {"scale_attn_by_inverse_layer_idx": True})],
)
def test_fast_sampler_samples_from_the_logits_the_scoring_pass_computes(temperature, activation, config):
    """Every decoding step's logits (static KV cache, own loop) equal the scoring pass's (policy.score_lm: one
    full-sequence forward of HF's model) at that position, for every sequence, EOS and the pad after it included; the
    loop stops where every sequence has ended, as `generate` does. Both GELUs: the tiny default's exact one, GPT-2's
    tanh form; and GPT-2's per-layer attention scaling (1/(layer+1), as in e.g. Stanford CRFM's GPT-2s)."""
    lm = random_gpt2(activation=activation, **config)
    policy = PolicyWithValue.from_reference(lm).eval()
    prompts = torch.randint(3, 64, (32, 6), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    scores: dict[str, torch.Tensor] = {}
    seqs = sample(policy.lm, prompts, max_new_tokens=30, temperature=temperature, eos_token_id=2, pad_token_id=0,
                  scores_out=scores)  # fmt: skip
    R = seqs.shape[1] - 6
    response = seqs[:, 6:]
    ended = (response == 2).any(1)
    assert 0 < int(ended.sum()) < 32  # some sequences ended early, some ran to the cap
    after = (response == 2).int().cumsum(1) - (response == 2).int() > 0  # positions after a sequence's EOS
    assert after.any() and (response[after] == 0).all()
    assert scores["logits"].shape[1] == R and scores["hidden"].shape[1] == R
    with torch.no_grad():
        scored, _ = policy.score(seqs, 6)  # (B, R, V) fp32
    torch.testing.assert_close(scores["logits"], scored, rtol=1e-5, atol=1e-5)
    # and the final hidden states the scoring pass projects (what a rollout's value head reads with score_from_sampler)
    with torch.no_grad():
        hidden = policy.lm.transformer(seqs[:, :-1].clone()).last_hidden_state[:, 5:]
    torch.testing.assert_close(scores["hidden"], hidden, rtol=1e-5, atol=1e-5)


def test_under_autocast_the_sampler_casts_each_weight_once_per_call_with_autocasts_rounding():
    """A bf16 trunk: autocast keeps no cast weights under inference mode, so the decode loop's GEMMs would cast every
    weight again at every token; the sampler casts each once per call. The numbers are autocast's own: the loop's
    bf16 logits equal those of the same loop with autocast casting the fp32 weights itself."""
    from torch.profiler import ProfilerActivity, profile

    from kl_research import decode

    lm = random_gpt2()
    prompts = torch.randint(3, 64, (8, 6), generator=torch.Generator().manual_seed(1))
    shape = list(lm.transformer.h[0].attn.c_attn.weight.shape)  # (64, 192): no other tensor has it

    def run():
        torch.manual_seed(3)
        scores: dict[str, torch.Tensor] = {}
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                seqs = sample(lm, prompts, max_new_tokens=12, temperature=1.0, eos_token_id=None, pad_token_id=0,
                              scores_out=scores)  # fmt: skip
        casts = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                    if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == shape)  # fmt: skip
        return seqs, scores["logits"], casts

    seqs, logits, casts = run()
    assert casts == 2  # the c_attn weights of the two blocks, once each
    real = decode.block_weights
    try:  # autocast casting the fp32 weights at every GEMM, as before
        decode.block_weights = lambda lm, dtype: real(lm)
        seqs_each, logits_each, casts_each = run()
    finally:
        decode.block_weights = real
    assert casts_each == 2 * 12  # every block at every decoding step (the prompt's pass included)
    assert torch.equal(seqs, seqs_each) and torch.equal(logits, logits_each)


def _rollout(policy, ref, prompts, seed=0, **kw):
    torch.manual_seed(seed)
    return rollout(policy, ref, prompts, temperature=1.0, eos_token_id=2, pad_token_id=0,
                   amp=torch.autocast("cpu", enabled=False), keep_ref_logprobs=True, **kw)  # fmt: skip


@pytest.mark.parametrize("response_length", [12, 40])
def test_score_from_sampler_gives_the_scoring_pass_numbers_without_running_it(response_length, monkeypatch):
    """rollout(score_from_sampler=True) with the fast sampler: the same tokens, and log π, values, exact KL, entropy
    equal to the policy's scoring pass's within fp32 rounding, with that pass never called. At 40 tokens every
    sequence ends before the cap (a 6-token vocabulary): the sampler stops early, and the scoring pass runs."""
    vocab = 64 if response_length == 12 else 6  # a vocabulary of 6: EOS is drawn soon in every sequence
    ref = random_gpt2(vocab=vocab, seed=5)
    policy = PolicyWithValue.from_reference(ref).eval()
    with torch.no_grad():
        for p in policy.lm.transformer.h.parameters():
            p.add_(0.1 * torch.randn_like(p))
        policy.v_head.weight.normal_()  # a value head that reads the hidden state (it starts at zero)
    prompts = torch.randint(3, vocab, (16, 5), generator=torch.Generator().manual_seed(3))
    calls = {"n": 0}
    real_score = PolicyWithValue.score

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(PolicyWithValue, "score", counted)
    a = _rollout(policy, ref, prompts, response_length=response_length, sampler="fast")
    assert calls["n"] == 1
    b = _rollout(policy, ref, prompts, response_length=response_length, sampler="fast", score_from_sampler=True)
    ended_early = bool(((a["response"] == 2).cumsum(1) > 0)[:, -1].all())
    assert ended_early == (response_length == 40)
    assert calls["n"] == (2 if ended_early else 1)
    assert torch.equal(a["seqs"], b["seqs"]) and torch.equal(a["mask"], b["mask"])
    for k in ("logp", "ref_logp", "values", "exact_kl", "entropy", "ref_logprobs"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    assert float(a["values"].abs().max()) > 0.1  # values that could differ
    # with `generate` there is nothing to take: the scoring pass runs, the rollout is the same
    c = _rollout(policy, ref, prompts, response_length=12, sampler="hf", score_from_sampler=True)
    assert calls["n"] == (3 if ended_early else 2)
    assert set(c) == set(a)


def test_score_from_sampler_key_is_validated(compose):
    with pytest.raises(ValueError, match="score_from_sampler='yes' is invalid; allowed: true, false"):
        compose("score_from_sampler=yes")
    assert compose().score_from_sampler is True


@pytest.fixture(scope="module")
def kernel_draw(vocab_kernel_lib):
    """kl_research/vocab_kernel.py loaded: its `sample_rows`, decode.sample's draw with kernel=True."""
    return vocab_kernel_lib.sample_rows


@pytest.mark.parametrize("draw", ["torch", "kernel"])
def test_inverse_cdf_draws_each_token_with_its_probability(draw, request):
    """P(v) exactly: frequencies of 200 000 draws within 4.5 binomial standard errors, zero-probability tokens
    never, one-hot rows always their token; unnormalised rows are normalised. By torch ops (`inverse_cdf_sample`)
    and by the C kernel's `sample_rows` (decode.sample with kernel=True)."""
    from kl_research.decode import inverse_cdf_sample

    if draw == "kernel":
        inverse_cdf_sample = request.getfixturevalue("kernel_draw")  # the same contract
    p = torch.tensor([0.5, 0.0, 0.2, 0.1, 0.15, 0.05, 0.0, 1e-4])
    p = p / p.sum()
    torch.manual_seed(0)
    n = 200_000
    draws = inverse_cdf_sample((3 * p).repeat(n, 1))  # unnormalised
    freq = torch.bincount(draws, minlength=8).double() / n
    sd = (p.double() * (1 - p.double()) / n).sqrt()
    assert torch.all((freq - p.double()).abs() < 4.5 * sd + 1e-5), freq - p
    assert freq[1] == 0 and freq[6] == 0
    one_hot = torch.zeros(5, 8)
    one_hot[torch.arange(5), torch.tensor([0, 7, 3, 3, 1])] = 1
    assert inverse_cdf_sample(one_hot).tolist() == [0, 7, 3, 3, 1]


@pytest.mark.parametrize("draw", ["torch", "kernel"])
def test_fast_sampler_token_frequencies_are_softmax_of_the_scored_logits(draw, request):
    """One token from 20 000 copies of a prompt: every token's frequency is softmax(logits/T) of the scoring pass
    (policy.score_lm, fp32 head) within 4.5 binomial standard errors, EOS included; the C kernel's draw (kernel=True)
    gives the same tokens as torch's."""
    lm = random_gpt2(vocab=32, seed=3)
    policy = PolicyWithValue.from_reference(lm).eval()
    n, T = 20_000, 0.8
    prompt = torch.tensor([[5, 9, 11, 4]]).repeat(n, 1)
    kernel = draw == "kernel"
    if kernel:
        request.getfixturevalue("kernel_draw")
    torch.manual_seed(0)
    seqs = sample(policy.lm, prompt, max_new_tokens=1, temperature=T, eos_token_id=2, pad_token_id=0, kernel=kernel)
    if kernel:
        torch.manual_seed(0)
        assert torch.equal(seqs, sample(policy.lm, prompt, max_new_tokens=1, temperature=T, eos_token_id=2,
                                        pad_token_id=0))  # fmt: skip
    with torch.no_grad():
        logits, _ = policy.score(torch.cat([prompt[:1], seqs[:1, 4:]], 1), 4)
    p = torch.softmax(logits[0, 0].double() / T, -1)
    freq = torch.bincount(seqs[:, 4], minlength=32).double() / n
    sd = (p * (1 - p) / n).sqrt()
    assert float(p[2]) > 0.005  # EOS is a real option here
    assert torch.all((freq - p).abs() < 4.5 * sd + 2e-4), (freq - p).abs().max()
    # and not softmax(logits) at T = 1: the test can tell the temperature apart
    p1 = torch.softmax(logits[0, 0].double(), -1)
    assert ((freq - p1).abs() > 4.5 * sd + 2e-4).any()


def test_rollout_with_the_fast_sampler_keeps_k1_unbiased_for_the_exact_kl():
    """On a policy moved away from its reference, the mean of k1 = log π(y) − log π_ref(y) over the sampled tokens
    equals the mean exact KL within 4 standard errors: the tokens are drawn from the π the rollout scores."""
    ref = random_gpt2(seed=4)
    policy = PolicyWithValue.from_reference(ref).eval()
    with torch.no_grad():
        for p in policy.lm.transformer.h.parameters():
            p.add_(0.15 * torch.randn_like(p))
    prompts = torch.randint(3, 64, (512, 4), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    b = rollout(
        policy, ref, prompts, response_length=12, temperature=1.0, eos_token_id=2, pad_token_id=0,
        amp=torch.autocast("cpu", enabled=False), sampler="fast",
    )  # fmt: skip
    m = b["mask"].bool()
    k1 = (b["logp"] - b["ref_logp"])[m]
    exact = b["exact_kl"][m]
    assert float(exact.mean()) > 0.05  # the policy is really away from the reference
    se = float((k1 - exact).std() / m.sum().sqrt())
    assert abs(float(k1.mean() - exact.mean())) < 4 * se


def test_fast_sampler_refuses_what_it_does_not_implement():
    """A model the loop does not implement is named with the reason (auto then falls back to generate)."""
    assert fast_sampler_reason(random_gpt2()) is None
    assert fast_sampler_reason(random_gpt2(activation="gelu")) is None  # the tiny default's
    assert "training" in fast_sampler_reason(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2)).train())
    llama = type("M", (), {"config": type("C", (), {"model_type": "llama"})()})()
    assert "llama" in fast_sampler_reason(llama)
    with pytest.raises(ValueError, match="fast sampler cannot run"):
        sample(llama, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2, temperature=1.0, eos_token_id=2,
               pad_token_id=0)  # fmt: skip


def test_sampler_key_is_validated_before_anything_loads(compose):
    with pytest.raises(ValueError, match="sampler='nope' is invalid; allowed: auto, fast, hf"):
        compose("sampler=nope")
    with pytest.raises(ValueError, match=r"sampler=.fast. is invalid with model\.name"):
        compose("model=smollm2", "sampler=fast")
    assert compose("sampler=hf").sampler == "hf"
