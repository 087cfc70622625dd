"""The gold evaluation: what the policy's reward stands for, measured beside it on held-out prompts (docs/gold.md).

KL control exists because the training reward is a proxy: pushed far enough from π_ref the proxy keeps rising while
what it stands for falls (Gao, Schulman & Hilton 2022, arXiv 2210.10760). At every eval step (and at the last) the
policy answers a fixed set of held-out prompts (the first data.prompt_tokens tokens of held-out texts, which never
train the reference or become training prompts), sampled exactly as a rollout samples (softmax(logits/T), the same
sampler, the response up to and including its EOS, decoded as the trainer decodes it), and three scorers read the
responses:

    eval/gold_reward    VADER compound (rewards.SentimentReward): the gold, which also labels the learned RM's data
    eval/gold2_reward   AFINN, tanh(sum / 5) (rewards.AfinnReward): a second, independent lexicon, so that a gain in
                        the gold is not one lexicon's quirk
    eval/proxy_reward   the training reward itself (for reward=sentiment it is the gold; for reward=learned the RM)

and eval/<name>_ref the same for π_ref (computed once, at the first evaluation). The policy never sees any of it: the
scores go to the logs only. The sampling runs in a fork of torch's RNG seeded by the run's seed, so the training
trajectory is the same token for token with the gold evaluation on or off (gold.prompts=0), and every evaluation of a
run draws with the same seed (common random numbers: the curve moves with the policy, not the sampling noise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from kl_research import ppo
from kl_research.decode import sample, uses_fast_sampler
from kl_research.rewards import AfinnReward, Reward, SentimentReward
from kl_research.rollout import sampling_kwargs

# The seed that picks the held-out prompts: the same set for every run, so runs are compared on the same prompts.
PROMPT_SEED = 0
# The evaluation's sampling seed is the run's seed plus this (prompt_gen uses seed, shuffle_gen seed + 1).
SAMPLE_SEED_OFFSET = 2


def gold_scorer() -> Reward:
    """The gold: VADER compound of the response (the `sentiment` reward). It labels the learned RM's data too."""
    return SentimentReward(include_prompt=False)


def gold_scorers() -> dict[str, Reward]:
    """The gold scorers by metric name (eval/<name>): VADER and the independent AFINN, both on the response alone."""
    return {"gold_reward": gold_scorer(), "gold2_reward": AfinnReward(include_prompt=False)}


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's global RNG seeded by `seed`, then give the caller back the exact state it had (CPU, and
    the block's CUDA device): sampling here never moves the training trajectory's random stream."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.inference_mode()
def sample_responses(
    lm: torch.nn.Module,
    tokenizer: Any,
    prompts: torch.Tensor,
    *,
    temperature: float,
    response_length: int,
    sampler: str = "auto",
    amp: Any = None,
    batch_size: int = 64,
) -> tuple[list[str], list[str]]:
    """(prompt texts, response texts) of one response per prompt (B, P), sampled as a rollout samples them
    (kl_research.rollout: the fast sampler where the model allows it and `sampler` asks for it, else `generate`, both
    exactly softmax(logits/T)) and decoded as the trainer decodes them (Job.score: the response up to and including
    its first EOS, special tokens dropped). Draws from torch's global RNG, `batch_size` prompts at a time."""
    amp = amp if amp is not None else contextlib.nullcontext()
    device = next(lm.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    fast = uses_fast_sampler(lm, sampler)
    texts_p: list[str] = []
    responses: list[str] = []
    for chunk in prompts.split(batch_size):
        chunk = chunk.to(device)
        P = chunk.shape[1]
        with amp:
            if fast:
                seqs = sample(
                    lm, chunk, max_new_tokens=response_length, temperature=temperature, eos_token_id=eos,
                    pad_token_id=pad,
                )  # fmt: skip
            else:
                seqs = lm.generate(input_ids=chunk, **sampling_kwargs(chunk, temperature, response_length, eos, pad))
        response = seqs[:, P:].cpu()  # (b, R'), R' <= response_length
        mask = ppo.response_mask(response, eos)  # (b, R'): up to and including the first EOS
        texts_p += tokenizer.batch_decode(chunk.cpu(), skip_special_tokens=True)
        responses += [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(response, mask, strict=True)]
    return texts_p, responses


@dataclass
class GoldEval:
    """The gold evaluation of one run: its held-out prompts, its seed and its scorers (see the module's docstring)."""

    prompts: torch.Tensor  # (N, P) held-out prompts, on the CPU
    tokenizer: Any  # the policy's (= the reference's)
    seed: int  # the sampling seed of every evaluation of the run
    temperature: float
    response_length: int
    sampler: str
    batch_size: int
    scorers: dict[str, Reward] = field(default_factory=gold_scorers)
    reference: dict[str, float] | None = None  # π_ref's scores, measured at the first evaluation
    keep: int = 8  # the first `keep` prompts' responses and scores of each policy evaluation: `last_samples`
    last_samples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: DictConfig, heldout: list[str], tokenizer: Any) -> GoldEval | None:
        """The run's gold evaluation (None with gold.prompts=0, or a config from before the gold group)."""
        from kl_research.data import build_prompts

        n = int(cfg.gold.prompts) if cfg.get("gold") is not None else 0
        if n == 0:
            return None
        prompts = build_prompts(heldout, tokenizer, cfg.data.prompt_tokens, n, seed=PROMPT_SEED)
        return cls(
            prompts=prompts,
            tokenizer=tokenizer,
            seed=int(cfg.seed) + SAMPLE_SEED_OFFSET,
            temperature=float(cfg.ppo.temperature),
            response_length=int(cfg.ppo.response_length),
            sampler=str(cfg.get("sampler", "auto")),
            batch_size=int(cfg.ppo.batch_size),
        )

    def measure(self, lm: torch.nn.Module, proxy: Reward, amp: Any = None) -> dict[str, float]:
        """Mean score of each gold scorer and of the proxy over one response per held-out prompt of `lm`."""
        return self.measure_with_samples(lm, proxy, amp)[0]

    def measure_with_samples(
        self, lm: torch.nn.Module, proxy: Reward, amp: Any = None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """`measure`, and the first `keep` prompts with their response and every score of it."""
        device = next(lm.parameters()).device
        with seeded_rng(self.seed, device):
            texts_p, responses = sample_responses(
                lm, self.tokenizer, self.prompts, temperature=self.temperature,
                response_length=self.response_length, sampler=self.sampler, amp=amp, batch_size=self.batch_size,
            )  # fmt: skip
        scores = {name: scorer(texts_p, responses) for name, scorer in self.scorers.items()}
        scores["proxy_reward"] = proxy(texts_p, responses)
        samples = [
            {"prompt": texts_p[i], "response": responses[i], **{k: float(v[i]) for k, v in scores.items()}}
            for i in range(min(self.keep, len(responses)))
        ]
        return {k: float(v.mean()) for k, v in scores.items()}, samples

    def __call__(
        self, policy_lm: torch.nn.Module, ref_lm: torch.nn.Module, proxy: Reward, amp: Any = None
    ) -> dict[str, float]:
        """The eval/ record of the policy now: eval/gold_reward, eval/gold2_reward, eval/proxy_reward, and the same
        for π_ref (eval/<name>_ref)."""
        if self.reference is None:
            self.reference = self.measure(ref_lm, proxy, amp)
        now, self.last_samples = self.measure_with_samples(policy_lm, proxy, amp)
        return {
            **{f"eval/{k}": v for k, v in now.items()},
            **{f"eval/{k}_ref": v for k, v in self.reference.items()},
        }
