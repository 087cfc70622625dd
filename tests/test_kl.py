"""KL estimators (docs/kl-contract.md) against hand-computed values and Monte-Carlo expectations."""

import math

import pytest
import torch

from kl_research.kl import ESTIMATORS, batch_kl, exact_token_kl, masked_mean, masked_sum, token_kl

LOGP = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.9)])
REF = torch.tensor([math.log(0.25), math.log(0.4), math.log(0.9)])
D = [math.log(2.0), math.log(0.5), 0.0]  # log π − log π_ref, by hand


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("k1", D),
        ("k2", [0.5 * d * d for d in D]),
        ("k3", [math.exp(-d) - 1 + d for d in D]),  # r = 0.5 -> 0.5-1+ln2; r = 2 -> 2-1-ln2; 0
        ("seed", [math.exp(d) * d for d in D]),  # 2 ln 2, -0.5 ln 2, 0
    ],
)
def test_estimators_hand_computed(estimator, expected):
    got = token_kl(LOGP, REF, estimator)
    assert got.shape == LOGP.shape
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_explicit_numbers():
    # d = ln 2: k1 = 0.693147, k2 = 0.240227, k3 = 0.5 - 1 + 0.693147 = 0.193147, seed = 1.386294
    vals = {e: token_kl(LOGP[:1], REF[:1], e).item() for e in ESTIMATORS}
    assert vals["k1"] == pytest.approx(0.693147, abs=1e-6)
    assert vals["k2"] == pytest.approx(0.240227, abs=1e-6)
    assert vals["k3"] == pytest.approx(0.193147, abs=1e-6)
    assert vals["seed"] == pytest.approx(1.386294, abs=1e-6)


def test_k3_precise_for_tiny_differences():
    d = torch.tensor([1e-6, -1e-6], dtype=torch.float32)
    k3 = token_kl(d, torch.zeros(2), "k3")
    torch.testing.assert_close(k3, 0.5 * d.double().square().float(), rtol=1e-3, atol=0.0)
    assert (k3 >= 0).all()


def test_unknown_estimator_lists_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3, seed"):
        token_kl(LOGP, REF, "k4")


def test_exact_kl_matches_definition_and_temperature():
    torch.manual_seed(0)
    logits, ref = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    for t in (1.0, 0.7):
        p, q = torch.softmax(logits.double() / t, -1), torch.softmax(ref.double() / t, -1)
        expected = (p * (p.log() - q.log())).sum(-1)
        torch.testing.assert_close(exact_token_kl(logits, ref, t).double(), expected, rtol=1e-5, atol=1e-6)
    assert exact_token_kl(logits, ref).shape == (2, 3)
    torch.testing.assert_close(exact_token_kl(logits, logits), torch.zeros(2, 3), atol=1e-6, rtol=0)


def test_exact_kl_stable_with_huge_logits():
    logits = torch.tensor([[[1e4, 0.0, -1e4]]])
    ref = torch.tensor([[[0.0, 1e4, -1e4]]])
    kl = exact_token_kl(logits, ref)
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(1e4, rel=1e-4)  # π puts all mass on v0, log π/π_ref = 1e4 there


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4) / 3)  # per token, not per sequence
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor([3.0, 4.0]))
    assert batch_kl(LOGP[None], REF[None], torch.ones(1, 3, dtype=torch.bool), "k1").item() == pytest.approx(sum(D) / 3)


def _mc(p: torch.Tensor, q: torch.Tensor, n: int, gen: torch.Generator):
    idx = torch.multinomial(p, n, replacement=True, generator=gen)
    logp, logq = p.log()[idx], q.log()[idx]
    return {e: token_kl(logp.double(), logq.double(), e) for e in ESTIMATORS}


