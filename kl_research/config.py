"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML file under conf/ starts from one of these schemas (``defaults: [/schema/<group>@_here_: <name>]``),
so a misspelt key or a wrongly-typed value fails when Hydra composes the config, and an unknown option
(``controller=pidd``) fails with the list of valid ones. Range checks live in ``__post_init__`` and run
in :func:`validate`, which ``train.py`` calls before it loads anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kl_research.controllers import build_controller
from kl_research.kl import ESTIMATORS, SIGNAL_ESTIMATORS, check_estimator


# --------------------------------------------------------------------------------------------- controller
@dataclass
class ControllerSchema:
    name: str = MISSING
    init_kl_coef: float = 0.2  # β₀ (TRL's default)
    target_kl: float = 0.05  # nats per response token

    def __post_init__(self) -> None:
        # One source of truth for the ranges: the controller's own constructor.
        build_controller({k: getattr(self, k) for k in self.__dataclass_fields__})


@dataclass
class FixedSchema(ControllerSchema):
    name: str = "fixed"


@dataclass
class AdaptiveSchema(ControllerSchema):
    name: str = "adaptive"
    horizon: float = 512.0  # samples


@dataclass
class ExponentialSchema(ControllerSchema):
    name: str = "exponential"
    gain: float = 0.1
    kl_coef_min: float = 1e-4
    kl_coef_max: float = 10.0
    relative_error: bool = False


@dataclass
class PIDSchema(ControllerSchema):
    name: str = "pid"
    horizon: float = 512.0
    kp: float = 0.5
    ki: float = 1.0
    kd: float = 0.0
    d_filter: float = 0.8
    error_clip: float = 1.0
    kl_coef_min: float = 1e-4
    kl_coef_max: float = 10.0


# ---------------------------------------------------------------------------------------------------- ppo
@dataclass
class PPOSchema:
    batch_size: int = 64  # sequences per rollout (= n_steps of the controller update)
    minibatch_size: int = 16  # sequences per gradient step
    epochs: int = 4  # passes over each rollout
    response_length: int = 24  # max new tokens per response
    temperature: float = 1.0  # sampling and scoring temperature (RESEARCH.md §2)
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    lr: float = 1e-4
    adam_eps: float = 1e-5
    max_grad_norm: float = 1.0
    kl_penalty: str = "k1"  # estimator of the per-token penalty −β·k
    kl_signal: str = "exact"  # estimator of the batch KL fed to the controller
    whiten_rewards: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"ppo.{key}={getattr(self, key)!r} is invalid; allowed: {allowed}")

        for key in ("batch_size", "minibatch_size", "epochs", "response_length"):
            need(getattr(self, key) > 0, key, "an int > 0")
        need(
            self.batch_size % self.minibatch_size == 0,
            "minibatch_size",
            f"a divisor of ppo.batch_size={self.batch_size}",
        )
        need(self.temperature > 0, "temperature", "a float > 0")
        need(self.cliprange > 0, "cliprange", "a float > 0")
        need(self.cliprange_value > 0, "cliprange_value", "a float > 0")
        need(self.vf_coef >= 0, "vf_coef", "a float >= 0")
        need(0 <= self.gamma <= 1, "gamma", "a float in [0, 1]")
        need(0 <= self.lam <= 1, "lam", "a float in [0, 1]")
        need(self.lr > 0, "lr", "a float > 0")
        need(self.adam_eps > 0, "adam_eps", "a float > 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "a float > 0")
        check_estimator(self.kl_penalty, ESTIMATORS, "ppo.kl_penalty")
        check_estimator(self.kl_signal, SIGNAL_ESTIMATORS, "ppo.kl_signal")


# -------------------------------------------------------------------------------------------------- wandb
@dataclass
class WandbSchema:
    mode: str = "offline"  # offline (default, no account needed; `wandb sync` later) | online | disabled
    project: str = "kl-research"
    entity: str | None = None
    group: str | None = None
    name: str | None = None  # default: <controller>_kl<target>_s<seed>
    tags: list[str] = field(default_factory=list)
    samples_every: int = 10  # steps between sample-generation tables

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb.mode={self.mode!r} is invalid; allowed: offline, online, disabled")
        if self.samples_every <= 0:
            raise ValueError(f"wandb.samples_every={self.samples_every} is invalid; allowed: an int > 0")


def register_configs() -> None:
    """Register every schema (idempotent; called on import)."""
    cs = ConfigStore.instance()
    for schema in (FixedSchema, AdaptiveSchema, ExponentialSchema, PIDSchema):
        cs.store(group="schema/controller", name=schema.name, node=schema)
    cs.store(group="schema/ppo", name="ppo", node=PPOSchema)
    cs.store(group="schema/wandb", name="wandb", node=WandbSchema)


def validate(cfg: DictConfig) -> None:
    """Run every schema's range checks. Raises ValueError naming the key, the value and what is allowed."""
    for section in ("controller", "ppo", "wandb"):
        OmegaConf.to_object(cfg[section])
    for key in ("steps",):
        if cfg[key] <= 0:
            raise ValueError(f"{key}={cfg[key]} is invalid; allowed: an int > 0")


register_configs()
