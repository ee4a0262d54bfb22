"""Per-token rewards, generalized advantage estimation and masked whitening.

All tensors are (batch, response_tokens), right-padded, with `mask` 1 on real response
tokens; padding never leaks into an advantage, a return or a statistic.
"""
from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries; padding stays 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL on every response token, plus the sequence score on its last token."""
    rewards = -kl_coef * kl * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()
    return rewards + last * scores[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns); the state after a sequence's last token is terminal (value 0)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_mask = mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running * next_mask) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask
