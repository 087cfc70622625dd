"""Micro-benchmarks behind results/perf.md's "checked, not kept" rows (CPU, 2 threads, median of repeats).

    python benchmark/perf_micro.py minibatch --shape gpt2-small   # one PPO minibatch of the real trainer, by part
    python benchmark/perf_micro.py head                           # vocabulary head: (B·R,H)×(H,V) layouts, fwd+bwd
    python benchmark/perf_micro.py gelu                           # tanh-GELU implementations, fwd and fwd+bwd
    python benchmark/perf_micro.py fusedhead --shape tiny         # chunked head + log-prob vs the trainer's, A/B
    python benchmark/perf_micro.py decode --shape tiny --threads 1  # the fast sampler vs three faster-looking variants
    python benchmark/perf_micro.py fp32gemm --threads 1           # the head's fp32 GEMMs: MKL against oneDNN
    python benchmark/perf_micro.py wgrad                          # oneDNN's ∂W = Gᵀx: which operand to transpose
    python benchmark/perf_micro.py heldout --threads 1            # a held-out perplexity evaluation, before/after

Timings on a shared VM drift by ±20 % over minutes: compare rows of one invocation only.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, n: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def synthetic_minibatch(shape: str) -> SimpleNamespace:
    """The real policy at a bench shape, the trainer's optimizer and allocator setting, and one synthetic PPO
    minibatch: 16 sequences of 16 prompt + 24 response tokens with old log-probs, advantages, returns, values."""
    from benchmark.bench import build_models
    from kl_research.reference import compose_config
    from kl_research.runtime import setup_allocator
    from kl_research.train import make_optimizer

    setup_allocator()
    _, policy, dims = build_models(shape)
    pcfg = compose_config([]).ppo
    g = torch.Generator().manual_seed(0)
    mb, P, R = 16, 16, 24
    seqs = torch.randint(1, dims["vocab_size"], (mb, P + R), generator=g)
    old, adv, ret, oldv = (torch.randn(mb, R, generator=g) for _ in range(4))
    policy.train()
    return SimpleNamespace(
        policy=policy,
        dims=dims,
        pcfg=pcfg,
        opt=make_optimizer(policy, pcfg, torch.device("cpu")),
        mb=mb,
        P=P,
        R=R,
        seqs=seqs,
        old=old - 10,  # far from the new log-probs: every ratio is clipped the same way in both arms of an A/B
        adv=adv,
        ret=ret,
        oldv=oldv,
        mask=torch.ones(mb, R, dtype=torch.bool),
    )


def ppo_loss(x: SimpleNamespace, logp: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The trainer's minibatch loss (clipped policy loss + vf_coef × clipped value loss) on x's synthetic batch."""
    from kl_research import ppo

    pg = ppo.policy_loss(logp, x.old, x.adv, x.mask, x.pcfg.cliprange)[0]
    return pg + x.pcfg.vf_coef * ppo.value_loss(values, x.oldv, x.ret, x.mask, x.pcfg.cliprange_value)[0]


def minibatch(shape: str) -> None:
    """fwd+bwd+clip+AdamW of one 16-sequence minibatch (16+24 tokens), and each part alone."""
    from kl_research import ppo

    x = synthetic_minibatch(shape)
    policy, pcfg, opt, seqs, P = x.policy, x.pcfg, x.opt, x.seqs, x.P

    def loss():
        logits, values = policy.score(seqs, P)
        return ppo_loss(x, ppo.gather_logprobs(logits, seqs[:, P:], 1.0), values)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        loss().backward()

    def full():
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), pcfg.max_grad_norm)
        opt.step()

    def fwd():
        with torch.no_grad():
            loss()

    def trunk():
        with torch.no_grad():
            policy.lm.base_model(input_ids=seqs[:, :-1], use_cache=False)

    parts = {
        "full minibatch": full,
        "forward (no grad)": fwd,
        "trunk forward (no grad)": trunk,
        "forward+backward": fwd_bwd,
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(policy.parameters(), pcfg.max_grad_norm),
        "AdamW step (fused)": opt.step,
    }
    for name, fn in parts.items():
        print(f"{shape:10s} {name:26s} {timed(fn, 5) * 1e3:9.1f} ms")


