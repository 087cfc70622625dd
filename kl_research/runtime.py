"""The process environment a job runs in: torch threads, the allocator, the device, the trunk's precision (and
its autocast), and the RNG state. One place for the rules the trainer, the reference build and the benchmark share.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import platform
import random
import resource
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ threads
def num_threads(configured: int | None = None) -> int:
    """CPU threads for torch: the `threads` config key if set, else $SLURM_CPUS_PER_TASK, else the cores this
    process may run on. One rule for the reference build and the trainer (sweep jobs side by side must not
    oversubscribe the cores: OpenMP threads that outnumber the free cores slow torch down many times)."""
    if configured:
        return int(configured)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def setup_threads(threads: int | None) -> int:
    """Set torch's thread count by num_threads(threads) for the rest of the process; returns it."""
    n = num_threads(threads)
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """setup_threads(threads) for the duration of a block, then the caller's count again (the reference build runs
    inside a trainer and must leave its setting alone)."""
    before = torch.get_num_threads()
    try:
        yield setup_threads(threads)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- allocator
def setup_allocator() -> bool:
    """glibc malloc: serve every allocation from the heap and keep freed memory for reuse (no mmap/munmap).

    A PPO step allocates and frees the same few 50-300 MB tensors (logits, the vocabulary gradient) every
    minibatch; by default glibc maps each one fresh from the OS, and the page faults cost ~20% of the CPU time
    of a GPT-2-shaped step (measured: sys time 13 s → 1.7 s in a 65 s run). The price: RSS stays at its high-water
    mark. Process-wide, idempotent; a no-op (False) off glibc or with KL_RESEARCH_MALLOC=0.
    """
    if os.environ.get("KL_RESEARCH_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


# ------------------------------------------------------------------------------------- device, precision
def resolve_device(name: str) -> torch.device:
    """The `device` key as run: "auto" is CUDA if torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The CPU flags that decide how fast bf16 matmuls run (AMX tiles; AVX-512 bf16 dot products; their absence).
BF16_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far, in MB (2^20 bytes): its peak resident set (``getrusage``; on a CPU it holds
    the models, Adam's state and every activation) and, on CUDA, the peak of tensors allocated on the device. Logged
    per step as ``memory/peak_rss_mb`` (``memory/cuda_peak_mb``) and in summary.json (a resumed job: since resume)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"memory/peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 1024)}
    if device.type == "cuda":
        out["memory/cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def cpu_features() -> dict[str, Any]:
    """The CPU as the precision probe's cache keys it: its model name (/proc/cpuinfo, else `platform`), the
    BF16_FLAGS it has, torch's kernel capability (e.g. AVX512) and whether torch sees AMX tiles."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())  # the first processor's entry
    model = info.get("model name") or " ".join(
        info[k]
        for k in ("CPU implementer", "CPU part")
        if k in info  # ARM Linux: no "model name"
    )
    flags = set((info.get("flags") or info.get("Features") or "").split())
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private torch API: absent means "don't know"
    return {
        "model": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "id": " ".join(info[k] for k in ("vendor_id", "cpu family", "model") if k in info),  # x86: the generation
        "flags": [f for f in BF16_FLAGS if f in flags],
        "capability": torch.backends.cpu.get_cpu_capability(),
        "amx": bool(amx and amx()),
    }


@dataclass(frozen=True)
class PrecisionChoice:
    """The trunk's precision as a run uses it, and why."""

    precision: str  # "fp32" | "bf16"
    source: str  # "explicit" | "cuda" | "cpu" (no bf16 hardware: not probed) | "probe" | "cache" | "checkpoint"
    reason: str  # in words, for the log and summary.json
    fp32_s: float | None = None  # the CPU probe's seconds per step's model work in fp32 (None: not probed)
    bf16_s: float | None = None  # the same in bf16

    def record(self) -> dict[str, Any]:
        """summary.json's (and the checkpoint's) keys: precision, precision_source, precision_reason,
        precision_fp32_s, precision_bf16_s."""
        return {("" if k == "precision" else "precision_") + k: v for k, v in asdict(self).items()}


def resolve_precision(
    device: torch.device, precision: str, probe: Callable[[], PrecisionChoice] | None = None
) -> PrecisionChoice:
    """The `precision` key as run. fp32 | bf16: as set, never probed. auto: bf16 on CUDA (no probe: bf16 tensor
    cores); on a CPU, `probe()` decides (precision_probe.auto_precision: the faster trunk, measured on this machine
    and model shape, cached), because there bf16 is faster or slower depending on the CPU and the model's size.

    bf16 covers the trunk only: the vocabulary projection's forward, log-softmax and value head stay fp32 (score_lm;
    the projection's backward GEMMs take the trunk's dtype, policy.head_linear), and the
    batch KL then moves by ≤ 1.4e-4 nats/token (measured, results/perf.md and results/gpu.md), far below the
    smallest target 0.01. The resolved value is logged and kept in the summary: a sweep that spans machines shows
    which jobs ran which.
    """
    if precision in ("fp32", "bf16"):
        return PrecisionChoice(precision, "explicit", f"precision={precision} set explicitly (no probe)")
    if precision != "auto":
        raise ValueError(f"precision={precision!r} is invalid; allowed: auto, fp32, bf16")
    if device.type == "cuda":
        return PrecisionChoice("bf16", "cuda", "a CUDA device: bf16 tensor-core matmuls (no probe on GPUs)")
    if probe is None:
        raise ValueError(f"precision=auto on {device.type} is decided by a probe of the model (none was given)")
    return probe()


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the trunk with precision "bf16" (as resolved: not "auto"), else nothing; the vocabulary
    projection and log-softmax stay fp32 inside it (policy.FP32Head, score_lm)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast takes a resolved precision (fp32 | bf16), not {precision!r}: see resolve_precision")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """The global RNG states a checkpoint keeps (torch CPU, Python, and every CUDA device if present)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state()'s output (CUDA states only where a GPU is present)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global RNGs (torch.manual_seed seeds every CUDA device too)."""
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_cache_dir(cfg_cache_dir: str | None) -> Path:
    """The cache root: the `cache_dir` config key, else $KL_RESEARCH_CACHE, else $XDG_CACHE_HOME or ~/.cache,
    + /kl-research."""
    if cfg_cache_dir:
        return Path(cfg_cache_dir).expanduser().resolve()
    env = os.environ.get("KL_RESEARCH_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "kl-research").expanduser().resolve()


def cached_build(final: Path, what: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """(final, whether this call built it): a cache directory built once across processes. If final/meta.json exists
    it is returned as is; otherwise, under a file lock (a concurrent job waits and then finds it), `build(tmp)` fills a
    private temporary directory and returns the metadata, meta.json is written last (the mark of a complete build),
    and the directory is renamed to `final` (a partial `final` left by something else is replaced). `what` names the
    artefact in the log. The tiny reference, the converted GGUF and the learned reward model are cached this way."""
    from filelock import FileLock

    if (final / "meta.json").is_file():
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "meta.json").is_file():  # another job built it while we waited
            log.info("%s: built by another process at %s", what, final)
            return final, False
        log.info("%s: building %s", what, final)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, True


ONEDNN_FP32 = ("auto", True, False)  # the `onednn_fp32` key


def _onednn_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _onednn_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """∂W = Gᵀ x (G (N, V), x (N, C)) through oneDNN, whose linear wants its input row-major (any weight strides):
    either Gᵀ copied as the input, giving ∂W, or xᵀ copied, giving ∂Wᵀ (returned as a transposed view). The one whose
    copies move fewer elements, counting the transpose AccumulateGrad makes when ∂W's layout is not the weight's: for
    the vocabulary head (V = 4096 ≫ C) the copy of G was 4.8 ms of each minibatch in a 2-thread fp32 update's profile
    (docs/performance.md); for a Conv1D's weight, held (C, V), ∂Wᵀ is its own layout and needs no transpose at all."""
    n, v, c = grad.shape[0], grad.shape[1], x.shape[1]
    row_major = weight.is_contiguous()  # (V, C) row-major: ∂Wᵀ would be transposed back
    copy_g = n * v + (0 if row_major else v * c)
    copy_x = n * c + (v * c if row_major else 0)
    if copy_g <= copy_x:
        return _onednn_gemm(grad.t(), x.t())
    return _onednn_gemm(x.t(), grad.t()).t()


class _OneDNNLinear(torch.autograd.Function):
    """x Wᵀ + b through oneDNN, its backward's two GEMMs (∂x = G W, ∂W = Gᵀ x) as oneDNN linears too."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_gemm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _onednn_gemm(grad, weight.t()) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = _onednn_weight_grad(grad, x, weight) if ctx.needs_input_grad[1] else None  # (V, C)
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b (x (N, C), W (V, C)) in fp32 through oneDNN's GEMM (`torch.ops.mkldnn._linear_pointwise`, the op
    inductor's CPU backend emits for a linear) instead of torch's BLAS (MKL in the x86 wheels), differentiable (the
    backward's GEMMs in oneDNN too). IEEE fp32 either way; where the reduction is long the two libraries may sum in
    another order (last-bit differences, ~1e-7 relative), at C = 128 they gave the same bits (docs/performance.md)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_gemm(x, weight, bias)


def use_onednn_fp32(lm: torch.nn.Module, on: bool) -> None:
    """Route this model's fp32 GEMMs through oneDNN (on) or torch's BLAS (off): the vocabulary projection in
    `policy.score_lm`, the fast sampler and the held-out perplexity, and an fp32 trunk's in the plain ops
    (gpt2.blocks: the scoring pass, the update, the sampler's steps); the `onednn_fp32` key as
    `resolve_onednn_fp32` resolved it. Read back with `onednn_fp32_on`."""
    lm._kl_onednn_fp32 = bool(on)


def onednn_fp32_on(lm: torch.nn.Module) -> bool:
    """Whether `use_onednn_fp32` routed this model's fp32 GEMMs through oneDNN (False for a model it never saw)."""
    return getattr(lm, "_kl_onednn_fp32", False)


def onednn_fp32_reason() -> str | None:
    """None if oneDNN's fp32 linear runs in this torch and gives F.linear's numbers to fp32 rounding (checked once on
    a small input, from a private generator: the global RNG is untouched); else why not."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return f"torch {torch.__version__} has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)"
    # torch's fp32-precision settings, most specific first ("none": inherit the next); only "ieee" keeps fp32 GEMMs
    chain = (getattr(torch.backends.mkldnn, "matmul", None), torch.backends.mkldnn, torch.backends)
    precision = next((p for p in (getattr(o, "fp32_precision", "none") for o in chain) if p != "none"), "ieee")
    if precision != "ieee":
        return f"torch's oneDNN fp32_precision is {precision!r} (its fp32 GEMM would round below fp32)"
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 64, generator=gen), torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    try:
        y = onednn_linear(x, w, b)
    except RuntimeError as e:  # an op that exists but does not run on this CPU
        return f"oneDNN's linear failed here ({str(e).splitlines()[0]})"
    if not torch.allclose(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4):
        return "oneDNN's linear did not give F.linear's numbers on a check input"
    return None


def resolve_onednn_fp32(setting: str | bool, device: torch.device) -> tuple[bool, str]:
    """The `onednn_fp32` key → (run the fp32 GEMMs through oneDNN?, why): the vocabulary projection's (fp32 in every
    job) and, where the trunk runs in fp32, the plain GPT-2 trunk's (gpt2.blocks). auto: on an x86
    CPU that is not Intel's and has AVX-512, where MKL (torch's BLAS) runs its AVX2 kernels while oneDNN runs AVX-512:
    the head's fp32 forward (384 × 128 × 4096) took 4.5 ms in MKL and 2.0 ms in oneDNN on one core of the 2-core AMD
    EPYC Zen 5 (docs/performance.md). Elsewhere MKL stays (not measured faster). true where oneDNN cannot run is
    refused with the reason, before any compute."""
    if setting is False:
        return False, "onednn_fp32=false"
    if device.type != "cpu":
        if setting is True:
            raise ValueError(f"onednn_fp32=true is invalid on {device.type}: oneDNN is the CPU's library; allowed: "
                             "auto, false")  # fmt: skip
        return False, f"auto: {device.type} (oneDNN is the CPU's library)"
    reason = onednn_fp32_reason()
    if setting is True:
        if reason is not None:
            raise ValueError(f"onednn_fp32=true is invalid here: {reason}; allowed: auto, false")
        return True, "onednn_fp32=true"
    if reason is not None:
        return False, f"auto: {reason}"
    cpu = cpu_features()
    vendor = cpu["id"].split()[0] if cpu["id"] else "?"
    if cpu["arch"] not in ("x86_64", "AMD64") or vendor == "GenuineIntel" or "avx512f" not in cpu["flags"]:
        return False, f"auto: MKL ({cpu['model']}, {vendor}: not a non-Intel x86 CPU with AVX-512)"
    return True, f"auto: oneDNN ({cpu['model']}, {vendor} with AVX-512: MKL runs its AVX2 kernels there)"


def resolve_compile_vocab(setting: str | bool, device: torch.device) -> tuple[bool, str]:
    """The `compile_vocab` key → (compile the update's vocabulary work?, why). auto: on a CPU with a C++ compiler
    (inductor generates C++ there), not on CUDA (`compile` compiles the whole trunk there). true without a compiler
    is refused with the reason, before any compute."""
    import shutil

    compiler = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if setting is True:
        if device.type == "cpu" and compiler is None:
            raise ValueError("compile_vocab=true is invalid on this machine: no C++ compiler (g++, c++, clang++) for "
                             "torch.compile's CPU backend; allowed: auto, false")  # fmt: skip
        return True, "compile_vocab=true"
    if setting is False:
        return False, "compile_vocab=false"
    if device.type != "cpu":
        return False, f"auto: {device.type} (the `compile` key compiles the trunk there)"
    if compiler is None:
        return False, "auto: no C++ compiler for torch.compile's CPU backend"
    return True, f"auto: CPU with {compiler}"
