"""The PPO update: `ppo_epochs` passes of clipped-objective steps over shuffled minibatches of one Experience."""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import torch

from persona.ppo.experience import Experience, Setup
from persona.ppo.losses import entropy, kl_loss, policy_loss, value_loss
from persona.ppo.rollout import token_logprobs

log = logging.getLogger(__name__)


def minibatch_loss(setup: Setup, part: Experience, kl_coef: float) -> tuple[torch.Tensor, dict]:
    """The loss of one minibatch (policy + value - entropy bonus, + the k2 KL penalty with kl_estimator k2)
    and its parts, as tensors."""
    cfg, packed = setup.cfg, part.packed
    logits, values = setup.module(packed.input_ids, packed.attention_mask, packed.response_mask,
                                  packed.prompt_width, cfg.temperature)
    logprobs = token_logprobs(logits, packed)
    pg, pg_stats = policy_loss(logprobs, part.old_logprobs, part.advantages, part.mask, cfg.clip_range)
    vf, vf_stats = value_loss(values, part.values, part.returns, part.mask, cfg.value_clip)
    ent = entropy(logits, part.mask)
    parts = {"policy_loss": pg, "value_loss": vf, "entropy": ent, **pg_stats, **vf_stats}
    loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * ent
    if cfg.kl_estimator == "k2":
        parts["kl_loss"] = kl_loss(logprobs, part.ref_logprobs, part.mask)
        loss = loss + kl_coef * parts["kl_loss"]
    return loss, parts


def update(setup: Setup, optimizer, experience: Experience, kl_coef: float) -> dict:
    """Train on `experience`; the mean of each loss and diagnostic over the minibatches taken (averaged over
    processes; the losses are NaN when none was), and `skipped`: minibatches dropped for a non-finite loss."""
    accelerator, module, cfg = setup.accelerator, setup.module, setup.cfg
    module.train()
    history, skipped = defaultdict(list), 0
    for _ in range(cfg.ppo_epochs):
        permutation = torch.randperm(len(experience))
        for start in range(0, len(experience), cfg.minibatch_size):
            part = experience.rows(permutation[start:start + cfg.minibatch_size].to(accelerator.device))
            loss, parts = minibatch_loss(setup, part, kl_coef)
            if setup.mean(float(torch.isfinite(loss).item())) < 1:
                # any process saw NaN/inf: every process skips, or DDP would wait forever for a missing all-reduce
                log.warning("minibatch skipped: non-finite loss (policy %s, value %s)", parts["policy_loss"].item(),
                            parts["value_loss"].item())
                optimizer.zero_grad()
                skipped += 1
                continue
            accelerator.backward(loss)
            parts["grad_norm"] = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            for key, value in parts.items():
                history[key].append(value.item() if torch.is_tensor(value) else value)
    stats = {key: setup.mean(np.mean(series)) for key, series in history.items()}
    return {"policy_loss": float("nan"), "value_loss": float("nan"), **stats, "skipped": float(skipped)}