def head() -> None:
    """The head at gpt2-small's update shape: logits = h·Wᵀ then log_softmax over V (what the trainer does) vs
    the faster GEMM layout W·hᵀ, whose log_softmax then runs along the strided dimension."""
    V, H, M = 50257, 768, 384
    W = torch.randn(V, H, requires_grad=True)
    h = torch.randn(M, H, requires_grad=True)
    y = torch.randint(0, V, (M,))

    def rowmajor(grad: bool):
        with torch.set_grad_enabled(grad):
            s = torch.log_softmax(F.linear(h, W), -1).gather(-1, y[:, None]).sum()
        if grad:
            W.grad = h.grad = None
            s.backward()

    def transposed(grad: bool):
        with torch.set_grad_enabled(grad):
            s = torch.log_softmax(W @ h.t(), 0).gather(0, y[None, :]).sum()
        if grad:
            W.grad = h.grad = None
            s.backward()

    with torch.no_grad():
        lt = W @ h.t()
        rows = {
            "GEMM h·Wᵀ (M,V)": lambda: F.linear(h, W),
            "GEMM W·hᵀ (V,M)": lambda: W @ h.t(),
            "log_softmax over V, (M,V)": lambda: torch.log_softmax(lt.t().contiguous(), -1),
            "log_softmax over V, (V,M)": lambda: torch.log_softmax(lt, 0),
        }
        for name, fn in rows.items():
            print(f"head {name:34s} {timed(fn) * 1e3:8.1f} ms")
    for name, fn in (("h·Wᵀ layout", rowmajor), ("W·hᵀ layout", transposed)):
        fwd_ms = timed(lambda fn=fn: fn(False)) * 1e3
        print(f"head {name}: forward {fwd_ms:.1f} ms, fwd+bwd {timed(lambda fn=fn: fn(True)) * 1e3:.1f} ms")


def gelu() -> None:
    c = math.sqrt(2 / math.pi)
    impls = {
        "aten gelu(tanh) (ours)": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new composite (HF/TRL)": lambda x: 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0)))),
        "x·sigmoid(2z) composite": lambda x: x * torch.sigmoid(2 * c * (x + 0.044715 * x * x * x)),
        "aten gelu(erf) (other function)": lambda x: F.gelu(x),
    }
    for width in (512, 3072):  # tiny's and gpt2-small's MLP width, one 16×39 minibatch
        x = torch.randn(16, 39, width, requires_grad=True)
        go = torch.randn_like(x)
        ref = impls["aten gelu(tanh) (ours)"](x.detach().double())
        for name, f in impls.items():

            def fb(f=f, x=x, go=go):
                f(x).backward(go)
                x.grad = None

            def fw(f=f, x=x):
                with torch.no_grad():
                    f(x)

            err = (f(x.detach().double()) - ref).abs().max().item()
            print(
                f"gelu {width:5d} {name:32s} fwd {timed(fw, 30) * 1e3:7.3f} ms  fwd+bwd {timed(fb, 30) * 1e3:7.3f} ms"
                f"  max |Δ| vs tanh-GELU {err:.1e}"
            )


