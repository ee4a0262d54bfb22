"""The align stage's held-out reward: the SFT policy and the aligned one sampled on the same valid prompts and
scored by the reward model, so every algorithm's `metrics/align.json` reports the same comparison.

Prompts are single-turn episodes of the valid split in a seeded order (PPO's `load_episodes` draws the same ones
for the same `eval_n` and `max_history_turns`). Replies sample the full softmax (top_k 0, top_p 1), as PPO's
rollouts do. Under several processes each samples its share and the rewards are gathered in prompt order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from persona import metrics as M
from persona.data import read_dialogues
from persona.generation import Decoding, generate
from persona.ppo.rollout import Episode, episodes, sample_order


def held_out_prompts(prepared: Path, n: int, max_history: int, seed: int) -> list[Episode]:
    """The first `n` single-turn episodes of the valid split in the seeded held-out order."""
    prompts = episodes(read_dialogues(prepared / "valid.jsonl"), 1, max_history)
    return [prompts[i] for i in sample_order(len(prompts), -1, seed)[:n]]


def full_softmax(max_new_tokens: int, temperature: float, batch_size: int, seed: int) -> Decoding:
    """Sampling from the whole distribution at `temperature`: no top-k (transformers would fill in 50) or top-p cut."""
    return Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0, batch_size=batch_size,
                    seed=seed)


def sample_chats(model, tokenizer, prompts: list[Episode], decoding: Decoding) -> list[list[dict]]:
    """This process's share of `prompts`, each with the policy's reply appended (the chats the reward model scores)."""
    from accelerate import PartialState

    state = PartialState()
    shard = [e.prompt.chat() for e in prompts[state.process_index::state.num_processes]]
    replies = generate(model, tokenizer, shard, decoding)
    return [chat + [{"role": "assistant", "content": reply.text}] for chat, reply in zip(shard, replies)]


def gathered_scores(reward_model, chats: list[list[dict]], n: int) -> list[float]:
    """Reward-model scores of every process's `sample_chats` share, in prompt order (all `n` prompts)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    mine = list(zip(range(state.process_index, n, state.num_processes), reward_model.score_chats(chats)))
    return [score for _, score in sorted(gather_object(mine))]


def reward_metrics(sft_rewards: list[float], policy_rewards: list[float], seed: int, policy: str) -> dict:
    """Held-out reward of the SFT policy and of `policy` (its `<policy>_reward`), and the paired gain with its
    bootstrap 95% interval."""
    gain = [p - s for p, s in zip(policy_rewards, sft_rewards)]
    summary = M.summarize(gain, seed, 1000) if gain else {}
    return {"eval_prompts": len(sft_rewards),
            "sft_reward": round(float(np.mean(sft_rewards)), 4) if sft_rewards else None,
            f"{policy}_reward": round(float(np.mean(policy_rewards)), 4) if policy_rewards else None,
            "reward_gain": summary.get("mean"), "reward_gain_ci_low": summary.get("ci_low"),
            "reward_gain_ci_high": summary.get("ci_high")}
