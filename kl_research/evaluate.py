"""Capability metrics: held-out perplexity of a causal LM, distinct-n of generations."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from kl_research import gpt2
from kl_research.policy import head_linear
from kl_research.runtime import onednn_fp32_on

log = logging.getLogger(__name__)


@torch.no_grad()
def heldout_perplexity(model, tokenizer, texts: list[str], *, batch_size: int, max_length: int, device) -> float:
    """Token-weighted perplexity: exp(total NLL / total predicted tokens) over `texts`, in the given order.

    Each text is scored from its start: its tokens (no special tokens) are preceded by the tokenizer's BOS
    (EOS when it has none — GPT-2's convention, and how the tiny reference saw text boundaries in
    pretraining), so its first token is predicted too; the sequence is truncated to `max_length` tokens
    including that BOS. Batches are right-padded and padding is masked out of both attention and the loss.
    Deterministic (eval mode, no sampling); the model's train/eval mode is restored afterwards.
    """
    if batch_size <= 0 or max_length < 2:
        raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be > 0 and >= 2")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("heldout_perplexity needs a tokenizer with a bos_token or an eos_token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    rows = [[start, *ids][:max_length] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError(f"heldout_perplexity: none of the {len(texts)} texts has a token to predict")
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
            for j, r in enumerate(batch):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            ids, mask = ids.to(device), mask.to(device)
            # transformers' forward, or the same numbers in plain ops where the job routes its trunk there
            # (gpt2.use_plain_trunk; with onednn_fp32, GEMMs through oneDNN: 2.2× MKL's on an AMD CPU, fp32 either way)
            if getattr(model, "_kl_plain_trunk", False):
                hidden = gpt2.hidden_states(model, ids, mask)[:, :-1]  # (B, T-1, H)
            else:
                hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            target, tmask = ids[:, 1:], mask[:, 1:].bool()  # (B, T-1)
            # The vocabulary projection at the N real positions only, as policy.score_lm projects only the response
            # positions (logits = head(last hidden state)): padding was ~44 % of the positions of a batch of
            # fortunes, and the projection and the log-softmax over V dominate this function. (N, V), contiguous.
            # policy.head_linear: the job's GEMM library for it (oneDNN only for an fp32 head: under autocast it
            # runs as autocast casts it, as before)
            head = model.get_output_embeddings()
            onednn = onednn_fp32_on(model) and not torch.is_autocast_enabled(hidden.device.type)
            logits = head_linear(hidden[tmask], head.weight, head.bias, None, onednn).float()
            total_nll += F.cross_entropy(logits, target[tmask], reduction="sum").item()
            total_tokens += int(tmask.sum().item())
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def perplexity_key(model, tokenizer, texts: list[str], *, batch_size: int, max_length: int, device) -> str:
    """What `heldout_perplexity`'s number depends on, hashed: the model (class, config, every weight's bytes), the
    token ids of the texts and the special ids it uses, the batching and truncation, and where it runs (device type,
    torch's thread count and version: a GEMM's sums may be ordered differently there)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    h.update(model.config.to_json_string(use_diff=False).encode() if hasattr(model, "config") else b"")
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    where = [torch.device(device).type, torch.get_num_threads(), torch.__version__]
    if onednn_fp32_on(model):  # another GEMM library, other sums (keys without it: MKL's)
        where.append("onednn_fp32")
    h.update(json.dumps([ids, specials, batch_size, max_length, where]).encode())
    return h.hexdigest()[:24]


def cached_heldout_perplexity(
    model, tokenizer, texts: list[str], *, batch_size: int, max_length: int, device, cache_dir: Path
) -> float:
    """`heldout_perplexity`, read from `<cache_dir>/perplexity/<perplexity_key>.json` where an earlier job computed
    it: the reference model's perplexity (eval/ppl_ref) is the same number for every job of a sweep (~0.5 s a job at
    the tiny default, 1 thread). A missing or unreadable entry is computed and written (atomically: jobs running side
    by side may both write it, with the same number)."""
    key = perplexity_key(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, device=device)
    path = Path(cache_dir) / "perplexity" / f"{key}.json"
    try:
        return float(json.loads(path.read_text())["ppl"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ppl = heldout_perplexity(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, device=device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ppl": ppl, "texts": len(texts), "max_length": max_length}))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache: the number is still right, only not kept
        log.warning("perplexity not cached at %s: %s", path, e)
    return ppl


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n over whitespace tokens (words), pooled across all texts (Li et al. 2016):
    number of unique n-grams / number of n-grams. 0.0 when no text has n words. 1.0 = no repetition."""
    if n <= 0:
        raise ValueError(f"distinct_n: n={n} is invalid; allowed: an int > 0")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0
