"""The learned reward model (reward=learned): the proxy of Gao, Schulman & Hilton's synthetic setup ("Scaling laws for
reward model overoptimization", 2022, arXiv 2210.10760; docs/gold.md).

A fixed gold scorer (VADER: kl_research.gold.gold_scorer) labels responses that π_ref samples for training prompts; a
scalar head on the reference's own trunk learns the labels; PPO optimises that proxy while the gold is measured on
held-out prompts (kl_research.gold). The RM is `AutoModelForSequenceClassification` with one label, loaded from the
reference's weights: for the tiny reference a GPT2ForSequenceClassification, the reference's trunk with a linear head
(`score`, new) on the hidden state of the last non-pad token (a BOS is put first, so an empty response is read there).

Build (:func:`build_reward_model`), offline and deterministic for a given key:

1. **test set**: `reward.test_labels` distinct π_ref responses to *held-out* prompts (the first data.prompt_tokens
   tokens of held-out texts), drawn first and from their own seed, so that every n is judged on the same texts;
2. **labels**: `reward.n_labels` distinct π_ref responses to training prompts, none of them in the test set, drawn in
   fixed batches from one seed (the n = 500 set is the first 500 of the n = 2000 one). Deduplicated on what the RM
   reads (the response): an empty or repeated response is labelled once;
3. **validation split**: the ceil(val_fraction · n) labels of lowest salted SHA-256; never trained on;
4. **training**: labels standardised by the training split's mean and sd; MSE regression, AdamW (one-epoch linear
   warmup, then constant lr), gradient norm clipped to 1; at most `reward.epochs` epochs, stopped after
   `reward.patience` epochs without a higher validation Pearson r, and the weights of the best epoch kept (why the
   correlation and not the MSE: :func:`fit`). The RM's score is intercept + slope · head, the least-squares line
   through the validation labels (:func:`calibrate`): in the gold's units, so β means what it means under
   reward=sentiment;
5. **agreement with the gold**: Pearson r, Spearman ρ and the pairwise ordering accuracy (over pairs whose gold labels
   differ: the fraction the RM orders as the gold does, a tie counting ½) on the test set, and on the splits it
   learned from; in the cache's meta.json and the log.

Cached under <cache>/reward_model/learned-<key> (model/, meta.json, data.jsonl: every labelled text and its split),
keyed by a hash of everything that determines it (the reference's own key, the model group, the corpus split,
data.prompt_tokens and every reward.* key), built in a temp dir renamed into place under a file lock, as the reference
is (kl_research.reference); a sweep builds it once before its jobs (conf/sweep.yaml's callbacks). The whole build runs
in a fork of torch's RNG: a job samples the same tokens whether its RM was built now or loaded from the cache.

    python -m kl_research.reward_model reward=learned reward.n_labels=500   # build or load; prints its metrics
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kl_research import rewards
from kl_research.data import Corpus, build_prompts, corpus_fingerprint, load_corpus
from kl_research.gold import gold_scorer, sample_responses, seeded_rng
from kl_research.reference import NOT_IN_KEY, ensure_reference, load_reference, reference_key
from kl_research.rewards import Reward
from kl_research.runtime import cached_build, resolve_cache_dir, resolve_device, torch_threads

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the build procedure changes: old caches are then ignored, not reused
GOLD = "vader compound of the response (vaderSentiment 3.3.2)"  # what labels the data: part of the key
SAMPLE_BATCH = 256  # responses sampled per batch while labelling (fixed: the labelled sets of two n are nested)
SCORE_BATCH = 256  # texts per forward pass when the RM scores
SPLIT_SALT = "kl-research-rm-val"


# ------------------------------------------------------------------------------------------------- the key
def reward_model_key(cfg: DictConfig, corpus: Corpus) -> tuple[str, dict]:
    """(hex digest, the JSON-able description it hashes) of everything that determines the learned RM."""
    m = cfg.model
    if m.name == "tiny":
        reference = reference_key(cfg, corpus)[0]
    elif m.name == "gguf":
        reference = str(m.sha256)
    else:
        reference = f"{m.path}@{m.get('revision')}"
    desc = {
        "format": FORMAT_VERSION,
        "gold": GOLD,
        "reference": reference,
        "model": {k: v for k, v in OmegaConf.to_container(m, resolve=True).items() if k not in NOT_IN_KEY},
        "corpus": corpus.name,
        "corpus_sha256": corpus_fingerprint(corpus),
        "prompt_tokens": int(cfg.data.prompt_tokens),
        "reward": OmegaConf.to_container(cfg.reward, resolve=True),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest(), desc


def reward_model_dir(cfg: DictConfig, corpus: Corpus | None = None) -> Path:
    corpus = corpus if corpus is not None else load_corpus(cfg.data)
    digest, _ = reward_model_key(cfg, corpus)
    return resolve_cache_dir(cfg.get("cache_dir")) / "reward_model" / f"learned-{digest[:16]}"


# ------------------------------------------------------------------------------------------------ encoding
def encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (N, T) int64, right-padded: each text's tokens (no special tokens) after one BOS
    (EOS when the tokenizer has none, as the tiny reference saw text boundaries), truncated to max_length tokens. The
    head reads the last non-pad token, so an empty text is read at its BOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [[start, *ids][:max_length] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows), default=1)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def predict(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = SCORE_BATCH) -> torch.Tensor:
    """The head's raw output (standardised units) for every row: (N,) fp32 on the CPU. Each batch is cut to its
    longest row."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(ids), batch):
            m = mask[i : i + batch]
            width = int(m.sum(1).max())
            x, m = ids[i : i + batch, :width].to(device), m[:, :width].to(device)
            out.append(model(input_ids=x, attention_mask=m).logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# --------------------------------------------------------------------------------------------- agreement
def agreement(pred: np.ndarray, gold: np.ndarray, pairwise: bool = True) -> dict[str, float]:
    """How well `pred` tracks `gold` (both (N,)): Pearson r, Spearman ρ, MSE (in the gold's units), and with
    `pairwise` the ordering accuracy: over the pairs whose gold labels differ, the fraction `pred` orders the same way,
    a tie in `pred` counting ½ (0.5 = chance). NaN where undefined (a constant input, no such pair)."""
    from scipy import stats

    pred, gold = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    out = {"n": len(gold), "mse": float(np.mean((pred - gold) ** 2)) if len(gold) else math.nan}
    varied = len(gold) >= 2 and pred.std() > 0 and gold.std() > 0
    out["pearson"] = float(stats.pearsonr(pred, gold)[0]) if varied else math.nan
    out["spearman"] = float(stats.spearmanr(pred, gold)[0]) if varied else math.nan
    if pairwise:
        dg = np.sign(gold[:, None] - gold[None, :])  # (N, N)
        dp = np.sign(pred[:, None] - pred[None, :])
        pairs = np.triu(dg != 0, k=1)
        score = np.where(dp == 0, 0.5, (dp == dg).astype(float))
        out["accuracy"] = float(score[pairs].mean()) if pairs.any() else math.nan
    return out


# ------------------------------------------------------------------------------------------------ sampling
def distinct_responses(
    lm: torch.nn.Module,
    tokenizer: Any,
    pool: torch.Tensor,
    n: int,
    seed: int,
    *,
    temperature: float,
    response_length: int,
    sampler: str,
    exclude: Collection[str] = (),
) -> tuple[list[str], int]:
    """(n distinct responses, responses drawn): π_ref's responses to prompts drawn uniformly (with replacement) from
    `pool`, SAMPLE_BATCH at a time, in order, skipping any already kept or in `exclude`. Seeded by `seed` in a fork of
    torch's RNG. Raises if 50·n draws do not give n distinct responses (π_ref too deterministic for that n)."""
    kept: list[str] = []
    seen = set(exclude)
    drawn = 0
    gen = torch.Generator().manual_seed(seed)
    device = next(lm.parameters()).device
    with seeded_rng(seed, device):
        while len(kept) < n:
            if drawn >= 50 * n:
                raise RuntimeError(
                    f"reward model: {drawn} responses of π_ref gave only {len(kept)} distinct texts, fewer than the "
                    f"{n} asked for; lower reward.n_labels / reward.test_labels or raise reward.temperature"
                )
            idx = torch.randint(len(pool), (SAMPLE_BATCH,), generator=gen)
            _, responses = sample_responses(
                lm, tokenizer, pool[idx], temperature=temperature, response_length=response_length, sampler=sampler,
                batch_size=SAMPLE_BATCH,
            )  # fmt: skip
            drawn += len(responses)
            for r in responses:
                if r not in seen and len(kept) < n:
                    seen.add(r)
                    kept.append(r)
    return kept, drawn


def validation_split(texts: list[str], fraction: float) -> np.ndarray:
    """(N,) bool, True for the ceil(fraction · N) texts of lowest salted SHA-256: a split that depends on the texts
    alone, not on their order."""
    h = [hashlib.sha256((SPLIT_SALT + t).encode()).hexdigest() for t in texts]
    order = np.argsort(h, kind="stable")
    val = np.zeros(len(texts), dtype=bool)
    val[order[: math.ceil(fraction * len(texts))]] = True
    return val


# ------------------------------------------------------------------------------------------------ training
def fit(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    r: DictConfig,
) -> tuple[list[dict[str, float]], int]:
    """Train `model` in place by MSE on standardised labels ((ids, mask, y) each) and leave it at the epoch of highest
    validation Pearson r. Returns (per-epoch history, that epoch).

    Why the correlation and not the validation MSE: measured on the default tiny reference (n = 2000), the validation
    MSE is lowest after the first epoch, before the RM has learnt anything (test Pearson 0.05), and rises from the
    third as the RM memorises its training set, while its held-out ordering keeps improving (test Pearson 0.25-0.38 at
    epochs 4-12). The scale is put right afterwards (:func:`calibrate`); PPO whitens advantages, so what the policy
    feels of the RM is its ordering."""
    from tqdm.auto import tqdm

    ids, mask, y = train
    n = len(y)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    per_epoch = math.ceil(n / r.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / per_epoch))
    gen = torch.Generator().manual_seed(int(r.seed))
    best, best_epoch, best_state, stale = -math.inf, 0, None, 0
    history = []
    bar = tqdm(range(1, r.epochs + 1), desc="reward model", disable=not sys.stderr.isatty())
    for epoch in bar:
        model.train()
        total = 0.0
        for b in torch.randperm(n, generator=gen).split(r.batch_size):
            width = int(mask[b].sum(1).max())
            x, m, t = ids[b, :width].to(device), mask[b, :width].to(device), y[b].to(device)
            loss = torch.nn.functional.mse_loss(model(input_ids=x, attention_mask=m).logits[:, 0].float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        v = agreement(predict(model, val[0], val[1]).numpy(), val[2].numpy(), pairwise=False)
        history.append({"epoch": epoch, "train_mse": total / n, "val_mse": v["mse"], "val_pearson": v["pearson"]})
        log.info(
            "reward model: epoch %d, train MSE %.4f, validation MSE %.4f, Pearson %.3f",
            *(epoch, total / n, v["mse"], v["pearson"]),
        )
        score = v["pearson"] if not math.isnan(v["pearson"]) else -math.inf  # a constant RM ranks nothing
        if best_state is None or score > best:
            best, best_epoch, best_state, stale = score, epoch, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= r.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch


def calibrate(head: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line gold ≈ intercept + slope · head on held-out labels: the RM's
    score in the gold's units (its best linear predictor of the gold), so that β means what it means under
    reward=sentiment. A constant head gets slope 0 and the labels' mean."""
    head, gold = np.asarray(head, dtype=float), np.asarray(gold, dtype=float)
    var = head.var()
    slope = float(np.mean((head - head.mean()) * (gold - gold.mean())) / var) if var > 0 else 0.0
    return float(gold.mean() - slope * head.mean()), slope


def build_reward_model(cfg: DictConfig, corpus: Corpus, out_dir: Path, device: torch.device) -> dict:
    """Sample, label, train and evaluate the RM (module docstring); save model/, data.jsonl into out_dir. Returns the
    build's metadata. Runs in a fork of torch's RNG with runtime.torch_threads(cfg.threads)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    verbosity = hf_logging.get_verbosity()
    r = cfg.reward
    P = int(cfg.data.prompt_tokens)
    sampler = str(cfg.get("sampler", "auto"))  # fast and hf draw the same tokens (tests/test_decode.py): not in the key
    kw = dict(temperature=float(r.temperature), response_length=int(r.response_length), sampler=sampler)
    with torch_threads(cfg.get("threads")) as threads, seeded_rng(int(r.seed), device):
        lm, tokenizer = load_reference(cfg)  # builds the tiny reference first if it is not cached (inside the fork)
        lm.to(device).eval().requires_grad_(False)
        # 1-2. the test set (held-out prompts) first, from its own seed; then the n labels, none of them test texts
        heldout = build_prompts(corpus.heldout, tokenizer, P, None, seed=int(r.seed))
        test, test_drawn = distinct_responses(lm, tokenizer, heldout, int(r.test_labels), int(r.seed) + 1, **kw)
        train_pool = build_prompts(corpus.train, tokenizer, P, None, seed=int(r.seed))
        texts, drawn = distinct_responses(
            lm, tokenizer, train_pool, int(r.n_labels), int(r.seed) + 2, exclude=set(test), **kw
        )
        t_sample = time.time() - t0
        gold = gold_scorer()
        y_all = gold([""] * len(texts), texts).numpy().astype(float)
        y_test = gold([""] * len(test), test).numpy().astype(float)
        # 3. the validation split; 4. standardised labels
        is_val = validation_split(texts, float(r.val_fraction))
        mean, sd = float(y_all[~is_val].mean()), float(y_all[~is_val].std())
        sd = sd if sd > 0 else 1.0  # every training label equal: nothing to scale
        max_length = int(getattr(lm.config, "n_positions", None) or lm.config.max_position_embeddings)
        ids, mask = encode(tokenizer, texts, max_length)
        z = torch.tensor((y_all - mean) / sd, dtype=torch.float32)
        tr, va = torch.from_numpy(~is_val), torch.from_numpy(is_val)
        source = ensure_reference(cfg) or str(cfg.model.path)  # the reference's weights (a hub id for `pretrained`)
        hf_logging.set_verbosity_error()  # its load report lists the new head (`score`) as missing: it is meant to be
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(source), num_labels=1, revision=cfg.model.get("revision"), dtype=torch.float32
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not padding
        model.to(device)
        t1 = time.time()
        history, best_epoch = fit(model, (ids[tr], mask[tr], z[tr]), (ids[va], mask[va], z[va]), r)
        t_train = time.time() - t1
        # the score in the gold's units: the best line through the validation split's labels
        intercept, slope = calibrate(predict(model, ids[va], mask[va]).numpy(), y_all[is_val])
        # 5. agreement with the gold, in the gold's units
        scores = {}
        for split, (x_texts, y) in {
            "test": (test, y_test),
            "val": ([t for t, v in zip(texts, is_val, strict=True) if v], y_all[is_val]),
            "train": ([t for t, v in zip(texts, is_val, strict=True) if not v], y_all[~is_val]),
        }.items():
            pred = intercept + slope * predict(model, *encode(tokenizer, x_texts, max_length)).numpy()
            scores[split] = agreement(pred, y, pairwise=split != "train")  # train: N² pairs, and not the question
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    with (out_dir / "data.jsonl").open("w") as f:
        for split, xs, ys in (("train", texts, y_all), ("test", test, y_test)):
            for i, (t, g) in enumerate(zip(xs, ys, strict=True)):
                s = "val" if split == "train" and is_val[i] else split
                f.write(json.dumps({"text": t, "gold": g, "split": s}) + "\n")
    meta = {
        "gold": GOLD,
        "n_labels": len(texts),
        "n_train": int((~is_val).sum()),
        "n_val": int(is_val.sum()),
        "n_test": len(test),
        "drawn": drawn,  # responses sampled to get n_labels distinct ones (duplicates and test texts skipped)
        "test_drawn": test_drawn,
        "label_mean": mean,  # the training split's: the head learns (gold - mean) / sd
        "label_sd": sd,
        "intercept": intercept,  # the RM's score = intercept + slope · head (calibrate, on the validation split)
        "slope": slope,
        "label_zero_fraction": float(np.mean(y_all == 0)),
        "max_length": max_length,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "history": history,
        "test": scores["test"],
        "val": scores["val"],
        "train": scores["train"],
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "threads": threads,
        "sample_seconds": round(t_sample, 2),
        "train_seconds": round(t_train, 2),
        "build_seconds": round(time.time() - t0, 2),
        "built_by_pid": os.getpid(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    log.info("reward model built in %.0f s: %s", meta["build_seconds"], describe(meta))
    return meta


def describe(meta: dict) -> str:
    """One line: the RM's size and its agreement with the gold on the held-out test set."""
    t = meta["test"]
    return (
        f"n={meta['n_labels']} ({meta['n_train']} train, {meta['n_val']} validation; best epoch {meta['best_epoch']} "
        f"of {meta['epochs_run']}), against the gold on {t['n']} held-out-prompt responses: "
        f"Pearson {t['pearson']:.3f}, Spearman {t['spearman']:.3f}, pairwise accuracy {t['accuracy']:.3f}"
    )


# ---------------------------------------------------------------------------------------------------- cache
def ensure_reward_model(cfg: DictConfig, device: torch.device | str | None = None) -> tuple[Path, bool]:
    """(cache dir of the learned RM of `cfg`, whether this call built it). Builds it under a file lock if missing; a
    concurrent job waits and then finds it. `device`: where to build (default: the config's device)."""
    if cfg.reward.name != "learned":
        raise ValueError(f"reward.name={cfg.reward.name!r}: only reward=learned has a reward model to build")
    device = torch.device(device) if device is not None else resolve_device(str(cfg.get("device", "auto")))
    corpus = load_corpus(cfg.data)
    digest, desc = reward_model_key(cfg, corpus)
    final = resolve_cache_dir(cfg.get("cache_dir")) / "reward_model" / f"learned-{digest[:16]}"

    def build(tmp: Path) -> dict:
        return {**build_reward_model(cfg, corpus, tmp, device), "key": desc, "key_sha256": digest}

    return cached_build(final, "reward model", build)


def reward_model_meta(path: Path) -> dict:
    """The build metadata (sizes, timings, agreement with the gold, key) saved next to a learned RM."""
    return json.loads((Path(path) / "meta.json").read_text())


def prepare(cfg: DictConfig) -> Path | None:
    """A sweep's shared preparation (conf/sweep.yaml's callbacks): the learned RM of a reward=learned config built
    once, before any job; None for any other reward."""
    return ensure_reward_model(cfg)[0] if cfg.reward.name == "learned" else None


# ---------------------------------------------------------------------------------------------------- score
class LearnedReward(Reward):
    """The learned RM as a reward: intercept + slope · head(response), in the gold's units, batched on `device`."""

    name = "learned"

    def __init__(self, path: str | Path, device: Any = "cpu") -> None:
        super().__init__(include_prompt=False)  # the RM reads what the gold reads: the response
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        self.meta = reward_model_meta(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path / "model")
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path / "model", dtype=torch.float32)
        self.model.to(torch.device(device)).eval().requires_grad_(False)
        self.intercept, self.slope = self.meta["intercept"], self.meta["slope"]
        self.max_length = self.meta["max_length"]

    def score(self, texts: list[str]) -> torch.Tensor:
        return self.intercept + self.slope * predict(self.model, *encode(self.tokenizer, texts, self.max_length))


def build_job_reward(cfg: DictConfig, device: Any = "cpu") -> Reward:
    """The reward a job trains on: for reward=learned the learned RM (built first if it is not cached), for any other
    reward rewards.build_reward's."""
    if cfg.reward.name != "learned":
        return rewards.build_reward(cfg.reward, device)  # looked up at call time (a test may stand in for it)
    path, built = ensure_reward_model(cfg, device)
    reward = LearnedReward(path, device)
    log.info("reward: learned RM %s at %s: %s", "built" if built else "cached", path, describe(reward.meta))
    return reward


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> None:
    from kl_research.reference import compose_config

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    cfg = compose_config(sys.argv[1:] if argv is None else argv)
    if cfg.reward.name != "learned":
        raise SystemExit(f"reward={cfg.reward.name}: pass reward=learned (and reward.n_labels=...)")
    t0 = time.time()
    path, built = ensure_reward_model(cfg)
    meta = reward_model_meta(path)
    print(f"reward model: {'built' if built else 'loaded from cache'} at {path} ({time.time() - t0:.1f} s)")
    print(
        f"  {meta['n_params'] / 1e6:.2f}M params; build {meta['build_seconds']:.0f} s (sampling "
        f"{meta['sample_seconds']:.0f} s, training {meta['train_seconds']:.0f} s, {meta['threads']} threads, "
        f"{meta['device']})"
    )
    print(f"  labels: mean {meta['label_mean']:.3f}, sd {meta['label_sd']:.3f}, {meta['label_zero_fraction']:.0%} zero")
    print(f"  {describe(meta)}")
    for split in ("val", "train"):
        s = meta[split]
        print(f"  {split}: Pearson {s['pearson']:.3f}, Spearman {s['spearman']:.3f}, MSE {s['mse']:.4f} (n={s['n']})")


if __name__ == "__main__":
    main()
