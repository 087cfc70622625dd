"""The matrix-multiply floor of a piece of PyTorch work: record every GEMM it dispatches, then time each one
alone on fresh tensors of the same shapes and strides.

    with GemmRecorder() as rec:
        work()                       # any forward / backward / optimizer code, CPU or CUDA
    floor = gemm_floor(rec.calls)    # {"seconds", "gflop", "gflop_per_s", "calls", "by_shape"}

`seconds` is what the GEMMs alone cost on this machine, with this BLAS, at these shapes: a lower bound on the
time of any implementation that does the same matrix multiplies (attention kernels, softmaxes, norms and the
optimizer come on top). Only torch is imported, so the TRL bench (its own venv) can use it too.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# op -> index of the two matrix operands in its args. `linear` reaches the dispatcher undecomposed under
# inference_mode (the rollout's scoring pass); with autograd on it arrives as mm/addmm.
GEMM_OPS = {
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
    aten.linear.default: (0, 1),
}
# oneDNN's fp32 linear (kl_research.runtime.onednn_linear, the `onednn_fp32` key): recorded as (input, weight, bias)
# and timed with the same fixed post-op arguments; its FLOPs are linear's
ONEDNN_LINEAR = getattr(getattr(torch.ops.mkldnn, "_linear_pointwise", None), "default", None)
ONEDNN_POSTOP = ("none", [], "")
if ONEDNN_LINEAR is not None:
    GEMM_OPS[ONEDNN_LINEAR] = (0, 1)


def _sig(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), str(t.dtype), t.device.type)


def gemm_flops(op, args) -> int:
    """2·m·k·n (times the batch for bmm) for one call."""
    i, j = GEMM_OPS[op]
    a, b = args[i], args[j]
    if op is aten.linear.default or op is ONEDNN_LINEAR:  # input (..., K) · weight (N, K)ᵀ
        return 2 * a.numel() * b.shape[0]
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class GemmRecorder(TorchDispatchMode):
    """Counts each GEMM call by (op, operand shapes/strides/dtypes); the work itself runs unchanged."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMM_OPS:
            kept = args[:3] if func is ONEDNN_LINEAR else args  # its post-op arguments (a list) are fixed
            tensors = tuple(_sig(a) if isinstance(a, torch.Tensor) else a for a in kept)
            self.calls[(func, tensors, tuple(sorted(kwargs.items())))] += 1
        return func(*args, **kwargs)


def _is_tensor_sig(sig) -> bool:
    """True for a recorded tensor (_sig's 4-tuple), False for a scalar argument (alpha, beta)."""
    return isinstance(sig, tuple) and len(sig) == 4 and isinstance(sig[0], tuple)


def _materialise(sig) -> Any:
    if not _is_tensor_sig(sig):
        return sig
    shape, stride, dtype, device = sig
    dtype = getattr(torch, dtype.removeprefix("torch."))
    # the storage the strides address (strides may be 0: autograd passes expanded gradients), filled, then viewed
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) if all(shape) else 0
    base = torch.empty(size, dtype=dtype, device=device)
    base = base.normal_() if base.is_floating_point() else base.zero_()
    return base.as_strided(shape, stride)


def gemm_floor(calls: Counter, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Time every recorded GEMM signature alone (median of `repeats`), weighted by its call count."""
    total_s, total_flop, rows = 0.0, 0, []
    for (op, sigs, kw), count in calls.items():
        args = [_materialise(s) for s in sigs] + (list(ONEDNN_POSTOP) if op is ONEDNN_LINEAR else [])
        kwargs = dict(kw)
        sync = torch.cuda.synchronize if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args) else None
        with torch.no_grad():
            for _ in range(warmup):
                op(*args, **kwargs)
            ts = []
            for _ in range(repeats):
                if sync:
                    sync()
                t = time.perf_counter()
                op(*args, **kwargs)
                if sync:
                    sync()
                ts.append(time.perf_counter() - t)
        sec = statistics.median(ts)
        flop = gemm_flops(op, args)
        total_s += sec * count
        total_flop += flop * count
        shapes = " x ".join("×".join(map(str, s[0])) for s in sigs if _is_tensor_sig(s))
        rows.append(
            {
                "op": str(op).split(".")[1],
                "shapes": shapes,
                "count": count,
                "seconds": sec * count,
                "gflop_per_s": flop / sec / 1e9,
            }
        )
    rows.sort(key=lambda r: -r["seconds"])
    return {
        "seconds": total_s,
        "gflop": total_flop / 1e9,
        "gflop_per_s": total_flop / total_s / 1e9 if total_s else 0.0,
        "calls": sum(calls.values()),
        "by_shape": rows,
    }


def gemm_fields(floors: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The bench records' GEMM keys from {phase: gemm_floor(...)}: seconds, GFLOP and GFLOP/s per phase."""
    return {
        "gemm_floor_seconds": {k: round(v["seconds"], 4) for k, v in floors.items()},
        "gemm_gflop": {k: round(v["gflop"], 2) for k, v in floors.items()},
        "gemm_gflop_per_s": {k: round(v["gflop_per_s"], 1) for k, v in floors.items()},
    }
