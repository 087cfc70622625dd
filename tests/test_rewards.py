"""Rewards: VADER sentiment, a sequence classifier by path and label, the non-finite guard."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from kl_research.reference import train_tokenizer
from kl_research.rewards import Reward, build_reward

POSITIVE = [" what a wonderful, lovely, happy day", " I love it, it is great"]
NEGATIVE = [" what a terrible, awful, sad day", " I hate it, it is horrible"]


def test_sentiment_orders_positive_above_negative(compose):
    reward = build_reward(compose().reward, "cpu")
    assert reward.name == "sentiment"
    r = reward(["Today:"] * 4, POSITIVE + NEGATIVE)
    assert r.dtype == torch.float32 and r.shape == (4,) and r.device.type == "cpu"
    assert r[:2].min() > 0.5 > -0.5 > r[2:].max()
    # only the response is scored by default; include_prompt adds the prompt's sentiment
    assert reward(["I hate this."], [" ok"]).item() == reward(["I love this."], [" ok"]).item()
    with_prompt = build_reward(compose("reward.include_prompt=true").reward, "cpu")
    assert with_prompt(["I hate this."], [" ok"]).item() < with_prompt(["I love this."], [" ok"]).item()


def test_non_finite_reward_names_reward_and_sample():
    class Broken(Reward):
        name = "broken"

        def score(self, texts):
            return torch.tensor([0.0, float("nan"), 1.0])

    with pytest.raises(ValueError, match=r"reward 'broken' is not finite \(nan\) for sample 1"):
        Broken()(["a", "b", "c"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        Broken()(["a", "b", "c"], ["x", "y"])


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A 2-label GPT-2 classifier trained for a few steps to tell the POSITIVE texts from the NEGATIVE ones."""
    path = tmp_path_factory.mktemp("clf")
    tok = train_tokenizer(POSITIVE + NEGATIVE + ["Today:"], 300, 64)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(cfg)
    enc = tok(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 1, 0, 0])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("label", ["POSITIVE", "1"])
@pytest.mark.parametrize("output", ["logit", "prob", "logprob"])
def test_classifier_reward(compose, classifier_dir, label, output):
    cfg = compose(
        "reward=classifier", f"reward.path={classifier_dir}", f"reward.label={label}", f"reward.output={output}"
    )
    reward = build_reward(cfg.reward, torch.device("cpu"))
    r = reward(["Today:"] * 4, POSITIVE + NEGATIVE)
    assert r.dtype == torch.float32 and r.shape == (4,)
    assert r[:2].min() > r[2:].max()
    if output == "prob":
        assert ((r > 0) & (r < 1)).all()
    if output == "logprob":
        assert (r < 0).all()
    # batching does not change the scores (padding masked)
    small = build_reward(
        compose(
            "reward=classifier",
            f"reward.path={classifier_dir}",
            f"reward.label={label}",
            f"reward.output={output}",
            "reward.batch_size=1",
        ).reward,
        "cpu",
    )
    torch.testing.assert_close(small(["Today:"] * 4, POSITIVE + NEGATIVE), r, rtol=1e-4, atol=1e-4)


def test_classifier_errors(compose, classifier_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"reward.label='HAPPY' is not a label .* allowed: 0 \(NEGATIVE\), 1 \(POSITIVE\)"
    ):
        build_reward(compose("reward=classifier", f"reward.path={classifier_dir}", "reward.label=HAPPY").reward)
    with pytest.raises(ValueError, match=r"reward\.label='7' is not a label"):
        build_reward(compose("reward=classifier", f"reward.path={classifier_dir}", "reward.label=7").reward)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward(compose("reward=classifier", f"reward.path={tmp_path / 'missing'}").reward)
