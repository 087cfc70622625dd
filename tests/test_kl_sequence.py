"""The KL penalty's gradient for whole responses, through the trainer's own pieces (docs/kl-contract.md, issue 19).

A tabular policy: one logit vector per prefix, a vocabulary of V tokens, responses of T tokens, every response
enumerated, float64 end to end. For each offered (ppo.kl_mode, ppo.kl_penalty) the *expected* gradient is computed
with `algos.PPO.advantages` (shaped rewards, GAE at γ = 1, λ = 1, no value baseline, no whitening) and
`algos.PPO.loss` (the policy loss at ratio 1 and the mode's own KL term), weighting each enumerated response by
its probability; it is compared with the autograd gradient of the enumerated sequence KL

    KL_seq(θ) = Σ_y π_θ(y) Σ_t KL_t(y_<t)      (per response token: / E[T], the count the trainer divides by)

Full modes equal it to float64 rounding (identities, not cosines). Partial modes are shown partial on the RLHF-shaped
case (π departs from π_ref only after a first token), and equal to the per-position term alone; GRPO's k3 loss equals
the per-position term of the reverse KL(π_ref‖π). Every check runs through both algorithms' pieces (algos.PPO and
algos.GRPO, whose advantage puts the KL credit beside the group-normalised score).
"""

from __future__ import annotations

import pytest
import torch

from kl_research import ppo
from kl_research.kl import PENALTY_MODES, SEQUENCE_GRADIENT, gradient_kind
from kl_research.tabular import DT, Tabular
from kl_research.tabular import case as _case

OFFERED = [(m, e) for m, es in PENALTY_MODES.items() for e in es]
FORWARD_PARTIAL = [e for e in PENALTY_MODES["loss"] if SEQUENCE_GRADIENT[("loss", e)] == "partial"]
ALGOS = ("ppo", "grpo")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


CASES = [
    ("random", 0, {}),
    ("random", 1, {"T": 4, "V": 3}),
    ("structured", 2, {"scale": 1.0}),
    ("structured", 3, {"scale": 0.8}),
    ("structured", 4, {"eos": 3}),  # variable lengths: EOS ends a response, later positions are masked
    ("random", 5, {"T": 2, "eos": 1}),
]


def test_every_offered_mode_is_labelled():
    assert set(SEQUENCE_GRADIENT) == set(OFFERED)
    assert {gradient_kind(m, e) for m, e in OFFERED} == {"full", "partial", "partial-reverse"}
    assert gradient_kind("sequence", "exact") == "full" and gradient_kind("reward", "k1") == "full"
    assert gradient_kind("loss", "exact") == "partial" and gradient_kind("loss", "k2") == "partial"
    assert gradient_kind("loss", "k3") == "partial-reverse"
    assert FORWARD_PARTIAL == ["exact", "k2"]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("kind,seed,kw", CASES)
@pytest.mark.parametrize("mode,penalty", [mp for mp in OFFERED if SEQUENCE_GRADIENT[mp] == "full"])
def test_full_modes_equal_the_gradient_of_the_sequence_kl(kind, seed, kw, mode, penalty, algo):
    tab = _case(kind, seed, **kw)
    truth, _, kl = tab.sequence_kl_grad()
    assert 0.005 < kl < 1.0
    for beta in (1.0, 0.3):
        got = tab.mode_grad(mode, penalty, beta=beta, algo=algo)
        torch.testing.assert_close(got, beta * truth, rtol=1e-9, atol=1e-12)


def _per_position_grad(tab: Tabular, reverse: bool = False) -> torch.Tensor:
    """E_π[Σ_t ∇KL_t(y_<t)] / E[T] at the sampled prefixes (weights detached): the first term of ∇KL_seq; with
    reverse, the same of KL(π_ref‖π)_t = Σ_v π_ref(v)(log π_ref(v) − log π(v))."""
    theta = tab.theta.detach().clone().requires_grad_(True)
    w = tab.weights(tab.logprobs(tab.theta)).detach()
    expected_len = float((w * tab.mask.sum(1)).sum())
    lp = tab.logprobs(theta)
    if reverse:
        ref = tab.logprobs(tab.ref)
        kl_t = (ref.exp() * (ref - lp)).sum(-1)
    else:
        kl_t = tab.position_kl(lp)
    per_position = (w * (kl_t * tab.mask).sum(1)).sum() / expected_len
    (grad,) = torch.autograd.grad(per_position, theta)
    return grad


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("kind,seed,kw", CASES)
def test_partial_modes_equal_the_per_position_term(kind, seed, kw, algo):
    """loss+exact and loss+k2 are the same in expectation: E[Σ_t ∇KL_t(y_<t)] at the sampled prefixes, exactly; and
    loss+k3 (GRPO's anchors' loss) is that term of the reverse KL(π_ref‖π), exactly, which is not the forward one."""
    tab = _case(kind, seed, **kw)
    first_term = _per_position_grad(tab)
    for penalty in FORWARD_PARTIAL:
        torch.testing.assert_close(tab.mode_grad("loss", penalty, algo=algo), first_term, rtol=1e-9, atol=1e-12)
    k3 = tab.mode_grad("loss", "k3", algo=algo)
    torch.testing.assert_close(k3, _per_position_grad(tab, reverse=True), rtol=1e-9, atol=1e-12)
    assert (k3 - first_term).norm() > 1e-3 * first_term.norm()


