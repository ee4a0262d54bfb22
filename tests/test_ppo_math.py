"""PPO building blocks on hand-computed tensors: KL estimators, penalties and controllers, GAE, whitening, losses."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

from persona.config import PPOConfig
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
    assert kl_per_token(logp, ref, "k2").tolist() == [pytest.approx([0.5 * math.log(2) ** 2, 0.0])]
    # k1 goes negative when the policy under-weights a sampled token; k2 and k3 never do
    assert kl_per_token(ref, logp, "k1")[0, 0] < 0 < kl_per_token(ref, logp, "k3")[0, 0]
    assert kl_per_token(ref, logp, "k2")[0, 0] > 0
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k4")


KL_ESTIMATORS = typing.get_args(typing.get_type_hints(PPOConfig)["kl_estimator"])


def penalty_gradient(estimator: str, logits: torch.Tensor, ref_logp: torch.Tensor, tokens: torch.Tensor):
    """The gradient, with respect to the policy's logits, of PPO's loss from the KL penalty alone (task score 0)
    on one-token episodes `tokens` sampled from the policy, through the functions the trainer uses."""
    logp = torch.log_softmax(logits, -1)[tokens][:, None]
    ref = ref_logp[tokens][:, None]
    mask = torch.ones_like(logp)
    if estimator == "k2":  # a loss term, differentiated directly
        from persona.ppo.losses import kl_loss
        loss = kl_loss(logp, ref, mask)
    else:  # in the per-token reward, through the policy gradient (ratio 1: old log-probs = current)
        rewards = token_rewards(torch.zeros(len(tokens)), kl_per_token(logp.detach(), ref, estimator), mask, 1.0)
        advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
        loss, _ = policy_loss(logp, logp.detach(), advantages, mask, clip=0.2)
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient


def kl_alignment(estimator: str) -> float:
    """Cosine between the penalty's update direction (averaged over 20,000 samples) and -grad KL(pi || ref)
    for a 6-token policy some way from its (uniform) reference."""
    logits = torch.tensor([1.5, 0.5, 0.0, 0.0, -0.5, -1.0], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.zeros(6, dtype=torch.float64), -1)
    logp = torch.log_softmax(logits, -1)
    (kl_gradient,) = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), logits)
    tokens = torch.multinomial(logp.exp().detach(), 20_000, replacement=True,
                               generator=torch.Generator().manual_seed(0))
    return torch.cosine_similarity(-penalty_gradient(estimator, logits, ref_logp, tokens), -kl_gradient, 0).item()


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_every_allowed_kl_penalty_pushes_down_the_kl(estimator):
    assert kl_alignment(estimator) > 0.99


def test_k3_in_the_reward_would_push_elsewhere():
    """Why k3 is no longer allowed: its reward's gradient is grad KL(pi||ref) - grad KL(ref||pi)."""
    assert kl_alignment("k3") < 0.6


def test_adaptive_controller_follows_ziegler():
    controller = AdaptiveKL(0.1, target=6.0, horizon=100)
    controller.update(9.0, n_samples=10)  # error 0.5 clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(5.4, n_samples=10)  # error -0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = kl_controller(dataclasses.replace(PPOConfig(), kl_coef=0.3, kl_target=0.0), processes=1)
    fixed.update(100.0, 10)
    assert isinstance(fixed, FixedKL) and fixed.value == 0.3


@pytest.mark.parametrize("processes", [1, 2])
def test_the_adaptive_controller_moves_the_coefficient_within_a_short_run(processes):
    """12 steps of 8 episodes (per process), the KL twice the target at every step: the coefficient rises by more
    than half; at half the target it falls by more than a third. The default params, whatever the process count."""
    cfg = dataclasses.replace(PPOConfig(), max_steps=12, rollout_batch_size=8, turns=1)
    above, below = kl_controller(cfg, processes), kl_controller(cfg, processes)
    for _ in range(cfg.max_steps):
        above.update(2 * cfg.kl_target, cfg.rollout_batch_size * processes)
        below.update(0.5 * cfg.kl_target, cfg.rollout_batch_size * processes)
    assert above.value > 1.5 * cfg.kl_coef
    assert below.value < cfg.kl_coef / 1.5


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
