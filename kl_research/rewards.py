"""Task rewards: one float per (prompt, response) pair, computed on decoded text.

Registry keyed by ``reward.name``:
    sentiment   VADER compound score in [-1, 1] (vaderSentiment; lexicon + rules, no model, no download)
    classifier  one label's logit / probability / log-probability from any AutoModelForSequenceClassification
    learned     a reward model trained by the project on gold (VADER) labels: kl_research.reward_model builds it
                (it needs the whole job config, so `reward_model.build_job_reward(cfg)` makes it, not `build_reward`)

Beside them, `AfinnReward` (AFINN-165 lexicon, tanh(sum / 5)) is the second, independent gold scorer of the gold
evaluation (kl_research.gold).

Every reward returns a float32 CPU tensor of shape (B,), and raises if a value is not finite, naming the
reward and the sample index (a NaN reward would silently poison the advantages).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

_WORD_RUN = re.compile(r"\w+")  # a run of word characters, as re's \w and \b see them
_SPACES = re.compile(r"\s+")


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"  # re's \w on str


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


class Reward:
    """Base class: subclasses implement `score`; `__call__` checks shapes and finiteness."""

    name: str = "reward"

    def __init__(self, include_prompt: bool = False) -> None:
        self.include_prompt = include_prompt

    def texts(self, prompts: list[str], responses: list[str]) -> list[str]:
        if len(prompts) != len(responses):
            raise ValueError(f"reward {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        return [p + r for p, r in zip(prompts, responses, strict=True)] if self.include_prompt else list(responses)

    def score(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = self.texts(prompts, responses)
        out = self.score(texts).detach().to("cpu", torch.float32).reshape(-1)  # (B,)
        if out.shape[0] != len(texts):
            raise RuntimeError(f"reward {self.name!r} returned {out.shape[0]} values for {len(texts)} samples")
        bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ValueError(
                f"reward {self.name!r} is not finite ({out[i].item()}) for sample {i} "
                f"({len(bad)} bad of {len(texts)}); text: {texts[i][:200]!r}"
            )
        return out


class SentimentReward(Reward):
    """VADER compound sentiment (Hutto & Gilbert 2014): a normalised sum of lexicon valences, in [-1, 1]."""

    name = "sentiment"

    def __init__(self, include_prompt: bool = False) -> None:
        super().__init__(include_prompt)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.analyzer.polarity_scores(t)["compound"] for t in texts], dtype=torch.float32)


class AfinnReward(Reward):
    """AFINN-165 (Nielsen 2011; the `afinn` package ships the lexicon: no download): the sum of the integer valences
    (-5..+5) of the lexicon's words in the text, squashed to tanh(sum / scale) in (-1, 1).

    Why tanh(sum / 5): like VADER's compound (also a squashed sum) it is bounded, odd, and saturates on a pile of
    sentiment words, on the same scale: one common word (|v| = 3: "good", "nice", "bad") gives ±0.54 and one strong word
    (|v| = 5: "outstanding", "superb") ±0.76, where VADER gives 0.42-0.64 and 0.61-0.62 for the same single words. A
    per-token mean was the alternative; it rewards short responses (one "good" alone beats "good" in a long sentence),
    which a policy would learn to exploit."""

    name = "afinn"

    def __init__(self, include_prompt: bool = False, scale: float = 5.0) -> None:
        super().__init__(include_prompt)
        from afinn import Afinn

        if not scale > 0:
            raise ValueError(f"AfinnReward: scale={scale} is invalid; allowed: a float > 0")
        self.analyzer = Afinn(language="en", emoticons=False)
        self.scale = scale
        # The lexicon's entries by their first word run, longest first: what `lexicon_sum` tries at a word's start
        self.by_first_word: dict[str, list[str]] = {}
        for entry in sorted(self.analyzer._dict, key=len, reverse=True):
            if not _WORD_RUN.match(entry) or not _is_word(entry[-1]):
                raise ValueError(f"AfinnReward: lexicon entry {entry!r} does not start and end with a word character")
            self.by_first_word.setdefault(_WORD_RUN.match(entry).group(), []).append(entry)

    def lexicon_sum(self, text: str) -> float:
        """The sum of the valences of the lexicon entries in `text`: `Afinn.score(text)`'s number, ~40× faster
        (tests/test_gold.py compares them on 4000 fortunes and 3000 stress strings). Afinn finds the entries with one
        regex (a word boundary, the 3382 entries longest first as alternatives, a word boundary); Python's `re` tries
        every alternative at every position. Every entry starts and ends with a word character (checked above), so a
        match starts where a word run starts and ends where one ends; its first word run is the text's run there (the
        run ends where the entry's first run ends, at the entry's end or at a non-word character inside it). Trying the
        entries with that first word run, longest first, finds the regex's match at every run start."""
        text = _SPACES.sub(" ", text).lower()  # as Afinn.find_all
        total, end = 0.0, 0
        for run in _WORD_RUN.finditer(text):
            start = run.start()
            if start < end:  # inside the previous match (a phrase)
                continue
            for entry in self.by_first_word.get(run.group(), ()):
                stop = start + len(entry)
                if text.startswith(entry, start) and (stop == len(text) or not _is_word(text[stop])):
                    total += self.analyzer._dict[entry]
                    end = stop
                    break
        return total

    def score(self, texts: list[str]) -> torch.Tensor:
        raw = torch.tensor([self.lexicon_sum(t) for t in texts], dtype=torch.float32)
        return torch.tanh(raw / self.scale)


