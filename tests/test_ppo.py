"""PPO maths (docs/kl-contract.md) on hand-computed values, including the EOS / padding pitfalls."""

import pytest
import torch
from conftest import policy_update_weights

from kl_research import ppo

EOS = 9


def test_response_mask_stops_after_first_eos():
    r = torch.tensor([[5, 6, EOS, 7, EOS], [1, 2, 3, 4, 5], [EOS, EOS, EOS, EOS, EOS]])
    m = ppo.response_mask(r, EOS)
    assert m.tolist() == [
        [True, True, True, False, False],  # EOS itself counts, nothing after it
        [True] * 5,  # no EOS: the whole response (truncated at max length)
        [True, False, False, False, False],  # immediate EOS: one token
    ]
    assert ppo.last_token_index(m).tolist() == [2, 4, 0]
    assert ppo.response_mask(r, None).all()


def test_score_on_last_real_token_not_on_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    k = torch.full((2, 5), 0.5)
    rw = ppo.shaped_rewards(torch.tensor([2.0, -1.0]), k, beta=0.1, mask=mask)
    assert rw[0].tolist() == pytest.approx([-0.05, -0.05, 2.0 - 0.05, 0.0, 0.0])
    assert rw[1].tolist() == pytest.approx([-0.05] * 4 + [-1.0 - 0.05])


def test_gae_hand_computed():
    # one sequence, 3 real tokens then a pad; γ = 0.9, λ = 0.5
    r = torch.tensor([[1.0, 0.0, 2.0, 5.0]])  # the 5.0 is after EOS and must be ignored
    v = torch.tensor([[0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    g, lam = 0.9, 0.5
    d2 = 2.0 + g * 0.0 - 1.5  # terminal after the last real token
    d1 = 0.0 + g * 1.5 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = ppo.gae(r, v, mask, g, lam)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0])


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    adv, ret = ppo.gae(r, v, mask, 1.0, 1.0)
    to_go = r.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - v)


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    w = ppo.masked_whiten(x, mask)
    vals = w[mask]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased std over the 4 real tokens
    assert (w[~mask] == 0).all()


def test_policy_loss_clipping_and_ratio_one():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, clipfrac, akl = ppo.policy_loss(old.clone(), old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(0.0) and clipfrac.item() == 0.0 and akl.item() == 0.0
    new = old + torch.log(torch.tensor([[1.5, 1.5]]))  # ratio 1.5 on both tokens
    loss, clipfrac, _ = ppo.policy_loss(new, old, adv, mask, 0.2)
    # token 0 (A=+1): min(1.5, 1.2)·1 -> loss −1.2 ; token 1 (A=−1): max(−(−1.5), −(−1.2)) -> +1.5
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_value_loss_clipped():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, vclip = ppo.value_loss(new, old, ret, mask, 0.2)
    # token 0: max((1-2)², (0.2-2)²) = 3.24 ; token 1: max(0.01, 0.01) = 0.01
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert vclip.item() == pytest.approx(0.5)


def test_logprobs_and_entropy_use_the_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    tok = torch.tensor([[0]])
    for t in (1.0, 0.5):
        p = torch.softmax(logits / t, -1)
        assert ppo.gather_logprobs(logits, tok, t).item() == pytest.approx(p[0, 0, 0].log().item())
        assert ppo.entropy_from_logits(logits, t).item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)