class ChunkedLinearLogProb(torch.autograd.Function):
    """log softmax(h Wᵀ)[y] with the vocabulary in column chunks, forward and a hand-written backward
    (∂/∂z = g·(onehot(y) − softmax(z)); ∂h = ∂z·W, ∂W = ∂zᵀ·h, written chunk by chunk into their own rows). No (N, V)
    log-softmax output, no zero-filled gather gradient, and each GEMM runs on a cache-sized (N, chunk) block: alone,
    the forward GEMM is 87 GFLOP/s at N=384, V=50257 as one GEMM and 133-159 GFLOP/s in 2048-column chunks."""

    @staticmethod
    def forward(ctx, h, W, y, chunk):
        N, V = h.shape[0], W.shape[0]
        zs = [F.linear(h, W[s : s + chunk]) for s in range(0, V, chunk)]  # (N, c) each
        m = torch.stack([z.amax(-1) for z in zs]).amax(0)
        lse = m + sum((z - m[:, None]).exp_().sum(-1) for z in zs).log()
        rows, z_y = torch.arange(N), torch.empty(N, dtype=zs[0].dtype)
        for i, z in enumerate(zs):
            here = (y >= i * chunk) & (y < i * chunk + z.shape[1])
            z_y[here] = z[rows[here], y[here] - i * chunk]
        ctx.save_for_backward(h, W, y, lse, *zs)
        ctx.chunk = chunk
        return z_y - lse

    @staticmethod
    def backward(ctx, g):
        h, W, y, lse, *zs = ctx.saved_tensors
        c, rows = ctx.chunk, torch.arange(h.shape[0])
        d_h, d_w = torch.zeros_like(h), torch.empty_like(W)
        for i, z in enumerate(zs):
            s, e = i * c, i * c + z.shape[1]
            dz = (z - lse[:, None]).exp_().mul_(-g[:, None])
            here = (y >= s) & (y < e)
            dz[rows[here], y[here] - s] += g[here]
            d_h.addmm_(dz, W[s:e])
            torch.mm(dz.t(), h, out=d_w[s:e])
        return d_h, d_w, None, None


def fusedhead(shape: str, rounds: int = 6) -> None:
    """One PPO minibatch of the real policy (16 × 40 tokens), the trainer's head (F.linear + log_softmax + gather)
    against ChunkedLinearLogProb, interleaved in rounds; prints both and the median within-round ratio."""
    from kl_research import ppo

    x = synthetic_minibatch(shape)
    policy, opt, seqs, mb, P, R = x.policy, x.opt, x.seqs, x.mb, x.P, x.R
    W = policy.lm.get_output_embeddings().weight
    y = seqs[:, P:].reshape(-1)

    def logprobs(hs: torch.Tensor, fused: bool) -> torch.Tensor:
        if fused:
            return ChunkedLinearLogProb.apply(hs, W, y, 2048).view(mb, R)
        return ppo.gather_logprobs(F.linear(hs, W).view(mb, R, -1), seqs[:, P:], 1.0)

    hs0 = torch.randn(mb * R, x.dims["n_embd"], dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # the two compute one function: values, and the gradients through gradcheck (float64)
        ref = torch.log_softmax(F.linear(hs0, W.double()), -1).gather(-1, y[:, None]).squeeze(-1)
        assert torch.allclose(ChunkedLinearLogProb.apply(hs0, W.double(), y, 2048), ref, atol=1e-10)
    h_small = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w_small = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y_small = torch.tensor([0, 3, 4, 7, 10, 4])  # chunks of 4 columns: targets in all three, the last one partial
    assert torch.autograd.gradcheck(lambda h, w: ChunkedLinearLogProb.apply(h, w, y_small, 4), (h_small, w_small))

    def step(fused: bool) -> None:
        opt.zero_grad(set_to_none=True)
        hidden = policy.lm.base_model(input_ids=seqs[:, :-1], use_cache=False).last_hidden_state
        hs = hidden[:, P - 1 :].reshape(mb * R, -1)
        values = policy.v_head(hs).view(mb, R)
        ppo_loss(x, logprobs(hs, fused), values).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), x.pcfg.max_grad_norm)
        opt.step()

    for fused in (False, True, False, True):
        step(fused)
    n = 20 if shape == "tiny" else 3
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for fused in (False, True) if r % 2 == 0 else (True, False):
            t = time.perf_counter()
            for _ in range(n):
                step(fused)
            times[fused].append((time.perf_counter() - t) / n)
    ratio = statistics.median(a / b for a, b in zip(times[False], times[True], strict=True))
    for fused, name in ((False, "trainer's head"), (True, "chunked fused head")):
        print(f"{shape:10s} {name:20s} minibatch ms per round: {[round(t * 1e3) for t in times[fused]]}")
    print(f"{shape:10s} trainer's / chunked fused, median of within-round ratios: {ratio:.3f}")


