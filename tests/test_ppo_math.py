"""PPO building blocks on hand-computed tensors: KL estimators and controllers, GAE, whitening, losses."""
from __future__ import annotations

import math

import pytest
import torch

from persona.ppo.advantages import gae, masked_mean, token_rewards, whiten
from persona.ppo.kl import AdaptiveKL, FixedKL, kl_controller, kl_per_token
from persona.ppo.losses import entropy, policy_loss, value_loss


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_kl_estimators():
    logp, ref = t([math.log(0.5), math.log(0.2)]), t([math.log(0.25), math.log(0.2)])
    assert kl_per_token(logp, ref, "k1").tolist() == [pytest.approx([math.log(2), 0.0])]
    # k3 = (ref/p - 1) - log(ref/p): 0.5 - 1 + log 2
    assert kl_per_token(logp, ref, "k3").tolist() == [pytest.approx([0.5 - 1 + math.log(2), 0.0], abs=1e-6)]
    # k1 goes negative when the policy under-weights a sampled token; k3 never does
    assert kl_per_token(ref, logp, "k1")[0, 0] < 0 < kl_per_token(ref, logp, "k3")[0, 0]
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_adaptive_controller_follows_ziegler():
    controller = AdaptiveKL(0.1, target=6.0, horizon=100)
    controller.update(9.0, n_samples=10)  # error 0.5 clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(5.4, n_samples=10)  # error -0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = kl_controller(0.3, 0.0, 100)
    fixed.update(100.0, 10)
    assert isinstance(fixed, FixedKL) and fixed.value == 0.3
    assert isinstance(kl_controller(0.3, 6.0, 100), AdaptiveKL)


def test_token_rewards_put_the_score_on_the_last_real_token():
    rewards = token_rewards(torch.tensor([2.0]), t([0.1, 0.2, 0.3, 0.4]), t([1, 1, 1, 0]), kl_coef=0.5)
    assert rewards.tolist() == [pytest.approx([-0.05, -0.1, -0.15 + 2.0, 0.0])]


def test_gae_by_hand():
    rewards, values, mask = t([0, 0, 1]), t([0.5, 0.5, 0.5]), t([1, 1, 1])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [pytest.approx([0.5, 0.5, 0.5])]
    assert returns.tolist() == [pytest.approx([1.0, 1.0, 1.0])]
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.tolist() == [pytest.approx([0.125, 0.25, 0.5])]
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    # delta2 = 1 - .5; delta1 = .9*.5 - .5; delta0 = .9*.5 - .5; A_t = delta_t + .9 A_{t+1}
    a2 = 0.5
    a1 = (0.45 - 0.5) + 0.9 * a2
    assert advantages.tolist() == [pytest.approx([(0.45 - 0.5) + 0.9 * a1, a1, a2])]


def test_gae_ignores_padding():
    """Padding after the reply (mask 0, junk values) neither bootstraps nor gets an advantage."""
    advantages, returns = gae(t([0, 1, 0]), t([0.5, 0.5, 9.0]), t([1, 1, 0]), gamma=1.0, lam=0.5)
    assert advantages.tolist() == [pytest.approx([0.25, 0.5, 0.0])]
    assert returns[0, 2] == 0
    batch = gae(t([0, 1, 0], [0, 0, 1]), t([0.5, 0.5, 9.0], [0.5, 0.5, 0.5]), t([1, 1, 0], [1, 1, 1]), 1.0, 0.5)[0]
    assert batch[0].tolist() == pytest.approx([0.25, 0.5, 0.0])  # rows do not leak into each other


def test_whitening_uses_only_real_tokens():
    values, mask = t([1, 2, 3, 100]), t([1, 1, 1, 0])
    white = whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert ((white[0, :3] ** 2).sum() / 2).item() == pytest.approx(1.0, abs=1e-5)  # unbiased variance 1
    assert white[0, 3] == 0
    assert whiten(values, mask, shift_mean=False)[0, :3].mean().item() == pytest.approx(2.0, abs=1e-5)


def test_clipped_policy_loss():
    old = t([0.0, 0.0])
    same, stats = policy_loss(old, old, t([1.0, -3.0]), t([1, 1]), clip=0.2)
    assert same.item() == pytest.approx(1.0) and stats["clip_fraction"] == 0  # -(1 - 3) / 2
    doubled = t([math.log(2), math.log(2)])
    # A > 0, ratio 2: the clipped term (-1.2) is the max, so the gain is capped
    loss, stats = policy_loss(doubled, old, t([1.0, 1.0]), t([1, 1]), clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clip_fraction"] == 1
    # A < 0, ratio 2: the unclipped term (2) is the max: a bad move is never hidden by clipping
    loss, stats = policy_loss(doubled, old, t([-1.0, -1.0]), t([1, 1]), clip=0.2)
    assert loss.item() == pytest.approx(2.0) and stats["clip_fraction"] == 0
    masked, _ = policy_loss(doubled, old, t([1.0, -1.0]), t([1, 0]), clip=0.2)
    assert masked.item() == pytest.approx(-1.2)


def test_clipped_value_loss():
    values, old, returns = t([1.0, 0.0]), t([0.0, 0.0]), t([1.0, 0.5])
    # row 0: clipped value 0.2 -> (0.2-1)^2 = 0.64 beats (1-1)^2 = 0; row 1: both 0.25
    loss, stats = value_loss(values, old, returns, t([1, 1]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25) / 2)
    assert stats["value_clip_fraction"] == pytest.approx(0.5)
    loss, _ = value_loss(values, old, returns, t([0, 1]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.25)


def test_entropy_of_uniform_and_peaked():
    uniform = torch.zeros(1, 2, 4)
    assert entropy(uniform, t([1, 1])).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[[50.0, 0, 0, 0], [0, 0, 0, 0]]])
    assert entropy(peaked, t([1, 0])).item() == pytest.approx(0.0, abs=1e-6)
