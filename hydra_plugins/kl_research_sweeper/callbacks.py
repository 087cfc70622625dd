"""Hydra callbacks run inside each job of a sweep.

Hydra's ``run_job`` catches the task function's exception and hands it back to the sweeper, pickled: its
traceback is lost on the way and nothing is logged. :class:`RecordJobFailure` writes it where the report
looks for it: ``<run dir>/error.txt`` and the job's log (``<run dir>/sweep.log``).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"


class RecordJobFailure(Callback):
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        (Path(config.hydra.runtime.output_dir) / ERROR_FILE).unlink(missing_ok=True)  # from an earlier attempt

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        e = job_return._return_value
        text = "".join(traceback.format_exception(e)) if isinstance(e, BaseException) else repr(e)
        log.error(f"job failed:\n{text}")
        (Path(config.hydra.runtime.output_dir) / ERROR_FILE).write_text(text)