@pytest.mark.parametrize("case", range(4))
def test_monte_carlo_bias(case):
    """k1 and k3 are unbiased for exact KL(π‖π_ref); `seed` is not (it estimates Σ π²/π_ref·log π/π_ref).

    Tolerance: 5 standard errors of the sample mean (std/√N): a correct estimator fails with
    probability < 1e-6; the seed's bias is asserted to exceed 5 standard errors too.
    """
    gen = torch.Generator().manual_seed(case)
    v, n = 50, 200_000
    logits = torch.randn(v, generator=gen, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits + 0.6 * torch.randn(v, generator=gen, dtype=torch.float64), -1)
    exact = exact_token_kl(p.log()[None, None], q.log()[None, None]).item()
    seed_mean = (p * p / q * (p / q).log()).sum().item()
    samples = _mc(p, q, n, gen)
    for e in ("k1", "k3"):
        s = samples[e]
        se = s.std().item() / math.sqrt(n)
        assert abs(s.mean().item() - exact) < 5 * se, (e, s.mean().item(), exact, se)
    s = samples["seed"]
    se = s.std().item() / math.sqrt(n)
    assert abs(s.mean().item() - seed_mean) < 5 * se  # it estimates its own (wrong) quantity ...
    assert abs(s.mean().item() - exact) > 5 * se  # ... which is not the KL
    assert s.mean().item() > exact  # biased upwards (docs/kl-contract.md: the seed document, read critically)
    # k3 has lower variance than k1 at these distances (Schulman's note)
    assert samples["k3"].std() < samples["k1"].std()


