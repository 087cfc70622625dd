"""Checkpoints of a job: the run-dir lock, atomic writes, safe loading with a fallback, and the config check of a
resume. A killed job restarts from checkpoints/last.pt with the same RNG streams and controller state, so its β
trajectory is the one an uninterrupted run would have had.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"
PREVIOUS_CHECKPOINT = "checkpoints/previous.pt"  # the one before last.pt, kept for a last.pt that cannot be read
LOCK_FILE = ".lock"
# Keys whose change does not change the trajectory: a restart may differ in these and still resume. `gold`: the gold
# evaluation samples in a fork of the RNG (kl_research.gold; tests/test_gold.py checks the trajectory is the same).
# fast_trunk: the same numbers either way (tests/test_gpt2.py)
RESUMABLE_DIFFS = ("steps", "wandb", "threads", "checkpoint_every", "keep_checkpoints", "sweep", "drift_", "gold",
                   "fast_trunk")  # fmt: skip


@contextlib.contextmanager
def run_dir_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on <out>/.lock while the job runs: two copies of a job in one run dir (a sweep re-run
    while the jobs of a killed sweep process still run, the same hydra.run.dir twice) would interleave checkpoints and
    metrics. The second copy fails at once, naming the holder; the lock dies with its process (SIGKILL included)."""
    fh = open(out / LOCK_FILE, "a+")  # held open on purpose: the lock lives as long as the file
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "a process that did not say"
        fh.close()
        raise RuntimeError(
            f"{out} is in use by another copy of this job ({holder}); wait for it to finish or stop it, then run the "
            "same command again: it resumes from the last checkpoint"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


def atomic_save(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """Write obj to path through a temporary file and a rename. With keep_previous, the file that was at path
    becomes keep_previous first: a path later found unreadable (a disk fault, a full disk) still has a fallback."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)


def load_checkpoint(out: Path) -> dict | None:
    """The newest readable checkpoint of the run in out, or None if it has none.

    Loaded with weights_only=True: tensors, numbers, strings and containers only, so a checkpoint can never run code
    (a pickle with a __reduce__ is refused, naming the file). If last.pt cannot be read (truncated, corrupt), the
    previous checkpoint is used with a warning naming the bad file; the run then repeats the steps after it, on the
    same seeded trajectory. If neither can be read, a clear error names both.
    """
    last, previous = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    if not last.exists() and not previous.exists():
        return None
    errors = []
    for path in (last, previous):
        if not path.exists():
            continue
        try:
            # to the CPU first: the RNG states must be CPU byte tensors; load_state_dict copies weights and optimizer
            # state onto the device (and a checkpoint written on a GPU resumes on a CPU-only machine too)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise RuntimeError(
                    f"refusing to load {path}: it holds objects other than tensors, numbers and strings, which a "
                    f"checkpoint of this project never does and which could run code when unpickled. Delete it (and "
                    f"{previous.name} if that is also foreign) to start the run over. torch said: {e}"
                ) from None
            errors.append(f"{path}: {type(e).__name__}: {e}")
            continue
        except Exception as e:  # truncated zip, EOF, ...: unreadable, not foreign
            errors.append(f"{path}: {type(e).__name__}: {e}")
            continue
        log.info("loaded checkpoint %s (step %d)", path, ckpt["step"])
        if errors:
            log.warning(
                "checkpoint %s cannot be read (%s); resuming from the previous one, %s (step %d)",
                last,
                errors[0].split(": ", 1)[1],
                path,
                ckpt["step"],
            )
        return ckpt
    raise RuntimeError(
        "no readable checkpoint in "
        f"{out / 'checkpoints'}: {'; '.join(errors)}. Delete the checkpoints/ folder to start the run over"
    )


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += config_diff(a[k], b[k], name + ".")
        elif a.get(k) != b.get(k):
            out.append(name)
    return out


def check_resumable(ckpt: dict, resolved: dict, out: Path) -> None:
    """Refuse to resume a checkpoint whose run had another config, except in keys that leave the trajectory alone."""
    before = {"algo": {"name": "ppo"}, **ckpt["config"]}  # checkpoints from before the algo group were PPO
    diff = [k for k in config_diff(before, resolved) if not k.startswith(RESUMABLE_DIFFS) and not k.startswith("hydra")]
    if diff:
        raise ValueError(
            f"{out} holds a checkpoint of a run with a different config (differs in: {', '.join(diff)}); "
            "use another output directory (hydra.run.dir=...) or delete the checkpoint"
        )
