"""The vocabulary projection (policy.head_linear, through score_lm): its forward is F.linear in fp32 whatever the
trunk's precision, so the logits, log-probs and KL are the fp32 head's; under a bf16 trunk its backward's two GEMMs
run in bf16, as autocast runs every trunk layer's, and the gradients come back in fp32 close to the fp32 ones."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel

from kl_research.policy import PolicyWithValue, head_linear
from kl_research.runtime import onednn_fp32_reason, onednn_linear, resolve_onednn_fp32, use_onednn_fp32


class MatmulDtypes(TorchDispatchMode):
    """Records (input dtype, first input's shape, output shape) of every mm/addmm dispatched inside it, backward
    included."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.calls.append((args[-1].dtype, tuple(args[-2].shape), tuple(out.shape)))
        return out


def tensors(seed: int = 0, n: int = 48, c: int = 32, v: int = 200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(v, c, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).requires_grad_()
    upstream = torch.randn(n, v, generator=g)
    return x, w, b, upstream


def grads(fn, x, w, b, upstream):
    for t in (x, w, b):
        t.grad = None
    out = fn(x, w, b)
    out.backward(upstream)
    return out.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()


def test_forward_is_f_linear_and_the_bf16_backward_is_close_to_fp32():
    x, w, b, up = tensors()
    ref_out, ref_gx, ref_gw, ref_gb = grads(F.linear, x, w, b, up)
    out, gx, gw, gb = grads(lambda *a: head_linear(*a, torch.bfloat16), x, w, b, up)
    assert torch.equal(out, ref_out)  # the logits: F.linear's in fp32, bit for bit
    assert gx.dtype == gw.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(gb, ref_gb)  # the bias's gradient is an fp32 sum
    # bf16 rounds G, W and x to 8 bits of mantissa before fp32 accumulation: a relative error of a few 1e-3
    for got, want in ((gx, ref_gx), (gw, ref_gw)):
        rel = (got - want).norm() / want.norm()
        assert 1e-5 < rel < 1e-2, rel  # rounded (so it did run in bf16), and close
    # None (fp32) and no-grad calls are F.linear itself
    _, gx32, gw32, _ = grads(lambda *a: head_linear(*a, None), x, w, b, up)
    assert torch.equal(gx32, ref_gx) and torch.equal(gw32, ref_gw)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def test_score_lm_under_a_bf16_trunk_keeps_fp32_logits_and_runs_the_heads_backward_in_bf16():
    """Through the policy's scoring pass: the logits equal an fp32 projection of the same hidden states, and the
    backward's GEMMs with the vocabulary on one side ((N, V)·(V, C) and (V, N)·(N, C)) are bf16; without autocast
    every GEMM is fp32 (the test tells the two apart)."""
    policy = PolicyWithValue.from_reference(gpt2())
    ids = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    prompt_len, V = 4, 96
    N = 4 * (12 - prompt_len)
    seen = {}
    hook = policy.lm.transformer.ln_f.register_forward_hook(lambda m, i, o: seen.update(h=o.detach()))
    for amp, want in ((True, torch.bfloat16), (False, torch.float32)):
        policy.zero_grad(set_to_none=True)
        with MatmulDtypes() as mode:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits, values = policy.score(ids, prompt_len)
            (logits.logsumexp(-1).mean() + values.mean()).backward()
        h = seen["h"][:, prompt_len - 1 :].reshape(N, -1).float()
        w = policy.lm.get_output_embeddings().weight
        assert logits.dtype == torch.float32
        assert torch.equal(logits.reshape(N, V), F.linear(h, w.detach()))  # the fp32 projection's numbers
        head_bwd = [dt for dt, a, out in mode.calls if V in a and out in ((N, 64), (V, 64))]  # G·W and Gᵀ·x
        assert len(head_bwd) == 2 and all(dt == want for dt in head_bwd), (amp, mode.calls)
        assert policy.lm.get_output_embeddings().weight.grad.dtype == torch.float32
    hook.remove()


# ------------------------------------------------------------------------------------- the head's GEMMs through oneDNN
class OneDNNCalls(TorchDispatchMode):
    """Counts oneDNN's linear (runtime.onednn_linear) and aten's mm/addmm dispatched inside it, backward included."""

    def __init__(self):
        super().__init__()
        self.onednn = self.aten = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.onednn += func is torch.ops.mkldnn._linear_pointwise.default
        self.aten += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


needs_onednn = pytest.mark.skipif(onednn_fp32_reason() is not None, reason=f"no oneDNN here: {onednn_fp32_reason()}")


@needs_onednn
def test_the_onednn_head_is_fp32_forward_and_backward():
    """onednn=True: the forward and, without a reduced grad dtype, both backward GEMMs run in oneDNN (three calls, no
    aten GEMM), to fp32 rounding of F.linear's autograd (not bf16's ~1e-3); with bf16 grads only the forward moves to
    oneDNN and the gradients are the onednn=False ones bit for bit; under no_grad it is one oneDNN call."""
    for c in (32, 128):
        x, w, b, up = tensors(c=c)
        ref = grads(F.linear, x, w, b, up)
        with OneDNNCalls() as calls:
            got = grads(lambda *a: head_linear(*a, None, True), x, w, b, up)
        assert (calls.onednn, calls.aten) == (3, 0)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        with OneDNNCalls() as calls:
            low = grads(lambda *a: head_linear(*a, torch.bfloat16, True), x, w, b, up)
        assert calls.onednn == 1
        low_mkl = grads(lambda *a: head_linear(*a, torch.bfloat16, False), x, w, b, up)
        torch.testing.assert_close(low[0], low_mkl[0], rtol=1e-6, atol=1e-6)
        for g, r in zip(low[1:], low_mkl[1:], strict=True):
            assert torch.equal(g, r)
        with torch.no_grad(), OneDNNCalls() as calls:
            out = head_linear(x, w, b, None, True)
        assert calls.onednn == 1 and not out.requires_grad
        torch.testing.assert_close(out, ref[0], rtol=1e-6, atol=1e-5)
    xs = torch.randn(6, 10, 32)[:, 3:].reshape(-1, 32)  # a strided hidden state: made contiguous first
    ws = torch.randn(50, 32)
    torch.testing.assert_close(onednn_linear(xs[::2], ws), F.linear(xs[::2], ws), rtol=1e-6, atol=1e-5)


class Copies(TorchDispatchMode):
    """The element counts of every copy (clone, copy_) dispatched inside it, backward and AccumulateGrad included."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@needs_onednn
@pytest.mark.parametrize("layout", ["head", "conv1d"])
def test_onednn_weight_gradient_copies_the_small_operand_and_lands_in_the_weights_layout(layout):
    """∂W = Gᵀ x through oneDNN needs one operand transposed into row-major order: the backward copies x (N × C), never
    the (N × V) upstream gradient, when V ≫ C (the vocabulary head: V = 4096, C = 128). The head's weight (V, C) gets
    its ∂W in that layout (a V × C transpose, still less than N × V); a Conv1D's weight, held (C, V) and passed
    transposed (gpt2.onednn_conv1d), gets ∂Wᵀ, its own layout, with no copy at all. Gradients are F.linear's to fp32
    rounding."""
    n, c, v = 96, 16, 512
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c, generator=g, requires_grad=True)
    stored = torch.randn(v, c, generator=g) if layout == "head" else torch.randn(c, v, generator=g)
    stored.requires_grad_()
    up = torch.randn(n, v, generator=g)
    weight = (lambda: stored) if layout == "head" else (lambda: stored.t())
    with Copies() as copies:
        onednn_linear(x, weight()).backward(up)
    got = (x.grad.clone(), stored.grad.clone())
    x.grad = stored.grad = None
    F.linear(x, weight()).backward(up)
    torch.testing.assert_close(got[0], x.grad, rtol=1e-5, atol=1e-4)  # sums of 512 terms of magnitude ~1
    torch.testing.assert_close(got[1], stored.grad, rtol=1e-5, atol=1e-4)
    assert got[1].stride() == stored.stride()
    assert max(copies.sizes, default=0) < n * v  # the upstream gradient was never copied
    assert sum(copies.sizes) == (n * c + v * c if layout == "head" else n * c)


@needs_onednn
def test_score_lm_and_the_fast_sampler_project_through_onednn_when_the_model_says_so():
    """use_onednn_fp32(lm, True) routes the scoring pass's and every decoding step's projection through oneDNN (and,
    the model being fp32, the sampler's blocks' four GEMMs), with the same logits to fp32 rounding; off, neither calls
    it."""
    from kl_research.decode import sample

    lm = gpt2()
    ids = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    policy = PolicyWithValue.from_reference(lm)
    logits = {}
    for on in (False, True):
        use_onednn_fp32(policy.lm, on)
        with torch.no_grad(), OneDNNCalls() as calls:
            logits[on], _ = policy.score(ids, 4)
        assert calls.onednn == (1 if on else 0)  # the head (the trunk here is transformers', not the plain ops)
        per_pass = 4 * policy.lm.config.n_layer + 1  # the sampler's blocks (plain ops) and the head
        out: dict = {}
        torch.manual_seed(5)
        with OneDNNCalls() as calls:
            sample(policy.lm, ids[:, :4], max_new_tokens=6, temperature=1.0, eos_token_id=None, pad_token_id=0,
                   scores_out=out)  # fmt: skip
        assert calls.onednn == (6 * per_pass if on else 0)  # the prompt's pass and five steps' blocks, six heads
        logits[on, "decode"] = out["logits"]
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits[True, "decode"], logits[False, "decode"], rtol=1e-6, atol=1e-5)


def test_onednn_fp32_resolves_by_cpu_vendor_and_refuses_where_it_cannot_run(monkeypatch, compose):
    """auto: oneDNN on a non-Intel x86 CPU with AVX-512 (MKL's AVX2 kernels there), MKL on Intel's or without
    AVX-512; true where oneDNN cannot run, or on CUDA, is refused with the reason; the key's value is validated."""
    from kl_research import runtime

    cpu = torch.device("cpu")
    assert resolve_onednn_fp32(False, cpu) == (False, "onednn_fp32=false")
    with pytest.raises(ValueError, match="onednn_fp32=true is invalid on cuda"):
        resolve_onednn_fp32(True, torch.device("cuda"))
    assert resolve_onednn_fp32("auto", torch.device("cuda"))[0] is False
    monkeypatch.setattr(runtime, "onednn_fp32_reason", lambda: None)
    for vendor, flags, want in (
        ("AuthenticAMD 26 2", ["avx512_bf16", "avx512f", "avx2"], True),
        ("AuthenticAMD 25 17", ["avx2"], False),
        ("GenuineIntel 6 143", ["amx_tile", "avx512f", "avx2"], False),
    ):
        feats = {"model": "x", "arch": "x86_64", "id": vendor, "flags": flags, "capability": "AVX512", "amx": False}
        monkeypatch.setattr(runtime, "cpu_features", lambda feats=feats: feats)
        assert runtime.resolve_onednn_fp32("auto", cpu)[0] is want, vendor
    monkeypatch.setattr(runtime, "onednn_fp32_reason", lambda: "simulated: no oneDNN")
    assert runtime.resolve_onednn_fp32("auto", cpu) == (False, "auto: simulated: no oneDNN")
    with pytest.raises(ValueError, match="onednn_fp32=true is invalid here: simulated: no oneDNN"):
        runtime.resolve_onednn_fp32(True, cpu)
    with pytest.raises(ValueError, match="onednn_fp32='yes' is invalid; allowed: auto, true, false"):
        compose("onednn_fp32=yes")


@needs_onednn
def test_a_reduced_onednn_fp32_precision_is_refused():
    """torch can be told to let oneDNN round fp32 GEMMs to bf16: then the head's fp32 rule would not hold."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision  # a property of torch's backend object: set and restored by hand
    try:
        matmul.fp32_precision = "bf16"
        assert "fp32_precision is 'bf16'" in onednn_fp32_reason()
    finally:
        matmul.fp32_precision = before
    assert onednn_fp32_reason() is None
