"""A tiny sweep of the real trainer through a real SLURM (submitit_slurm), with one job made to fail.

Needs a SLURM with accounting (`sudo bash scripts/slurm/start.sh` starts a single-node one; CI does it in
.ci/run). Without a working `sinfo` and `sacct` the test skips and says why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from test_sweep import check_tiny_sweep, only_sweep_dir, run_sweep


def slurm_missing() -> str | None:
    """Why SLURM cannot run the test, or None when it can."""
    for cmd in (["sinfo", "-h", "-o", "%T"], ["sacct", "-n", "-X", "-S", "now"]):
        if shutil.which(cmd[0]) is None:
            return f"`{cmd[0]}` not found: no SLURM here (start one: sudo bash scripts/slurm/start.sh)"
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"`{' '.join(cmd)}` fails ({why[0]}); SLURM with accounting is needed (scripts/slurm/start.sh)"
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node is up (sinfo: {states})"
    return None


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_sweep_through_submitit_slurm(tmp_path):
    why = slurm_missing()
    if why:
        pytest.skip(why)
    grid = ["sweep.controllers=[fixed,pid]", "sweep.targets=[0.05,-1]", "sweep.seeds=[0]", "steps=3"]
    launcher = [
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=20",
        "hydra.launcher.array_parallelism=2",
    ]
    t = time.time()
    r = run_sweep(tmp_path, *grid, *launcher, "sweep.name=tiny_slurm")
    wall = time.time() - t
    assert r.returncode != 0, r.stdout + r.stderr  # one job failed on purpose
    assert "1 of 3 jobs failed (pid_kl-1_s0)" in r.stderr, r.stderr[-3000:]
    sweep_dir = only_sweep_dir(tmp_path, "tiny_slurm")
    check_tiny_sweep(sweep_dir, ok=["fixed_s0", "pid_kl0.05_s0"], failed=["pid_kl-1_s0"], steps=3)

    # The jobs were SLURM array tasks, seen by accounting.
    ids = json.loads((sweep_dir / "sweep.json").read_text())["attempts"][-1]["submitit_ids"]
    assert all("_" in str(i) for i in ids.values()), ids  # <array job id>_<index>
    array_id = str(ids["fixed_s0"]).split("_")[0]
    sacct = subprocess.run(["sacct", "-n", "-X", "-j", array_id, "-o", "JobID,State"], capture_output=True, text=True)
    assert sacct.stdout.count("COMPLETED") == 3, sacct.stdout  # the failing job fails inside Hydra, not SLURM
    assert "ValueError" in (sweep_dir / "pid_kl-1_s0" / "error.txt").read_text()
    print(f"tiny SLURM sweep (3 jobs): {wall:.0f} s")