def test_rollout_token_stats_equal_the_reference_functions(monkeypatch):
    """rollout.token_stats (one log-softmax per model, chunked) gives the numbers of the plain functions."""
    from kl_research import rollout
    from kl_research.kl import exact_token_kl
    from kl_research.rollout import token_stats

    torch.manual_seed(0)
    B, R, V = 7, 5, 3001
    monkeypatch.setattr(rollout, "VOCAB_CHUNK", 2 * R * V + 7)  # two sequences per chunk: 4 chunks, a ragged last one
    assert [c.stop - c.start for c in rollout.vocab_row_chunks(B, R * V)] == [2, 2, 2, 1]
    logits, ref = 3 * torch.randn(B, R, V), 3 * torch.randn(B, R, V)
    tokens = torch.randint(V, (B, R))
    for t in (1.0, 0.7):
        logp, ref_logp, kl, ent = token_stats(logits, ref, tokens, t)
        torch.testing.assert_close(logp, ppo.gather_logprobs(logits, tokens, t))
        torch.testing.assert_close(ref_logp, ppo.gather_logprobs(ref, tokens, t))
        torch.testing.assert_close(kl, exact_token_kl(logits, ref, t))
        torch.testing.assert_close(ent, ppo.entropy_from_logits(logits, t))
        buf = torch.empty(B, R, V)
        with_buf = token_stats(logits, ref, tokens, t, buf)  # the KL-loss mode keeps the reference's log-probs
        torch.testing.assert_close(buf, torch.log_softmax(ref / t, -1))
        for got, want in zip(with_buf, (logp, ref_logp, kl, ent), strict=True):  # the same stats, from the buffer
            assert torch.equal(got, want)


def test_exact_kl_loss_is_the_masked_mean_of_exact_kl_and_k2_loss_of_half_d_squared():
    from kl_research.kl import exact_token_kl

    torch.manual_seed(1)
    logits, ref = torch.randn(3, 4, 11), torch.randn(3, 4, 11)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    lp, ref_lp = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    want = exact_token_kl(logits, ref)[mask].mean()
    torch.testing.assert_close(ppo.exact_kl_loss(lp, ref_lp, mask), want)
    d = torch.randn(3, 4)
    torch.testing.assert_close(ppo.k2_kl_loss(d, torch.zeros(3, 4), mask), (0.5 * d.square())[mask].mean())


def _perturbed_policy(model, scale=0.3, seed=0, detach_value_head=True):
    from kl_research.policy import PolicyWithValue

    policy = PolicyWithValue.from_reference(model, detach_value_head=detach_value_head)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.lm.parameters():
            p.add_(scale * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    return policy


SGD_LR = 0.005  # small enough that β = 3 does not overshoot the reference under k2's sampled-token loss


@pytest.mark.parametrize("penalty", ["exact", "k2"])
def test_kl_loss_mode_pulls_the_policy_back_and_beta_sets_how_hard(tiny_reference, penalty):
    """kl_mode=loss: with no task signal (zero advantages), PPO epochs on β·KL move a perturbed policy back towards
    the reference, and more so at a larger β; with β = 0 they leave it exactly where it is, although the value loss
    is not zero (returns = values + 1): with the trainer's detach_value_head it trains the head alone. The KL is
    measured exactly on the rollout's sequences before and after the update. Plain SGD: with zero advantages the loss
    is β·KL alone, and Adam's step does not depend on the loss's scale, so under Adam β could not set how hard."""
    import contextlib

    from omegaconf import OmegaConf

    from kl_research.algos import PPO, policy_update
    from kl_research.policy import score_lm
    from kl_research.rollout import rollout, token_stats

    cfg, model, _, _ = tiny_reference
    model.eval()
    pcfg = OmegaConf.merge(cfg.ppo, {"kl_mode": "loss", "kl_penalty": penalty, "batch_size": 16, "minibatch_size": 8})
    prompts = torch.randint(1, 500, (16, 4), generator=torch.Generator().manual_seed(0))
    amp = contextlib.nullcontext()
    kls = {}
    for beta in (0.0, 1.0, 3.0):
        policy = _perturbed_policy(model)
        torch.manual_seed(0)
        batch = rollout(
            policy,
            model,
            prompts,
            response_length=8,
            temperature=1.0,
            eos_token_id=None,
            pad_token_id=0,
            amp=amp,
            keep_ref_logprobs=True,
        )
        before = float(batch["exact_kl"].mean())
        zeros = torch.zeros_like(batch["logp"])
        opt = torch.optim.SGD(policy.parameters(), lr=SGD_LR)
        policy.train()
        for _ in range(3):
            gen = torch.Generator().manual_seed(0)
            policy_update(PPO(pcfg), policy, opt, batch, zeros, batch["values"] + 1.0, 4, amp, gen, beta)
        with torch.no_grad():
            logits, _ = policy.score(batch["seqs"], 4)
            ref_logits, _ = score_lm(model, batch["seqs"], 4)
            after = float(token_stats(logits, ref_logits, batch["response"], 1.0)[2].mean())
        kls[beta] = (before, after)
    assert kls[0.0][1] == pytest.approx(kls[0.0][0], rel=1e-6)  # no KL term, no task signal: no move at all
    assert kls[1.0][1] < 0.9 * kls[1.0][0]
    assert kls[3.0][1] < kls[1.0][1]


def test_fp32_head_under_bf16_autocast_matches_the_fp32_projection(tiny_reference):
    """Generation samples from the logits of FP32Head; under a bf16 autocast they stay fp32 and equal the fp32
    projection of the same hidden state (what score_lm computes), so sampling draws from the π that is scored."""
    from kl_research.policy import FP32Head, PolicyWithValue

    _, model, _, _ = tiny_reference
    policy = PolicyWithValue.from_reference(model)
    head = policy.lm.get_output_embeddings()
    assert isinstance(head, FP32Head)
    assert head.weight is policy.lm.get_input_embeddings().weight  # still tied, same parameters
    assert set(policy.lm.state_dict()) == set(model.state_dict())
    x = torch.randn(2, 3, head.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x.bfloat16())
        plain = torch.nn.functional.linear(x.bfloat16(), head.weight)  # what a plain nn.Linear would give
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.linear(x.bfloat16().float(), head.weight))


