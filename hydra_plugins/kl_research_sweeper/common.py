"""What the sweeper (:mod:`.sweeper`) and the callbacks (:mod:`.callbacks`) both need, so that neither imports the
other.

- :data:`STATE_FILE`: ``<sweep dir>/sweep.json``, the sweep's state: the sweeper writes it (grid, fingerprint,
  attempts and their failures) and :class:`.callbacks.SweepReport` reads it after the jobs;
- :class:`SweepJobsFailed` and :func:`failed_message`: the non-zero exit of a sweep whose jobs failed, raised by the
  report callback, or by the sweeper itself when no report callback is configured (:func:`has_callback`);
- :func:`job_error`: the exception a failed job raised, for the sweeper's record and the job's ``error.txt``.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

STATE_FILE = "sweep.json"
# ``hydra.callbacks`` target of the report callback (callbacks.SweepReport; a test checks that the two agree).
SWEEP_REPORT = "hydra_plugins.kl_research_sweeper.callbacks.SweepReport"


class SweepJobsFailed(SystemExit):
    """The sweep ends with exit status 1 (after its report) when some jobs did not complete."""


def job_error(job_return: JobReturn) -> BaseException | None:
    """The exception a failed job raised (Hydra's public ``return_value`` re-raises it), or None."""
    if job_return.status != JobStatus.FAILED:
        return None
    try:
        job_return.return_value  # noqa: B018  (raises the job's exception)
    except BaseException as e:
        return e
    return None


def failed_message(failures: dict[str, str], n_jobs: int, where: Path) -> str:
    return (
        f"{len(failures)} of {n_jobs} jobs failed ({', '.join(sorted(failures))}); see {where}. "
        "Re-run the same command to run them again."
    )


def has_callback(config: DictConfig, target: str) -> bool:
    """Whether ``hydra.callbacks`` of ``config`` instantiates ``target`` (a class's dotted path, e.g.
    :data:`SWEEP_REPORT`)."""
    targets = [str(c.get("_target_", "")) for c in (OmegaConf.select(config, "hydra.callbacks") or {}).values()]
    return target in targets
