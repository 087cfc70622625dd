"""Corpora, the content-hash split, local `datasets` sources, prompts."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from kl_research.config import validate
from kl_research.data import build_prompts, fortune_categories, load_corpus, read_fortunes, split_texts
from kl_research.reference import train_tokenizer


def test_fortunes_default_split_is_disjoint_deterministic_and_sized(compose):
    cfg = compose()
    a, b = load_corpus(cfg.data), load_corpus(cfg.data)
    assert a.name == "fortunes" and a.train == b.train and a.heldout == b.heldout
    assert not set(a.train) & set(a.heldout)
    n = len(a.train) + len(a.heldout)
    assert n > 10_000 and 0.03 < len(a.heldout) / n < 0.07
    assert all(len(t) >= cfg.data.min_chars and "\n" not in t for t in a.train)


def test_default_categories_leave_out_the_offensive_ones(compose):
    cats = compose().data.categories
    assert {"ethnic", "men-women", "translate-me", "ascii-art"}.isdisjoint(cats)
    assert set(cats) <= set(fortune_categories())


def test_split_depends_only_on_the_text():
    texts = [f"quote number {i}" for i in range(2000)]
    train, heldout = split_texts(texts, 0.1)
    sub_train, sub_heldout = split_texts(texts[::3], 0.1)
    assert set(sub_heldout) <= set(heldout) and set(sub_train) <= set(train)
    # duplicates never straddle the split
    train2, heldout2 = split_texts(texts + texts[:50], 0.1)
    assert (train2, heldout2) == (train, heldout)
    # another salt draws another split
    assert split_texts(texts, 0.1, salt="other")[1] != heldout


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_local_files(compose, tmp_path, fmt):
    # data=imdb scores 128-token held-out texts; the default tiny model has a 64-token context (validated)
    texts = [f"This is review number {i}, and it is fine." for i in range(200)]
    path = tmp_path / f"reviews.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(texts) + "\n")
        column = "text"  # the `text` loader's column
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"review": t, "label": 1}) for t in texts))
        column = "review"
    else:
        df = pd.DataFrame({"review": texts, "label": [1] * len(texts)})
        df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
        column = "review"
    cfg = compose(
        "data=imdb", "data.eval_max_length=64", f"data.path={path}", f"data.text_column={column}", "data.min_chars=5"
    )
    corpus = load_corpus(cfg.data)
    assert sorted(corpus.train + corpus.heldout) == sorted(texts)
    assert not set(corpus.train) & set(corpus.heldout)
    assert corpus.name == "reviews"


def test_local_folder(compose, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("\n".join(f"line {i} of the folder" for i in range(100)))
    cfg = compose(
        "data=imdb",
        "data.eval_max_length=64",
        f"data.path={tmp_path / 'data'}",
        "data.min_chars=5",
        "data.heldout_fraction=0.2",
    )
    corpus = load_corpus(cfg.data)
    assert len(corpus.train) + len(corpus.heldout) == 100


def test_clear_errors(compose, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(compose("data=imdb", "data.eval_max_length=64", f"data.path={tmp_path / 'nope.jsonl'}").data)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="both must be non-empty"):
        load_corpus(compose("data=imdb", "data.eval_max_length=64", f"data.path={empty}").data)
    good = tmp_path / "ok.jsonl"
    good.write_text('{"review": "a fine text"}\n')
    with pytest.raises(ValueError, match=r"data.text_column='text' is not a column .* available: review"):
        load_corpus(compose("data=imdb", "data.eval_max_length=64", f"data.path={good}").data)
    odd = tmp_path / "texts.xyz"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"unknown file type '\.xyz'"):
        load_corpus(compose("data=imdb", "data.eval_max_length=64", f"data.path={odd}").data)
    with pytest.raises(ValueError, match="unknown entries"):
        read_fortunes(["not-a-category"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.heldout_fraction=1.5", r"data.heldout_fraction=1.5 is invalid; allowed: a float in \(0, 1\)"),
        ("data.prompt_tokens=0", "data.prompt_tokens=0 is invalid"),
        ("data.num_prompts=-3", "data.num_prompts=-3 is invalid"),
        ("data.categories=[nope]", r"data.categories has unknown entries \['nope'\]"),
        ("model.n_embd=130", "model.n_embd=130 is invalid; allowed: a multiple of model.n_head=4"),
        ("model.steps=0", "model.steps=0 is invalid; allowed: an int > 0"),
        ("reward=classifier reward.output=odds", "reward.output='odds' is invalid"),
    ],
)
def test_bad_config_values_name_the_key(compose, override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose(*override.split()))


def test_build_prompts_fixed_length_deterministic():
    texts = [f"fox {i} jumps over the lazy dog" for i in range(100)] + ["hi"]
    tok = train_tokenizer(texts, 300, 64)
    p1 = build_prompts(texts, tok, prompt_tokens=5, num_prompts=None, seed=0)
    p2 = build_prompts(texts, tok, prompt_tokens=5, num_prompts=None, seed=0)
    p3 = build_prompts(texts, tok, prompt_tokens=5, num_prompts=None, seed=1)
    assert p1.dtype == torch.long and p1.shape == (100, 5)  # "hi" has < 5 tokens
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    assert sorted(map(tuple, p1.tolist())) == sorted(map(tuple, p3.tolist()))
    assert build_prompts(texts, tok, 5, num_prompts=7, seed=0).shape == (7, 5)
    assert all(any(t.startswith(tok.decode(row)) for t in texts) for row in p1)  # prefixes of the texts
    with pytest.raises(ValueError, match=r"no text has data\.prompt_tokens=500"):
        build_prompts(texts, tok, 500, None, 0)
