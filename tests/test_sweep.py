"""The sweep (sweep.py, hydra_plugins/kl_research_sweeper, kl_research/{analysis,report}.py).

Fast tier: the grid expansion, the composed configs, the sweep-dir rule, the report, and resume/failure
handling through a real `kl_grid` multirun of a fake task (no torch, seconds). Slow tier: a tiny real
sweep of the trainer through the submitit local launcher.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import child_pids, tiny_job, wait_for
from hydra import compose, initialize_config_dir

import kl_research.config  # noqa: F401  (registers the schemas)
from hydra_plugins.kl_research_sweeper.grid import Grid, expand_grid, fingerprint, grid_from_overrides
from hydra_plugins.kl_research_sweeper.launchers import squeue_ids
from hydra_plugins.kl_research_sweeper.sweeper import STATE_FILE, check_launcher, choose_sweep_dir
from kl_research.analysis import load_curves, load_summaries
from kl_research.report import write_report

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")
CONTROLLERS = ["fixed", "adaptive", "exponential", "pid"]
TARGETS = [0.01, 0.02, 0.05, 0.10, 0.20]

# The trainer's tiny test job (conftest.tiny_job), with a reference that builds in seconds.
TINY = tiny_job(10)
# Shared by this module and test_slurm.py: the reference is keyed by its config, so reuse is safe.
CACHE = Path(tempfile.gettempdir()) / "kl-research-sweep-test-cache"


def env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return e


def only_sweep_dir(root: Path, name: str = "kl_grid") -> Path:
    dirs = [p.parent for p in (root / name).glob(f"*/{STATE_FILE}")]
    assert len(dirs) == 1, dirs
    return dirs[0]


# ------------------------------------------------------------------------------------------------- grid
def test_default_grid_runs_fixed_once_per_seed():
    jobs = expand_grid(CONTROLLERS, TARGETS, [0, 1, 2])
    assert len(jobs) == 3 + 3 * 5 * 3  # fixed per seed; the others per target × seed
    fixed = [j for j in jobs if j.controller == "fixed"]
    assert [j.name for j in fixed] == ["fixed_s0", "fixed_s1", "fixed_s2"]
    assert all(not any(o.startswith("controller.target_kl") for o in j.overrides) for j in fixed)
    keys = [tuple(sorted(j.overrides)) for j in jobs]
    assert len(set(keys)) == len(keys), "two jobs with the same overrides"
    assert len({j.name for j in jobs}) == len(jobs)
    pid = [j for j in jobs if j.controller == "pid"]
    assert {(j.target_kl, j.seed) for j in pid} == {(t, s) for t in TARGETS for s in (0, 1, 2)}
    assert "pid_kl0.05_s1" in {j.name for j in pid}
    assert ("controller=pid", "controller.target_kl=0.05", "seed=1") in {j.overrides for j in pid}


def test_frontier_grid_and_user_sweeps():
    jobs = expand_grid(["fixed"], [], [0, 1], fixed_betas=[0.1, 1.0])
    assert [j.name for j in jobs] == ["fixed_b0.1_s0", "fixed_b0.1_s1", "fixed_b1_s0", "fixed_b1_s1"]
    assert jobs[0].overrides == ("controller=fixed", "controller.init_kl_coef=0.1", "seed=0")
    combos = [["steps=5", "ppo.lr=0.001"], ["steps=5", "ppo.lr=0.0003"]]
    jobs = expand_grid(["fixed", "pid"], [0.05], [0], combos=combos, swept_keys=["ppo.lr"])
    assert [j.name for j in jobs] == [
        "fixed_s0_lr=0.001",
        "pid_kl0.05_s0_lr=0.001",
        "fixed_s0_lr=0.0003",
        "pid_kl0.05_s0_lr=0.0003",
    ]
    assert jobs[1].overrides[:2] == ("steps=5", "ppo.lr=0.001")


def test_grid_rejects_what_would_collapse_it():
    with pytest.raises(ValueError, match="sets a key the grid sets"):
        expand_grid(["pid"], [0.05], [0], combos=[["seed=3"]])
    with pytest.raises(ValueError, match="duplicates"):
        expand_grid(["pid"], [0.05, 0.05], [0])
    with pytest.raises(ValueError, match="targets must not be empty"):
        expand_grid(["pid"], [], [0])


def test_hydra_syntax_for_the_grid_keys_is_the_grid():
    base = Grid(controllers=("fixed", "adaptive", "pid"), targets=(0.01, 0.2), seeds=(0, 1, 2))
    given = {"controller": ["fixed", "pid"], "controller.target_kl": ["0.05", "0.1"], "seed": ["0", "1"]}
    grid, recorded = grid_from_overrides(base, given)
    assert (grid.controllers, grid.targets, grid.seeds) == (("fixed", "pid"), (0.05, 0.1), (0, 1))
    assert recorded == ["sweep.controllers=[fixed,pid]", "sweep.targets=[0.05,0.1]", "sweep.seeds=[0,1]"]
    via_lists = expand_grid(["fixed", "pid"], [0.05, 0.1], [0, 1])
    assert expand_grid(grid.controllers, grid.targets, grid.seeds) == via_lists  # fixed still once per seed
    assert len(via_lists) == 2 + 2 * 2

    # fixed's β: one job per β and seed; with adaptive controllers too, a single value is everyone's β₀
    g, _ = grid_from_overrides(base, {"controller": ["fixed"], "controller.init_kl_coef": ["0.1", "1"]})
    assert g.fixed_betas == (0.1, 1.0) and g.beta0 is None
    assert [j.name for j in expand_grid(g.controllers, g.targets, [0], g.fixed_betas)] == [
        "fixed_b0.1_s0",
        "fixed_b1_s0",
    ]
    g, _ = grid_from_overrides(base, {"controller.init_kl_coef": ["0.3"]})
    assert g.fixed_betas == (0.3,) and g.beta0 == 0.3
    jobs = expand_grid(g.controllers, g.targets, [0], g.fixed_betas, beta0=g.beta0)
    assert all("controller.init_kl_coef=0.3" in j.overrides for j in jobs)

    # what cannot be meant, refused with the key
    with pytest.raises(ValueError, match="also sweep the β₀ of adaptive, pid"):
        grid_from_overrides(base, {"controller.init_kl_coef": ["0.1", "1"]})
    with pytest.raises(ValueError, match=re.escape("seed=... and sweep.seeds=... both")):
        grid_from_overrides(base, {"seed": ["0", "1"]}, sweep_keys=["sweep.seeds"])
    with pytest.raises(ValueError, match="not used by `fixed`"):
        grid_from_overrides(base, {"controller": ["fixed"], "controller.target_kl": ["0.05"]})
    with pytest.raises(ValueError, match="must be an integer"):
        grid_from_overrides(base, {"seed": ["0.5"]})
    with pytest.raises(ValueError, match="duplicates"):
        grid_from_overrides(base, {"seed": ["1", "1"]})


def test_fingerprint_is_the_grid_not_how_it_is_run():
    a = expand_grid(["fixed", "pid"], [0.05], [0], combos=[["steps=5", "sweep.fresh=true", "sweep.root=/x"]])
    b = expand_grid(["fixed", "pid"], [0.05], [0], combos=[["steps=5"]])
    c = expand_grid(["fixed", "pid"], [0.05], [0], combos=[["steps=6"]])
    assert fingerprint("s", a) == fingerprint("s", b) != fingerprint("s", c)
    assert fingerprint("s", b) != fingerprint("t", b)


# ----------------------------------------------------------------------------------------------- config
def compose_sweep(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("sweep", overrides=list(overrides), return_hydra_config=True)


def test_sweep_config_composes_with_the_default_grid():
    cfg = compose_sweep()
    s = cfg.hydra.sweeper
    assert s._target_.endswith("KLGridSweeper")
    assert (list(s.controllers), list(s.targets), list(s.seeds)) == ([*CONTROLLERS, "pid_ci"], TARGETS, [0, 1, 2, 3, 4])
    assert s.fixed_betas is None and s.fresh is False
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.wandb.group == "kl_grid"
    assert cfg.hydra.launcher._target_.endswith("launchers.LocalLauncher")
    assert cfg.hydra.launcher.cpus_per_task == 1
    assert cfg.hydra.callbacks.job_failure._target_.endswith("RecordJobFailure")


def test_the_sweeper_finds_the_report_callback_without_importing_it():
    """The sweeper raises the failed-sweep exit itself only when no report callback will (common.has_callback); it
    names that callback by its dotted path (importing callbacks.py would close an import circle), which must be the
    class's and the one conf/sweep.yaml configures."""
    from hydra_plugins.kl_research_sweeper.callbacks import SweepReport
    from hydra_plugins.kl_research_sweeper.common import SWEEP_REPORT, has_callback

    assert SWEEP_REPORT == f"{SweepReport.__module__}.{SweepReport.__qualname__}"
    cfg = compose_sweep()
    assert has_callback(cfg, SWEEP_REPORT)
    assert not has_callback(compose_sweep("~hydra.callbacks.report"), SWEEP_REPORT)