class ClassifierReward(Reward):
    """One label of a sequence classifier: its logit, probability or log-probability. Batched on `device`."""

    name = "classifier"

    def __init__(
        self,
        path: str,
        label: str | int,
        device: Any = "cpu",
        output: str = "logit",
        include_prompt: bool = False,
        batch_size: int = 32,
        max_length: int = 256,
    ) -> None:
        super().__init__(include_prompt)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if output not in ("logit", "prob", "logprob"):
            raise ValueError(f"reward.output={output!r} is invalid; allowed: logit, prob, logprob")
        local = Path(str(path)).expanduser()
        if str(path).startswith((".", "/", "~")) and not local.is_dir():
            raise FileNotFoundError(f"reward.path={path!r} does not exist")
        src = str(local) if local.is_dir() else str(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src)
            self.model = AutoModelForSequenceClassification.from_pretrained(src)
        except OSError as e:
            raise FileNotFoundError(
                f"reward.path={path!r} is neither a local classifier directory nor a cached hub model "
                f"(offline? run once with HF_HUB_OFFLINE=0 to download it): {e}"
            ) from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.label_index = self.resolve_label(label)
        self.output = output
        self.batch_size = batch_size
        self.max_length = max_length

    def resolve_label(self, label: str | int) -> int:
        id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        n = self.model.config.num_labels
        names = {v: k for k, v in id2label.items()}
        if str(label) in names:
            return names[str(label)]
        if str(label).lstrip("-").isdigit() and 0 <= int(label) < n:
            return int(label)
        allowed = ", ".join(f"{i} ({id2label.get(i, '?')})" for i in range(n))
        raise ValueError(f"reward.label={label!r} is not a label of {self.model.name_or_path!r}; allowed: {allowed}")

    @torch.no_grad()
    def score(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float()  # (b, num_labels)
            if self.output == "prob":
                logits = logits.softmax(-1)
            elif self.output == "logprob":
                logits = logits.log_softmax(-1)
            out.append(logits[:, self.label_index].cpu())
        return torch.cat(out) if out else torch.zeros(0)


REWARDS = ("sentiment", "classifier", "learned")


def build_reward(reward_cfg: Any, device: Any = "cpu") -> Reward:
    """The reward named by ``reward_cfg.name``, on `device` (used by model-based rewards)."""
    name = _get(reward_cfg, "name")
    include_prompt = bool(_get(reward_cfg, "include_prompt", False))
    if name == "sentiment":
        return SentimentReward(include_prompt=include_prompt)
    if name == "classifier":
        return ClassifierReward(
            path=str(_get(reward_cfg, "path")),
            label=_get(reward_cfg, "label"),
            device=device,
            output=_get(reward_cfg, "output", "logit"),
            include_prompt=include_prompt,
            batch_size=int(_get(reward_cfg, "batch_size", 32)),
            max_length=int(_get(reward_cfg, "max_length", 256)),
        )
    if name == "learned":  # its cache key and its build need the model, data and sampling settings too
        raise ValueError(
            "reward.name='learned' is built from the whole job config: use "
            "kl_research.reward_model.build_job_reward(cfg, device), not rewards.build_reward(cfg.reward)"
        )
    raise ValueError(f"reward.name={name!r} is invalid; allowed: {', '.join(REWARDS)}")
