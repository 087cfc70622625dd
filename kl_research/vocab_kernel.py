"""The work over the vocabulary as one C loop per row (`fused_vocab=kernel`, and `auto` on a CPU that builds it): in
the PPO update, log π(y) and the exact KL(π‖π_ref) at each response position and their gradient in closed form; in
the rollout, the per-token numbers of both models (`token_stats`: log π(y), log π_ref(y), exact KL, entropy, and the
reference's log-probs the update keeps), and in the fast sampler's decoding steps the draw from the softmax
(`sample_rows`: the inverse-CDF token of decode.inverse_cdf_sample from the same uniform, ~0.3 ms a decoding step saved
at the tiny default).

Why (docs/performance.md): the torch-ops version (`ppo.logp_and_exact_kl`) makes ~4 passes over each (b, R, V) fp32
tensor forward and 3 backward, each ~6 MB at the tiny default, more than a core's L2, plus a copy of the minibatch's
rows of the reference's log-probs. Here each row of V logits (16 KB) is read into L1 once per pass and nothing of
size V is written forward; backward writes the gradient. The reference's rows are read in place through the
minibatch's row indices. Measured at (16, 24, 4096), 1 thread, the 2-core Intel Xeon with AMX: 7.9 → 3.2 ms forward +
backward per minibatch; a default 1-thread bf16 step ~0.64 → ~0.58 s with the rollout's part (docs/performance.md).

The maths is `ppo._LogpExactKL`'s: with lse = log Σ_v exp(z_v), log π_v = z_v − lse, d_v = log π_v − log π_ref,v,
    log π(y) = z_y − lse,   KL = Σ_v π_v·d_v,   ∂L/∂z_v = π_v·(g_KL·(d_v − KL) − g_y) + g_y·[v = y].
The numbers equal torch's to fp32 rounding, not bit for bit (another exp: glibc's vector math, `libmvec`, ≤ 4 ulp;
sums in another order): `tests/test_vocab_kernel.py`. NaN and ±inf propagate as in torch (no -ffast-math).

Built once per machine with the system C compiler (`cc`/`gcc`/`clang`, well under a second) into the cache
(`<cache>/kernels/<hash of source, flags, compiler and CPU>/`) and loaded with ctypes (stdlib; the call releases the
GIL). Rows are split across torch's thread count with a thread pool, each row computed by one thread, so the results
do not depend on the number of threads. Without a compiler, or off a CPU, `fused_vocab=auto` keeps the torch-ops
version (`ppo.logp_and_exact_kl`) and `fused_vocab=kernel` is refused before any compute.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#ifdef KL_SIMD_EXP
#pragma omp declare simd notinbranch
float expf(float);
#endif

/* rows [n0, n1) of z (N, V): row n's reference row is ref + ref_row[n] * V, its token y[n] */
void logp_kl_fwd(const float* z, const float* ref, const int64_t* ref_row, const int64_t* y, int64_t n0, int64_t n1,
                 int64_t V, float* logp_y, float* kl, float* lse_out) {
  for (int64_t n = n0; n < n1; n++) {
    const float* zr = z + n * V;
    const float* rr = ref + ref_row[n] * V;
    float m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max:m) reduction(|:nan)
    for (int64_t v = 0; v < V; v++) { m = zr[v] > m ? zr[v] : m; nan |= zr[v] != zr[v]; }
    if (nan || isinf(m)) m = NAN;  /* as torch's log_softmax: a NaN or +inf logit, or all -inf, makes the row NaN */
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int64_t v = 0; v < V; v++) s += expf(zr[v] - m);
    const float lse = m + logf(s);
    float acc = 0.f;
#pragma omp simd reduction(+:acc)
    for (int64_t v = 0; v < V; v++) { const float lp = zr[v] - lse; acc += expf(lp) * (lp - rr[v]); }
    logp_y[n] = zr[y[n]] - lse;
    kl[n] = acc;
    lse_out[n] = lse;
  }
}

/* the rollout's per-token numbers from the policy's and the reference's logits, each row divided by t:
   log π(y), log π_ref(y), Σ π (log π − log π_ref), −Σ π log π; and log π_ref into ref_out when it is not NULL */
void token_stats(const float* zp, const float* zr, const int64_t* y, int64_t n0, int64_t n1, int64_t V, float t,
                 float* logp_y, float* ref_logp_y, float* kl, float* entropy, float* ref_out) {
  for (int64_t n = n0; n < n1; n++) {
    const float* a = zp + n * V;
    const float* b = zr + n * V;
    float ma = -INFINITY, mb = -INFINITY;
    int nan_a = 0, nan_b = 0;
#pragma omp simd reduction(max:ma, mb) reduction(|:nan_a, nan_b)
    for (int64_t v = 0; v < V; v++) {
      const float x = a[v] / t, r = b[v] / t;
      ma = x > ma ? x : ma;
      mb = r > mb ? r : mb;
      nan_a |= x != x;
      nan_b |= r != r;
    }
    if (nan_a || isinf(ma)) ma = NAN;  /* each model's row as its log_softmax: NaN where torch's is */
    if (nan_b || isinf(mb)) mb = NAN;
    float sa = 0.f, sb = 0.f;
#pragma omp simd reduction(+:sa, sb)
    for (int64_t v = 0; v < V; v++) { sa += expf(a[v] / t - ma); sb += expf(b[v] / t - mb); }
    const float la = ma + logf(sa), lb = mb + logf(sb);
    float ent = 0.f, acc = 0.f;
    float* ro = ref_out ? ref_out + n * V : 0;
    /* two copies of one loop on purpose: one loop with `if (ro)` inside stays unvectorised under gcc 12 -O3
       (no unswitching under omp simd): 9.8 -> 28.5 ms at (64, 24, 4096) without the buffer, measured */
    if (ro) {
#pragma omp simd reduction(+:ent, acc)
      for (int64_t v = 0; v < V; v++) {
        const float lp = a[v] / t - la, rl = b[v] / t - lb, p = expf(lp);
        ro[v] = rl;
        ent += p * lp;
        acc += p * (lp - rl);
      }
    } else {
#pragma omp simd reduction(+:ent, acc)
      for (int64_t v = 0; v < V; v++) {
        const float lp = a[v] / t - la, rl = b[v] / t - lb, p = expf(lp);
        ent += p * lp;
        acc += p * (lp - rl);
      }
    }
    logp_y[n] = a[y[n]] / t - la;
    ref_logp_y[n] = b[y[n]] / t - lb;
    kl[n] = acc;
    entropy[n] = -ent;
  }
}

/* one draw per row of probs (N, V) by inversion: the first v with cdf[v] > u[n] * cdf[V-1], the cdf in fp64, as
   decode.inverse_cdf_sample's cumsum + searchsorted; here the sums of 64 entries at a time (a vector sum each) are
   kept, the target's block found among them, then the token within that block, so a row costs ~1 pass, not a
   sequential fp64 scan of V. Rounding can leave the within-block scan short of the target: the block's last token
   with p > 0 then (V - 1 for a row without one, as the clamp of inverse_cdf_sample). */
void sample_rows(const float* probs, const double* u, int64_t n0, int64_t n1, int64_t V, int64_t* out) {
  const int64_t nb = (V + 63) / 64;
  double bs[nb > 0 ? nb : 1];
  for (int64_t n = n0; n < n1; n++) {
    const float* p = probs + n * V;
    double total = 0.0;
    for (int64_t b = 0; b < nb; b++) {
      const int64_t b1 = (b + 1) * 64 < V ? (b + 1) * 64 : V;
      double s = 0.0;
#pragma omp simd reduction(+:s)
      for (int64_t v = b * 64; v < b1; v++) s += (double)p[v];
      bs[b] = s;
      total += s;
    }
    const double target = u[n] * total;
    int64_t pick = V - 1;
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++) {
      if (acc + bs[b] > target) {
        const int64_t b1 = (b + 1) * 64 < V ? (b + 1) * 64 : V;
        int64_t last = -1;
        for (int64_t v = b * 64; v < b1; v++) {
          if (p[v] > 0.f) last = v;
          acc += (double)p[v];
          if (acc > target) { last = v; break; }
        }
        if (last >= 0) pick = last;
        break;
      }
      acc += bs[b];
    }
    out[n] = pick;
  }
}

void logp_kl_bwd(const float* z, const float* ref, const int64_t* ref_row, const int64_t* y, int64_t n0, int64_t n1,
                 int64_t V, const float* lse, const float* kl, const float* g_y, const float* g_kl, float* grad) {
  for (int64_t n = n0; n < n1; n++) {
    const float* zr = z + n * V;
    const float* rr = ref + ref_row[n] * V;
    float* gr = grad + n * V;
    const float l = lse[n], k = kl[n], gy = g_y[n], gk = g_kl[n];
#pragma omp simd
    for (int64_t v = 0; v < V; v++) {
      const float lp = zr[v] - l;
      gr[v] = expf(lp) * (gk * (lp - rr[v] - k) - gy);
    }
    gr[y[n]] += gy;
  }
}
"""

