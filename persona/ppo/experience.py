"""Experience making: a batch of episodes in, every tensor the PPO update reads out.

rollout (sample replies) -> pack -> policy log-probs and values, reference log-probs -> reward-model
scores -> per-token rewards (k1 KL penalty) -> GAE -> whitening. Sampling and scoring run under the
same autocast as the update, so the log-probs the PPO ratio divides by are those the tokens were
drawn with (`sampler_gap` measures how closely).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from persona.config import PPOConfig
from persona.models import policy as switch_to
from persona.ppo.advantages import gae, token_rewards, whiten
from persona.ppo.kl import kl_per_token
from persona.ppo.policy import reference_name
from persona.ppo.rollout import (
    Episode,
    Packed,
    Sample,
    exact_decoding,
    pack,
    response_logits,
    rollout,
    sampler_logprobs,
    token_logprobs,
)
from persona.ppo.sampler import MergedSampler

# The largest sampler-vs-scorer log-prob gap (nats, any one response token) a run accepts on its first
# rollout, by compute precision. Sampler and scorer share the weights and the autocast; they differ only in
# how the forward is split (KV-cached, a token at a time, vs the whole sequence at once), i.e. in rounding.
# fp32, measured here (CPU): the tiny test Llama 1e-6; SmolLM2-135M 2.3e-5 (3 batches, 740 tokens, temperature
# 0.8). 1e-3 is 40x that, and any reshaping of the distribution (a top-k or min_p cut, a repetition penalty)
# moves some sampled token's log-prob by far more.
# bf16, fp16: NOT measured on a GPU (none was available). Rounding bounds them: two summation orders can round
# a logit of magnitude L one unit in the last place apart (L * 2^-7 in bf16, L * 2^-10 in fp16), which moves a
# log-prob by up to ~2 ulp / temperature: 0.31 (bf16) and 0.04 (fp16) for SmolLM2's logits (L < 32) at 0.8,
# 0.16 in fp16 for GPT-2's (L ~ 100). CPU autocast on SmolLM2-135M, same batches, agrees: max 0.30 (bf16) and
# 0.037 (fp16). The bounds leave ~3x for longer batches and deeper models: a truncation of the softmax, which
# the guard is for, still shows above them somewhere in a batch, but a gap under them is not proof of none.
SAMPLER_GAP_BOUNDS = {"fp32": 1e-3, "bf16": 1.0, "fp16": 0.3}


@dataclass(frozen=True)
class Setup:
    """What every PPO step of this process runs with."""
    accelerator: object  # accelerate.Accelerator: device, autocast, reductions over processes
    module: torch.nn.Module  # PolicyWithValue after accelerator.prepare (DDP-wrapped over several processes)
    tokenizer: object
    reward_model: object  # score_chats(chats) -> one float per chat (persona.reward.RewardModel)
    reward_stats: dict | None  # the reward stage's held-out score_mean/score_std; None = raw scores
    cfg: PPOConfig
    sampler: MergedSampler | None = None  # what rollouts generate from (ppo.sampler: merged); None = the policy

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.module)

    def mean(self, value) -> float:
        """`value`'s mean over processes (every process must call it: it is a collective)."""
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, "mean").item()


@dataclass
class Experience:
    """One scored rollout batch. B = rows (the batch's episodes x turns, on this process), P = prompt
    width (prompts left-padded), R = response width (replies right-padded); (B, R) tensors are 0 on padding.

    packed: input_ids, attention_mask (B, P + R); response_mask (B, R), 1 on generated tokens; P
    old_logprobs (B, R): the policy's log-prob of each sampled token at sampling time (the ratio's denominator)
    ref_logprobs (B, R): the reference's log-prob of the same tokens
    values (B, R): the value head's estimate before each token, at sampling time
    rewards (B, R): -kl_coef * k1 on every token (kl_estimator k1; none with k2) + the score on the last token
    advantages (B, R): GAE of the rewards, whitened over the batch when ppo.whiten_advantages
    returns (B, R): advantages + values (before whitening): the value head's targets
    scores (B,): the reward: the normalised reward-model score + the missing-eos penalty of a cut-off reply
    raw_scores (B,): the reward model's raw score
    """
    packed: Packed
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    raw_scores: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.packed.response_mask.float()

    def __len__(self) -> int:
        return self.packed.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> Experience:
        """A minibatch: rows `index` of every tensor."""
        return Experience(self.packed.rows(index), *(getattr(self, f.name)[index]
                                                     for f in dataclasses.fields(self) if f.name != "packed"))


