"""PPO maths as pure tensor functions (docs/kl-contract.md). Shapes: B sequences, T response positions.

Every function here takes a response mask (B, T): True on response tokens up to and including the first
EOS, False after it (padding). Nothing after EOS counts anywhere.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kl_research.kl import masked_mean, tempered


def response_mask(response_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """(B, T) bool: True up to and including the first EOS of each response (all True if none)."""
    if eos_token_id is None:
        return torch.ones_like(response_ids, dtype=torch.bool)
    is_eos = response_ids == eos_token_id
    # number of EOS strictly before position t; a token counts iff no EOS came before it
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real response token (the score goes there, never on a PAD after EOS)."""
    return mask.long().sum(1).clamp_min(1) - 1


def shaped_rewards(scores: torch.Tensor, kl_tokens: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (B, T): −β·k(t) on every response token, plus the task score at the last one."""
    rewards = -beta * kl_tokens * mask
    idx = last_token_index(mask)
    rewards[torch.arange(rewards.shape[0]), idx] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. Returns (advantages, returns), (B, T).

    values[t] is V(s_t), the state before token t is emitted; the state after the last real token is
    terminal (value 0). Positions after EOS have zero reward and zero value, so they contribute nothing.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages + values


def kl_to_go(token_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T): at each response token s, Σ_{t>s} KL_t over the later response positions of its sequence.

    The score-function half of ∇KL_seq (docs/kl-contract.md) credits token s with the KL of every later position, whose
    state y_≤s it chose. KL_s itself is excluded: it depends on y_<s only, so crediting it to y_s would add noise and
    no signal (its expectation against ∇log π(y_s|y_<s) is 0). With γ = 1 this is the return of the per-token
    reward KL_{s+1} placed on token s. Zero outside the mask.
    """
    x = token_kl * mask
    later = x.flip(1).cumsum(1).flip(1) - x  # Σ_{t>=s} − KL_s
    return later * mask


def reward_to_go(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T): at each response token s, Σ_{t>=s} x_t over its sequence's response (the γ = 1 return of per-token
    rewards x). Zero outside the mask."""
    x = x * mask
    return x.flip(1).cumsum(1).flip(1) * mask


def group_advantages(scores: torch.Tensor, group_size: int, eps: float, scale: bool = True) -> torch.Tensor:
    """GRPO's advantage of each response (B,): (score − its group's mean) / (the group's std + eps), or without the
    division (scale=False: Dr. GRPO's choice, Liu et al. 2025, which removes the std's per-prompt weighting).

    scores: (B,) with B = prompts × group_size, the G responses to one prompt adjacent. The std is the unbiased one
    (DeepSeekMath's GRPO, TRL). A group whose scores are all equal gets advantage 0: it carries no preference.
    """
    g = scores.reshape(-1, group_size)
    centred = g - g.mean(1, keepdim=True)
    if not scale:
        return centred.reshape(-1)
    std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    return (centred / (std + eps)).reshape(-1)


def leave_one_out_baseline(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T): at each position, the mean of x over the *other* sequences whose response reaches that position.

    A baseline for sequence i that does not depend on sequence i's tokens, so subtracting it leaves the expected
    score-function gradient unchanged (RLOO's argument, per position). 0 where no other sequence reaches it.
    """
    m = mask.to(x.dtype)
    total, count = (x * m).sum(0, keepdim=True), m.sum(0, keepdim=True)
    others = (count - m).clamp_min(1.0)
    return (total - x * m) / others * m


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean)/std over masked positions (unbiased variance, as TRL); zero outside the mask."""
    mean = masked_mean(x, mask)
    m = mask.to(x.dtype)
    n = m.sum()
    var = ((x - mean).square() * m).sum() / (n - 1).clamp_min(1.0)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate. Returns (loss, clip fraction, approx KL(old‖new) = ½·E[(log ratio)²])."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.square(), mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ½·max((V−R)², (V_clip−R)²). Returns (loss, clip fraction)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns).square(), (clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((l2 > l1).float(), mask)
    return loss, clipfrac


def exact_kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response positions of the full-vocabulary KL(π_θ(·|s_t) ‖ π_ref(·|s_t)), differentiable in π_θ.

    logprobs: (B, T, V) log-softmax of the policy (with grad); ref_logprobs: (B, T, V) of the reference (no grad).
    Autograd of this sum is the analytic gradient of the per-position KL: no token is sampled, so no score-function
    noise. The states s_t are the rollout's (sampled from π_old): the usual on-policy approximation, one update old.
    """
    return masked_mean(exact_token_kl_of_logprobs(logprobs, ref_logprobs), mask)


def exact_token_kl_of_logprobs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Σ_v π(v)·(log π(v) − log π_ref(v)) at every position, (B, T), from (B, T, V) log-probs; differentiable in π."""
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


class _LogpExactKL(torch.autograd.Function):
    """log π(y) and the exact KL(π‖π_ref) per position from tempered logits z (b, R, V), with a hand-written backward:
    4 passes over (b, R, V) instead of autograd's ~12 (`logp_and_exact_kl`)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, response: torch.Tensor, ref_logprobs: torch.Tensor):
        lp = torch.log_softmax(z, dim=-1)
        logp_y = lp.gather(-1, response.unsqueeze(-1)).squeeze(-1)
        p = lp.exp()
        d = lp.sub_(ref_logprobs)  # log π − log π_ref; lp is spent
        kl = torch.linalg.vecdot(p, d)  # Σ_v π(v)·d(v), (b, R)
        ctx.save_for_backward(p, d, kl, response)
        return logp_y, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: torch.Tensor | None, g_kl: torch.Tensor | None):
        # ∂KL/∂z_j = π_j·(d_j − KL) (the ∂log π terms sum to Σ_i π_i(δ_ij − π_j) = 0); ∂log π(y)/∂z_j = δ_jy − π_j.
        # So ∂L/∂z = π ⊙ (g_kl·(d − KL) − g_y) + g_y·onehot(y): one addcmul, one mul, one scatter of (b, R) values.
        p, d, kl, response = ctx.saved_tensors
        g_y = torch.zeros_like(kl) if g_y is None else g_y
        g_kl = torch.zeros_like(kl) if g_kl is None else g_kl
        grad = torch.addcmul((-(kl * g_kl) - g_y).unsqueeze(-1), d, g_kl.unsqueeze(-1))
        grad.mul_(p)
        grad.scatter_add_(-1, response.unsqueeze(-1), g_y.unsqueeze(-1))
        return grad, None, None


