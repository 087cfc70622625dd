"""The update's vocabulary work (algos.vocab_stats) through torch.compile equals eager: values and gradients, with
and without the exact-KL term, and one whole policy_update leaves the same weights. Skips, saying why, where
torch.compile's CPU backend has no C++ compiler (compile_vocab=auto then stays eager)."""

from __future__ import annotations

import pytest
import torch
from conftest import policy_update_weights

from kl_research.algos import compiled_vocab_stats, vocab_stats
from kl_research.runtime import resolve_compile_vocab

HAS_COMPILER = resolve_compile_vocab("auto", torch.device("cpu"))[0]
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: torch.compile cannot build CPU kernels")


@needs_compiler
@pytest.mark.parametrize("with_ref", [True, False])
def test_compiled_vocab_stats_equal_eager_values_and_gradients(with_ref):
    g = torch.Generator().manual_seed(0)
    b, R, V = 4, 6, 97
    logits = torch.randn(b, R, V, generator=g) * 3
    ref = torch.log_softmax(torch.randn(b, R, V, generator=g), -1) if with_ref else None
    response = torch.randint(V, (b, R), generator=g)
    w_logp, w_kl = torch.randn(b, R, generator=g), torch.randn(b, R, generator=g)
    out = {}
    for name, fn in (("eager", vocab_stats), ("compiled", compiled_vocab_stats())):
        x = logits.clone().requires_grad_()
        logp, kl = fn(x, response, 0.7, ref)
        loss = (w_logp * logp).sum() + ((w_kl * kl).sum() if kl is not None else 0)
        loss.backward()
        out[name] = (logp.detach(), None if kl is None else kl.detach(), x.grad)
    for a, c in zip(out["eager"], out["compiled"], strict=True):
        if a is None:
            assert c is None
        else:
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_policy_update_with_compiled_vocab_leaves_the_weights_eager_leaves(tiny_reference):
    """One PPO update (sequence + exact, the default) from the same state: the same weights within 1e-5."""
    start, weights = policy_update_weights(
        tiny_reference, {False: {"compile_vocab": False}, True: {"compile_vocab": True}}
    )
    moved = max(float((a - b).abs().max()) for a, b in zip(weights[False], start, strict=True))
    assert moved > 1e-4  # the update did something
    for a, c in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_compile_vocab_key_is_validated(compose):
    with pytest.raises(ValueError, match="compile_vocab='yes' is invalid; allowed: auto, true, false"):
        compose("compile_vocab=yes")
    assert resolve_compile_vocab("auto", torch.device("cuda"))[0] is False
    assert resolve_compile_vocab(False, torch.device("cpu")) == (False, "compile_vocab=false")


MODES = [("ppo", "sequence", "exact"), ("ppo", "loss", "k2"), ("grpo", "loss", "k3"), ("grpo", "sequence", "exact")]


@pytest.mark.parametrize(("algo", "mode", "penalty"), MODES)
def test_the_update_path_computes_the_loss_the_enumeration_tests_check(compose, algo, mode, penalty):
    """policy_update's path (vocab_stats → loss_from_stats) gives the loss and the logits' gradient of
    Algorithm.loss(log_softmax(logits / T)), the function tests/test_kl_sequence.py differentiates exactly."""
    from kl_research.algos import build_algorithm, uses_exact_kl_loss

    cfg = compose(f"algo={algo}", f"ppo.kl_mode={mode}", f"ppo.kl_penalty={penalty}", "ppo.temperature=0.8")
    alg = build_algorithm(cfg)
    g = torch.Generator().manual_seed(3)
    b, R, V = 8, 5, 41
    mb = {"mask": (torch.rand(b, R, generator=g) > 0.2).float(), "response": torch.randint(V, (b, R), generator=g),
          "logp": torch.randn(b, R, generator=g) - 3, "ref_logp": torch.randn(b, R, generator=g) - 3,
          "values": torch.randn(b, R, generator=g),
          "ref_logprobs": torch.log_softmax(torch.randn(b, R, V, generator=g), -1)}  # fmt: skip
    adv, ret = torch.randn(b, R, generator=g), torch.randn(b, R, generator=g)
    values = torch.randn(b, R, generator=g) if alg.value_head else None
    logits = torch.randn(b, R, V, generator=g)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want, _ = alg.loss(torch.log_softmax(x1 / 0.8, -1), values, mb, adv, ret, 0.7)
    logp, kl_pos = vocab_stats(x2, mb["response"], 0.8, mb["ref_logprobs"] if uses_exact_kl_loss(cfg.ppo) else None)
    got, _ = alg.loss_from_stats(logp, kl_pos, values, mb, adv, ret, 0.7)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(want, x1)
    (g2,) = torch.autograd.grad(got, x2)
    torch.testing.assert_close(g2, g1)
