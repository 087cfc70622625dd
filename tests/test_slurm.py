"""A tiny sweep of the real trainer through a real SLURM (submitit_slurm), with one job made to fail.

Needs a SLURM with accounting (`sudo bash scripts/slurm/start.sh` starts a single-node one; CI does it in
.ci/run). Without a working `sinfo` and `sacct` the test skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
from test_sweep import check_tiny_sweep, env, fake_app, only_sweep_dir, run_sweep, submitted_ids, wait_for


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


def need_slurm() -> None:
    """Skip, saying why, where no SLURM runs; but fail where the environment says one must (.ci/run sets
    KL_RESEARCH_REQUIRE_SLURM=1): these are the only tests of array submission, requeue and the resubmit guard."""
    why = slurm_missing()
    if why is None:
        return
    if os.environ.get("KL_RESEARCH_REQUIRE_SLURM") == "1":
        pytest.fail(f"KL_RESEARCH_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_sweep_through_submitit_slurm(tmp_path):
    need_slurm()
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


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def in_squeue(job_id: str) -> bool:
    return job_id in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


def squeue_empty() -> bool:
    return not subprocess.run(["squeue", "-h", "-n", "fake_sweep"], capture_output=True, text=True).stdout.strip()


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_slurm_job_and_resume_after_the_sweep_process_died(tmp_path):
    """With a fake task (no torch): a job killed by SLURM (scancel) never returns a result, submitit raises
    when it is fetched; the sweep still collects the others and reports the cancelled one. Then the sweep's
    own process dies while a job is on SLURM: re-running refuses to submit a second copy of it, and once it
    has finished, completes the sweep without re-running anything that completed."""
    need_slurm()
    app = fake_app(tmp_path)
    (app / "conf" / "hydra" / "launcher").mkdir(parents=True, exist_ok=True)
    (app / "conf" / "hydra" / "launcher" / "slurm.yaml").write_text(
        "defaults:\n  - /schema/launcher@_here_: slurm\n  - _self_\ncpus_per_task: 1\nmem_gb: 1\ntimeout_min: 5\n"
    )
    hold = app / "hold"
    hold.touch()  # seed-1 jobs wait while it exists
    args = [
        f"log={app / 'calls.log'}",
        f"sweep.root={app / 'multirun'}",
        f"hold={hold}",
        "hydra/launcher=slurm",
        "hydra.job.name=fake_sweep",
        "sweep.controllers=[fixed,pid]",
        "sweep.targets=[0.05]",
        "sweep.seeds=[0,1]",
    ]
    cmd = [sys.executable, "app.py", *args]

    def calls() -> list[str]:
        return (app / "calls.log").read_text().split() if (app / "calls.log").exists() else []

    # 1. scancel one held job; release the other: the sweep ends with the cancelled one reported.
    proc = subprocess.Popen(cmd, cwd=app, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(calls()) == 4, what="all 4 jobs to start")
        sweep_dir = only_sweep_dir(app / "multirun")
        ids = submitted_ids(sweep_dir)
        subprocess.run(["scancel", ids["pid_kl0.05_s1"]], check=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            if "FAILED" in line and ids["pid_kl0.05_s1"] in line:
                break
        # submitit ignores the SIGTERM of scancel: the task lives until SLURM's SIGKILL (KillWait) and would
        # finish its work if released before.
        wait_for(lambda: not in_squeue(ids["pid_kl0.05_s1"]), what="the cancelled job to be gone")
        hold.unlink()
        out = line + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert "1 of 4 jobs failed (pid_kl0.05_s1)" in out, out[-3000:]
    for done in ("fixed_s0", "pid_kl0.05_s0", "fixed_s1"):
        assert (sweep_dir / done / "summary.json").is_file()
    md = (sweep_dir / "report" / "report.md").read_text()
    assert "### pid_kl0.05_s1" in md and "CANCELLED" in md

    # 2. Re-run (the cancelled job is held again), and kill the sweep's process while the job is on SLURM.
    hold.touch()
    proc = subprocess.Popen(cmd, cwd=app, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(calls()) == 5, what="the re-run job to start")
    proc.kill()
    proc.wait()
    r = subprocess.run(cmd, cwd=app, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "still queued or running on SLURM (pid_kl0.05_s1)" in r.stderr, r.stderr[-2000:]
    assert only_sweep_dir(app / "multirun") == sweep_dir

    # 3. Once it has finished, the same command completes the sweep and runs nothing again.
    hold.unlink()
    wait_for(squeue_empty, what="the orphaned job to finish")
    r = subprocess.run(cmd, cwd=app, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(calls()) == 5
    assert "Jobs: 4, complete: 4, failed: 0" in (sweep_dir / "report" / "report.md").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_slurm_job_resumes_from_its_checkpoint_and_counts_once(tmp_path):
    """docs/sweeps.md: a preempted or requeued job resumes from its checkpoint. A real trainer job on the real
    cluster is `scontrol requeue`d after its first checkpoint: SLURM kills it and runs it again as the same array
    task; the rerun says it resumed, ends on the uninterrupted run's trajectory (timings aside), and the sweep's
    report counts it once."""
    need_slurm()
    from omegaconf import OmegaConf
    from test_sweep import CACHE, REPO, TINY
    from test_train import read_metrics, without_timing

    from kl_research.train import CHECKPOINT, train

    name = "adaptive_kl0.05_s0"
    cmd = [
        sys.executable,
        str(REPO / "sweep.py"),
        *TINY,
        f"cache_dir={CACHE}",
        f"sweep.root={tmp_path}",
        "sweep.name=requeue",
        "sweep.controllers=[adaptive]",
        "sweep.targets=[0.05]",
        "sweep.seeds=[0]",
        "steps=200",
        "controller.horizon=16",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=20",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list((tmp_path / "requeue").glob(f"*/{name}/{CHECKPOINT}")), timeout=600, what="a checkpoint")
        sweep_dir = only_sweep_dir(tmp_path, "requeue")
        run = sweep_dir / name
        job_id = submitted_ids(sweep_dir)[name]
        assert not (run / "summary.json").exists(), "the job finished before it could be requeued"
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)
        # SLURM holds a requeued job for ~2 min (BeginTime); release it at once
        wait_for(lambda: job_state(job_id) == "PENDING", timeout=120, what="the requeued job to be pending")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True)
        out = proc.communicate(timeout=900)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    states = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    assert "REQUEUED" in states.stdout and "COMPLETED" in states.stdout, states.stdout
    log = (run / "sweep.log").read_text()
    assert "resumed from a checkpoint at step" in log, log[-2000:]
    # the same trajectory as the job run once, start to end, in this process from the job's own config
    full = tmp_path / "uninterrupted"
    train(OmegaConf.load(run / ".hydra" / "config.yaml"), full)
    a, b = read_metrics(full), read_metrics(run)
    assert len(b) == 200 and [r["kl/coef"] for r in a] == [r["kl/coef"] for r in b]
    assert without_timing(a) == without_timing(b)
    # ... and the report counts it once
    assert "Jobs: 1, complete: 1, failed: 0" in (sweep_dir / "report" / "report.md").read_text()
    assert list(pd.read_csv(sweep_dir / "report" / "summaries.csv")["run"]) == [name]
