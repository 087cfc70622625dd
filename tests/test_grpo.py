"""algo=grpo's own pieces: the group advantage, grouped prompts, the config it composes to (the KL gradient of every
mode under GRPO is tests/test_kl_sequence.py's; a GRPO job's kill-and-resume is tests/test_train.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import kl_research.config  # noqa: F401  (registers schemas)
from kl_research import ppo
from kl_research.algos import GRPO, PPO, build_algorithm
from kl_research.checkpoint import check_resumable
from kl_research.config import PPO_ONLY_KEYS, validate

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_group_advantage_is_the_group_normalised_score():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    adv = ppo.group_advantages(scores, 4, 1e-4)
    g1 = torch.tensor([1.0, 2.0, 3.0, 6.0])
    std = float(torch.sqrt(((g1 - 3.0) ** 2).sum() / 3))  # unbiased, as DeepSeekMath and TRL
    torch.testing.assert_close(adv[:4], (g1 - 3.0) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # equal scores: no preference, advantage 0
    assert abs(float(adv[:4].sum())) < 1e-6
    unscaled = ppo.group_advantages(scores, 4, 1e-4, scale=False)  # Dr. GRPO: centred, not divided by the std
    torch.testing.assert_close(unscaled, torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))


def test_grpo_advantage_is_the_same_on_every_response_token_and_zero_after_eos():
    pcfg = _compose("algo=grpo", "algo.group_size=2", "ppo.batch_size=4").ppo
    algo = GRPO(pcfg, OmegaConf.create({"group_size": 2, "std_eps": 1e-4, "scale_rewards": True}))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    z = torch.zeros(4, 3)
    batch = {"mask": mask, "logp": z, "ref_logp": z, "exact_kl": z}  # π = π_ref: the KL credit is 0
    adv, returns = algo.advantages(batch, torch.tensor([1.0, 0.0, 2.0, 5.0]), beta=0.5)
    assert returns is None
    expected = ppo.group_advantages(torch.tensor([1.0, 0.0, 2.0, 5.0]), 2, 1e-4)
    torch.testing.assert_close(adv, expected.unsqueeze(1) * mask)


def test_grpo_draws_whole_groups_of_one_prompt():
    cfg = _compose("algo=grpo", "algo.group_size=4", "ppo.batch_size=16", "ppo.minibatch_size=8")
    algo = build_algorithm(cfg)
    assert isinstance(algo, GRPO) and not algo.value_head
    idx = algo.prompt_indices(1000, torch.Generator().manual_seed(0))
    groups = idx.view(4, 4)
    assert idx.shape == (16,) and (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 4
    ppo_algo = build_algorithm(_compose())
    assert isinstance(ppo_algo, PPO) and ppo_algo.value_head
    assert ppo_algo.prompt_indices(1000, torch.Generator().manual_seed(0)).shape == (64,)


def test_grpo_config_nulls_every_ppo_only_key_and_validates():
    cfg = _compose("algo=grpo")
    validate(cfg)
    assert cfg.algo.name == "grpo" and cfg.algo.group_size == 8
    assert all(cfg.ppo[k] is None for k in PPO_ONLY_KEYS)
    assert cfg.ppo.kl_mode == "sequence" and cfg.ppo.kl_penalty == "exact"  # the project's default KL, as PPO's
    ppo_cfg = _compose()
    assert all(ppo_cfg.ppo[k] is not None for k in PPO_ONLY_KEYS)
    shared = [k for k in ppo_cfg.ppo if k not in PPO_ONLY_KEYS]
    assert all(cfg.ppo[k] == ppo_cfg.ppo[k] for k in shared)  # a PPO and a GRPO run differ in the algorithm only


def test_a_checkpoint_from_before_the_algo_group_resumes_as_ppo(tmp_path):
    resolved = OmegaConf.to_container(_compose(), resolve=True)
    old = {k: v for k, v in resolved.items() if k != "algo"}
    check_resumable({"config": old}, resolved, tmp_path)  # no error: it was a PPO run
    grpo = OmegaConf.to_container(_compose("algo=grpo"), resolve=True)
    with pytest.raises(ValueError, match=r"differs in: .*algo\.name"):
        check_resumable({"config": old}, grpo, tmp_path)