def decode(shape: str, rounds: int = 2) -> None:
    """Generation at the bench's rollout (64 prompts of 16 tokens, 24 new, no EOS): the fast sampler
    (`kl_research.decode.sample`) against (a) the one-query attention as matmul + softmax instead of SDPA, (b) a
    two-level inverse CDF (fp64 cumulative sums over 64 block sums, then within one block of 64, instead of over all V),
    (c) a static-shape decode step (the cache's full length, masked; the position a tensor) through torch.compile, the
    draw outside it. (a) and (c) must give the sampler's tokens exactly; (b) draws differently from the same law."""
    from benchmark.bench import build_models
    from kl_research import decode as dec

    _, policy, dims = build_models(shape)
    lm = policy.lm
    cfg, tr = lm.config, lm.transformer
    B, P, R = 64, 16, 24
    S, C = P + R, cfg.n_embd
    H, D = cfg.n_head, C // cfg.n_head
    eps, scale = cfg.layer_norm_epsilon, 1.0 / math.sqrt(C // cfg.n_head)
    prompts = torch.randint(1, dims["vocab_size"], (B, P), generator=torch.Generator().manual_seed(0))
    sdpa, draw = F.scaled_dot_product_attention, dec.inverse_cdf_sample

    def matmul_attention(q, k, v, is_causal=False, scale=None):
        if q.shape[-2] != 1:
            return sdpa(q, k, v, is_causal=is_causal, scale=scale)
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)).mul_(scale), -1), v)

    def two_level(probs, block=64):
        n, V = probs.shape
        nb = -(-V // block)
        pb = F.pad(probs, (0, nb * block - V)).view(n, nb, block)
        bcdf = pb.sum(-1, dtype=torch.float64).cumsum(-1)
        u = torch.rand(n, 1, dtype=torch.float64) * bcdf[:, -1:]
        bi = torch.searchsorted(bcdf, u, right=True).clamp_(max=nb - 1)
        r = u - torch.where(bi > 0, bcdf.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(u))
        inner = pb.gather(1, bi.unsqueeze(-1).expand(n, 1, block)).squeeze(1).cumsum(-1, dtype=torch.float64)
        j = torch.searchsorted(inner, r, right=True).clamp_(max=block - 1)
        return (bi * block + j).squeeze(1).clamp_(max=V - 1)

    def layers(x, kcs, vcs, idx, mask):
        b, t, c = x.shape
        for blk, kc, vc in zip(tr.h, kcs, vcs, strict=True):
            h = F.layer_norm(x, (c,), blk.ln_1.weight, blk.ln_1.bias, eps)
            qkv = torch.addmm(blk.attn.c_attn.bias, h.view(b * t, c), blk.attn.c_attn.weight).view(b, t, 3, H, D)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            kc.index_copy_(2, idx, k)
            vc.index_copy_(2, idx, v)
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale).transpose(1, 2).reshape(b * t, c)
            x = x + torch.addmm(blk.attn.c_proj.bias, a, blk.attn.c_proj.weight).view(b, t, c)
            h = F.layer_norm(x, (c,), blk.ln_2.weight, blk.ln_2.bias, eps)
            m = blk.mlp.act(torch.addmm(blk.mlp.c_fc.bias, h.view(b * t, c), blk.mlp.c_fc.weight))
            x = x + torch.addmm(blk.mlp.c_proj.bias, m, blk.mlp.c_proj.weight).view(b, t, c)
        h = F.layer_norm(x[:, -1], (c,), tr.ln_f.weight, tr.ln_f.bias, eps)
        return torch.softmax(F.linear(h, lm.get_output_embeddings().weight), -1)

    def step(tok, pos, kcs, vcs):
        x = tr.wte(tok).unsqueeze(1) + tr.wpe(pos).unsqueeze(0)
        return layers(x, kcs, vcs, pos, (torch.arange(S) <= pos).view(1, S))

    compiled_step = torch.compile(step, dynamic=False)

    @torch.inference_mode()
    def static_compiled():
        kcs = [torch.zeros(B, H, S, D) for _ in tr.h]
        vcs = [torch.zeros(B, H, S, D) for _ in tr.h]
        out = torch.empty(B, S, dtype=torch.long)
        out[:, :P] = prompts
        x = tr.wte(prompts) + tr.wpe(torch.arange(P))
        probs = layers(x, kcs, vcs, torch.arange(P), torch.ones(P, S, dtype=torch.bool).tril())
        for t in range(R):
            out[:, P + t] = tok = draw(probs)
            if t + 1 < R:
                probs = compiled_step(tok, torch.tensor([P + t]), kcs, vcs)
        return out

    def fast(attention=sdpa, sampler=draw):
        def run():
            dec.F.scaled_dot_product_attention, dec.inverse_cdf_sample = attention, sampler
            try:
                return dec.sample(lm, prompts, max_new_tokens=R, temperature=1.0, eos_token_id=None, pad_token_id=0)
            finally:
                dec.F.scaled_dot_product_attention, dec.inverse_cdf_sample = sdpa, draw

        return run

    arms = {
        "fast sampler": fast(),
        "(a) matmul attention": fast(attention=matmul_attention),
        "(b) two-level CDF": fast(sampler=two_level),
        "(c) static step, compiled": static_compiled,
    }
    t = time.perf_counter()
    torch.manual_seed(1)
    compiled_tokens = static_compiled()
    print(f"{shape}: (c) compile + first call {time.perf_counter() - t:.1f} s ({torch.get_num_threads()} threads)")
    for name in ("(a) matmul attention", "(c) static step, compiled"):
        torch.manual_seed(1)
        ref = arms["fast sampler"]()
        torch.manual_seed(1)
        got = arms[name]() if name.startswith("(a)") else compiled_tokens
        print(f"{name}: the fast sampler's tokens exactly: {bool(torch.equal(ref, got))}")
    for r in range(rounds):
        for name, fn in arms.items():
            print(f"round {r + 1} {name:28s} {timed(fn, n=5, warmup=1) * 1e3:7.1f} ms per rollout's generation")


