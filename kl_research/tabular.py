"""An enumerable tabular policy over short responses, and the expected gradient of any KL mode through the trainer's
own pieces (docs/kl-contract.md, "The sequence-level gradient": check a mode by enumeration, in float64). Used by
tests/test_kl_sequence.py and by scripts/kl_gradient.py's exact variance measurement.
"""

from __future__ import annotations

import itertools

import torch
from omegaconf import OmegaConf

from kl_research import ppo
from kl_research.algos import ALGORITHMS, Algorithm

DT = torch.float64


def trainer_pcfg(mode: str, penalty: str, **overrides):
    """The `ppo` settings under which the trainer's pieces compute a mode's *expected* KL gradient: γ = 1, λ = 1, no
    value baseline (values 0), no whitening, no KL-to-go baseline, vf_coef 0."""
    base = dict(
        kl_mode=mode,
        kl_penalty=penalty,
        gamma=1.0,
        lam=1.0,
        whiten_rewards=False,
        whiten_advantages=False,
        kl_baseline="none",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.0,
    )
    return OmegaConf.create(base | overrides)


class Tabular:
    """π_θ(y_t | y_<t) = softmax(θ[prefix(y_<t)]) over V tokens, for responses of T tokens; π_ref likewise.

    With `eos`, the token `eos` ends a response: positions after it are masked (the trainer's response_mask) and the
    enumeration weights each masked position by 1/V, so the duplicates that differ only there sum to one response.
    """

    def __init__(self, V: int, T: int, theta: torch.Tensor, ref: torch.Tensor, eos: int | None = None) -> None:
        self.V, self.T, self.eos = V, T, eos
        self.theta, self.ref = theta, ref
        self.Y = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (N, T)
        # prefix index of y_<t: offset of length t + the prefix read as a base-V number
        offsets = [sum(V**k for k in range(t)) for t in range(T)]
        idx = torch.zeros(self.Y.shape, dtype=torch.long)
        for t in range(T):
            num = torch.zeros(len(self.Y), dtype=torch.long)
            for j in range(t):
                num = num * V + self.Y[:, j]
            idx[:, t] = offsets[t] + num
        self.prefix = idx
        self.mask = ppo.response_mask(self.Y, eos)

    @staticmethod
    def n_prefixes(V: int, T: int) -> int:
        return sum(V**k for k in range(T))

    def logprobs(self, table: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(table[self.prefix], dim=-1)  # (N, T, V)

    def weights(self, logprobs: torch.Tensor) -> torch.Tensor:
        """P(response) of each enumerated row, (N,): π over the unmasked positions, 1/V per masked one."""
        lp = logprobs.gather(-1, self.Y.unsqueeze(-1)).squeeze(-1)
        lp = torch.where(self.mask, lp, torch.full_like(lp, -torch.log(torch.tensor(float(self.V), dtype=DT))))
        return lp.sum(1).exp()

    def position_kl(self, logprobs: torch.Tensor) -> torch.Tensor:
        ref = self.logprobs(self.ref)
        return (logprobs.exp() * (logprobs - ref)).sum(-1)  # (N, T)

    def sequence_kl_grad(self) -> tuple[torch.Tensor, float, float]:
        """(∇_θ KL_seq / E[T], E[T], KL per token) by autograd of the enumeration: the ground truth."""
        theta = self.theta.detach().clone().requires_grad_(True)
        lp = self.logprobs(theta)
        w = self.weights(lp)
        kl_seq = (w * (self.position_kl(lp) * self.mask).sum(1)).sum()
        expected_len = float((w.detach() * self.mask.sum(1)).sum())
        (grad,) = torch.autograd.grad(kl_seq, theta)
        return grad / expected_len, expected_len, float(kl_seq.detach()) / expected_len

    def batch(self) -> dict[str, torch.Tensor]:
        """The enumeration as a rollout batch: every response once, with the tensors the trainer keeps."""
        lp_old = self.logprobs(self.theta)
        ref = self.logprobs(self.ref)
        gather = lambda x: x.gather(-1, self.Y.unsqueeze(-1)).squeeze(-1)  # noqa: E731
        return {
            "mask": self.mask,
            "response": self.Y,
            "logp": gather(lp_old),
            "ref_logp": gather(ref),
            "values": torch.zeros(self.Y.shape, dtype=DT),
            "exact_kl": self.position_kl(lp_old),
            "ref_logprobs": ref,
        }

    def algorithm(self, name: str, pcfg) -> Algorithm:
        """The trainer's algorithm `name` over the enumeration; for GRPO the whole enumeration is one group (its
        group mean is unweighted: the tests give GRPO equal scores, i.e. the KL part alone)."""
        algo = OmegaConf.create({"name": name, "group_size": len(self.Y), "std_eps": 1e-4, "scale_rewards": True})
        if name == "grpo":
            pcfg = OmegaConf.merge(pcfg, {"batch_size": len(self.Y)})
        return ALGORITHMS[name](pcfg, algo)

    def mode_grad(
        self,
        mode: str,
        penalty: str,
        beta: float = 1.0,
        scores: torch.Tensor | None = None,
        algo: str = "ppo",
        **ppo_overrides,
    ) -> torch.Tensor:
        """E_π[∇_θ algo.loss] for one (mode, penalty), through the trainer's pieces (algos.PPO or algos.GRPO); the
        task score of each enumerated response is `scores` (default 0: the KL part alone)."""
        pcfg = trainer_pcfg(mode, penalty, **ppo_overrides)
        alg = self.algorithm(algo, pcfg)
        batch = self.batch()
        scores = torch.zeros(len(self.Y), dtype=DT) if scores is None else scores
        advantages, returns = alg.advantages(batch, scores, beta)
        # The expectation over responses: each row weighted by its probability under the sampling π (detached). The
        # losses' masked means then divide Σ_y P(y)·Σ_t(...) by Σ_y P(y)·T_y = E[T]: a large batch's token count.
        w = self.weights(self.logprobs(self.theta)).detach()
        mb = {**batch, "mask": self.mask.to(DT) * w.unsqueeze(1)}
        theta = self.theta.detach().clone().requires_grad_(True)
        loss, _ = alg.loss(self.logprobs(theta), batch["values"], mb, advantages, returns, beta)
        (grad,) = torch.autograd.grad(loss, theta)
        return grad

    def per_response_grads(self, mode: str, penalty: str, beta: float = 1.0, **ppo_overrides) -> torch.Tensor:
        """(N, *θ.shape): the one-response gradient estimate of each enumerated response (a batch of one; no
        baseline can use other responses). Its π-weighted mean is mode_grad's, times E[T]/T for fixed lengths."""
        pcfg = trainer_pcfg(mode, penalty, **ppo_overrides)
        alg = self.algorithm("ppo", pcfg)
        batch = self.batch()
        advantages, returns = alg.advantages(batch, torch.zeros(len(self.Y), dtype=DT), beta)
        out = []
        for i in range(len(self.Y)):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            theta = self.theta.detach().clone().requires_grad_(True)
            loss, _ = alg.loss(
                self.logprobs(theta)[i : i + 1],
                one["values"],
                one,
                advantages[i : i + 1],
                returns[i : i + 1],
                beta,
            )
            out.append(torch.autograd.grad(loss, theta)[0])
        return torch.stack(out)

    def gradient_variance(self, mode: str, penalty: str) -> tuple[float, float]:
        """(E‖g − E g‖², ‖E g‖²) of the one-response estimate g, exactly over the enumeration."""
        g = self.per_response_grads(mode, penalty).flatten(1)
        w = self.weights(self.logprobs(self.theta)).detach()
        mean = (w.unsqueeze(1) * g).sum(0)
        var = (w * (g - mean).square().sum(1)).sum()
        return float(var), float(mean.square().sum())


def case(kind: str, seed: int, V: int = 4, T: int = 3, eos: int | None = None, scale: float = 0.7) -> Tabular:
    """A random π_ref and π = π_ref + scale·noise ("random"), or the RLHF shape ("structured"): π equals π_ref at the
    first position and departs after it, in full after first token 0 (a prefix the policy learnt to steer into) and
    at a tenth of the scale elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    n = Tabular.n_prefixes(V, T)
    ref = torch.randn(n, V, generator=gen, dtype=DT)
    delta = scale * torch.randn(n, V, generator=gen, dtype=DT)
    if kind == "structured":
        delta[0] = 0.0  # the empty prefix: the first position
        after0 = torch.tensor([bool(len(p) and p[0] == 0) for p in prefixes(V, T)])
        delta[~after0] *= 0.1
    return Tabular(V, T, ref + delta, ref, eos)


def prefixes(V: int, T: int) -> list[tuple[int, ...]]:
    """The prefixes in Tabular's index order: by length, then as base-V numbers."""
    return [p for t in range(T) for p in itertools.product(range(V), repeat=t)]