def logp_and_exact_kl(
    z: torch.Tensor, response: torch.Tensor, ref_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y), KL(π‖π_ref)) per position, each (b, R), from tempered logits z (b, R, V) and the reference's
    log-probs (b, R, V): the numbers of `exact_token_kl_of_logprobs` and a gather of log_softmax(z), differentiable in
    z through a fused backward (`_LogpExactKL`; gradients equal autograd's, tests/test_ppo_math.py)."""
    return _LogpExactKL.apply(z, response, ref_logprobs)


def k2_kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of ½(log π_θ(y) − log π_ref(y))² at the sampled tokens, differentiable in log π_θ.
    On-policy its expected gradient is E_π[d·∇log π] = ∇KL(π‖π_ref) (not so for k1 or k3 as a loss). (B, T)."""
    return masked_mean(0.5 * (logp - ref_logp).square(), mask)


def k3_kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of k3 = π_ref(y)/π(y) − 1 − log(π_ref(y)/π(y)) at the sampled tokens, through log π:
    the KL loss of DeepSeekMath's GRPO and TRL's GRPOTrainer. On-policy its expected gradient at one position is
    E_π[(1 − π_ref/π)∇log π] = ∇KL(π_ref‖π), the *reverse* KL's, and per position only (kl.SEQUENCE_GRADIENT)."""
    d = logp - ref_logp
    return masked_mean(torch.expm1(-d) + d, mask)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits/T)[token] in fp32. logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = torch.log_softmax(tempered(logits, temperature), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits/T) at each position, fp32. (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(tempered(logits, temperature), dim=-1)
    return -(logp.exp() * logp).sum(-1)
