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
    # the tokenizer never saw held-out text: its vocabulary comes from the train split only (checked via
    # the key: the corpus fingerprint covers both sides, and the build reads corpus.train only)
    assert meta["key"]["model"]["seed"] == cfg.model.seed


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
    overrides = [
        "data.max_texts=400",
        "model.vocab_size=300",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.n_positions=16",
        "model.steps=40",
        "model.batch_size=8",
        "model.eval_every=40",
        f"cache_dir={tmp_path}",
    ]
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
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2)
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
