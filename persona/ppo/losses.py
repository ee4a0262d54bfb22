"""The clipped PPO objectives, the k2 KL penalty, and the diagnostics logged with them."""
from __future__ import annotations

import torch

from persona.ppo.advantages import masked_mean
from persona.ppo.kl import kl_per_token


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (Schulman et al. 2017), averaged over response tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: a value may not move more than `clip` from its rollout estimate for free."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    losses = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * masked_mean(losses, mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean(((values - returns) ** 2 < (clipped_values - returns) ** 2)
                                                    .float(), mask).item()}
    return loss, stats


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean k2 = (log pi - log ref)^2 / 2 over response tokens sampled from pi, differentiated through
    `logprobs`: its gradient is an unbiased estimate of grad KL(pi || ref) (see persona/ppo/kl.py)."""
    return masked_mean(kl_per_token(logprobs, ref_logprobs, "k2"), mask)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the sampling distribution over response tokens."""
    logp = torch.log_softmax(logits.float(), -1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)
