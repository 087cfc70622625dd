"""``hydra/sweeper=kl_grid``: the controller × target KL × seed fan-out of the experiment (docs/sweeps.md).

``sweep(arguments)``:

1. expands the grid (:func:`.grid.expand_grid`; ``fixed`` once per seed × β, never per target), crossed
   with the user's own sweep overrides (``ppo.lr=1e-4,3e-4``); Hydra's own syntax for the grid's keys
   (``controller=fixed,pid seed=0,1``) is the grid (:func:`.grid.grid_from_overrides`);
2. picks the sweep dir (the resume rule, below), holds a lock on it while the jobs run, and writes it into
   ``hydra.sweep.dir`` of the config, where the callbacks read it;
3. composes every job's config up front (a config error fails the sweep before anything is launched);
4. launches only the jobs without ``<run dir>/summary.json`` (the trainer writes it last), on the launcher
   the config names (``hydra/launcher=local|slurm``; the stock submitit ones are refused, naming ours);
5. records each job's outcome in ``<sweep dir>/sweep.json``.

What Hydra has hooks for is in :mod:`.callbacks`: the one-off reference build before the jobs
(``on_multirun_start``), the report and the exit status after them (``on_multirun_end``).

Sweep dir rule: ``<root>/<name>/<YYYY-MM-DD_HH-MM-SS>`` (``_2``, ``_3``… if that exists: two sweeps started
in the same second never share a dir). Unless ``fresh=true``, a sweep first looks for the latest existing
dir of the same name whose ``sweep.json`` has the same grid fingerprint (name + every job's overrides) and
whose lock no running sweep holds, and resumes it: re-running the same command completes what is missing
or failed. ``dir=<path>`` names the dir exactly (resumed if its fingerprint matches, an error otherwise).

Resume never runs two copies of a job: a completed job (``summary.json``) is skipped; a job that an earlier
run of the sweep submitted to SLURM and that ``squeue`` still lists (the sweep's own process died, the job did
not) stops the re-run with its job id, to wait for it or ``scancel`` it; local jobs are cancelled when the
sweep's process is stopped (Ctrl-C, SIGTERM: :mod:`.launchers`), and the trainer holds a lock on its run dir,
so a second copy that slips through (the sweep's process SIGKILLed) fails at once, naming the first. A job that
was interrupted restarts in its run dir, where the trainer resumes from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import logging
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.kl_research_sweeper.common import (
    STATE_FILE,
    SWEEP_REPORT,
    SweepJobsFailed,
    failed_message,
    has_callback,
    job_error,
)
from hydra_plugins.kl_research_sweeper.config import as_plain
from hydra_plugins.kl_research_sweeper.grid import Grid, Job, fingerprint, jobs_of

log = logging.getLogger(__name__)

INVOCATION_KEYS = ("sweep.fresh", "sweep.dir", "sweep.report", "sweep.fail_on_error")
LOCK_FILE = ".sweep.lock"


def _quote(value: str) -> str:
    """A path as a Hydra override value (quoted: it may hold characters of the override grammar)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _try_lock(sweep_dir: Path) -> Any | None:
    """An exclusive lock on the sweep dir, held (by the open file) until the sweep ends, or None."""
    fh = open(sweep_dir / LOCK_FILE, "a")  # held open on purpose: the lock lives as long as the file
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def choose_sweep_dir(root: Path, name: str, fp: str, fresh: bool, exact: str | None) -> tuple[Path, Any, bool]:
    """(sweep dir, its held lock, resumed?) by the rule in the module docstring."""
    if exact:
        d = Path(exact).absolute()
        state = d / STATE_FILE
        if state.exists() and json.loads(state.read_text())["fingerprint"] != fp:
            raise ValueError(f"sweep.dir={d} holds another grid (fingerprint differs); choose another dir")
        d.mkdir(parents=True, exist_ok=True)
        lock = _try_lock(d)
        if lock is None:
            raise RuntimeError(f"another sweep is running in {d}")
        return d, lock, state.exists()
    base = root / name
    if not fresh and base.is_dir():
        candidates = []
        for state in base.glob(f"*/{STATE_FILE}"):
            try:
                s = json.loads(state.read_text())
            except (OSError, ValueError):
                continue
            if s.get("fingerprint") == fp:
                candidates.append((s.get("created", ""), state.parent.name, state.parent))
        for _, _, d in sorted(candidates, reverse=True):
            lock = _try_lock(d)
            if lock is not None:
                return d, lock, True
            log.info(f"{d} is held by a running sweep; not resuming it")
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for n in range(1, 1000):
        d = base / (stamp if n == 1 else f"{stamp}_{n}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        lock = _try_lock(d)
        assert lock is not None
        return d, lock, False
    raise RuntimeError(f"could not create a sweep dir under {base}")


def queued_slurm_jobs(sweep_dir: Path, names: set[str]) -> dict[str, str]:
    """Run-dir name -> SLURM job id, for the jobs among ``names`` that an earlier run of this sweep submitted
    to SLURM and that ``squeue`` still lists (pending, running, requeued). Resubmitting them would run two
    copies of a job in one run dir."""
    from hydra_plugins.kl_research_sweeper.launchers import SUBMITTED, slurm_active_jobs

    path = sweep_dir / SUBMITTED
    if not path.is_file():
        return {}
    latest: dict[str, str] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("executor") == "slurm" and rec.get("subdir") in names and rec.get("job_id"):
            latest[rec["subdir"]] = str(rec["job_id"])
    if not latest:
        return {}
    queued = slurm_active_jobs()
    if queued is None:
        log.warning("cannot ask squeue whether earlier SLURM jobs of this sweep still run; resubmitting them")
        return {}
    return {n: i for n, i in latest.items() if i in queued}


STOCK_LAUNCHERS = {  # hydra-submitit-launcher's own, by _target_ -> the project's launcher config
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": "local",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": "slurm",
}


def check_launcher(config: DictConfig) -> None:
    """Refuse the stock submitit launchers before anything runs: their ``launch()`` loses every job's result
    when one job fails outside the task function, and they lack the project's settings (local: at most
    max_parallel jobs, threads per job; SLURM: requeue, conf/local/slurm.yaml). The named configs
    ``hydra/launcher=local|slurm`` take the same parameters."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    ours = STOCK_LAUNCHERS.get(target)
    if ours is not None:
        stock = "submitit_" + ours
        raise ValueError(
            f"hydra/launcher={stock} is hydra-submitit-launcher's stock launcher (one failing job loses every "
            f"result; none of this project's defaults): use hydra/launcher={ours}, which takes the same "
            f"hydra.launcher.* parameters{' (site values: conf/local/slurm.yaml)' if ours == 'slurm' else ''}"
        )


class KLGridSweeper(Sweeper):
    def __init__(
        self,
        name: str,
        controllers: Sequence[str],
        targets: Sequence[float],
        seeds: Sequence[int],
        fixed_betas: Sequence[float] | None = None,
        overrides: Sequence[str] = (),
        root: str = "multirun",
        dir: str | None = None,
        fresh: bool = False,
    ) -> None:
        self.name = str(name)
        self.grid = Grid.of(controllers, targets, seeds, fixed_betas)
        self.overrides = [str(o) for o in as_plain(overrides)]
        self.root, self.dir, self.fresh = root, dir, bool(fresh)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # The launcher is instantiated in sweep(), once the sweep dir (which its params interpolate) is known.
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    # ------------------------------------------------------------------------------------------ grid
    def jobs(self, arguments: Sequence[str]) -> list[Job]:
        assert self.hydra_context is not None
        # How this invocation runs (not what the jobs compute) stays out of the jobs' configs, so that a
        # re-run with e.g. sweep.report=false resumes a job's checkpoint with an identical config.
        arguments = [a for a in arguments if a.partition("=")[0].lstrip("+~") not in INVOCATION_KEYS]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides([*self.overrides, *arguments])
        # Hydra's own syntax for the grid's keys (controller=fixed,pid seed=0,1) is the grid.
        return jobs_of(self.grid, parsed, [a.partition("=")[0] for a in arguments])

    # ----------------------------------------------------------------------------------------- sweep
    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        t0 = time.time()
        check_launcher(self.config)
        jobs = self.jobs(arguments)
        fp = fingerprint(self.name, jobs)
        sweep_dir, lock, resumed = choose_sweep_dir(Path(self.root).absolute(), self.name, fp, self.fresh, self.dir)
        try:
            return self._run(jobs, fp, sweep_dir, resumed, t0)
        finally:
            lock.close()

    def _run(self, jobs: list[Job], fp: str, sweep_dir: Path, resumed: bool, t0: float) -> Any:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        with read_write(self.config.hydra.sweep), open_dict(self.config.hydra.sweep):
            self.config.hydra.sweep.dir = str(sweep_dir)
        state_path = sweep_dir / STATE_FILE
        state = (
            json.loads(state_path.read_text())
            if resumed
            else {
                "name": self.name,
                "fingerprint": fp,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "jobs": [{"name": j.name, "overrides": list(j.overrides)} for j in jobs],
                "attempts": [],
            }
        )
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        done = [j for j in jobs if (sweep_dir / j.name / "summary.json").exists()]
        todo = [j for j in jobs if j not in done]
        if resumed:
            still_queued = queued_slurm_jobs(sweep_dir, {j.name for j in todo})
            if still_queued:
                ids = " ".join(sorted(set(still_queued.values())))
                raise RuntimeError(
                    f"{len(still_queued)} jobs of an earlier run of this sweep are still queued or running on SLURM "
                    f"({', '.join(sorted(still_queued))}); wait for them, or cancel them (scancel {ids}), then re-run"
                )
        log.info(
            f"Sweep '{self.name}' {'resumed' if resumed else 'started'} in {sweep_dir}: {len(jobs)} jobs, "
            f"{len(done)} already complete, {len(todo)} to run"
        )
        failures: dict[str, str] = {}
        attempt: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "host": socket.gethostname(),
            "argv": sys.argv,
            "launched": [j.name for j in todo],
        }
        state["attempts"].append(attempt)
        state_path.write_text(json.dumps(state, indent=1))
        if todo:
            job_overrides = [self._job_overrides(j, sweep_dir) for j in todo]
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=self.hydra_context, task_function=self.task_function, config=self.config
            )
            if hasattr(launcher, "prestart"):  # ours: its fork server imports while the configs are checked
                launcher.prestart(sweep_dir)
            stop_prestarted = getattr(launcher, "stop_prestarted", lambda: None)  # a no-op once launch took it
            try:
                self._check_configs(job_overrides)
            except BaseException:
                stop_prestarted()
                raise
            try:
                results: Sequence[JobReturn | None] = launcher.launch(job_overrides, initial_job_idx=0)
            except Exception as e:  # a launcher that is not tolerant per job (not hydra/launcher=local|slurm)
                log.exception("the launcher raised; jobs without summary.json count as failed")
                results = [None] * len(todo)
                err: BaseException | None = e
            else:
                err = None
            finally:
                stop_prestarted()
            job_ids = getattr(launcher, "job_ids", [None] * len(todo))
            attempt["submitit_ids"] = {j.name: jid for j, jid in zip(todo, job_ids, strict=True)}
            for j, r in zip(todo, results, strict=True):
                if (sweep_dir / j.name / "summary.json").exists():
                    continue
                if r is not None and r.status == JobStatus.FAILED:
                    e = job_error(r)
                    failures[j.name] = f"{type(e).__name__}: {e}"
                else:
                    failures[j.name] = f"no summary.json ({err!r})" if err else "no summary.json after the job ended"
        attempt["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        attempt["wall_time_s"] = round(time.time() - t0, 1)
        attempt["failed"] = sorted(failures)
        attempt["failures"] = failures
        state_path.write_text(json.dumps(state, indent=1))
        n_ok = len(jobs) - len(failures)
        log.info(f"Sweep '{self.name}': {n_ok}/{len(jobs)} jobs complete in {time.time() - t0:.1f} s; {sweep_dir}")
        # The report and the exit status are the SweepReport callback's (on_multirun_end, after this returns).
        # Without one, failures must not pass silently.
        if failures and not has_callback(self.config, SWEEP_REPORT):
            raise SweepJobsFailed(failed_message(failures, len(jobs), sweep_dir))
        return sweep_dir

    def _job_overrides(self, job: Job, sweep_dir: Path) -> list[str]:
        return [*job.overrides, f"hydra.sweep.dir={_quote(str(sweep_dir))}", f"hydra.sweep.subdir={_quote(job.name)}"]

    def _check_configs(self, job_overrides: list[list[str]]) -> None:
        """Compose every job's config before launching any: one that does not compose fails the sweep here,
        naming its overrides, instead of failing on a node after the queue."""
        assert self.config is not None and self.hydra_context is not None
        for ov in job_overrides:
            try:
                self.hydra_context.config_loader.load_sweep_config(self.config, ov)
            except Exception as e:
                raise ValueError(f"a job's config does not compose ({' '.join(ov[:-2])}): {e}") from e
