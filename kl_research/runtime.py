"""The process environment a job runs in: torch threads, the allocator, the device, the trunk's precision (and
its autocast), and the RNG state. One place for the rules the trainer, the reference build and the benchmark share.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from collections.abc import Iterator
from typing import Any

import torch


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


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later): there oneDNN runs bf16 matmuls 5-7x faster
    than fp32. Without AMX (AVX2 or plain AVX-512, e.g. this project's AMD EPYC VM) bf16 autocast is ~8x slower."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private torch API: absent means "don't know"
    return bool(probe and probe())


def resolve_precision(device: torch.device, precision: str) -> str:
    """The `precision` key as run: "auto" is bf16 where bf16 matmuls are fast (CUDA, AMX CPUs), else fp32.

    bf16 covers the trunk only: the vocabulary projection, log-softmax and value head stay fp32 (score_lm), and the
    batch KL then moves by ≤ 1.4e-4 nats/token (measured, results/perf.md and results/gpu.md), far below the
    smallest target 0.01. The resolved value is logged and kept in the summary: a sweep that spans machines with
    and without AMX shows which jobs ran which.
    """
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()) else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the trunk where `resolve_precision` says so; log-softmax stays fp32 (score_lm)."""
    if resolve_precision(device, precision) == "bf16":
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
