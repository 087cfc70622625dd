"""The reference: cache location, cache key, reuse, the build lock, hub/local checkpoints, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES
from transformers import GPT2Config, GPT2LMHeadModel

from kl_research.reference import (
    _ensure,
    ensure_reference,
    load_reference,
    main,
    reference_dir,
    reference_meta,
    resolve_cache_dir,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent

# A reference that builds in a second or two (the lock test builds it in two processes at once). Its context
# holds the default prompt (8) + response (24) tokens: compose_config validates that.
SMALL_BUILD = [
    "data.max_texts=400",
    "data.eval_max_length=32",
    "model.vocab_size=300",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.n_positions=32",
    "model.steps=40",
    "model.batch_size=8",
    "model.eval_every=40",
    "threads=1",
]


def test_resolve_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KL_RESEARCH_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("KL_RESEARCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(None) == tmp_path / "xdg" / "kl-research"


def test_cache_dir_key_comes_from_env(compose, monkeypatch, tmp_path):
    monkeypatch.setenv("KL_RESEARCH_CACHE", str(tmp_path))
    assert compose().cache_dir == str(tmp_path)


def test_tiny_reference_contract(tiny_reference):
    cfg, model, tokenizer, corpus = tiny_reference
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert tokenizer.pad_token is not None and tokenizer.eos_token_id is not None
    assert len(tokenizer) == cfg.model.vocab_size == model.config.vocab_size
    meta = reference_meta(reference_dir(cfg, corpus))
    assert meta["heldout_ppl"] < cfg.model.vocab_size / 2  # learnt something
    assert meta["key"]["n_heldout"] == len(corpus.heldout)
    # that no held-out text reaches the tokenizer or the pretraining: test_build_never_trains_on_heldout_text


def test_build_never_trains_on_heldout_text(compose, tmp_path, monkeypatch):
    """What the build actually feeds the tokenizer trainer and the gradient steps, recorded: the train split and
    windows of its token stream, never a held-out text (which the build reads only to report perplexity)."""
    import transformers

    import kl_research.reference as reference
    from kl_research.data import load_corpus

    cfg = compose(*SMALL_BUILD, f"cache_dir={tmp_path}")
    corpus = load_corpus(cfg.data)
    assert corpus.heldout and set(corpus.train).isdisjoint(corpus.heldout)
    tokenizer_texts, trained_on = [], []
    real_train_tokenizer = reference.train_tokenizer

    def recording_train_tokenizer(texts, *args, **kwargs):
        texts = list(texts)
        tokenizer_texts.extend(texts)
        return real_train_tokenizer(texts, *args, **kwargs)

    class RecordingGPT2(transformers.GPT2LMHeadModel):
        def forward(self, input_ids=None, *args, **kwargs):
            if torch.is_grad_enabled():  # a pass that can train the weights (evaluation runs under no_grad)
                trained_on.append(input_ids.detach().clone())
            return super().forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(reference, "train_tokenizer", recording_train_tokenizer)
    monkeypatch.setattr(transformers, "GPT2LMHeadModel", RecordingGPT2)
    reference.pretrain_tiny(cfg, corpus, tmp_path / "ref")

    assert tokenizer_texts == corpus.train  # the whole train split, and nothing else
    assert not set(tokenizer_texts) & set(corpus.heldout)
    assert len(trained_on) == cfg.model.steps
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "ref")

    def joined(ids) -> str:
        return "," + ",".join(map(str, ids.tolist())) + ","

    train_stream = joined(reference._token_stream(corpus.train, tokenizer))
    heldout_stream = joined(reference._token_stream(corpus.heldout, tokenizer))
    rows = [joined(row) for batch in trained_on for row in batch]
    assert len(rows) == cfg.model.steps * cfg.model.batch_size
    for row in rows:  # every gradient step saw windows of the train split's token stream ...
        assert row in train_stream
    assert sum(row in heldout_stream for row in rows) == 0  # ... and none of the held-out one


def test_cache_reuse_and_key(tiny_reference, compose):
    cfg, *_ = tiny_reference
    path, built = _ensure(cfg)
    assert not built and path == reference_dir(cfg)
    cache = cfg.cache_dir
    same = compose(*TINY_OVERRIDES, f"cache_dir={cache}", "seed=7", "model.eval_every=10", "controller=pid")
    assert reference_dir(same) == path  # PPO seed, controller, logging cadence: same reference
    for change in ("model.seed=1", "model.steps=151", "model.n_layer=1", "data.heldout_fraction=0.1"):
        other = compose(*TINY_OVERRIDES, f"cache_dir={cache}", change)
        assert reference_dir(other) != path, change
    assert ensure_reference(compose("model=gpt2")) is None


def test_two_processes_build_once(tmp_path):
    """Two jobs start at once on an empty cache: one builds, the other waits on the lock and loads."""
    overrides = [*SMALL_BUILD, f"cache_dir={tmp_path}"]
    script = textwrap.dedent(
        f"""
        import json, sys
        from kl_research.reference import compose_config, _ensure
        path, built = _ensure(compose_config({overrides!r}))
        print(json.dumps({{"path": str(path), "built": built}}))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    ref = Path(results[0]["path"])
    assert (ref / "meta.json").is_file()
    assert [p.name for p in ref.parent.iterdir() if p.name.startswith(".tmp")] == []  # no temp dir left


def test_local_pretrained_checkpoint(compose, tmp_path):
    texts = [f"a small corpus line {i} for the tokenizer" for i in range(50)]
    tok = train_tokenizer(texts, 300, 32)
    tok.pad_token = None  # load_reference must set it
    # 64 positions: the defaults' prompt + response (8 + 24) and held-out texts (64) must fit (validated first)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    model, tokenizer = load_reference(compose("model=gpt2", f"model.path={tmp_path / 'ckpt'}"))
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference(compose("model=gpt2", f"model.path={tmp_path / 'missing'}"))


def test_cli_prints_cache_perplexity_samples(tiny_reference, capsys):
    cfg, *_ = tiny_reference
    main([*TINY_OVERRIDES, f"cache_dir={cfg.cache_dir}"])
    out = capsys.readouterr().out
    assert "loaded from cache at" in out and "held-out perplexity" in out and "samples" in out
