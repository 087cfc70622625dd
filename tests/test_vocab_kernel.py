"""The update's vocabulary work as a C loop per row (kl_research/vocab_kernel.py, `fused_vocab=kernel|auto`): the
numbers and gradients of the torch-ops version (ppo.logp_and_exact_kl) to fp32 rounding, read through the
minibatch's rows of the reference's log-probs; the same bits at any thread count; NaN propagated; built once into
the cache; refused where it cannot run, and `auto` falls back there."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import policy_update_weights

from kl_research import ppo, vocab_kernel


@pytest.fixture(scope="module")
def kernel(vocab_kernel_lib):
    return vocab_kernel_lib


def case(b=5, R=7, V=1003, B=9, seed=0):
    """Tempered logits (b, R, V), the whole rollout's reference log-probs (B, R, V), the minibatch's rows, tokens."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, R, V, generator=g) * 3
    ref = torch.log_softmax(torch.randn(B, R, V, generator=g) * 2, -1)
    rows = torch.randperm(B, generator=g)[:b]
    y = torch.randint(V, (b, R), generator=g)
    return z, ref, rows, y


@pytest.mark.parametrize("upstream", ["both", "logp_only", "kl_only"])
def test_kernel_gives_the_torch_ops_numbers_and_gradients(kernel, upstream):
    """Against ppo.logp_and_exact_kl on ref[rows] (whose closed-form backward is gradchecked in test_ppo.py): the
    same log π(y), exact KL and ∂/∂z to fp32 rounding, with the gradient into either output alone or both. V = 1003 is
    no multiple of any vector width (the loops' tails)."""
    z, ref, rows, y = case()
    pick = {"both": lambda a, k: a.sum() * 0.3 + (k * k).sum(), "logp_only": lambda a, k: a.sum(),
            "kl_only": lambda a, k: k.sum()}[upstream]  # fmt: skip
    out = {}
    for name, fn in (("torch", lambda x: ppo.logp_and_exact_kl(x, y, ref[rows])),
                     ("kernel", lambda x: kernel.logp_and_exact_kl(x, y, ref, rows))):  # fmt: skip
        x = z.clone().requires_grad_()
        logp, kl = fn(x)
        pick(logp, kl).backward()
        out[name] = (logp.detach(), kl.detach(), x.grad)
    for a, c in zip(out["torch"], out["kernel"], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)  # as torch-ops against autograd (test_ppo.py)
    assert float(out["kernel"][1].min()) >= -1e-6 and float(out["kernel"][1].max()) > 0.1  # the exact KL


def test_kernel_is_the_same_bits_at_any_thread_count(kernel):
    z, ref, rows, y = case(b=6, R=5, V=4096, B=12, seed=1)
    threads = torch.get_num_threads()
    res = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x = z.clone().requires_grad_()
            logp, kl = kernel.logp_and_exact_kl(x, y, ref, rows)
            (logp.sum() + kl.sum()).backward()
            res[n] = (logp, kl, x.grad)
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(res[1], res[n], strict=True)), n


def test_kernel_propagates_nan_and_inf_as_torch_does(kernel):
    """A NaN or +inf logit makes its row's log π(y) and KL NaN, as log_softmax does (the update's non-finite-loss
    guard must see it); the other rows are untouched."""
    z, ref, rows, y = case(b=2, R=3, V=300)
    z[0, 1, 17] = float("nan")
    z[1, 2, 5] = float("inf")
    logp, kl = kernel.logp_and_exact_kl(z, y, ref, rows)
    _, want_kl = ppo.logp_and_exact_kl(z, y, ref[rows])
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert logp[bad].isnan().all() and kl[bad].isnan().all()
    assert want_kl[bad].isnan().all()  # as torch's
    torch.testing.assert_close(kl[~bad], want_kl[~bad], rtol=1e-5, atol=2e-6)


