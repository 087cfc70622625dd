"""Typed configs of the sweep, the ``kl_grid`` sweeper and the two launchers, in Hydra's ConfigStore.

- ``schema/sweep``: the user-facing ``sweep:`` section of ``conf/sweep.yaml`` (``conf/sweep/*.yaml`` are
  named grids: ``sweep=frontier``). Every job's ``.hydra/config.yaml`` carries it, so a run dir says which
  sweep it belongs to.
- ``hydra/sweeper/kl_grid``: the sweeper's own parameters. ``conf/sweep.yaml`` points them at ``${sweep.*}``;
  the defaults below are the experiment's grid (docs/sweeps.md), so the sweeper also works without a ``sweep:``
  section.
- ``schema/launcher/{local,slurm}``: hydra-submitit-launcher's schemas plus ``max_parallel`` (local), with
  ``_target_`` set to the failure-tolerant launchers of :mod:`.launchers`.
"""
# No `from __future__ import annotations`: Hydra's plugin scanner executes this module before it is in
# sys.modules, where dataclasses cannot resolve string annotations.

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

CONTROLLERS = ["fixed", "adaptive", "exponential", "pid", "pid_ci"]
TARGETS = [0.01, 0.02, 0.05, 0.10, 0.20]  # nats per response token (docs/kl-contract.md)
SEEDS = [0, 1, 2]
# What a training job imports, for the fork server to import once (a module that fails to import is skipped): the
# trainer (torch, transformers, hydra), and what it imports later: the models' and tokenizers' modules that
# from_pretrained loads lazily, matplotlib for curves.png (0.7 s), wandb (0.6 s; when the run logs to W&B).
FORK_PRELOAD = [
    "train",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_tokenizers",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "matplotlib.pyplot",
    "wandb",
]


@dataclass
class SweepSchema:
    """What to run and where; ``python sweep.py sweep.targets=[0.05,0.1] sweep.seeds=[0,1]``."""

    name: str = "kl_grid"  # sweep dir <root>/<name>/<time>; W&B group
    controllers: list[str] = field(default_factory=lambda: list(CONTROLLERS))
    targets: list[float] = field(default_factory=lambda: list(TARGETS))  # not used by `fixed`
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    # `fixed` runs once per seed × β in fixed_betas (the reward–KL frontier); null: once per seed at the
    # controller's init_kl_coef.
    fixed_betas: list[float] | None = None
    root: str = "multirun"  # relative to the directory the sweep is started from
    dir: str | None = None  # an exact sweep dir (resume it, or start there); null: pick by the rule below
    # false: resume the latest dir of this name with the same grid fingerprint that no running sweep holds;
    # true: always start a new dir.
    fresh: bool = False
    report: bool = True  # write <sweep dir>/report/ at the end (callbacks.SweepReport)
    fail_on_error: bool = True  # exit non-zero (after the report) when a job failed (callbacks.SweepReport)


@dataclass
class KLGridSweeperConf:
    _target_: str = "hydra_plugins.kl_research_sweeper.sweeper.KLGridSweeper"
    name: str = "kl_grid"
    controllers: list[str] = field(default_factory=lambda: list(CONTROLLERS))
    targets: list[float] = field(default_factory=lambda: list(TARGETS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    # Any, not Optional[list[float]]: OmegaConf cannot merge an interpolation into an optional list node
    fixed_betas: Any = None
    # overrides added to every job (before the user's command-line ones), e.g. ["ppo.epochs=2"]
    overrides: list[str] = field(default_factory=list)
    root: str = "multirun"
    dir: str | None = None
    fresh: bool = False


@dataclass
class LocalLauncherConf(LocalQueueConf):
    _target_: str = "hydra_plugins.kl_research_sweeper.launchers.LocalLauncher"
    timeout_min: int = 24 * 60
    cpus_per_task: int | None = 1  # torch threads per job (passed as `threads=`)
    # jobs running at once; null: os.cpu_count() // cpus_per_task (never oversubscribe the cores)
    max_parallel: int | None = None
    # each job forks from one process that has imported these modules (kl_research/forkserver.py; Linux), instead of
    # starting a fresh python that imports them (~5 s per job); false: submitit's own `python -m submitit.core._submit`
    fork_server: bool = True
    fork_preload: list[str] = field(default_factory=lambda: list(FORK_PRELOAD))


@dataclass
class SlurmLauncherConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.kl_research_sweeper.launchers.SlurmLauncher"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="schema/sweep", name="sweep", node=SweepSchema, provider="kl_research_sweeper")
    cs.store(group="hydra/sweeper", name="kl_grid", node=KLGridSweeperConf, provider="kl_research_sweeper")
    cs.store(group="schema/launcher", name="local", node=LocalLauncherConf, provider="kl_research_sweeper")
    cs.store(group="schema/launcher", name="slurm", node=SlurmLauncherConf, provider="kl_research_sweeper")


def as_plain(value: Any) -> Any:
    """A DictConfig/ListConfig (or anything else) as plain Python containers."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


register_configs()
