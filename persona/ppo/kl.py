"""Per-token KL estimators and the KL-penalty coefficient controllers.

The estimators use log r = log pi(y_t) - log ref(y_t) on tokens sampled from pi (Schulman,
"Approximating KL divergence"): k1 = log r (unbiased, noisy, can be negative), k2 = (log r)^2 / 2
(biased, never negative), k3 = (1/r - 1) + log r (unbiased, never negative, low variance).

As *estimates* of KL(pi || ref) all three are worth reporting. As a *penalty* only two push along
-grad KL(pi || ref): k1 put into the per-token reward (InstructGPT, Ziegler et al.), whose
score-function gradient E_pi[k1 grad log pi] is grad KL; and k2 as a loss term differentiated
directly, since grad k2 = log r grad log pi has the same expectation. k3 does neither: in the reward
its expected gradient is grad KL(pi || ref) - grad KL(ref || pi), which vanishes to first order near
the reference (no restoring force), and differentiated directly it is grad KL(ref || pi), the reverse KL.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from persona.config import PPOConfig


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 | k2 | k3)")


@dataclass
class FixedKL:
    value: float

    def update(self, current_kl: float, n_samples: int) -> None:
        pass


@dataclass
class AdaptiveKL:
    """Ziegler et al. (2019): move the coefficient so the sequence KL tracks `target`.

    The proportional error is clipped to +-0.2 and applied in proportion to the samples
    seen over `horizon`, so one noisy batch cannot swing the coefficient.
    """
    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon


def run_samples(cfg: PPOConfig, processes: int) -> int:
    """Samples (policy replies) a whole run scores: every turn of every episode, on every process, every step."""
    return cfg.max_steps * cfg.rollout_batch_size * cfg.turns * processes


def kl_controller(cfg: PPOConfig, processes: int) -> FixedKL | AdaptiveKL:
    """kl_target > 0: adaptive, its horizon `kl_horizon_fraction` of the run's samples, so it moves the
    coefficient as far in a 12-step CPU run as in a 300-step GPU run; kl_target == 0: a fixed coefficient."""
    if cfg.kl_target == 0:
        return FixedKL(cfg.kl_coef)
    return AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon_fraction * run_samples(cfg, processes))
