"""The vocabulary projection (policy.head_linear, through score_lm): its forward is F.linear in fp32 whatever the
trunk's precision, so the logits, log-probs and KL are the fp32 head's; under a bf16 trunk its backward's two GEMMs
run in bf16, as autocast runs every trunk layer's, and the gradients come back in fp32 close to the fp32 ones."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel

from kl_research.policy import PolicyWithValue, head_linear


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
