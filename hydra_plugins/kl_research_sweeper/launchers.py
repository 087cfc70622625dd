"""hydra-submitit-launcher's launchers, made tolerant to a failing job.

The stock ``launch()`` returns ``[j.results()[0] for j in jobs]``: the first job that fails outside the task
function (killed, timed out, out of memory, a config that does not compose) raises there, and the sweep
loses every other job's result. Here each job's outcome is fetched on its own, and a job that raised
becomes a ``JobReturn`` with ``status=FAILED`` holding the exception. (An exception *inside* the task
function is already caught by Hydra's ``run_job`` the same way.)

Locally, submitit starts every job at once; ``max_parallel`` keeps at most that many running, so that
``max_parallel × cpus_per_task`` never exceeds the machine's cores. On SLURM, ``array_parallelism`` does
the same. Requeue on timeout/preemption (``max_num_timeout``) is the stock ``checkpoint()``: the job
restarts with the same arguments, in the same run dir, and the trainer resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as stock
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SUBMITTED = ".submitit/submitted.jsonl"
# keys of our launcher configs that are not submitit parameters
_OWN_KEYS = {"max_parallel", "fork_server", "fork_preload"}
# the modules that run any job (submitit's runner, the launcher it unpickles): the fork server imports them whatever
# the config's fork_preload (config.FORK_PRELOAD: what a training job imports) says
_JOB_RUNNER_MODULES = ["submitit.core.submission", "hydra_plugins.hydra_submitit_launcher.submitit_launcher"]


def failed_return(overrides: Sequence[str], error: BaseException) -> JobReturn:
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = error  # JobReturn.return_value raises it when read (common.job_error)
    ret.status = JobStatus.FAILED
    return ret


def _sigterm_raises() -> Any:
    """Make SIGTERM (``kill <pid>``) raise SystemExit in this process, as Ctrl-C raises KeyboardInterrupt, so that
    the launcher can stop its jobs first; returns the previous handler (None off the main thread: left alone)."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


# squeue's states for a job the controller still holds (pending, running, requeued, held, ...)
_ACTIVE_STATES = "PD,R,CG,CF,RQ,RH,RF,RS,S,SE,SO,ST"


def squeue_ids(text: str) -> set[str]:
    """The job ids in ``squeue -o %i`` output, a pending array's compacted tasks expanded: ``123_[4-6,9%2]`` is
    123_4, 123_5, 123_6 and 123_9 (``%2`` is the array's parallelism limit, not a task)."""
    ids: set[str] = set()
    for tok in text.split():
        m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", tok)
        if m is None:
            ids.add(tok)
            continue
        for part in m.group(2).split("%")[0].split(","):
            lo, _, hi = part.partition("-")
            ids.update(f"{m.group(1)}_{t}" for t in range(int(lo), int(hi or lo) + 1))
    return ids


