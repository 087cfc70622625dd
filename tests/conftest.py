"""Shared fixtures. Everything offline; the reference here is a deliberately tiny model built in seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# Overrides that make the embedded reference build in a few seconds (tokenizer + 1-2 layer GPT-2 on a
# slice of the fortunes corpus). Tests append cache_dir=<tmp>.
TINY_OVERRIDES = [
    "data.max_texts=3000",
    "model.vocab_size=512",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.n_positions=32",
    "model.steps=150",
    "model.batch_size=16",
    "model.warmup_steps=10",
    "model.eval_every=75",
    "data.eval_max_length=32",
]


def tiny_job(reference_steps: int) -> list[str]:
    """Overrides for a PPO job of a few steps on a 1-layer reference that builds in seconds (the trainer's and
    the sweep's tests; the reference cache is keyed by its config, so `reference_steps` picks one of two)."""
    return [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.vocab_size=512",
        f"model.steps={reference_steps}",
        f"model.eval_every={reference_steps}",
        "data.max_texts=1500",
        "data.eval_texts=16",
        "ppo.batch_size=8",
        "ppo.minibatch_size=4",
        "ppo.epochs=2",  # test_train's NaN-guard counts depend on epochs × minibatches
        "ppo.response_length=8",
        "eval_every=2",
        "checkpoint_every=2",
        "wandb.mode=disabled",
    ]


@pytest.fixture
def compose():
    """compose(*overrides) -> the project config from conf/, validated (as train.py sees it)."""
    from kl_research.reference import compose_config

    return lambda *overrides: compose_config(list(overrides))


@pytest.fixture(scope="session")
def vocab_kernel_lib(tmp_path_factory):
    """kl_research/vocab_kernel.py built into a fresh cache and loaded (the module); skipped, saying why, only where
    the machine has no C compiler."""
    import shutil

    from kl_research import vocab_kernel

    ok, why = vocab_kernel.load(tmp_path_factory.mktemp("kernel_cache"))
    if not ok and not any(shutil.which(c) for c in vocab_kernel.COMPILERS):
        pytest.skip(f"no C compiler on this machine: {why}")
    assert ok, why
    return vocab_kernel


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """(cfg, model, tokenizer, corpus) of a tiny reference built once per test session in a temp cache."""
    from kl_research.data import load_corpus
    from kl_research.reference import compose_config, load_reference

    cache = tmp_path_factory.mktemp("kl-cache")
    cfg = compose_config([*TINY_OVERRIDES, f"cache_dir={cache}"])
    model, tokenizer = load_reference(cfg)
    return cfg, model, tokenizer, load_corpus(cfg.data)


def policy_update_weights(tiny_reference, runs: dict) -> tuple[list, dict]:
    """One PPO update (sequence + exact, the default; 16 rollouts of 8 tokens, minibatch 8) from the same policy,
    rollout, advantages and shuffle seed, once per entry of `runs` (name → extra `policy_update` keywords, e.g.
    {"compile_vocab": True}). Returns the starting parameters and each run's parameters after its update."""
    import contextlib
    import copy

    import torch
    from omegaconf import OmegaConf

    from kl_research.algos import PPO, policy_update
    from kl_research.policy import PolicyWithValue
    from kl_research.rollout import rollout
    from kl_research.train import make_optimizer

    cfg, model, _, _ = tiny_reference
    pcfg = OmegaConf.merge(cfg.ppo, {"batch_size": 16, "minibatch_size": 8})
    policy = PolicyWithValue.from_reference(model, detach_value_head=True).eval()
    prompts = torch.randint(1, 500, (16, 4), generator=torch.Generator().manual_seed(0))
    amp = contextlib.nullcontext()
    torch.manual_seed(0)
    batch = rollout(policy, model, prompts, response_length=8, temperature=1.0, eos_token_id=None, pad_token_id=0,
                    amp=amp, keep_ref_logprobs=True)  # fmt: skip
    adv = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    weights = {}
    for name, kwargs in runs.items():
        p = copy.deepcopy(policy).train()
        opt = make_optimizer(p, pcfg, torch.device("cpu"))
        policy_update(PPO(pcfg), p, opt, batch, adv, batch["values"] + 0.5, 4, amp,
                      torch.Generator().manual_seed(2), 0.3, **kwargs)  # fmt: skip
        weights[name] = [t.detach().clone() for t in p.parameters()]
    return [t.detach() for t in policy.parameters()], weights


def wait_for(predicate, timeout: float = 120, what: str = "", poll: float = 0.5) -> None:
    """Poll predicate() until it is true; fail the test after timeout seconds, naming what it waited for."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def child_pids(pid: int) -> list[int]:
    """The pids of a live process's children (Linux /proc; [] once it is gone)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []
