"""Held-out perplexity and distinct-n."""

from __future__ import annotations

import copy
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


def test_cached_perplexity_is_computed_once_per_model_and_texts(tiny_reference, tmp_path, monkeypatch):
    """The reference's perplexity (eval/ppl_ref), cached: the first call computes and writes it, the second reads the
    same float without running the model; other weights, other texts or another max_length miss; an unreadable entry
    is recomputed."""
    from kl_research import evaluate

    _, model, tok, corpus = tiny_reference
    texts = eval_subset(corpus.heldout, 12)
    kw = {"batch_size": 5, "max_length": 24, "device": CPU, "cache_dir": tmp_path}
    want = heldout_perplexity(model, tok, texts, batch_size=5, max_length=24, device=CPU)
    assert evaluate.cached_heldout_perplexity(model, tok, texts, **kw) == want
    entries = list((tmp_path / "perplexity").glob("*.json"))
    assert len(entries) == 1
    calls = []
    real = evaluate.heldout_perplexity
    monkeypatch.setattr(evaluate, "heldout_perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert evaluate.cached_heldout_perplexity(model, tok, texts, **kw) == want and calls == []  # read, not run
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.bias.add_(1e-3)  # one weight moved
    evaluate.cached_heldout_perplexity(other, tok, texts, **kw)
    evaluate.cached_heldout_perplexity(model, tok, texts[:-1], **kw)
    evaluate.cached_heldout_perplexity(model, tok, texts, **{**kw, "max_length": 20})
    assert len(calls) == 3 and len(list((tmp_path / "perplexity").glob("*.json"))) == 4
    entries[0].write_text("{")  # a torn write
    assert evaluate.cached_heldout_perplexity(model, tok, texts, **kw) == want and len(calls) == 4


def test_perplexity_through_the_jobs_trunk_is_transformers_and_keyed_by_the_gemm_library(tiny_reference, monkeypatch):
    """Where a job routes its model's trunk through plain ops (use_plain_trunk) the held-out perplexity runs there too,
    with the same number to the bit (padded batches included); with onednn_fp32 its GEMMs run in oneDNN (fp32, sums in
    another order: the same perplexity to 1e-6) and its cache key says so, so a number computed with MKL is not read
    back for it."""
    from kl_research import evaluate, gpt2
    from kl_research.runtime import onednn_fp32_reason, use_onednn_fp32

    _, model, tok, corpus = tiny_reference
    texts = eval_subset(corpus.heldout, 12)
    kw = {"batch_size": 5, "max_length": 24, "device": CPU}
    want = heldout_perplexity(model, tok, texts, **kw)
    plain = copy.deepcopy(model)
    assert gpt2.use_plain_trunk(plain) is None
    calls = []
    real = gpt2.hidden_states
    monkeypatch.setattr(gpt2, "hidden_states", lambda *a: calls.append(a[2] is not None) or real(*a))
    assert heldout_perplexity(plain, tok, texts, **kw) == want
    assert calls and all(calls)  # every batch through the plain trunk, with its padding mask
    key = evaluate.perplexity_key(plain, tok, texts, **kw)
    assert key == evaluate.perplexity_key(model, tok, texts, **kw)  # the same numbers, the same key
    if onednn_fp32_reason() is None:
        use_onednn_fp32(plain, True)
        assert heldout_perplexity(plain, tok, texts, **kw) == pytest.approx(want, rel=1e-6)
        assert evaluate.perplexity_key(plain, tok, texts, **kw) != key