def test_frontier_config_and_slurm_launcher():
    cfg = compose_sweep("sweep=frontier", "sweep.seeds=[0]", "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert cfg.hydra.sweeper.name == cfg.wandb.group == "frontier"
    assert list(cfg.hydra.sweeper.controllers) == ["fixed"]
    assert len(cfg.hydra.sweeper.fixed_betas) >= 5
    assert list(cfg.hydra.sweeper.seeds) == [0]
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("launchers.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.max_num_timeout > 0
    for key in ("account", "qos", "timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb", "array_parallelism"):
        assert key in launcher


def test_the_gold_frontier_sweep_composes_for_every_proxy_size():
    """scripts/gold_frontier.sh (docs/gold.md): the fixed-β frontier × reward.n_labels=500,2000,8000 is one grid whose
    every job composes and validates as reward=learned at its own n, and whose reward models the sweep builds once
    each before its jobs (a PrepareOnce callback after the reference's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.kl_research_sweeper.grid import jobs_of
    from kl_research.config import validate
    from kl_research.reward_model import prepare

    script = (REPO / "scripts" / "gold_frontier.sh").read_text().splitlines()
    (line,) = [x for x in script if x.startswith("python sweep.py")]
    args = [a for a in line.split()[2:] if a != '"$@"']
    assert "reward=learned" in args and "reward.n_labels=500,2000,8000" in args
    cfg = compose_sweep(*[a for a in args if "," not in a])
    s = cfg.hydra.sweeper
    callbacks = cfg.hydra.callbacks
    assert list(callbacks).index("reference") < list(callbacks).index("reward_model")
    assert callbacks.reward_model.function == "kl_research.reward_model.prepare"
    jobs = jobs_of(
        Grid.of(s.controllers, s.targets, s.seeds, s.fixed_betas), OverridesParser.create().parse_overrides(args)
    )
    assert len(jobs) == len(s.fixed_betas) * len(s.seeds) * 3
    assert {j.name for j in jobs} >= {"fixed_b0.03_s0_n_labels=500", "fixed_b10_s4_n_labels=8000"}
    for n in (500, 2000, 8000):
        job = next(j for j in jobs if j.name == f"fixed_b0.1_s1_n_labels={n}")
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            job_cfg = compose("sweep", overrides=list(job.overrides))
        validate(job_cfg)
        assert (job_cfg.reward.name, job_cfg.reward.n_labels, job_cfg.controller.name) == ("learned", n, "fixed")
        assert (job_cfg.controller.init_kl_coef, job_cfg.seed, job_cfg.wandb.group) == (0.1, 1, "gold_frontier")
        assert job_cfg.reward.response_length == job_cfg.ppo.response_length  # labels sampled as PPO will sample
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        assert prepare(compose("sweep")) is None  # any other reward: nothing to build


def test_stock_submitit_launchers_are_refused_naming_ours():
    check_launcher(compose_sweep())  # hydra/launcher=local
    check_launcher(compose_sweep("hydra/launcher=slurm"))
    for stock, ours in (("submitit_local", "local"), ("submitit_slurm", "slurm")):
        with pytest.raises(ValueError, match=f"use hydra/launcher={ours},"):
            check_launcher(compose_sweep(f"hydra/launcher={stock}"))


def test_squeue_ids_expand_a_pending_arrays_compacted_tasks():
    """The launcher (is a requeued job still held?) and the sweeper (did an earlier run's job outlive it?) read
    squeue's job ids through one parser: a pending array shows as 123_[4-6,9%2], its running tasks one by one."""
    text = "77\n123_[4-6,9%2]\n123_2\n124_[0]\n"
    assert squeue_ids(text) == {"77", "123_4", "123_5", "123_6", "123_9", "123_2", "124_0"}
    assert "123_7" not in squeue_ids(text) and "123_3" not in squeue_ids(text)  # not every task of the array
    assert squeue_ids("") == set()


def test_slurm_launcher_takes_requeued_jobs_later_and_asks_squeue_once_per_poll(tmp_path, monkeypatch):
    """Three array tasks that sacct calls done in the first poll, one of them requeued (squeue still holds it): the
    launcher takes the other two, waits for the requeued one, and asks squeue once per poll, not once per job."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from hydra_plugins.kl_research_sweeper import launchers

    answers = iter([{"7_1"}, set()])  # squeue: 7_1 is held in the first poll, gone in the second
    calls: list[int] = []
    monkeypatch.setattr(launchers, "slurm_active_jobs", lambda: calls.append(1) or next(answers, set()))
    monkeypatch.setattr(launchers.time, "sleep", lambda s: None)
    taken: list[str] = []

    class Job:
        def __init__(self, job_id: str):
            self.job_id = job_id

        def done(self) -> bool:
            return True

        def results(self) -> list[JobReturn]:
            taken.append(self.job_id)
            return [JobReturn(overrides=[], status=JobStatus.COMPLETED)]

    class Executor:
        def map_array(self, fn, *columns):
            return [Job(f"7_{i}") for i in range(len(columns[0]))]

    launcher = object.__new__(launchers.SlurmLauncher)
    launcher.params, launcher.config = {}, OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    monkeypatch.setattr(launcher, "_executor", lambda: Executor())
    results = launcher.launch([[f"seed={i}"] for i in range(3)], initial_job_idx=0)
    assert [r.status for r in results] == [JobStatus.COMPLETED] * 3
    assert taken == ["7_0", "7_2", "7_1"]  # the requeued task is taken in the second poll
    assert len(calls) == 2, f"squeue asked {len(calls)} times in 2 polls"


# ---------------------------------------------------------------------------------------- sweep dir rule
def test_sweep_dir_rule(tmp_path):
    d1, lock1, resumed = choose_sweep_dir(tmp_path, "s", "fp1", fresh=False, exact=None)
    assert not resumed and d1.parent == tmp_path / "s"
    (d1 / STATE_FILE).write_text(json.dumps({"fingerprint": "fp1", "created": "2020-01-01T00:00:00"}))
    # The same second, while the first sweep runs: never the same dir.
    d2, lock2, resumed = choose_sweep_dir(tmp_path, "s", "fp1", fresh=False, exact=None)
    assert d2 != d1 and not resumed
    lock1.close()
    lock2.close()
    # Finished: a re-run resumes it; another grid or fresh=true does not.
    d3, lock3, resumed = choose_sweep_dir(tmp_path, "s", "fp1", fresh=False, exact=None)
    assert (d3, resumed) == (d1, True)
    lock3.close()
    d4, lock4, resumed = choose_sweep_dir(tmp_path, "s", "fp2", fresh=False, exact=None)
    assert d4 not in (d1, d2) and not resumed
    lock4.close()
    d5, lock5, resumed = choose_sweep_dir(tmp_path, "s", "fp1", fresh=True, exact=None)
    assert d5 not in (d1, d2, d4) and not resumed
    lock5.close()
    # The latest of two matching dirs is resumed.
    (d5 / STATE_FILE).write_text(json.dumps({"fingerprint": "fp1", "created": "2030-01-01T00:00:00"}))
    d6, lock6, _ = choose_sweep_dir(tmp_path, "s", "fp1", fresh=False, exact=None)
    assert d6 == d5
    lock6.close()
    with pytest.raises(ValueError, match="another grid"):
        choose_sweep_dir(tmp_path, "s", "other", fresh=False, exact=str(d1))


# ------------------------------------------------------------------------------------------------ report
def fake_run(sweep_dir: Path, name: str, controller: str, target: float, seed: int, reward: float) -> dict:
    run = sweep_dir / name
    (run / ".hydra").mkdir(parents=True)
    steps = [
        {"step": i, "kl/exact": target * (i + 1) / 4, "kl/coef": 0.2 / (i + 1), "reward/mean": reward} for i in range(4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    summary = {
        "status": "completed",
        "controller": controller,
        "target_kl": target,
        "init_kl_coef": 0.2,
        "seed": seed,
        "reward": reward,
        "kl": target * 1.1,
        "tracking_error": 0.1 + seed / 100,
        "in_band": 1.0,
        "iae": 0.4,
        "final_beta": 0.05,
        "ppl_change": 0.01,
        "wall_time_s": 3.0,
        "kl_unit": "nats/token",
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return summary


def test_report_numbers_equal_the_runs_summaries(tmp_path):
    expected = [
        fake_run(tmp_path, "fixed_s0", "fixed", 0.05, 0, 0.3),
        fake_run(tmp_path, "pid_kl0.05_s0", "pid", 0.05, 0, 0.5),
        fake_run(tmp_path, "pid_kl0.05_s1", "pid", 0.05, 1, 0.7),
    ]
    failed = tmp_path / "pid_kl0.1_s0"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "error.txt").write_text("Traceback...\nValueError: controller.target_kl=-1 is invalid\n")
    out = write_report(tmp_path, jobs=["fixed_s0", "pid_kl0.05_s0", "pid_kl0.05_s1", "pid_kl0.1_s0"])

    csv = pd.read_csv(out / "summaries.csv").set_index("run")
    for s, run in zip(expected, ["fixed_s0", "pid_kl0.05_s0", "pid_kl0.05_s1"], strict=True):
        for k, v in s.items():
            assert csv.loc[run, k] == pytest.approx(v) if isinstance(v, float) else csv.loc[run, k] == v
    cells = pd.read_csv(out / "cells.csv")
    pid = cells[cells.controller == "pid"].iloc[0]
    assert pid["n"] == 2 and pid["reward_mean"] == pytest.approx(0.6) and pid["target_kl"] == 0.05
    assert pid["reward_sd"] == pytest.approx(pd.Series([0.5, 0.7]).std())
    assert pd.isna(cells[cells.controller == "fixed"].iloc[0]["target_kl"])
    md = (out / "report.md").read_text()
    assert "complete: 3, failed: 1" in md and "### pid_kl0.1_s0" in md and "target_kl=-1 is invalid" in md
    assert "| pid_kl0.05_s1 | pid | 0.05 | 0.2 | 1 | 0.7 |" in md
    assert json.loads((out / "failed.json").read_text()) == {"pid_kl0.1_s0": "no summary.json"}
    assert {"frontier.png", "kl.png", "beta.png"} <= {p.name for p in out.iterdir()}
    from test_analysis import assert_drawn_pngs

    assert_drawn_pngs(out)
    curves = load_curves(tmp_path)
    assert len(curves) == 12 and set(curves["run"]) == {"fixed_s0", "pid_kl0.05_s0", "pid_kl0.05_s1"}
    assert load_summaries(tmp_path)["run"].tolist() == ["fixed_s0", "pid_kl0.05_s0", "pid_kl0.05_s1"]


# ---------------------------------------------------------------------- resume, through a real multirun
FAKE_APP = """
import json, os, sys, time
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    t0 = time.time()
    with open(Path(cfg.log), "a") as f:
        f.write(out.name + "\\n")
    proc = {"pid": os.getpid(), "ppid": os.getppid(), "prepare_loaded": "prepare" in sys.modules}
    (out / "proc.json").write_text(json.dumps(proc))
    while cfg.hold and cfg.seed == 1 and Path(cfg.hold).exists():  # held until the test removes the file
        time.sleep(0.2)
    time.sleep(cfg.sleep)
    if cfg.controller.target_kl < 0:
        raise ValueError(f"controller.target_kl={cfg.controller.target_kl} is invalid")
    kl = cfg.controller.target_kl * 1.5 if cfg.controller.name != "fixed" else 0.3 / cfg.controller.init_kl_coef
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "kl/exact": kl, "kl/coef": 0.1}) + "\\n")
    s = {"status": "completed", "controller": cfg.controller.name, "target_kl": cfg.controller.target_kl,
         "init_kl_coef": cfg.controller.init_kl_coef, "seed": cfg.seed, "reward": cfg.seed + kl, "kl": kl,
         "tracking_error": 0.5, "in_band": 1.0, "iae": 1.0, "final_beta": 0.1, "ppl_change": 0.0,
         "wall_time_s": 0.0, "kl_unit": "nats/token", "threads": cfg.threads}
    (out / "summary.json").write_text(json.dumps(s))
    with open(Path(cfg.log + ".times"), "a") as f:
        f.write(f"{out.name} {t0} {time.time()}\\n")
    return s["reward"]