def slurm_active_jobs() -> set[str] | None:
    """The ids of the jobs SLURM's controller still holds (waiting, running, requeued to run again, held, ...), or
    None when squeue cannot answer. After a requeue, accounting (submitit's ``done()`` reads sacct) can report the
    attempt the requeue ended as COMPLETED while the job waits to run again; squeue asks the controller, which knows.
    The launcher asks it before taking a finished job's result; the sweeper before resubmitting an earlier run's."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-t", _ACTIVE_STATES, "-o", "%i"], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return squeue_ids(out.stdout)


class _TolerantMixin:
    """``launch()`` for both executors; also records each job's submitit id in ``self.job_ids``."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any
    _early_server: Any = None  # the fork server `prestart` started, until `launch` takes it

    def _executor(self) -> Any:
        import submitit

        params = {k: v for k, v in self.params.items() if k not in _OWN_KEYS}
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and len(job_overrides) > 0
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir: {sweep_dir}")
        job_overrides = [self._with_threads(o) for o in job_overrides]
        args = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))

        results: list[JobReturn | None] = [None] * len(args)
        self.job_ids: list[str | None] = [None] * len(args)
        pending = list(range(len(args)))
        running: dict[int, Any] = {}
        server = self._fork_server(executor, sweep_dir)
        if self._EXECUTOR == "local":
            cpus = self.params.get("cpus_per_task") or 1
            limit = self.params.get("max_parallel") or max(1, (os.cpu_count() or 1) // cpus)
        else:  # SLURM throttles the array itself (array_parallelism)
            for i, job in zip(pending, executor.map_array(self, *zip(*args, strict=True)), strict=True):
                running[i] = job
                self.job_ids[i] = job.job_id
            self._record(sweep_dir, job_overrides, pending)
            pending, limit = [], len(args)
        n_done = 0
        previous = _sigterm_raises()
        try:
            while pending or running:
                while pending and len(running) < limit:
                    i = pending.pop(0)
                    running[i] = executor.submit(self, *args[i])
                    self.job_ids[i] = running[i].job_id
                    self._record(sweep_dir, job_overrides, [i])
                active: set[str] | None = None  # squeue, asked at most once per poll and only if a job is done
                for i, job in list(running.items()):
                    if not job.done():
                        continue
                    if self._EXECUTOR != "local":
                        if active is None:
                            active = slurm_active_jobs() or set()
                        if str(job.job_id) in active:
                            continue  # requeued: sacct says the ended attempt is done, the job itself is not
                    del running[i]
                    try:
                        results[i] = job.results()[0]
                    except Exception as e:  # killed, timed out, failed outside the task function
                        results[i] = failed_return(job_overrides[i], e)
                    n_done += 1
                    status = results[i].status.name  # type: ignore[union-attr]
                    log.info(f"[{n_done}/{len(args)}] job #{initial_job_idx + i} ({job.job_id}): {status}")
                # locally a poll is a few stat calls; every 0.1 s a freed slot waits ~0.05 s, not ~0.25 s, for its
                # next job (ten jobs on two slots: eight hand-offs)
                time.sleep(0.1 if self._EXECUTOR == "local" else 2.0)
        except BaseException:  # Ctrl-C, kill (SIGTERM), a bug here
            self._stop(running)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if server is not None:
                server.stop()
        return results  # type: ignore[return-value]

    def prestart(self, sweep_dir: Path) -> None:
        """Start the fork server now (``_fork_server``'s), so that its imports (~5 s) run while the sweeper still
        composes and checks every job's config (~0.2 s a job); ``launch`` then uses it. The sweeper calls this."""
        self._early_server = self._start_fork_server(sweep_dir)

    def _fork_server(self, executor: Any, sweep_dir: Path) -> Any:
        """Locally with ``fork_server`` on (Linux): start the sweep's fork server (kl_research/forkserver.py), or take
        the one `prestart` started, and make each job's task its client, so that every job starts from a process
        that has imported torch, transformers and the trainer once (``fork_preload``, found beside the script that
        started the sweep) instead of importing them itself (~5 s a job). Returns the server, or None where jobs
        start as before."""
        server = self._early_server or self._start_fork_server(sweep_dir)
        self._early_server = None
        if server is None:
            return None
        try:
            use_fork_server(executor, server)
        except BaseException:
            server.stop()
            raise
        return server

    def stop_prestarted(self) -> None:
        """Stop a fork server `prestart` started that `launch` will not use (the sweep stopped before it)."""
        server, self._early_server = self._early_server, None
        if server is not None:
            server.stop()

    def _start_fork_server(self, sweep_dir: Path) -> Any:
        from kl_research import forkserver

        if self._EXECUTOR != "local" or not self.params.get("fork_server") or not forkserver.supported():
            return None
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        path = str(Path(main_file).resolve().parent) if main_file else None
        preload = [*_JOB_RUNNER_MODULES, *(self.params.get("fork_preload") or [])]
        log_file = sweep_dir / ".submitit" / "forkserver.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            server = forkserver.ForkServer(preload, path=path, log=log_file)
        except (OSError, RuntimeError) as e:  # e.g. a socket path past the OS's limit ($TMPDIR too long)
            log.warning(f"no fork server ({e}); each job starts its own python (see {log_file})")
            return None
        log.info(f"Fork server {server.process.pid}: each job forks from it after {preload} (log: {log_file})")
        return server

    def _stop(self, running: dict[int, Any]) -> None:
        """The sweep's process is going away with jobs still running. Local jobs are its children: cancel them, or
        they would run on, orphaned, and a re-run of the sweep would start second copies (which the trainer's run-dir
        lock then refuses). SLURM jobs are the cluster's: they go on, and a re-run waits for them."""
        if not running:
            return
        if self._EXECUTOR == "local":
            log.warning(
                f"stopping: cancelling {len(running)} running local jobs (their checkpoints stay: re-run the "
                "same command to resume them)"
            )
            for job in running.values():
                job.cancel(check=False)
        else:
            ids = " ".join(str(j.job_id) for j in running.values())
            log.warning(
                f"stopping: {len(running)} SLURM jobs go on ({ids}); a re-run of the same command waits for "
                f"them, or cancel them: scancel {ids}"
            )

    def _with_threads(self, overrides: Sequence[str]) -> list[str]:
        """The job's overrides plus ``threads=<cpus_per_task>`` when the task has a ``threads`` key and the
        user did not set it: torch threads = the cores the launcher gives each job, so that jobs side by side
        never oversubscribe the cores (locally cpus_per_task defaults to 1; on SLURM, unset, the job reads
        $SLURM_CPUS_PER_TASK)."""
        cpus = self.params.get("cpus_per_task") or (1 if self._EXECUTOR == "local" else None)
        if not cpus or "threads" not in self.config or any(o.startswith("threads=") for o in overrides):
            return list(overrides)
        return [*overrides, f"threads={int(cpus)}"]

    def _record(self, sweep_dir: Path, job_overrides: Sequence[Sequence[str]], indices: Sequence[int]) -> None:
        """Append each submitted job's run-dir name and submitit id to ``<sweep dir>/.submitit/submitted.jsonl``
        as soon as it is submitted: a later run of the sweep checks there whether a job is still queued."""
        path = sweep_dir / SUBMITTED
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for i in indices:
                key = "hydra.sweep.subdir="
                given = next((o for o in job_overrides[i] if o.startswith(key)), None)
                subdir = OverridesParser.create().parse_override(given).value() if given else None  # unquoted
                rec = {"subdir": subdir, "job_id": self.job_ids[i], "executor": self._EXECUTOR, "time": time.time()}
                f.write(json.dumps(rec) + "\n")


_FORK_EXECUTOR: type | None = None


def use_fork_server(executor: Any, server: Any) -> None:
    """Make a local ``submitit.AutoExecutor``'s jobs start through ``server`` (a kl_research.forkserver.ForkServer):
    its LocalExecutor becomes a subclass whose task command is the server's client; everything else (the controller,
    timeouts, requeue, logs, results) is submitit's own."""
    from submitit.local.local import LocalExecutor

    global _FORK_EXECUTOR
    if _FORK_EXECUTOR is None:

        class ForkServerLocalExecutor(LocalExecutor):
            fork_server: Any

            @property
            def _submitit_command_str(self) -> str:
                return shlex.join(self.fork_server.client_command(self.folder))

        _FORK_EXECUTOR = ForkServerLocalExecutor
    inner = getattr(executor, "_executor", None)  # AutoExecutor keeps its executor there (submitit 1.5)
    if type(inner) is not LocalExecutor:
        raise RuntimeError(f"expected submitit's LocalExecutor inside the AutoExecutor, found {type(inner)}")
    inner.__class__ = _FORK_EXECUTOR
    inner.fork_server = server


class LocalLauncher(_TolerantMixin, stock.LocalLauncher):
    pass


class SlurmLauncher(_TolerantMixin, stock.SlurmLauncher):
    pass
