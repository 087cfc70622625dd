"""What a sweep does around its jobs, on Hydra's public extension points (``hydra.callbacks`` in conf/sweep.yaml).

- :class:`PrepareOnce` (``on_multirun_start``, in the sweep's own process, before any job is launched): calls a
  function once per distinct job config, e.g. ``kl_research.reference.ensure_reference``, which builds and caches
  the reference model, so that no job builds it and jobs side by side never race to.
- :class:`SweepReport` (``on_multirun_end``, after the sweeper returns): writes ``<sweep dir>/report/`` from the
  sweep's ``sweep.json``, logs each failed job with the tail of its log, and ends the process with a non-zero
  status when a job failed.
- :class:`RecordJobFailure` (``on_job_end``, inside each job): a failing job writes its traceback to
  ``<run dir>/error.txt``, where the report looks for it.

Hydra turns an exception raised in a callback into a warning; the two decisions that must stop the process (the
shared preparation failed, so launching would only fail every job; jobs failed, so the sweep must exit non-zero)
raise ``SystemExit`` subclasses, which it does not catch.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.kl_research_sweeper.common import STATE_FILE, SweepJobsFailed, failed_message, job_error
from hydra_plugins.kl_research_sweeper.grid import Grid, combinations, is_grid_override, jobs_of

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"
# Keys whose value never changes what PrepareOnce builds: the grid's own (controller, target, β, seed) and W&B.
_NOT_SHARED = ("controller", "wandb", "seed")


class SweepAborted(SystemExit):
    """The sweep stops before launching anything (exit status 1)."""


class RecordJobFailure(Callback):
    """Hydra's ``run_job`` catches the task function's exception and hands it back to the sweeper, pickled: its
    traceback is lost on the way and nothing is logged. Here it goes to ``error.txt`` and the job's log."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        (Path(config.hydra.runtime.output_dir) / ERROR_FILE).unlink(missing_ok=True)  # from an earlier attempt

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        e = job_error(job_return)
        if e is None:
            return
        text = "".join(traceback.format_exception(e))
        log.error(f"job failed:\n{text}")
        (Path(config.hydra.runtime.output_dir) / ERROR_FILE).write_text(text)


class PrepareOnce(Callback):
    """``function(cfg)`` once per distinct job config of the sweep, before any job is launched.

    The job configs are the command line's combinations (``model.n_layer=2,4`` gives two), composed as the jobs
    will be; the grid's own keys (controller, target, β, seed) and ``wandb`` are left out, so the default grid
    calls it once. The jobs still call ``function`` themselves and find its result cached.

    ``only_if`` ({key: value}): call it only for job configs with those values, and import its module only then
    (``kl_research.reward_model`` pulls in transformers, ~2 s of a sweep's start before any job, for a function that
    does nothing unless ``reward.name=learned``)."""

    def __init__(self, function: str, only_if: dict[str, Any] | None = None) -> None:
        self.function = function
        self.only_if = dict(only_if or {})

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        fn = None
        loader = GlobalHydra.instance().config_loader()
        task = [*(OmegaConf.select(config, "hydra.sweeper.overrides") or []), *config.hydra.overrides.task]
        try:
            parsed = OverridesParser.create(config_loader=loader).parse_overrides([str(o) for o in task])
            sweeper = config.hydra.sweeper
            if str(sweeper.get("_target_", "")).endswith(".KLGridSweeper"):  # a grid it refuses: before any work
                grid = Grid.of(sweeper.controllers, sweeper.targets, sweeper.seeds, sweeper.get("fixed_betas"))
                jobs_of(grid, parsed, [str(o).partition("=")[0] for o in task])
            combos = combinations([o for o in parsed if not is_grid_override(o)])
        except Exception as e:  # the sweeper reports a bad command line, naming the key, right after this
            log.warning(f"{self.function}: not run ({e})")
            return
        seen: set[str] = set()
        for combo in combos:
            try:
                cfg = loader.load_sweep_config(config, combo)
            except Exception as e:  # the sweeper composes every job again and fails with the error
                log.warning(f"{self.function}: not run for {' '.join(combo)} (its config does not compose: {e})")
                continue
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
            key = OmegaConf.to_yaml({k: cfg[k] for k in cfg if k not in _NOT_SHARED})
            if key in seen:
                continue
            seen.add(key)
            if any(OmegaConf.select(cfg, k) != v for k, v in self.only_if.items()):
                log.info(f"{self.function}: not needed ({' '.join(combo) or 'the defaults'}: not {self.only_if})")
                continue
            fn = fn or get_method(self.function)
            t = time.time()
            try:
                result = fn(cfg)
            except Exception as e:
                log.exception(f"{self.function} failed")
                raise SweepAborted(
                    f"{self.function} failed before any job was launched ({type(e).__name__}: {e}); every job needs "
                    "it: fix the cause (traceback above) and re-run the same command"
                ) from e
            log.info(f"{self.function}: {result} ({time.time() - t:.1f} s)")


class SweepReport(Callback):
    """After the jobs: ``<sweep dir>/report/`` (``enabled``), the failed jobs in the log, and exit status 1
    when one failed (``fail_on_error``). Reads what the sweeper left in ``<sweep dir>/sweep.json``."""

    def __init__(self, enabled: bool = True, fail_on_error: bool = True) -> None:
        self.enabled, self.fail_on_error = bool(enabled), bool(fail_on_error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kl_research.report import log_tail, write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))  # the sweeper writes the dir it chose into the config
        if not (sweep_dir / STATE_FILE).is_file():
            return  # not a kl_grid sweep, or it stopped before choosing a dir
        state = json.loads((sweep_dir / STATE_FILE).read_text())
        jobs = [j["name"] for j in state["jobs"]]
        last = state["attempts"][-1] if state["attempts"] else {}
        failures: dict[str, str] = last.get("failures", {})
        where = sweep_dir
        if self.enabled:
            where = write_report(sweep_dir, failures=failures, jobs=jobs) / "report.md"
            log.info(f"Report: {where}")
        for name, why in failures.items():
            log.error(f"FAILED {name}: {why}\n{log_tail(sweep_dir / name, sweep_dir)}")
        if failures and self.fail_on_error:
            raise SweepJobsFailed(failed_message(failures, len(jobs), where))