if __name__ == "__main__":
    main()
"""
# What the sweep builds once before its jobs (the reference, in conf/sweep.yaml): here it logs its calls.
FAKE_PREPARE = """
from pathlib import Path

def prepare(cfg):
    if cfg.prepare_fails:
        raise OSError("the corpus is missing")
    with open(cfg.log + ".prepare", "a") as f:
        f.write(f"x={cfg.x} seed={cfg.seed}\\n")
    return "prepared"
"""
FAKE_PREPARE_X2 = """
from pathlib import Path

Path(__file__).with_name("prepare_x2.imported").write_text("imported")  # the import itself leaves a mark

def prepare(cfg):
    with open(cfg.log + ".prepare_x2", "a") as f:
        f.write(f"x={cfg.x} seed={cfg.seed}\\n")
    return "prepared"
"""
FAKE_CONF = """
defaults:
  - controller: pid
  - /schema/sweep@sweep: sweep
  - override hydra/sweeper: kl_grid
  - override hydra/launcher: basic
  - _self_
seed: 0
log: ???
hold: null
sleep: 0
x: 0
threads: null
prepare_fails: false
hydra:
  mode: MULTIRUN
  sweeper: {name: '${sweep.name}', controllers: '${sweep.controllers}', targets: '${sweep.targets}',
            seeds: '${sweep.seeds}', fixed_betas: '${sweep.fixed_betas}', root: '${sweep.root}',
            fresh: '${sweep.fresh}'}
  callbacks:
    prepare: {_target_: hydra_plugins.kl_research_sweeper.callbacks.PrepareOnce, function: prepare.prepare}
    prepare_x2: {_target_: hydra_plugins.kl_research_sweeper.callbacks.PrepareOnce, function: prepare_x2.prepare,
                 only_if: {x: 2}}
    report: {_target_: hydra_plugins.kl_research_sweeper.callbacks.SweepReport, enabled: '${sweep.report}',
             fail_on_error: '${sweep.fail_on_error}'}
    job_failure: {_target_: hydra_plugins.kl_research_sweeper.callbacks.RecordJobFailure}