def test_sampling_draws_from_the_scored_distribution(tiny_reference):
    """generate with the trainer's settings samples the first response token from exactly softmax of the logits
    the scoring pass computes, EOS included (a min_new_tokens processor would make EOS impossible there)."""
    from kl_research.policy import PolicyWithValue
    from kl_research.rollout import sampling_kwargs

    _, model, tok, _ = tiny_reference
    policy = PolicyWithValue.from_reference(model).eval()
    n = 4000
    prompt = torch.randint(1, 500, (1, 4), generator=torch.Generator().manual_seed(3)).repeat(n, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        seqs = policy.lm.generate(input_ids=prompt, **sampling_kwargs(prompt, 1.0, 1, tok.eos_token_id, 0))
        logits, _ = policy.score(seqs[:1], 4)
    p = torch.softmax(logits[0, 0], -1)
    counts = torch.bincount(seqs[:, 4], minlength=p.numel()).double()
    eos = tok.eos_token_id
    top = sorted(set(p.topk(5).indices.tolist()) | {eos})
    assert p[eos] > 0.002  # EOS is a real option at this position
    for v in top:
        sd = (p[v] * (1 - p[v]) / n).sqrt()
        assert abs(counts[v] / n - p[v]) < 4.5 * sd + 1e-4, (v, float(counts[v] / n), float(p[v]))


def test_policy_and_value_losses_are_masked_means_over_real_tokens():
    """Padding counts nowhere, and the mean is over the batch's real tokens (not per row, not over every slot)."""
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, -0.1, 5.0], [0.05, 3.0, -4.0]])  # the large entries sit on padding
    adv = torch.tensor([[1.0, 2.0, 100.0], [-1.0, 50.0, -70.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, clipfrac, akl = ppo.policy_loss(new, old, adv, mask, 0.2)
    r = new.exp()
    per_token = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    assert loss.item() == pytest.approx(per_token[mask].sum().item() / 3)
    assert akl.item() == pytest.approx(0.5 * (0.01 + 0.01 + 0.0025) / 3)
    assert clipfrac.item() == 0.0  # the clipped entries are padding
    values, returns = torch.tensor([[1.0, 2.0, 9.0], [0.5, 8.0, 8.0]]), torch.tensor([[1.1, 1.9, 0.0], [0.0, 0.0, 0.0]])
    vloss, _ = ppo.value_loss(values, values, returns, mask, 0.2)
    assert vloss.item() == pytest.approx(0.5 * (0.01 + 0.01 + 0.25) / 3)


def test_approx_kl_away_from_ratio_one():
    """approx-KL(π_old‖π) = ½·E[(log π − log π_old)²], also for ratios far from 1 (any f with f(0) = 0 is not it)."""
    old = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    log_ratio = torch.tensor([[0.2, -0.4, 1.0]])
    _, _, akl = ppo.policy_loss(old + log_ratio, old, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), 0.2)
    assert akl.item() == pytest.approx(0.5 * (0.04 + 0.16 + 1.0) / 3)


def test_whiten_rewards_scales_the_rewards_keeping_their_mean():
    from omegaconf import OmegaConf

    from kl_research.algos import PPO

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0])
    logp, ref_logp = torch.tensor([[0.1, 0.3, -0.2, 9.0], [0.0, 0.5, 9.0, 9.0]]), torch.zeros(2, 4)
    batch = {"mask": mask, "logp": logp, "ref_logp": ref_logp, "values": torch.zeros(2, 4)}
    base = dict(kl_mode="reward", kl_penalty="k1", gamma=1.0, lam=1.0, whiten_advantages=False)
    beta = 0.5
    raw = -beta * logp * mask
    raw[0, 2] += 2.0
    raw[1, 1] += -1.0
    vals = raw[mask]
    want = ((raw - vals.mean()) / vals.std() + vals.mean()) * mask  # unbiased std, mean kept (TRL's shift_mean=False)
    _, ret = PPO(OmegaConf.create({**base, "whiten_rewards": True})).advantages(batch, scores, beta)
    torch.testing.assert_close(ret, want.flip(1).cumsum(1).flip(1) * mask, rtol=1e-5, atol=1e-6)
    adv0, _ = PPO(OmegaConf.create({**base, "whiten_rewards": False})).advantages(batch, scores, beta)
    torch.testing.assert_close(adv0, raw.flip(1).cumsum(1).flip(1) * mask)


