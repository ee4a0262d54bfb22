"""Per-token KL estimators and the KL-penalty coefficient controllers.

Both estimators use log r = log pi(y_t) - log ref(y_t) on tokens sampled from pi:
k1 = log r is unbiased but noisy and can be negative; k3 = (1/r - 1) + log r (Schulman's
"approximating KL") is unbiased for the same KL, never negative, and lower-variance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 | k3)")


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
    horizon: int

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon


def kl_controller(coef: float, target: float, horizon: int):
    """target > 0: adaptive; target == 0: fixed coefficient."""
    return AdaptiveKL(coef, target, horizon) if target > 0 else FixedKL(coef)