"""


def fake_app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "conf" / "controller").mkdir(parents=True)
    (app / "app.py").write_text(FAKE_APP)
    (app / "prepare.py").write_text(FAKE_PREPARE)
    (app / "prepare_x2.py").write_text(FAKE_PREPARE_X2)
    (app / "conf" / "app.yaml").write_text(FAKE_CONF)
    (app / "conf" / "hydra" / "launcher").mkdir(parents=True)
    for name in ("local", "slurm"):  # the project's launcher configs
        (app / "conf" / "hydra" / "launcher" / f"{name}.yaml").write_text(
            (REPO / "conf" / "hydra" / "launcher" / f"{name}.yaml").read_text().replace("- optional /local", "# ")
            # the fake task imports no torch: its fork server preloads only what every job runs (no ~6 s of imports)
            + ("fork_preload: []\n" if name == "local" else "")
        )
    for name in ("fixed", "pid"):
        (app / "conf" / "controller" / f"{name}.yaml").write_text(f"name: {name}\ntarget_kl: 0.05\ninit_kl_coef: 0.2\n")
    return app


def run_fake(app: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "app.py", f"log={app / 'calls.log'}", f"sweep.root={app / 'multirun'}", *args]
    return subprocess.run(cmd, cwd=app, env=env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # ~15 s: three sweeps of a fake task, each with its report
def test_failed_job_does_not_stop_the_others_and_rerun_completes_what_is_missing(tmp_path):
    app = fake_app(tmp_path)
    grid = ["sweep.controllers=[fixed,pid]", "sweep.targets=[0.05,-1,0.1]", "sweep.seeds=[0,1]"]
    r = run_fake(app, *grid)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "2 of 8 jobs failed (pid_kl-1_s0, pid_kl-1_s1)" in r.stderr
    sweep_dir = only_sweep_dir(app / "multirun")
    calls = (app / "calls.log").read_text().split()
    assert sorted(calls) == sorted(j["name"] for j in json.loads((sweep_dir / STATE_FILE).read_text())["jobs"])
    assert len(calls) == 8 and len(list(sweep_dir.glob("*/summary.json"))) == 6
    assert "target_kl=-1 is invalid" in (sweep_dir / "pid_kl-1_s0" / "error.txt").read_text()
    md = (sweep_dir / "report" / "report.md").read_text()
    assert "### pid_kl-1_s1" in md and "ValueError: controller.target_kl=-1 is invalid" in md

    # A job that never finished (no summary.json): the same command resumes the same dir and runs only
    # it and the failed ones.
    (sweep_dir / "pid_kl0.1_s1" / "summary.json").unlink()
    mtime = (sweep_dir / "fixed_s0" / "summary.json").stat().st_mtime_ns
    time.sleep(1.1)  # a new dir would get another name
    r = run_fake(app, *grid, "sweep.fail_on_error=false")  # not part of the jobs' configs
    assert r.returncode == 0, r.stderr
    assert only_sweep_dir(app / "multirun") == sweep_dir
    assert "fail_on_error" not in (sweep_dir / "pid_kl0.1_s1" / ".hydra" / "overrides.yaml").read_text()
    calls = (app / "calls.log").read_text().split()[8:]
    assert sorted(calls) == ["pid_kl-1_s0", "pid_kl-1_s1", "pid_kl0.1_s1"]
    assert (sweep_dir / "fixed_s0" / "summary.json").stat().st_mtime_ns == mtime
    state = json.loads((sweep_dir / STATE_FILE).read_text())
    assert len(state["attempts"]) == 2 and state["attempts"][1]["failed"] == ["pid_kl-1_s0", "pid_kl-1_s1"]
    summaries = pd.read_csv(sweep_dir / "report" / "summaries.csv")
    assert len(summaries) == 6
    for row in summaries.itertuples():
        assert json.loads((sweep_dir / row.run / "summary.json").read_text())["reward"] == pytest.approx(row.reward)

    # fresh=true starts over in a new dir, here with the project's local launcher (tolerant per job).
    small = ["sweep.controllers=[fixed,pid]", "sweep.targets=[0.05,-1]", "sweep.seeds=[0]"]
    r = run_fake(app, *small, "sweep.fresh=true", "sweep.report=false", "hydra/launcher=local")
    assert r.returncode != 0 and "1 of 3 jobs failed" in r.stderr
    assert len(list((app / "multirun" / "kl_grid").iterdir())) == 2
    assert len((app / "calls.log").read_text().split()) == 8 + 3 + 3

    # The stock submitit launchers are refused before anything runs, naming the project's.
    r = run_fake(app, *small, "sweep.fresh=true", "hydra/launcher=submitit_slurm")
    assert r.returncode != 0 and "use hydra/launcher=slurm" in r.stderr, r.stderr[-2000:]
    assert len(list((app / "multirun" / "kl_grid").iterdir())) == 2


@pytest.mark.slow  # ~10 s: three sweeps of a fake task
def test_hydra_sweep_syntax_and_the_shared_preparation(tmp_path):
    app = fake_app(tmp_path)
    # Hydra's own syntax for the grid's keys, crossed with a sweep of the user's own (x).
    r = run_fake(app, "controller=fixed,pid", "controller.target_kl=0.05", "seed=0,1", "x=1,2")
    assert r.returncode == 0, r.stderr[-3000:]
    sweep_dir = only_sweep_dir(app / "multirun")
    names = sorted(j["name"] for j in json.loads((sweep_dir / STATE_FILE).read_text())["jobs"])
    assert names == sorted(
        f"{n}_x={x}" for n in ("fixed_s0", "fixed_s1", "pid_kl0.05_s0", "pid_kl0.05_s1") for x in (1, 2)
    )
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(sweep_dir / "pid_kl0.05_s1_x=2" / ".hydra" / "config.yaml")
    assert (cfg.controller.name, cfg.controller.target_kl, cfg.seed, cfg.x) == ("pid", 0.05, 1, 2)
    assert list(cfg.sweep.seeds) == [0, 1] and list(cfg.sweep.controllers) == ["fixed", "pid"]  # the grid as run
    # prepared once per distinct job config, in the sweep's process: x matters, the grid's keys do not
    assert (app / "calls.log.prepare").read_text().split("\n")[:-1] == ["x=1 seed=0", "x=2 seed=0"]
    assert len((app / "calls.log").read_text().split()) == 8

    # The same grid as sweep.* lists is the same sweep: it resumes the dir and runs nothing again.
    time.sleep(1.1)
    r = run_fake(app, "sweep.controllers=[fixed,pid]", "sweep.targets=[0.05]", "sweep.seeds=[0,1]", "x=1,2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert only_sweep_dir(app / "multirun") == sweep_dir
    assert len((app / "calls.log").read_text().split()) == 8

    # A grid the sweeper refuses is refused before the preparation runs (it may take minutes: the reference build).
    before = (app / "calls.log.prepare").read_text()
    r = run_fake(app, "controller=pid", "seed=0.5", "sweep.fresh=true")
    assert r.returncode != 0 and "seed=0.5: each value must be an integer" in r.stderr, r.stderr[-2000:]
    assert (app / "calls.log.prepare").read_text() == before

    # A preparation that fails stops the sweep before any job is launched, saying so.
    r = run_fake(app, "controller=pid", "seed=0", "prepare_fails=true", "sweep.fresh=true")
    assert r.returncode != 0
    assert "prepare.prepare failed before any job was launched (OSError: the corpus is missing)" in r.stderr
    assert len((app / "calls.log").read_text().split()) == 8
    assert len(list((app / "multirun" / "kl_grid").iterdir())) == 1


def test_a_preparation_with_only_if_is_neither_imported_nor_run_for_other_configs(tmp_path):
    """PrepareOnce's only_if (conf/sweep.yaml: the learned RM's preparation, only for reward=learned, whose module
    pulls in transformers): a sweep without a matching config never imports the function's module; one with both
    calls it for the matching configs only."""
    app = fake_app(tmp_path)
    r = run_fake(app, "controller=pid", "seed=0", "x=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prepare_x2.prepare: not needed" in r.stdout + r.stderr
    assert not (app / "prepare_x2.imported").exists() and not (app / "calls.log.prepare_x2").exists()
    r = run_fake(app, "controller=pid", "seed=0", "x=1,2", "sweep.fresh=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (app / "prepare_x2.imported").exists()
    assert (app / "calls.log.prepare_x2").read_text().split("\n")[:-1] == ["x=2 seed=0"]


def submitted_ids(sweep_dir: Path) -> dict[str, str]:
    """Run-dir name -> submitit job id, from the launcher's record of what it submitted."""
    lines = (sweep_dir / ".submitit" / "submitted.jsonl").read_text().splitlines()
    return {r["subdir"]: r["job_id"] for r in map(json.loads, lines)}


