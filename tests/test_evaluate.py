"""Held-out perplexity and distinct-n."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from kl_research.data import eval_subset
from kl_research.evaluate import distinct_n, heldout_perplexity

CPU = torch.device("cpu")


def test_distinct_n():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["a"], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_perplexity_matches_manual_and_ignores_padding(tiny_reference):
    _, model, tok, corpus = tiny_reference
    texts = eval_subset(corpus.heldout, 12)
    p1 = heldout_perplexity(model, tok, texts, batch_size=1, max_length=24, device=CPU)
    p5 = heldout_perplexity(model, tok, texts, batch_size=5, max_length=24, device=CPU)
    assert p1 == pytest.approx(p5, rel=1e-4)  # pads masked: batching does not change it
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([[tok.eos_token_id, *tok(t, add_special_tokens=False)["input_ids"]][:24]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    assert p1 == pytest.approx(math.exp(nll / n), rel=1e-4)  # token-weighted, not a mean of per-text ppl
    assert heldout_perplexity(model, tok, texts, batch_size=5, max_length=24, device=CPU) == p5  # deterministic


def test_reference_prefers_real_text_to_shuffled_tokens(tiny_reference):
    cfg, model, tok, corpus = tiny_reference
    texts = eval_subset(corpus.heldout, 64)
    rng = random.Random(0)
    shuffled = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][: cfg.data.eval_max_length]
        rng.shuffle(ids)
        shuffled.append(tok.decode(ids))
    real = heldout_perplexity(model, tok, texts, batch_size=16, max_length=cfg.data.eval_max_length, device=CPU)
    fake = heldout_perplexity(model, tok, shuffled, batch_size=16, max_length=cfg.data.eval_max_length, device=CPU)
    assert real < 0.9 * fake, (real, fake)
    assert model.training is False  # mode restored


def test_perplexity_errors(tiny_reference):
    _, model, tok, _ = tiny_reference
    with pytest.raises(ValueError, match="none of the 1 texts"):
        heldout_perplexity(model, tok, [""], batch_size=4, max_length=16, device=CPU)