def test_policy_update_with_the_kernel_leaves_the_torch_ops_weights(kernel, tiny_reference):
    """One PPO update (sequence + exact, the default) from the same state, fused_vocab kernel and true: the same
    weights within 1e-5, and the update moved them."""
    start, weights = policy_update_weights(tiny_reference, {"torch": {"fused_vocab": True},
                                                            "kernel": {"fused_vocab": "kernel"}})  # fmt: skip
    assert max(float((a - b).abs().max()) for a, b in zip(weights["torch"], start, strict=True)) > 1e-4
    for a, c in zip(weights["torch"], weights["kernel"], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_built_once_into_the_cache(tmp_path):
    if not any(shutil.which(c) for c in vocab_kernel.COMPILERS):
        pytest.skip("no C compiler on this machine")
    first = vocab_kernel.build(tmp_path)
    assert first.is_file() and first.parent.parent == tmp_path / "kernels"
    mtime = first.stat().st_mtime_ns
    assert vocab_kernel.build(tmp_path) == first and first.stat().st_mtime_ns == mtime  # found, not rebuilt


def test_fused_vocab_resolves_where_the_kernel_cannot_run(kernel, tmp_path, monkeypatch):
    """auto: the kernel on a CPU where it loads; without a compiler (and nothing loaded), or on CUDA, the torch-ops
    version, saying why; kernel there is refused before any compute."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernel.resolve_fused_vocab("auto", cpu, tmp_path)[0] == "kernel"
    assert kernel.resolve_fused_vocab(False, cpu, tmp_path)[0] is False
    assert kernel.resolve_fused_vocab(True, cpu, tmp_path)[0] is True
    assert kernel.resolve_fused_vocab("auto", cuda, tmp_path)[0] is True
    with pytest.raises(ValueError, match="fused_vocab=kernel is invalid on cuda"):
        kernel.resolve_fused_vocab("kernel", cuda, tmp_path)
    monkeypatch.setattr(vocab_kernel, "_LIB", None)
    monkeypatch.setattr(vocab_kernel.shutil, "which", lambda name: None)
    mode, why = kernel.resolve_fused_vocab("auto", cpu, tmp_path / "fresh")
    assert mode is True and "no C compiler" in why
    with pytest.raises(ValueError, match="fused_vocab=kernel is invalid on this machine: no C compiler"):
        kernel.resolve_fused_vocab("kernel", cpu, tmp_path / "fresh")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_token_stats_give_the_rollouts_numbers(kernel, temperature):
    """The rollout's per-token numbers (log π(y), log π_ref(y), exact KL, entropy) and the reference's log-probs it
    writes for the update: rollout.token_stats's to fp32 rounding; a NaN logit of the policy makes its row's numbers
    NaN where torch's are (all but the reference's)."""
    from kl_research.rollout import token_stats

    g = torch.Generator().manual_seed(3)
    logits, ref_logits = torch.randn(2, 3, 7, 501, generator=g).mul(3).unbind(0)
    y = torch.randint(501, (3, 7), generator=g)
    logits[2, 4, 9] = float("nan")
    want_buf, got_buf = torch.empty(3, 7, 501), torch.empty(3, 7, 501)
    want = token_stats(logits, ref_logits, y, temperature, want_buf)
    got = kernel.token_stats(logits, ref_logits, y, temperature, got_buf)
    ok = torch.ones(3, 7, dtype=torch.bool)
    ok[2, 4] = False
    for w, c in zip(want, got, strict=True):
        torch.testing.assert_close(c[ok], w[ok], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c[~ok], w[~ok], equal_nan=True)  # the policy's NaN: all but log π_ref(y)
    torch.testing.assert_close(got_buf[ok], want_buf[ok], rtol=1e-5, atol=1e-5)
    assert float(got[2][ok].min()) >= -1e-6 and float(got[3][ok].min()) > 0  # KL and entropy
    no_buf = kernel.token_stats(logits, ref_logits, y, temperature)
    assert all(torch.equal(a[ok], b[ok]) for a, b in zip(no_buf, got, strict=True))


@pytest.mark.parametrize("V", [1, 63, 64, 1003, 4096])
def test_kernel_sample_rows_draws_inverse_cdf_samples_tokens(kernel, V):
    """The decode loop's draw (decode.sample with kernel=True): from the same generator state, the token
    `decode.inverse_cdf_sample` draws (its cumsum in fp64 sequentially, the kernel's by 64-entry blocks), at any thread
    count; rows with zero-probability tokens, a one-hot row, a row of one huge and many tiny probabilities, V no
    multiple of the block."""
    from kl_research.decode import inverse_cdf_sample

    g = torch.Generator().manual_seed(V)
    p = torch.softmax(torch.randn(300, V, generator=g) * 4, -1)
    if V > 2:
        p[:100, ::3] = 0.0
        p[100] = 0.0
        p[100, V // 2] = 1.0
        p[101] = torch.softmax(torch.cat([torch.tensor([40.0]), torch.zeros(V - 1)]), 0)
    threads = torch.get_num_threads()
    draws = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(7)
            draws.append(kernel.sample_rows(p))
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(7)
    want = inverse_cdf_sample(p)
    for got in draws:
        assert torch.equal(got, want)
    assert bool((p.gather(1, want[:, None]) > 0).all())
    if V > 2:
        assert int(want[100]) == V // 2