def local_task_pid(sweep_dir: Path, subdir: str) -> int:
    """The pid of a local job's task: submitit's local job id is its controller's pid; the task is its child."""
    (task,) = child_pids(int(submitted_ids(sweep_dir)[subdir]))
    return task


@pytest.mark.slow  # ~10 s: a local sweep of a fake task with a job SIGKILLed
@pytest.mark.parametrize("victim", ["task", "job"])
def test_sigkilled_local_job_is_reported_and_fails_the_sweep(tmp_path, victim):
    """A job killed from outside (OOM killer, kill -9): no exception inside the task for Hydra to catch. The other
    jobs finish, the report lists it, the sweep exits non-zero; the same command then runs only it. With the fork
    server (the default) the controller's task is the server's client and the job runs in the server's child: either
    one killed fails the job (the OOM killer picks the job, which holds the memory)."""
    app = fake_app(tmp_path)
    hold = app / "hold"
    hold.touch()  # seed-1 jobs wait while it exists
    grid = ["sweep.controllers=[fixed,pid]", "sweep.targets=[0.05]", "sweep.seeds=[0,1]", f"hold={hold}"]
    cmd = [sys.executable, "app.py", f"log={app / 'calls.log'}", f"sweep.root={app / 'multirun'}", *grid]
    launcher = ["hydra/launcher=local", "hydra.launcher.max_parallel=4"]
    proc = subprocess.Popen(
        [*cmd, *launcher], cwd=app, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        calls = app / "calls.log"
        wait_for(lambda: calls.exists() and len(calls.read_text().split()) == 4, 60, "all 4 jobs to start")
        sweep_dir = only_sweep_dir(app / "multirun")
        proc_json = sweep_dir / "pid_kl0.05_s1" / "proc.json"
        wait_for(proc_json.is_file, 30, "the held job to record its pid")
        task, job = local_task_pid(sweep_dir, "pid_kl0.05_s1"), json.loads(proc_json.read_text())["pid"]
        assert task != job  # the job is the fork server's child, the task its client
        os.kill(task if victim == "task" else job, 9)
        time.sleep(1.0)
        hold.unlink()  # fixed_s1 finishes
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out + err
    assert "1 of 4 jobs failed (pid_kl0.05_s1)" in err, err[-3000:]
    for done in ("fixed_s0", "fixed_s1", "pid_kl0.05_s0"):
        assert (sweep_dir / done / "summary.json").is_file()
    md = (sweep_dir / "report" / "report.md").read_text()
    assert "complete: 3, failed: 1" in md and "### pid_kl0.05_s1" in md
    failed = json.loads((sweep_dir / "report" / "failed.json").read_text())
    assert list(failed) == ["pid_kl0.05_s1"] and "UncompletedJobError" in failed["pid_kl0.05_s1"]

    r = subprocess.run([*cmd, *launcher], cwd=app, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (app / "calls.log").read_text().split()[4:] == ["pid_kl0.05_s1"]


@pytest.mark.slow  # ~10 s
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_stopping_a_local_sweep_stops_its_jobs(tmp_path, sig):
    """Ctrl-C or kill of the sweep's process: its local jobs are cancelled, not left running orphaned (a re-run would
    start second copies of them); the same command then resumes and completes the sweep."""
    app = fake_app(tmp_path)
    hold = app / "hold"
    hold.touch()
    grid = ["sweep.controllers=[pid]", "sweep.targets=[0.05]", "sweep.seeds=[0,1]", "hydra/launcher=local"]
    cmd = [
        sys.executable,
        "app.py",
        f"log={app / 'calls.log'}",
        f"sweep.root={app / 'multirun'}",
        *grid,
        f"hold={hold}",
    ]
    proc = subprocess.Popen(cmd, cwd=app, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        calls = app / "calls.log"
        wait_for(lambda: calls.exists() and "pid_kl0.05_s1" in calls.read_text(), 60, "the held job to start")
        sweep_dir = only_sweep_dir(app / "multirun")
        task = local_task_pid(sweep_dir, "pid_kl0.05_s1")
        # the unheld job must have finished (its process too: on a loaded machine it can still be running here)
        wait_for(lambda: (sweep_dir / "pid_kl0.05_s0" / "summary.json").is_file(), 60, "the unheld job to finish")
        done = submitted_ids(sweep_dir)["pid_kl0.05_s0"]
        wait_for(lambda: not Path(f"/proc/{done}").exists(), 60, "the unheld job's process to end")
        proc.send_signal(getattr(signal, sig))
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "cancelling 1 running local jobs" in out, out[-3000:]
    wait_for(lambda: not Path(f"/proc/{task}").exists(), 30, "the cancelled job's process to end")
    assert not (sweep_dir / "pid_kl0.05_s1" / "summary.json").exists()

    hold.unlink()
    r = subprocess.run(cmd, cwd=app, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert only_sweep_dir(app / "multirun") == sweep_dir
    assert (sweep_dir / "pid_kl0.05_s1" / "summary.json").is_file()
    assert calls.read_text().split().count("pid_kl0.05_s0") == 1  # the completed job did not run again


def job_intervals(app: Path) -> list[tuple[float, float]]:
    return sorted(
        (float(a), float(b)) for _, a, b in (ln.split() for ln in (app / "calls.log.times").read_text().splitlines())
    )


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    return max(sum(a <= t < b for a, b in intervals) for t, _ in intervals)


@pytest.mark.slow  # ~20 s: two local sweeps of 3 fake jobs
def test_local_launcher_runs_at_most_max_parallel_jobs_with_threads_per_job(tmp_path):
    app = fake_app(tmp_path)
    grid = ["sweep.controllers=[fixed]", "sweep.seeds=[0,1,2]", "sleep=1.5", "hydra/launcher=local"]
    r = run_fake(app, *grid, "hydra.launcher.max_parallel=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert most_at_once(job_intervals(app)) == 1
    sweep_dir = only_sweep_dir(app / "multirun")
    assert {json.loads(p.read_text())["threads"] for p in sweep_dir.glob("*/summary.json")} == {1}  # cpus_per_task

    (app / "calls.log.times").unlink()
    r = run_fake(app, *grid, "hydra.launcher.max_parallel=2", "hydra.launcher.cpus_per_task=2", "sweep.fresh=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert most_at_once(job_intervals(app)) == 2
    newest = max((app / "multirun" / "kl_grid").iterdir())
    assert {json.loads(p.read_text())["threads"] for p in newest.glob("*/summary.json")} == {2}


@pytest.mark.slow  # ~15 s: two local sweeps of 2 fake jobs
def test_local_jobs_fork_from_the_sweeps_fork_server_unless_it_is_off(tmp_path):
    """fork_server (the default): every job is a child of one server that imported fork_preload before the jobs; it
    ends with the sweep. fork_server=false: each job is submitit's own process, a child of its controller."""
    app = fake_app(tmp_path)
    grid = ["sweep.controllers=[fixed]", "sweep.seeds=[0,1]", "hydra/launcher=local", "hydra.launcher.max_parallel=2"]
    r = run_fake(app, *grid, "hydra.launcher.fork_preload=[prepare]")  # the fake app's prepare.py, beside app.py
    assert r.returncode == 0, r.stderr[-3000:]
    sweep_dir = only_sweep_dir(app / "multirun")
    log = (sweep_dir / ".submitit" / "forkserver.log").read_text()
    server = int(re.search(r"fork server: pid (\d+), preloaded .*'prepare'", log).group(1))
    procs = [json.loads((sweep_dir / f"fixed_s{s}" / "proc.json").read_text()) for s in (0, 1)]
    assert {p["ppid"] for p in procs} == {server} and all(p["prepare_loaded"] for p in procs), (procs, log)
    assert not Path(f"/proc/{server}").exists()  # stopped with the sweep

    r = run_fake(app, *grid, "hydra.launcher.fork_server=false", "sweep.fresh=true")
    assert r.returncode == 0, r.stderr[-3000:]
    newest = max((app / "multirun" / "kl_grid").iterdir())
    assert not (newest / ".submitit" / "forkserver.log").exists()
    controllers = submitted_ids(newest)
    for s in (0, 1):
        proc = json.loads((newest / f"fixed_s{s}" / "proc.json").read_text())
        assert proc["ppid"] == int(controllers[f"fixed_s{s}"]) and not proc["prepare_loaded"], proc


@pytest.mark.slow  # ~5 s
def test_a_fork_server_that_cannot_start_leaves_the_jobs_to_start_as_before(tmp_path):
    """A Unix socket's path has a length limit (108 bytes on Linux): under a $TMPDIR too long for it the server cannot
    bind, and the sweep runs its jobs the ordinary way instead of failing."""
    app = fake_app(tmp_path)
    long_tmp = tmp_path / ("t" * 60) / ("u" * 60)
    long_tmp.mkdir(parents=True)
    cmd = [sys.executable, "app.py", f"log={app / 'calls.log'}", f"sweep.root={app / 'multirun'}"]
    grid = ["sweep.controllers=[fixed]", "sweep.seeds=[0]", "hydra/launcher=local"]
    r = subprocess.run(
        [*cmd, *grid], cwd=app, env={**env(), "TMPDIR": str(long_tmp)}, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no fork server" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    sweep_dir = only_sweep_dir(app / "multirun")
    proc = json.loads((sweep_dir / "fixed_s0" / "proc.json").read_text())
    assert proc["ppid"] == int(submitted_ids(sweep_dir)["fixed_s0"])  # submitit's own task, its controller's child


# ------------------------------------------------------------------------------- real trainer, local
def run_sweep(tmp_path: Path, *args: str, timeout: int = 900, cache: Path = CACHE) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "sweep.py"), *TINY, f"cache_dir={cache}", f"sweep.root={tmp_path}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=timeout)


def check_tiny_sweep(sweep_dir: Path, ok: list[str], failed: list[str], steps: int) -> None:
    """The outputs of a finished tiny sweep: run dirs, W&B group, report = summaries, failures listed."""
    for name in ok:
        run = sweep_dir / name
        assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == steps
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == steps
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert cfg.wandb.group == cfg.sweep.name
    for name in failed:
        assert not (sweep_dir / name / "summary.json").exists()
    report = sweep_dir / "report"
    csv = pd.read_csv(report / "summaries.csv")
    assert sorted(csv["run"]) == sorted(ok)
    for row in csv.to_dict("records"):
        summary = json.loads((sweep_dir / row["run"] / "summary.json").read_text())
        for k in ("reward", "kl", "tracking_error", "in_band", "iae", "final_beta", "ppl_change"):
            assert row[k] == pytest.approx(summary[k], rel=1e-12, abs=1e-15), (row["run"], k)
    md = (report / "report.md").read_text()
    assert f"complete: {len(ok)}, failed: {len(failed)}" in md
    for name in failed:
        assert f"### {name}" in md
    assert "target_kl=-1" in md if failed else True
    assert (report / "frontier.png").is_file()


@pytest.mark.slow
def test_tiny_sweep_through_submitit_local(tmp_path):
    """2 controllers × 2 targets (one invalid: that job fails, the others finish), 1 seed, 3 PPO steps."""
    grid = ["sweep.controllers=[fixed,pid]", "sweep.targets=[0.05,-1]", "sweep.seeds=[0]", "steps=3"]
    t = time.time()
    r = run_sweep(tmp_path, *grid, "sweep.name=tiny", cache=tmp_path / "cache")  # an empty reference cache
    wall = time.time() - t
    assert r.returncode != 0, r.stdout + r.stderr
    assert "1 of 3 jobs failed (pid_kl-1_s0)" in r.stderr
    sweep_dir = only_sweep_dir(tmp_path, "tiny")
    check_tiny_sweep(sweep_dir, ok=["fixed_s0", "pid_kl0.05_s0"], failed=["pid_kl-1_s0"], steps=3)
    overrides = (sweep_dir / "fixed_s0" / ".hydra" / "overrides.yaml").read_text()
    assert "threads=1" in overrides  # cpus_per_task of the local launcher
    assert "ValueError" in (sweep_dir / "pid_kl-1_s0" / "error.txt").read_text()
    # The reference is built once, by the sweep's own process before the jobs; every job finds it cached.
    assert (r.stdout + r.stderr).count("tiny reference: building") == 1
    job_logs = [p for p in sweep_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert len(job_logs) >= 3 and not any("tiny reference: building" in p.read_text() for p in job_logs)
    assert len(list((tmp_path / "cache").iterdir())) >= 1
    print(f"tiny local sweep (3 jobs, 2 in parallel): {wall:.0f} s")


def test_grpo_sweep_runs_reports_and_analyses_as_grpo(tmp_path):
    """`sweep.py algo=grpo`: every job is a GRPO job, the report and the analysis read it unchanged, and the runs carry
    algo.name=grpo so that they never pool with PPO runs."""
    from omegaconf import OmegaConf

    from kl_research import analysis as A

    grid = ["algo=grpo", "algo.group_size=4", "sweep.controllers=[fixed,adaptive]", "sweep.targets=[0.05]"]
    r = run_sweep(tmp_path, *grid, "sweep.seeds=[0]", "steps=3", "sweep.name=grpo")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = only_sweep_dir(tmp_path, "grpo")
    check_tiny_sweep(sweep_dir, ok=["fixed_s0", "adaptive_kl0.05_s0"], failed=[], steps=3)
    for run in ("fixed_s0", "adaptive_kl0.05_s0"):
        cfg = OmegaConf.load(sweep_dir / run / ".hydra" / "config.yaml")
        assert cfg.algo.name == "grpo" and cfg.ppo.vf_coef is None
        assert not any("loss/value" in line for line in (sweep_dir / run / "metrics.jsonl").read_text().splitlines())
    res = A.analyse(A.load_sweep(sweep_dir))
    assert set(res.scores["algo.name"]) == {"grpo"} and set(res.cells["algo.name"]) == {"grpo"}
    old = res.sweep.configs.assign(**{"algo.name": ["grpo", float("nan")]})  # as if one run predated the algo group
    mixed = A.attach_config(res.scores.drop(columns=["algo.name"]), old)
    assert set(mixed["algo.name"]) == {"grpo", "ppo"}  # a run from before the algo group counts as PPO ...
    with pytest.raises(ValueError, match=r"differ in algo\.name \(algo\.name=grpo"):  # only the key that differs
        A.require_one_variant(mixed, "a PPO/GRPO mix")  # ... and never pools with GRPO


@pytest.mark.slow
def test_train_multirun_gets_a_named_dir_a_wandb_group_and_threads_per_job(tmp_path):
    """`python train.py -m` (Hydra's BasicSweeper) with the project's local launcher: two jobs side by side."""
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *TINY, f"cache_dir={CACHE}", "steps=2", "seed=0,1"]
    r = subprocess.run(
        [*cmd, "hydra/launcher=local"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multirun" / "train").iterdir()
    for n in (0, 1):
        run = sweep_dir / str(n)
        assert json.loads((run / "summary.json").read_text())["steps"] == 2
        assert "threads=1" in (run / ".hydra" / "overrides.yaml").read_text()
        assert f"W&B group train_{sweep_dir.name}" in (run / "train.log").read_text()