def fp32gemm(rounds: int = 3) -> None:
    """The vocabulary head's fp32 GEMMs at the tiny default's shapes (C = 128, V = 4096: a decoding step's 64 rows, a
    minibatch's 384, the reference's 1536; the fp32 backward's two; SmolLM2's C = 576, V = 49152) through torch's
    BLAS (F.linear / mm: MKL in the x86 wheels) and through oneDNN (runtime.onednn_linear, the `onednn_fp32` key):
    ms and GFLOP/s, alternating, median of `rounds`; and whether the two give the same bits."""
    from kl_research.runtime import cpu_features, onednn_fp32_reason, onednn_linear

    cpu = cpu_features()
    dnn_ok = onednn_fp32_reason() or "ok"
    print(f"cpu: {cpu['model']} ({cpu['id']}), {torch.get_num_threads()} thread(s); oneDNN: {dnn_ok}")
    g = torch.Generator().manual_seed(0)
    cases = [  # (what, x, W as linear's (out, in)): the forward is x Wᵀ; the backward's are G W and Gᵀ x
        *((f"forward {n}×128 · 128×4096", torch.randn(n, 128, generator=g), torch.randn(4096, 128, generator=g))
          for n in (64, 384, 1536)),
        ("grad x: 384×4096 · 4096×128", torch.randn(384, 4096, generator=g), torch.randn(4096, 128, generator=g).t()),
        ("grad W: 4096×384 · 384×128", torch.randn(384, 4096, generator=g).t(), torch.randn(384, 128, generator=g).t()),
        ("SmolLM2 forward 96×576 · 576×49152", torch.randn(96, 576, generator=g), torch.randn(49152, 576, generator=g)),
    ]  # fmt: skip
    for what, x, w in cases:
        flop = 2 * x.shape[0] * x.shape[1] * w.shape[0]
        mkl, dnn = [], []
        for _ in range(rounds):
            mkl.append(timed(lambda x=x, w=w: F.linear(x, w)))
            dnn.append(timed(lambda x=x, w=w: onednn_linear(x, w)))
        a, b = statistics.median(mkl), statistics.median(dnn)
        same = torch.equal(F.linear(x, w), onednn_linear(x, w))
        print(f"{what:36s} MKL {a * 1e3:7.3f} ms {flop / a / 1e9:5.0f} GFLOP/s   oneDNN {b * 1e3:7.3f} ms "
              f"{flop / b / 1e9:5.0f} GFLOP/s   {a / b:4.2f}×   same bits: {same}")  # fmt: skip