def _one_update(model, pcfg_over, detach=True, advantages_scale=1.0, returns_shift=0.0):
    import contextlib

    from omegaconf import OmegaConf

    from kl_research.algos import PPO, policy_update
    from kl_research.reference import compose_config
    from kl_research.rollout import rollout
    from kl_research.train import make_optimizer

    pcfg = OmegaConf.merge(compose_config([]).ppo, {"batch_size": 8, "minibatch_size": 4, **pcfg_over})
    policy = _perturbed_policy(model, detach_value_head=detach)
    prompts = torch.randint(1, 500, (8, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    batch = rollout(
        policy,
        model,
        prompts,
        response_length=6,
        temperature=1.0,
        eos_token_id=None,
        pad_token_id=0,
        amp=contextlib.nullcontext(),
        keep_ref_logprobs=True,
    )
    adv = advantages_scale * torch.randn(batch["logp"].shape, generator=torch.Generator().manual_seed(1))
    opt = make_optimizer(policy, OmegaConf.merge(pcfg, {"lr": 1e-3}), torch.device("cpu"))
    trunk = {k: v.clone() for k, v in policy.lm.state_dict().items()}
    policy.train()
    stats = policy_update(
        PPO(pcfg),
        policy,
        opt,
        batch,
        adv,
        batch["values"] + returns_shift,
        4,
        contextlib.nullcontext(),
        torch.Generator().manual_seed(0),
        0.0,
    )
    moved = max(float((v - trunk[k]).abs().max()) for k, v in policy.lm.state_dict().items())
    return stats, moved


def test_target_approx_kl_stops_the_epochs_early(tiny_reference):
    _, model, _, _ = tiny_reference
    model.eval()
    full, _ = _one_update(model, {"epochs": 3, "target_approx_kl": None})
    stopped, _ = _one_update(model, {"epochs": 3, "target_approx_kl": 1e-12})
    loose, _ = _one_update(model, {"epochs": 3, "target_approx_kl": 1e3})
    assert full["epochs"] == 3 and loose["epochs"] == 3
    assert stopped["epochs"] == 1 and stopped["approx_kl_last_epoch"] > 1e-12


def test_detach_value_head_keeps_the_value_loss_off_the_policy(tiny_reference):
    """With no policy signal (zero advantages, β = 0) and a value loss (returns ≠ values): detach_value_head=True,
    the trainer's setting, leaves π's weights exactly as they were; False lets the value loss move them."""
    _, model, _, _ = tiny_reference
    model.eval()
    _, moved_detached = _one_update(model, {"epochs": 1}, detach=True, advantages_scale=0.0, returns_shift=1.0)
    _, moved_shared = _one_update(model, {"epochs": 1}, detach=False, advantages_scale=0.0, returns_shift=1.0)
    assert moved_detached == 0.0
    assert moved_shared > 1e-5


@pytest.mark.parametrize("upstream", ["both", "logp_only", "kl_only"])
def test_fused_logp_and_exact_kl_equal_autograd_values_and_gradients(upstream):
    """ppo.logp_and_exact_kl's hand-written backward (π ⊙ (g_kl·(d − KL) − g_y) + g_y·onehot(y)) is the gradient of
    the same numbers autograd differentiates: float64 gradcheck, and fp32 against the autograd path at a sweep's shape
    ratio, with a gradient flowing into one output only (the other's grad is None)."""
    from kl_research.algos import vocab_stats

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 4, 13, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ref = torch.log_softmax(torch.randn(3, 4, 13, generator=g, dtype=torch.float64), -1)
    y = torch.randint(13, (3, 4), generator=g)
    pick = {"both": lambda a, k: a.sum() * 0.3 + (k * k).sum(), "logp_only": lambda a, k: a.sum(),
            "kl_only": lambda a, k: k.sum()}[upstream]  # fmt: skip
    assert torch.autograd.gradcheck(lambda z: pick(*ppo.logp_and_exact_kl(z, y, ref)), (z,))

    b, R, V = 4, 6, 257
    logits = torch.randn(b, R, V, generator=g) * 3
    ref = torch.log_softmax(torch.randn(b, R, V, generator=g), -1)
    y = torch.randint(V, (b, R), generator=g)
    out = {}
    for fused in (False, True):
        x = logits.clone().requires_grad_()
        logp, kl = vocab_stats(x, y, 0.7, ref, fused=fused)
        pick(logp, kl).backward()
        out[fused] = (logp.detach(), kl.detach(), x.grad)
    for a, c in zip(out[False], out[True], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)  # fp32 rounding of different sums: ~2e-6
    assert float(out[True][1].min()) >= 0  # the exact KL, not an estimate


def test_policy_update_with_the_fused_vocab_backward_leaves_autograds_weights(tiny_reference):
    """One PPO update (sequence + exact, the default) from the same state, fused_vocab true and false: the same
    weights within 1e-5, and the update moved them."""
    start, weights = policy_update_weights(tiny_reference, {False: {"fused_vocab": False}, True: {"fused_vocab": True}})
    moved = max(float((a - b).abs().max()) for a, b in zip(weights[False], start, strict=True))
    assert moved > 1e-4
    for a, c in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_fused_vocab_key_is_validated(compose):
    with pytest.raises(ValueError, match="fused_vocab='yes' is invalid; allowed: auto, kernel, true, false"):
        compose("fused_vocab=yes")
