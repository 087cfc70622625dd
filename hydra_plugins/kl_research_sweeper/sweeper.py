"""``hydra/sweeper=kl_grid``: the controller × target KL × seed fan-out of RESEARCH.md §5.

``sweep(arguments)``:

1. expands the grid (:func:`.grid.expand_grid`; ``fixed`` once per seed × β, never per target), crossed
   with the user's own sweep overrides (``ppo.lr=1e-4,3e-4``);
2. picks the sweep dir (the resume rule, below) and holds a lock on it while the sweep runs;
3. composes every job's config up front (a config error fails the sweep before anything is launched) and
   calls ``prepare`` once per distinct config (``conf/sweep.yaml``: ``kl_research.reference.ensure_reference``,
   which builds and caches the reference model), so no job builds it;
4. launches only the jobs without ``<run dir>/summary.json`` (the trainer writes it last);
5. whatever failed, writes ``<sweep dir>/report/`` (:func:`kl_research.report.write_report`), logs the failed
   jobs with the tail of their logs, and then raises if any job failed (``sweep.fail_on_error``).

Sweep dir rule: ``<root>/<name>/<YYYY-MM-DD_HH-MM-SS>`` (``_2``, ``_3``… if that exists: two sweeps started
in the same second never share a dir). Unless ``fresh=true``, a sweep first looks for the latest existing
dir of the same name whose ``sweep.json`` has the same grid fingerprint (name + every job's overrides) and
whose lock no running sweep holds, and resumes it: re-running the same command completes what is missing
or failed. ``dir=<path>`` names the dir exactly (resumed if its fingerprint matches, an error otherwise).

Resume never runs two copies of a job: a completed job (``summary.json``) is skipped; a job that an earlier
run of the sweep submitted to SLURM and that ``squeue`` still lists (the sweep's own process died, the job did
not) stops the re-run with its job id, to wait for it or ``scancel`` it. A job that was interrupted restarts
in its run dir, where the trainer resumes from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import logging
import socket
import subprocess
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
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.kl_research_sweeper.config import as_plain
from hydra_plugins.kl_research_sweeper.grid import Job, expand_grid, fingerprint

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
INVOCATION_KEYS = ("sweep.fresh", "sweep.dir", "sweep.report", "sweep.fail_on_error")
LOCK_FILE = ".sweep.lock"


class SweepJobsFailed(RuntimeError):
    """Raised at the end of a sweep (after its report) when some jobs did not complete."""


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
    from hydra_plugins.kl_research_sweeper.launchers import SUBMITTED

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
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning(f"cannot check whether earlier SLURM jobs of this sweep still run ({e}); resubmitting them")
        return {}
    queued = set(out.stdout.split())
    # squeue shows a pending array's tasks as 123_[4-7]: match on the array id too.
    queued_arrays = {q.split("_")[0] for q in queued if "[" in q}
    return {n: i for n, i in latest.items() if i in queued or i.split("_")[0] in queued_arrays}


def make_tolerant(launcher: Any) -> Any:
    """The stock ``submitit_local``/``submitit_slurm`` launchers, upgraded in place to ours (same state, a
    ``launch()`` that survives a failing job and, locally, runs at most cores/cpus_per_task jobs at once)."""
    from hydra_plugins.kl_research_sweeper import launchers

    stock = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
    ours = {stock + "LocalLauncher": launchers.LocalLauncher, stock + "SlurmLauncher": launchers.SlurmLauncher}
    cls = ours.get(f"{type(launcher).__module__}.{type(launcher).__qualname__}")
    if cls is not None:
        log.info(f"{type(launcher).__qualname__}: using {cls.__module__}.{cls.__qualname__} (tolerant to failed jobs)")
        upgraded = cls.__new__(cls)
        upgraded.__dict__.update(launcher.__dict__)
        return upgraded
    return launcher


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
        report: bool = True,
        fail_on_error: bool = True,
        prepare: str | None = None,
    ) -> None:
        self.name = str(name)
        self.controllers = [str(c) for c in as_plain(controllers)]
        self.targets = [float(t) for t in as_plain(targets)]
        self.seeds = [int(s) for s in as_plain(seeds)]
        self.fixed_betas = [float(b) for b in as_plain(fixed_betas)] if fixed_betas else None
        self.overrides = [str(o) for o in as_plain(overrides)]
        self.root, self.dir, self.fresh = root, dir, bool(fresh)
        self.report, self.fail_on_error = bool(report), bool(fail_on_error)
        self.prepare = prepare
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # The launcher is instantiated in sweep(), once the sweep dir (which its params interpolate) is known.
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    # ------------------------------------------------------------------------------------------ grid
    def jobs(self, arguments: Sequence[str]) -> list[Job]:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        # How this invocation runs (not what the jobs compute) stays out of the jobs' configs, so that a
        # re-run with e.g. sweep.report=false resumes a job's checkpoint with an identical config.
        arguments = [a for a in arguments if a.partition("=")[0].lstrip("+~") not in INVOCATION_KEYS]
        parsed = parser.parse_overrides([*self.overrides, *arguments])
        swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
        combos = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0] if parsed else [[]]
        return expand_grid(self.controllers, self.targets, self.seeds, self.fixed_betas, combos, swept)

    # ----------------------------------------------------------------------------------------- sweep
    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        t0 = time.time()
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
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=self.hydra_context, task_function=self.task_function, config=self.config
            )
            launcher = make_tolerant(launcher)
            job_overrides = [self._job_overrides(j, sweep_dir) for j in todo]
            self._prepare(job_overrides)
            try:
                results: Sequence[JobReturn | None] = launcher.launch(job_overrides, initial_job_idx=0)
            except Exception as e:  # a launcher that is not tolerant per job (e.g. the stock submitit one)
                log.exception("the launcher raised; jobs without summary.json count as failed")
                results = [None] * len(todo)
                err: BaseException | None = e
            else:
                err = None
            job_ids = getattr(launcher, "job_ids", [None] * len(todo))
            attempt["submitit_ids"] = {j.name: jid for j, jid in zip(todo, job_ids, strict=True)}
            for j, r in zip(todo, results, strict=True):
                if (sweep_dir / j.name / "summary.json").exists():
                    continue
                if r is not None and r.status == JobStatus.FAILED:
                    e = r._return_value
                    failures[j.name] = f"{type(e).__name__}: {e}"
                else:
                    failures[j.name] = f"no summary.json ({err!r})" if err else "no summary.json after the job ended"
        attempt["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        attempt["wall_time_s"] = round(time.time() - t0, 1)
        attempt["failed"] = sorted(failures)
        state_path.write_text(json.dumps(state, indent=1))

        if self.report:
            from kl_research.report import write_report

            report_dir = write_report(sweep_dir, failures=failures, jobs=[j.name for j in jobs])
            log.info(f"Report: {report_dir / 'report.md'}")
        n_ok = len(jobs) - len(failures)
        log.info(f"Sweep '{self.name}': {n_ok}/{len(jobs)} jobs complete in {time.time() - t0:.1f} s; {sweep_dir}")
        if failures:
            from kl_research.report import log_tail

            for name, why in failures.items():
                log.error(f"FAILED {name}: {why}\n{log_tail(sweep_dir / name, sweep_dir)}")
            if self.fail_on_error:
                where = sweep_dir / "report" / "report.md" if self.report else sweep_dir
                raise SweepJobsFailed(
                    f"{len(failures)} of {len(jobs)} jobs failed ({', '.join(sorted(failures))}); see {where}. "
                    "Re-run the same command to run them again."
                )
        return sweep_dir

    def _job_overrides(self, job: Job, sweep_dir: Path) -> list[str]:
        assert self.config is not None
        ov = [*job.overrides, f"hydra.sweep.dir={_quote(str(sweep_dir))}", f"hydra.sweep.subdir={job.name}"]
        cpus = OmegaConf.select(self.config, "hydra.launcher.cpus_per_task", default=None)
        if cpus is None and str(OmegaConf.select(self.config, "hydra.launcher._target_")).endswith(".LocalLauncher"):
            cpus = 1  # stock submitit_local leaves it unset: one thread per job, as many jobs as cores
        if cpus and "threads" in self.config and not any(o.startswith("threads=") for o in ov):
            ov.append(f"threads={int(cpus)}")  # torch threads = the cores the launcher gives each job
        return ov

    def _prepare(self, job_overrides: list[list[str]]) -> None:
        """Compose every job's config (fail before launching if one does not compose) and call ``prepare``
        (here: build the reference model) once per distinct config, in this process, so no job does it."""
        assert self.config is not None and self.hydra_context is not None
        prepare = get_method(self.prepare) if self.prepare else None
        loader = self.hydra_context.config_loader
        seen: set[str] = set()
        for ov in job_overrides:
            cfg = loader.load_sweep_config(self.config, ov)
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
            key = OmegaConf.to_yaml({k: cfg[k] for k in cfg if k not in ("controller", "wandb")})
            if key in seen:
                continue
            seen.add(key)
            if prepare is not None:
                t = time.time()
                result = prepare(cfg)
                log.info(f"{self.prepare}: {result} ({time.time() - t:.1f} s)")