@torch.no_grad()
def score_replies(setup: Setup, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward per sample: normalised score + the penalty for a reply cut off, raw reward-model score)."""
    raw = torch.tensor(setup.reward_model.score_chats([s.chat + [{"role": "assistant", "content": s.reply.text}]
                                                       for s in samples]))
    stats = setup.reward_stats
    scores = (raw - stats["score_mean"]) / max(stats["score_std"], 1e-6) if stats else raw.clone()
    cut = torch.tensor([not s.reply.finished for s in samples])
    return scores + setup.cfg.missing_eos_penalty * cut, raw


@torch.no_grad()
def sample(setup: Setup, batch: list[Episode], turns: int, seed: int, with_logprobs: bool = False) -> list[Sample]:
    """The policy's replies to `batch`, drawn from the distribution `score_tokens` scores: by the policy itself
    or by its merged copy, refreshed to the policy's current weights."""
    generator = setup.sampler.refresh() if setup.sampler else setup.unwrapped.policy
    with setup.accelerator.autocast():
        return rollout(generator, setup.tokenizer, batch, turns, exact_decoding(setup.cfg, seed), with_logprobs)


@torch.no_grad()
def score_tokens(setup: Setup, packed: Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy log-probs, values, reference log-probs), each (B, R), computed as the update computes them."""
    module, temperature = setup.unwrapped, setup.cfg.temperature
    module.eval()
    with setup.accelerator.autocast():
        logits, values = module(packed.input_ids, packed.attention_mask, packed.response_mask,
                                packed.prompt_width, temperature)
        logprobs = token_logprobs(logits, packed)
        del logits  # (B, R, vocabulary): the largest tensor here
        with switch_to(module.policy, reference_name(setup.cfg.reference)) as reference:
            ref_logprobs = token_logprobs(response_logits(reference, packed, temperature)[0], packed)
    return logprobs, values * packed.response_mask, ref_logprobs


def sampler_gap(setup: Setup, samples: list[Sample], packed: Packed, logprobs: torch.Tensor) -> float:
    """The largest |sampler - scorer| log-prob of any response token, over every process."""
    gap = ((sampler_logprobs(samples, packed) - logprobs).abs() * packed.response_mask).max()
    return setup.accelerator.gather(gap[None]).max().item()


def check_sampler_gap(gap: float, precision: str) -> None:
    """Stop a run whose sampler does not draw from the distribution PPO scores: its ratios and KL are off-policy."""
    if gap > SAMPLER_GAP_BOUNDS[precision]:
        raise RuntimeError(f"sampler and scorer disagree: a sampled token's log-prob differs by {gap:.3g} nats "
                           f"(bound {SAMPLER_GAP_BOUNDS[precision]:g} in {precision}); something reshapes the "
                           "sampling distribution (a top-k, top-p or min_p cut, or a repetition penalty, from the "
                           "model's generation_config?)")


@torch.no_grad()
def make_experience(setup: Setup, batch: list[Episode], kl_coef: float, seed: int, measure_sampler: bool = False
                    ) -> tuple[Experience, dict]:
    """Roll out `batch` and score it: the Experience, and the batch's statistics (averaged over processes;
    with `measure_sampler`, also `sampler_logprob_gap_max`)."""
    cfg = setup.cfg
    started = time.perf_counter()
    samples = sample(setup, batch, cfg.turns, seed, measure_sampler)
    generation_s = time.perf_counter() - started
    packed = pack(setup.tokenizer, samples).to(setup.accelerator.device)
    mask = packed.response_mask.float()
    logprobs, values, ref_logprobs = score_tokens(setup, packed)
    scores, raw = (t.to(mask.device) for t in score_replies(setup, samples))
    k1 = kl_per_token(logprobs, ref_logprobs, "k1") * mask
    # k1 is the penalty in the reward; k2 is a loss term of the update instead (persona/ppo/kl.py says why)
    rewards = token_rewards(scores, k1, mask, kl_coef if cfg.kl_estimator == "k1" else 0.0)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    experience = Experience(packed, logprobs, ref_logprobs, values, rewards, advantages, returns, scores, raw)
    stats = {"reward": setup.mean(raw.mean()), "reward_normalised": setup.mean(scores.mean()),
             "kl": setup.mean(k1.sum(1).mean()),
             "kl_k3": setup.mean((kl_per_token(logprobs, ref_logprobs, "k3") * mask).sum(1).mean()),
             "kl_coef": kl_coef, "response_length": setup.mean(mask.sum(1).mean()),
             "finished_rate": setup.mean(np.mean([s.reply.finished for s in samples])),
             "rollout_tokens_per_s": setup.mean(mask.sum().item() / generation_s) * setup.accelerator.num_processes}
    if measure_sampler:
        stats["sampler_logprob_gap_max"] = sampler_gap(setup, samples, packed, logprobs)
    return experience, stats