def wgrad(rounds: int = 3) -> None:
    """oneDNN's linear wants its input row-major: the head's weight gradient ∂W = Gᵀ x (G (384, 4096), x (384, 128),
    a minibatch of the tiny default) with Gᵀ copied as the input (the code before session 26), with xᵀ copied and ∂Wᵀ
    transposed back into the weight's layout (runtime._onednn_weight_grad), MKL's mm on the strided operands, and the
    copy of Gᵀ alone: ms, alternating, median of `rounds`."""
    from kl_research.runtime import _onednn_gemm

    g = torch.Generator().manual_seed(0)
    grad, x = torch.randn(384, 4096, generator=g), torch.randn(384, 128, generator=g)
    cases = {
        "copy Gᵀ, oneDNN": lambda: _onednn_gemm(grad.t(), x.t()),
        "copy xᵀ, oneDNN, ∂Wᵀ → ∂W": lambda: _onednn_gemm(x.t(), grad.t()).t().contiguous(),
        "MKL mm(Gᵀ, x), no copy": lambda: torch.mm(grad.t(), x),
        "the copy of Gᵀ alone": lambda: grad.t().contiguous(),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn))
    print(f"{torch.get_num_threads()} thread(s); ∂W of the tiny head (4096×384 · 384×128)")
    for k, ts in times.items():
        print(f"  {k:28s} {statistics.median(ts) * 1e3:7.3f} ms")


def heldout(rounds: int = 3) -> None:
    """One held-out perplexity evaluation of the tiny default (256 fortunes, batches of 32, 64 tokens): transformers'
    forward and nn.Linear's head (MKL's fp32 GEMMs; the code before session 26) against the job's trunk (plain ops,
    GEMMs through oneDNN where `onednn_fp32: auto` picks it), alternating; seconds and the perplexity each gives."""
    import copy
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kl_research import evaluate, gpt2
    from kl_research.data import eval_subset, load_corpus
    from kl_research.reference import compose_config, load_reference
    from kl_research.runtime import resolve_onednn_fp32, use_onednn_fp32

    cfg = compose_config([])
    lm, tok = load_reference(cfg)
    texts = eval_subset(load_corpus(cfg.data).heldout, cfg.data.eval_texts)
    kw = {"batch_size": 32, "max_length": cfg.data.eval_max_length, "device": torch.device("cpu")}
    job = copy.deepcopy(lm)
    gpt2.use_plain_trunk(job)
    onednn, why = resolve_onednn_fp32("auto", torch.device("cpu"))
    use_onednn_fp32(job, onednn)
    print(f"{torch.get_num_threads()} thread(s); onednn_fp32 auto → {onednn} ({why})")
    for r in range(rounds + 1):  # the first round warms both up
        row = []
        for name, m in (("transformers + MKL", lm), ("the job's trunk", job)):
            t = time.perf_counter()
            ppl = evaluate.heldout_perplexity(m, tok, texts, **kw)
            row.append(f"{name} {time.perf_counter() - t:.3f} s (ppl {ppl:.6f})")
        print(("warm-up  " if r == 0 else f"round {r}  ") + "   ".join(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ("minibatch", "head", "gelu", "fusedhead", "decode", "fp32gemm", "wgrad", "heldout")
    ap.add_argument("what", choices=what)
    ap.add_argument("--shape", default="gpt2-small")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {
        "minibatch": lambda: minibatch(a.shape),
        "head": head,
        "gelu": gelu,
        "fusedhead": lambda: fusedhead(a.shape),
        "decode": lambda: decode(a.shape),
        "fp32gemm": fp32gemm,
        "wgrad": wgrad,
        "heldout": heldout,
    }[a.what]()


if __name__ == "__main__":
    main()
