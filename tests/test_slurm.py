"""A tiny sweep of the real trainer through a real SLURM (submitit_slurm), with one job made to fail.

Needs a SLURM with accounting (`sudo bash scripts/slurm/start.sh` starts a single-node one; CI does it in
.ci/run). Without a working `sinfo` and `sacct` the test skips and says why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from test_sweep import check_tiny_sweep, env, fake_app, only_sweep_dir, run_sweep


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


@pytest.mark.slurm
@pytest.mark.slow
def test_a_cancelled_slurm_job_is_reported_and_the_others_finish(tmp_path):
    """A job killed by SLURM (here: scancel) never returns a result: submitit raises when it is fetched.
    The sweep must still collect the other jobs and report the cancelled one (fake task, no torch)."""
    why = slurm_missing()
    if why:
        pytest.skip(why)
    app = fake_app(tmp_path)
    (app / "conf" / "hydra" / "launcher").mkdir(parents=True)
    (app / "conf" / "hydra" / "launcher" / "slurm.yaml").write_text(
        "defaults:\n  - /schema/launcher@_here_: slurm\n  - _self_\ncpus_per_task: 1\nmem_gb: 1\ntimeout_min: 5\n"
    )
    src = (app / "app.py").read_text()
    (app / "app.py").write_text(
        src.replace(
            "    if cfg.controller.target_kl < 0:",
            "    if cfg.seed == 1:\n        time.sleep(300)\n    if cfg.controller.target_kl < 0:",
        )
    )
    cmd = [
        sys.executable,
        "app.py",
        f"log={app / 'calls.log'}",
        f"sweep.root={app / 'multirun'}",
        "hydra/launcher=slurm",
        "hydra.job.name=cancel_me",
        "sweep.controllers=[fixed,pid]",
        "sweep.targets=[0.05]",
        "sweep.seeds=[0,1]",
    ]
    proc = subprocess.Popen(cmd, cwd=app, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sweeper_log = app / "calls.log"
        deadline = time.time() + 120
        while time.time() < deadline and (not sweeper_log.exists() or len(sweeper_log.read_text().split()) < 4):
            time.sleep(0.5)  # every job has started (the two seed-1 jobs now sleep)
        sweep_dir = only_sweep_dir(app / "multirun")
        running = subprocess.run(["squeue", "-h", "-n", "cancel_me", "-o", "%i"], capture_output=True, text=True)
        ids = running.stdout.split()
        assert len(ids) == 2, running.stdout  # the two seed-1 jobs, sleeping
        subprocess.run(["scancel", *ids], check=True)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert "2 of 4 jobs failed (fixed_s1, pid_kl0.05_s1)" in out, out[-3000:]
    assert (sweep_dir / "fixed_s0" / "summary.json").is_file() and (
        sweep_dir / "pid_kl0.05_s0" / "summary.json"
    ).is_file()
    md = (sweep_dir / "report" / "report.md").read_text()
    assert "### pid_kl0.05_s1" in md and "CANCELLED" in md
