"""The KL contract (docs/kl-contract.md): per-token estimators, the exact full-vocabulary KL, masked reductions.

Notation at a sampled response token y ~ π (sampling temperature T, both policies scored at the same T):
    d = log π(y) − log π_ref(y),   r = π_ref(y) / π(y) = exp(−d)

    k1    = d                      unbiased for KL(π‖π_ref), high variance, negative per token half the time
    k2    = ½ d²                   biased (second order), low variance
    k3    = (r − 1) − log r        unbiased, low variance, never negative
    seed  = exp(d) · d             the seed document's formula; E_π[seed] = Σ π²/π_ref · log(π/π_ref),
                                   i.e. k1 importance-weighted the wrong way: biased upwards, can be < 0

All KL values here are in nats per response token unless a function says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ESTIMATORS = ("k1", "k2", "k3", "seed")
SIGNAL_ESTIMATORS = (*ESTIMATORS, "exact")

# Where an estimator may act on π is a question of its *gradient*, and of the gradient of the KL of the whole
# response (docs/kl-contract.md): KL_seq = E_π[Σ_t KL_t(y_<t)] and
#     ∇KL_seq = E[Σ_t ∇KL_t(y_<t)]  +  E[Σ_s ∇log π(y_s|y_<s) · Σ_{t>s} KL_t(y_<t)]
#               (pathwise, per position)  (score function: what token s does to every later position's KL)
# - reward  + k1:    −β·k1 per token through γ = 1 returns: both terms, unbiased, through a sampled log-ratio
#                    (high variance). FULL. (algo=grpo: the same returns, Σ_{t>=s} k1_t, added to the advantage.)
# - loss    + exact: β·Σ_v π(v)(log π(v) − log π_ref(v)) per position, differentiated analytically: the first term
#                    only. PARTIAL (Tang & Munos 2025; Shah et al. 2025).
# - loss    + k2:    ½(log π(y) − log π_ref(y))² through log π: on-policy the same first term in expectation. PARTIAL.
# - loss    + k3:    (r − 1) − log r through log π, the KL loss of GRPO (DeepSeekMath) and TRL's GRPOTrainer: its
#                    expected gradient is the per-position term of the *reverse* KL(π_ref‖π), not of KL(π‖π_ref).
#                    PARTIAL-REVERSE. Offered so that the anchors' loss can be reproduced for comparison; never the
#                    default. Forward and reverse agree to second order, so near the targets (≤ 0.2 nats) it behaves
#                    much like loss+k2; the controllers still measure and hold KL(π‖π_ref).
# - sequence + exact: the analytic per-position term (as loss+exact) plus each position's exact KL credited through
#                    the returns to the earlier tokens that led to it (ppo.kl_to_go): both terms, with no sampled
#                    log-ratio anywhere. FULL.
# tests/test_kl_sequence.py checks each pair, for PPO and GRPO, through the trainer's own pieces against the autograd
# gradient of the enumerated KL_seq (float64 identities); tests/test_kl.py checks the one-token case of every pair.
PENALTY_MODES: dict[str, tuple[str, ...]] = {
    "sequence": ("exact",),
    "loss": ("exact", "k2", "k3"),
    "reward": ("k1",),
}
# What each offered (mode, penalty) differentiates at the sequence level: "full" = ∇KL_seq in expectation,
# "partial" = the per-position pathwise term only, "partial-reverse" = that term of the reverse KL(π_ref‖π).
SEQUENCE_GRADIENT: dict[tuple[str, str], str] = {
    ("sequence", "exact"): "full",
    ("reward", "k1"): "full",
    ("loss", "exact"): "partial",
    ("loss", "k2"): "partial",
    ("loss", "k3"): "partial-reverse",
}
_REFUSED_WHY = {
    ("reward", "k2"): "as a per-token reward only its score-function term E[k2·∇log π] reaches π, and that is a "
    "small fraction of ∇KL in a direction barely correlated with it",
    ("reward", "k3"): "as a per-token reward only its score-function term E[k3·∇log π] reaches π, and that is a "
    "small fraction of ∇KL in a direction barely correlated with it",
    ("reward", "seed"): "the seed's exp(d)·d is biased (importance-weighted the wrong way) and so is its gradient; "
    "it stays available as an estimator (kl/seed) and as a controller signal (ppo.kl_signal=seed)",
    ("loss", "k1"): "the expected gradient of k1 = d through log π is E_π[∇log π] = 0: it pulls nothing",
    ("loss", "seed"): "the seed's exp(d)·d is biased and so is its gradient",
    ("reward", "exact"): "the exact KL is a sum over the vocabulary, not a sampled token's value; as a loss it "
    "is differentiated analytically, and ppo.kl_mode=sequence also credits it to earlier tokens through the returns",
}


def gradient_kind(mode: str, estimator: str) -> str:
    """'full', 'partial' or 'partial-reverse': what an offered (ppo.kl_mode, ppo.kl_penalty) pair differentiates of
    KL_seq (SEQUENCE_GRADIENT)."""
    check_penalty(mode, estimator)
    return SEQUENCE_GRADIENT[(mode, estimator)]


def check_penalty(mode: str, estimator: str) -> None:
    """Refuse a (ppo.kl_mode, ppo.kl_penalty) pair whose expected gradient is not ∇KL(π‖π_ref) at one token,
    naming the pairs that are offered and what each differentiates at the sequence level."""
    if mode not in PENALTY_MODES:
        raise ValueError(f"ppo.kl_mode={mode!r} is invalid; allowed: {', '.join(PENALTY_MODES)} (docs/kl-contract.md)")
    if estimator in PENALTY_MODES[mode]:
        return
    allowed = "; ".join(
        f"ppo.kl_mode={m} ppo.kl_penalty={e} ({SEQUENCE_GRADIENT[(m, e)]} sequence-level gradient)"
        for m, es in PENALTY_MODES.items()
        for e in es
    )
    why = _REFUSED_WHY.get((mode, estimator), "it is not a KL estimator")
    raise ValueError(
        f"ppo.kl_penalty={estimator!r} with ppo.kl_mode={mode!r} is refused: {why}. The full gradient of the "
        f"response's KL with no sampled log-ratio is ppo.kl_mode=sequence ppo.kl_penalty=exact; the classic reward "
        f"shaping (full, high variance) is ppo.kl_mode=reward ppo.kl_penalty=k1; ppo.kl_mode=loss (exact or k2) "
        f"differentiates each position's KL only (partial), and with k3 (GRPO's loss) the reverse KL's. "
        f"Allowed: {allowed}"
    )


def check_estimator(name: str, allowed: tuple[str, ...] = ESTIMATORS, key: str = "estimator") -> str:
    """Return `name` if it is a known estimator, else raise ValueError naming the key and the choices."""
    if name not in allowed:
        raise ValueError(f"{key}={name!r} is not a KL estimator; valid: {', '.join(allowed)}")
    return name


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate at sampled tokens.

    logp, ref_logp: (...) log-probabilities of the sampled tokens under π and π_ref.
    Returns a tensor of the same shape, computed in at least fp32 (float64 inputs stay float64).
    """
    check_estimator(estimator)
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    d = logp.to(dtype) - ref_logp.to(dtype)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        # exp(−d) − 1 + d cancels to ~d²/2: expm1 in float64 keeps that precision for tiny |d|.
        dd = d.double()
        return (torch.expm1(-dd) + dd).to(d.dtype)
    return torch.exp(d) * d  # "seed"


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in at least fp32 (bf16/fp16 up-cast, float64 kept). At T = 1 the division is skipped: x / 1.0 == x
    exactly, so the result is the same bits without a pass over a (B, T, V) tensor (and its backward)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return x if temperature == 1.0 else x / temperature


def exact_token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary KL(π‖π_ref) at each position.

    logits, ref_logits: (B, T, V) raw logits of the policy and the reference.
    Both are divided by the same temperature and normalised with log_softmax in fp32 (no exp of large
    differences: π(v) = exp(logπ(v)) ≤ 1 and the log-ratio is a difference of finite log-probs).
    Returns (B, T).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = F.log_softmax(tempered(logits, temperature), dim=-1)
    ref_logp = F.log_softmax(tempered(ref_logits, temperature), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is true: the batch per-token KL when x is a token KL. Scalar."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x over the last dimension where mask is true: the per-sequence KL when x is a token KL. (B,)"""
    return (x * mask.to(x.dtype)).sum(-1)


def batch_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """Batch KL in nats per response token: sum over response tokens / number of response tokens."""
    return masked_mean(token_kl(logp, ref_logp, estimator), mask)