COMPILERS = ("cc", "gcc", "clang")
_LIB: ctypes.CDLL | None = None
_WHY_NOT: str | None = None


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try in order: vectorised exp through glibc's libmvec, then the plain scalar loop."""
    base = ["-O3", "-march=native", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64"):
        base.append("-mprefer-vector-width=512")  # AVX-512 where the CPU has it (a no-op elsewhere)
    return [[*base, "-fopenmp-simd", "-DKL_SIMD_EXP"], base]


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags (a cache shared across unlike nodes must not hand
    one node's binary to another)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))


def build(cache_dir: Path) -> Path:
    """The kernel's shared library for this machine, compiled into the cache on first use (file-locked: concurrent
    jobs build it once). Raises RuntimeError, saying why, where no compiler or no flag set builds it."""
    from kl_research.runtime import cached_build

    compiler = next((c for c in COMPILERS if shutil.which(c)), None)
    if compiler is None:
        raise RuntimeError(f"no C compiler ({', '.join(COMPILERS)}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE, version, _cpu_id(), repr(_flag_sets())]).encode()).hexdigest()[:16]

    def compile_into(tmp: Path) -> dict:
        errors = []
        for flags in _flag_sets():
            (tmp / "vocab_kl.c").write_text(SOURCE)
            cmd = [compiler, *flags, str(tmp / "vocab_kl.c"), "-o", str(tmp / "vocab_kl.so"), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                return {"compiler": compiler, "version": version.splitlines()[:1], "flags": flags}
            errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
        raise RuntimeError("the vocabulary kernel does not compile: " + " | ".join(errors))

    final, _ = cached_build(cache_dir / "kernels" / f"vocab_kl-{key}", "vocabulary kernel", compile_into)
    return final / "vocab_kl.so"


def load(cache_dir: Path) -> tuple[bool, str]:
    """Build (once) and load the kernel in this process: (loaded?, why or why not)."""
    global _LIB, _WHY_NOT
    if _LIB is not None:
        return True, "loaded"
    try:
        path = build(cache_dir)
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError) as e:
        _WHY_NOT = str(e)
        return False, _WHY_NOT
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.logp_kl_fwd.argtypes = [ptr] * 4 + [i64] * 3 + [ptr] * 3
    lib.logp_kl_bwd.argtypes = [ptr] * 4 + [i64] * 3 + [ptr] * 5
    lib.token_stats.argtypes = [ptr] * 3 + [i64] * 3 + [ctypes.c_float] + [ptr] * 5
    lib.sample_rows.argtypes = [ptr] * 2 + [i64] * 3 + [ptr]
    lib.logp_kl_fwd.restype = lib.logp_kl_bwd.restype = lib.token_stats.restype = lib.sample_rows.restype = None
    _LIB = lib
    return True, f"built at {path}"


def loaded() -> bool:
    return _LIB is not None


def _loaded_lib() -> ctypes.CDLL:
    """The loaded kernel; RuntimeError, saying why, where `load` has not succeeded."""
    if _LIB is None:
        raise RuntimeError(f"the vocabulary kernel is not loaded ({_WHY_NOT or 'call vocab_kernel.load first'})")
    return _LIB


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _over_rows(fn, n_rows: int, *args, at: int = 4) -> None:
    """fn(*args[:at], n0, n1, *args[at:]) over row chunks, one chunk per torch thread (ctypes releases the GIL)."""
    global _POOL, _POOL_SIZE
    threads = max(1, min(torch.get_num_threads(), n_rows))
    head, tail = args[:at], args[at:]
    if threads == 1:
        fn(*head, 0, n_rows, *tail)
        return
    if _POOL is None or _POOL_SIZE < threads:
        _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vocab_kl"), threads
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    list(_POOL.map(lambda i: fn(*head, bounds[i], bounds[i + 1], *tail), range(threads)))


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class _LogpExactKLKernel(torch.autograd.Function):
    """(log π(y), KL(π‖π_ref)) per position from z (b, R, V) fp32, response (b, R), the reference's log-probs of the
    whole rollout (B, R, V) and the minibatch's rows of it (b,)."""

    @staticmethod
    def forward(ctx, z, response, ref_logprobs, rows):
        b, R, V = z.shape
        z = z.contiguous()
        ref = ref_logprobs.contiguous()
        ref_row = (rows.to(torch.int64).unsqueeze(1) * R + torch.arange(R)).reshape(-1).contiguous()  # (b·R,)
        y = response.to(torch.int64).reshape(-1).contiguous()
        logp_y, kl, lse = (torch.empty(b, R, dtype=torch.float32) for _ in range(3))
        _over_rows(_LIB.logp_kl_fwd, b * R, _ptr(z), _ptr(ref), _ptr(ref_row), _ptr(y), V, _ptr(logp_y), _ptr(kl),
                   _ptr(lse))  # fmt: skip
        ctx.save_for_backward(z, ref_row, y, lse, kl)
        ctx.ref = ref  # not saved for backward: the rollout's buffer is an inference tensor (no grad, never modified)
        return logp_y, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y, g_kl):
        z, ref_row, y, lse, kl = ctx.saved_tensors
        ref = ctx.ref
        b, R, V = z.shape
        g_y = torch.zeros_like(kl) if g_y is None else g_y.to(torch.float32).contiguous()
        g_kl = torch.zeros_like(kl) if g_kl is None else g_kl.to(torch.float32).contiguous()
        grad = torch.empty_like(z)
        _over_rows(_LIB.logp_kl_bwd, b * R, _ptr(z), _ptr(ref), _ptr(ref_row), _ptr(y), V, _ptr(lse), _ptr(kl),
                   _ptr(g_y), _ptr(g_kl), _ptr(grad))  # fmt: skip
        return grad, None, None, None


def logp_and_exact_kl(
    z: torch.Tensor, response: torch.Tensor, ref_logprobs: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ppo.logp_and_exact_kl(z, response, ref_logprobs[rows])` through the kernel (load() first), without the copy
    of the reference's rows. z (b, R, V) fp32 on the CPU, response (b, R), ref_logprobs (B, R, V) fp32, rows (b,)."""
    _loaded_lib()
    if z.dtype != torch.float32 or ref_logprobs.dtype != torch.float32 or z.device.type != "cpu":
        raise ValueError(f"the vocabulary kernel takes fp32 CPU tensors, got {z.dtype} on {z.device}")
    return _LogpExactKLKernel.apply(z, response, ref_logprobs, rows)


def resolve_fused_vocab(setting: str | bool, device: torch.device, cache_dir: Path) -> tuple[str | bool, str]:
    """The `fused_vocab` key → (the mode the update runs: "kernel" | True (torch ops, closed-form backward) | False
    (autograd), why). auto: the kernel on a CPU where it builds and loads, else True. kernel where it cannot run is
    refused with the reason, before any compute."""
    if setting is False or setting is True:
        return setting, f"fused_vocab={str(setting).lower()}"
    if device.type != "cpu":
        if setting == "kernel":
            raise ValueError(f"fused_vocab=kernel is invalid on {device.type}: the kernel is a CPU loop; allowed: "
                             "auto, true, false")  # fmt: skip
        return True, f"auto: {device.type} (the torch-ops version, ppo.logp_and_exact_kl)"
    ok, why = load(cache_dir)
    if ok:
        return "kernel", f"{setting}: the C kernel ({why})"
    if setting == "kernel":
        raise ValueError(f"fused_vocab=kernel is invalid on this machine: {why}; allowed: auto, true, false")
    return True, f"auto: the torch-ops version (the kernel cannot be built: {why})"


def token_stats(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    response: torch.Tensor,
    temperature: float,
    ref_logprobs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rollout.token_stats` through the kernel (load() first): log π(y), log π_ref(y), exact KL and entropy, each
    (B, R), from the (B, R, V) fp32 logits of π and π_ref at temperature T, one pass set per row; log π_ref written
    into ref_logprobs_out (B, R, V) when given. Inference only (no autograd)."""
    lib = _loaded_lib()
    B, R, V = logits.shape
    a = logits.to(torch.float32).contiguous()
    b = ref_logits.to(torch.float32).contiguous()
    y = response.to(torch.int64).reshape(-1).contiguous()
    out = torch.empty(4, B, R, dtype=torch.float32)
    ro = 0 if ref_logprobs_out is None else _ptr(ref_logprobs_out)
    if ref_logprobs_out is not None and not (ref_logprobs_out.is_contiguous() and ref_logprobs_out.shape == a.shape):
        raise ValueError("ref_logprobs_out must be a contiguous (B, R, V) buffer")
    _over_rows(lib.token_stats, B * R, _ptr(a), _ptr(b), _ptr(y), V, float(temperature), _ptr(out[0]),
               _ptr(out[1]), _ptr(out[2]), _ptr(out[3]), ro, at=3)  # fmt: skip
    return out[0], out[1], out[2], out[3]


def sample_rows(probs: torch.Tensor) -> torch.Tensor:
    """`decode.inverse_cdf_sample(probs)` through the kernel (load() first): one draw per row of probs (B, V) fp32,
    u ~ U[0, 1) from the same draw of torch's global generator (B fp64 uniforms), the same token up to fp64 rounding
    of the cdf (its sums in another order move each boundary by ~1e-16 of the total: a draw differs with probability
    ~V·1e-16). Returns (B,) int64."""
    lib = _loaded_lib()
    if probs.dtype != torch.float32 or probs.device.type != "cpu" or probs.dim() != 2:
        raise ValueError(f"sample_rows takes (B, V) fp32 CPU probabilities, got {tuple(probs.shape)} {probs.dtype}")
    p = probs.contiguous()
    B, V = p.shape
    u = torch.rand(B, dtype=torch.float64)
    out = torch.empty(B, dtype=torch.int64)
    lib.sample_rows(_ptr(p), _ptr(u), 0, B, V, _ptr(out))  # on this thread: ~0.1 ms of work, less than a pool hand-off
    return out