# ------------------------------------------------------------------------------ which penalty may act where
def _expected_gradients(z: torch.Tensor, z_ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """∇_z KL(π‖π_ref) and, for every (kl_mode, estimator) pair, the expected gradient that pair applies to π, summed
    exactly over the V outcomes y ~ π of a categorical with logits z (float64, no sampling).

    reward: the penalty enters as a per-token reward, so only its score-function term reaches π: E_π[k(y)·∇log π(y)]
    with k held constant. loss: it is differentiated through log π: E_π[∇k(y)], and `exact` is the analytic gradient
    of the full sum (kl_research.ppo.exact_kl_loss)."""
    from kl_research import ppo

    V = z.shape[0]
    ref_lp = torch.log_softmax(z_ref, -1)
    zz = z.clone().requires_grad_(True)
    lp = torch.log_softmax(zz, -1)
    true = torch.autograd.grad((lp.exp() * (lp - ref_lp)).sum(), zz)[0]
    p = lp.exp().detach()
    out = {}
    one = torch.ones(1, 1, dtype=torch.bool)
    for mode, estimators in (("reward", ("k1", "k2", "k3", "seed")), ("loss", ("k1", "k2", "k3", "seed"))):
        for est in estimators:
            g = torch.zeros(V, dtype=torch.float64)
            for y in range(V):
                zy = z.clone().requires_grad_(True)
                lpy = torch.log_softmax(zy, -1)
                k = token_kl(lpy[y], ref_lp[y], est).double()
                obj = k.detach() * lpy[y] if mode == "reward" else k
                if mode == "loss" and est in ("k2", "k3"):  # the trainer's functions themselves
                    loss_fn = ppo.k2_kl_loss if est == "k2" else ppo.k3_kl_loss
                    obj = loss_fn(lpy[y].view(1, 1), ref_lp[y].view(1, 1), one)
                g += p[y] * torch.autograd.grad(obj, zy)[0]
            out[(mode, est)] = g
    zy = z.clone().requires_grad_(True)
    lpy = torch.log_softmax(zy, -1)
    obj = ppo.exact_kl_loss(lpy.view(1, 1, V), ref_lp.view(1, 1, V), one)
    out[("loss", "exact")] = torch.autograd.grad(obj, zy)[0]
    return true, out


def _cases(scale: float, n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = torch.randn(12, generator=gen, dtype=torch.float64)
        out.append((z, z + scale * torch.randn(12, generator=gen, dtype=torch.float64)))
    return out


def _reverse_kl_grad(z: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
    zz = z.clone().requires_grad_(True)
    lp, ref_lp = torch.log_softmax(zz, -1), torch.log_softmax(z_ref, -1)
    return torch.autograd.grad((ref_lp.exp() * (ref_lp - lp)).sum(), zz)[0]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-10, atol=1e-14)


# KL 0.1-0.5 nats (scale 1) and 0.005-0.03 nats (scale 0.2: the targets' range, where forward and reverse KL agree
# to second order and a cosine threshold could not tell loss+k3 from the right gradient)
@pytest.mark.parametrize("scale", [1.0, 0.2])
def test_one_token_gradients_are_identities_in_float64(scale):
    """docs/kl-contract.md, one token: reward+k1, loss+k2 and loss+exact give ∇KL(π‖π_ref) exactly in expectation
    (float64 end to end); loss+k1 gives exactly 0; loss+k3 gives exactly ∇KL(π_ref‖π), the reverse KL; the other
    refused pairs are not ∇KL. The sequence-level gradient, which one token cannot show, is
    tests/test_kl_sequence.py's."""
    from kl_research.kl import PENALTY_MODES

    cases = _cases(scale)
    results = [_expected_gradients(z, zr) for z, zr in cases]
    kls = []
    for z, zr in cases:
        lp, rlp = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
        kls.append(float((lp.exp() * (lp - rlp)).sum()))
    assert (0.05 <= min(kls) and max(kls) <= 0.6) if scale == 1.0 else (0.002 <= min(kls) and max(kls) <= 0.04), kls
    from kl_research.kl import SEQUENCE_GRADIENT

    # the offered pairs whose one-token gradient is the forward KL's (loss+k3, offered as GRPO's loss, is the reverse)
    allowed = {(m, e) for m, es in PENALTY_MODES.items() for e in es if m != "sequence"} - {("loss", "k3")}
    assert SEQUENCE_GRADIENT[("loss", "k3")] == "partial-reverse"
    assert allowed <= set(results[0][1])
    for (z, zr), (true, out) in zip(cases, results, strict=True):
        assert true.dtype == torch.float64 and all(g.dtype == torch.float64 for g in out.values())
        for pair in allowed:
            assert _same(out[pair], true), (pair, (out[pair] - true).abs().max())
        assert _same(out[("loss", "k1")], torch.zeros_like(true))
        reverse = _reverse_kl_grad(z, zr)
        assert _same(out[("loss", "k3")], reverse) and not _same(reverse, true)
        for pair in [("reward", "k2"), ("reward", "k3"), ("reward", "seed"), ("loss", "seed")]:
            assert (out[pair] - true).norm() > 0.05 * true.norm(), pair


@pytest.mark.parametrize(
    ("mode", "est", "hint"),
    [
        ("reward", "k3", "score-function"),
        ("reward", "k2", "score-function"),
        ("reward", "seed", "biased"),
        ("loss", "k1", "pulls nothing"),
        ("reward", "exact", "vocabulary"),
    ],
)
def test_refused_penalty_names_the_mode_that_works(mode, est, hint):
    from kl_research.kl import check_penalty

    with pytest.raises(ValueError, match=rf"ppo\.kl_penalty='{est}' with ppo\.kl_mode='{mode}' is refused") as err:
        check_penalty(mode, est)
    assert hint in str(err.value) and "ppo.kl_mode=sequence ppo.kl_penalty=exact" in str(err.value)
    assert "(full sequence-level gradient)" in str(err.value) and "(partial sequence-level gradient)" in str(err.value)
    assert "ppo.kl_mode=loss ppo.kl_penalty=k3 (partial-reverse sequence-level gradient)" in str(err.value)
    for m, e in (("loss", "exact"), ("loss", "k2"), ("loss", "k3"), ("reward", "k1"), ("sequence", "exact")):
        check_penalty(m, e)  # no error
    with pytest.raises(ValueError, match=r"ppo\.kl_mode='lose' is invalid"):
        check_penalty("lose", "exact")