@pytest.mark.parametrize("seed,kw", [(2, {"scale": 1.0}), (3, {"scale": 0.8}), (4, {"eos": 3}), (6, {"T": 4, "V": 3})])
def test_partial_modes_miss_the_score_function_term_when_pi_departs_after_a_first_token(seed, kw):
    tab = _case("structured", seed, **kw)
    truth, _, kl = tab.sequence_kl_grad()
    assert 0.005 < kl < 0.5  # near the targets' range, not only far out
    full = tab.mode_grad("sequence", "exact")
    for penalty in FORWARD_PARTIAL:
        part = tab.mode_grad("loss", penalty)
        assert _cos(part, truth) < 0.95 and part.norm() < 0.95 * truth.norm(), (penalty, _cos(part, truth))
        # and what is missing is exactly the score-function term the sequence mode adds through the returns
        torch.testing.assert_close(full - part, truth - part, rtol=1e-9, atol=1e-12)


def test_the_reward_path_pulls_pi_towards_the_reference():
    """A step against the reward+k1 gradient lowers the sequence KL (swapping log π and log π_ref in
    PPO.advantages flips the gradient, and the KL rises instead)."""
    tab = _case("structured", 2, scale=1.0)
    _, _, kl0 = tab.sequence_kl_grad()
    for algo in ALGOS:
        for mode, penalty in [("reward", "k1"), ("sequence", "exact")]:
            step = tab.mode_grad(mode, penalty, algo=algo)
            moved = Tabular(tab.V, tab.T, tab.theta - 0.5 * step / step.norm(), tab.ref)
            _, _, kl1 = moved.sequence_kl_grad()
            assert kl1 < 0.9 * kl0, (algo, mode, kl0, kl1)


def _whitened_grad(tab: Tabular, beta: float, scores: torch.Tensor, whiten: bool) -> torch.Tensor:
    """Expected gradient of the sequence mode with a task score, whitening on or off, with a fixed whitening scale.

    masked_whiten's mean and std come from the batch; here the 'batch' is the enumeration, so they are constants c and
    σ, and E[Σ_s c·∇log π(y_s|y_<s)] = 0 exactly: whitening must scale the score's part by 1/σ and leave every KL part
    (analytic and through the returns) as it is.
    """
    return tab.mode_grad("sequence", "exact", beta, scores=scores, whiten_advantages=whiten)


def test_whitening_scales_the_score_and_leaves_both_kl_halves_alone():
    tab = _case("structured", 2, scale=1.0)
    truth, _, _ = tab.sequence_kl_grad()
    scores = (
        3
        * torch.linspace(-1, 2, len(tab.Y), dtype=DT)[
            torch.randperm(len(tab.Y), generator=torch.Generator().manual_seed(0))
        ]
    )
    beta = 0.7
    # the score's part alone, unwhitened: the mode's gradient at β = 0
    score_part = _whitened_grad(tab, 0.0, scores, whiten=False)
    # the whitening scale the trainer uses on this batch
    adv, _ = ppo.gae(
        ppo.shaped_rewards(scores, torch.zeros(tab.Y.shape, dtype=DT), 0.0, tab.mask),
        torch.zeros(tab.Y.shape, dtype=DT),
        tab.mask,
        1.0,
        1.0,
    )
    m = tab.mask.to(DT)
    mean = (adv * m).sum() / m.sum()
    sigma = float(torch.sqrt(((adv - mean).square() * m).sum() / (m.sum() - 1) + 1e-8))
    got = _whitened_grad(tab, beta, scores, whiten=True)
    torch.testing.assert_close(got, score_part / sigma + beta * truth, rtol=1e-9, atol=1e-12)
    assert abs(sigma - 1) > 0.2  # the check could tell a whitened KL part from an unwhitened one


def test_one_response_estimates_average_to_the_expected_gradient():
    """The variance measurement (scripts/kl_gradient.py variance) uses one-response gradients: their π-weighted mean
    is the expected gradient, for both full modes."""
    tab = _case("structured", 3, scale=0.8)
    w = tab.weights(tab.logprobs(tab.theta)).detach()
    for mode, penalty in [("sequence", "exact"), ("reward", "k1")]:
        g = tab.per_response_grads(mode, penalty)
        torch.testing.assert_close((w.view(-1, 1, 1) * g).sum(0), tab.mode_grad(mode, penalty), rtol=1e-9, atol=1e-12)
    var_seq, sq = tab.gradient_variance("sequence", "exact")
    var_k1, sq_k1 = tab.gradient_variance("reward", "k1")
    assert sq == pytest.approx(sq_k1, rel=1e-9) and 0 < var_seq < var_k1
