"""The arithmetic of PPO on language models, as small pure tensor functions.

Every function works on a batch of responses laid out as `[batch, tokens]` tensors with a
`mask` of the same shape: 1 on the response's own tokens (up to and including its EOS),
0 on the padding after it. Valid tokens come first in each row; masked positions never
change a result. `ppo.py` puts these pieces together into a training loop.

Notation in the docstrings: t is the token position in the response, m_t the mask, π the
policy being trained, π_old the policy that sampled the batch, π_ref the frozen reference.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid positions: Σ values·m / Σ m (a scalar)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var + eps) with the mean and the (population) variance taken over
    the valid positions only; masked positions come out as 0.

    Advantages are normalized this way so the step size of the policy update does not
    depend on the scale of the reward model; padding must not pull the statistics to 0.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over the response tokens.

        δ_t = r_t + γ·V_{t+1} − V_t            (V after the last valid token is 0)
        A_t = δ_t + γ·λ·A_{t+1}
        R_t = A_t + V_t                        (the value targets)

    Each response is one episode that ends at its last valid token, so the value after
    it bootstraps to 0 and nothing flows back from the padding.

    Returns:
        (advantages, returns), both 0 at masked positions.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """A per-token estimate of KL(π ‖ π_ref) from the log-probabilities of sampled tokens.

        k1 = log π − log π_ref                  (unbiased, can be negative)
        k3 = (ρ − 1) − log ρ,  ρ = π_ref / π    (unbiased, always ≥ 0, lower variance)

    Summed over a response, k1 is the sequence's log-likelihood ratio, the quantity the
    KL penalty of RLHF is defined on.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def shaped_rewards(
    score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> Tensor:
    """Per-token rewards: r_t = −β·k1_t on every valid token, plus the sequence score
    (from the reward model) on the last valid token.

    The KL term keeps the policy close to the reference so it cannot drift into text the
    reward model was never trained to judge (reward hacking).
    """
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * kl_per_token(logprobs, ref_logprobs) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


def policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The clipped surrogate objective of PPO, as a loss to minimize.

        ρ_t = π(a_t) / π_old(a_t) = exp(new − old)
        L   = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))

    Taking the pessimistic of the two stops the update from profiting from moving ρ
    outside [1 − ε, 1 + ε], so several epochs on one batch stay close to π_old.

    Returns:
        (loss, clip fraction: share of tokens where the clipped term was chosen,
        approx KL(π_old ‖ π) = mean ½·(new − old)²), all scalars.
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def value_loss(
    new_values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip_range: float,
) -> tuple[Tensor, Tensor]:
    """The clipped value loss.

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L      = ½ · mean_t max((V − R)², (V_clip − R)²)

    Like the policy, the value head may not move its prediction more than ε_v from the
    value it had when the batch was sampled.

    Returns:
        (loss, clip fraction: share of tokens where the clipped error was the larger).
    """
    clipped_values = old_values + torch.clamp(
        new_values - old_values, -value_clip_range, value_clip_range
    )
    unclipped_error = (new_values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > unclipped_error).to(new_values.dtype), mask)
    return loss, clip_fraction.detach()


class FixedKLController:
    """A constant KL coefficient β (when alignment.rlhf.klTarget is not set)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, kl: float, n_steps: int) -> None:
        """Leaves β as it is."""


class AdaptiveKLController:
    """The proportional controller of Ziegler et al. (2019), "Fine-Tuning Language Models
    from Human Preferences":

        e = clip(KL / target − 1, −0.2, 0.2)
        β ← β · (1 + e · n / horizon)

    where KL is the mean KL of a batch's responses and n the number of responses in it.
    Above the target β grows (stronger pull to the reference), below it β shrinks; the
    clip keeps one bad batch from swinging it. `horizon` sets how fast it reacts: at the
    largest error, β changes by a factor of about e^±0.2 (×1.22 or ×0.82) every `horizon`
    responses.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10_000) -> None:
        if target <= 0:
            raise ValueError(f"the KL target must be positive, got {target}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: int) -> None:
        """Moves β after a batch of n_steps responses whose mean KL was kl."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
