"""Rollouts: pick episodes, sample replies (single- or multi-turn), pack them, take their log-probs.

A batch is packed as [left-padded prompt | right-padded response], so every response starts at
the same column and per-token tensors are (batch, response_tokens). Position ids follow the
attention mask, exactly as in generation, so the logprobs scored here are those the tokens
were sampled with.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from persona.chat_format import Prompt, render
from persona.config import PPOConfig
from persona.data import Dialogue
from persona.generation import Decoding, Reply, generate
from persona.seeds import derive_seed


@dataclass
class Episode:
    """A prompt and the partner's SPC turns that follow it (used between multi-turn policy turns)."""
    prompt: Prompt
    partner_turns: list[str]


def episodes(dialogues: list[Dialogue], turns: int, max_history: int) -> list[Episode]:
    """Every (dialogue, speaker turn) with history before it and room for `turns` policy turns after."""
    out = []
    for d in dialogues:
        for i in range(1, len(d.turns) - 2 * (turns - 1)):
            speaker = d.turns[i][0]
            follow = d.turns[i + 1: i + 2 * (turns - 1): 2]
            if any(who == speaker for who, _ in follow):
                continue  # the partner must speak between policy turns
            out.append(Episode(Prompt.at(d, i, max_history), [text for _, text in follow]))
    return out


def sample_order(n: int, step: int, seed: int) -> list[int]:
    """A fresh seeded permutation of the episodes for each pass over them."""
    order = list(range(n))
    random.Random(derive_seed(seed, "episode-order", step)).shuffle(order)
    return order


def episode_indices(n: int, step: int, per_process: int, process: int, processes: int, seed: int) -> list[int]:
    """The episodes a process rolls out at `step`: consecutive slices of a fresh permutation per pass."""
    first = (step * processes + process) * per_process
    return [sample_order(n, (first + k) // n, seed)[(first + k) % n] for k in range(per_process)]


def exact_decoding(cfg: PPOConfig, seed: int) -> Decoding:
    """The rollout sampler: the full softmax at `cfg.temperature`, no top-k or nucleus cut, i.e. exactly the
    distribution `token_logprobs` scores, so importance ratios and KL estimates are on-policy."""
    return Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
                    batch_size=cfg.batch_size, seed=seed)


@dataclass
class Sample:
    chat: list[dict]  # the context the reply was generated for
    reply: Reply


def rollout(model, tokenizer, batch: list[Episode], turns: int, decoding: Decoding, with_logprobs: bool = False
            ) -> list[Sample]:
    """Policy replies for each episode; with turns > 1 each reply joins the context of the next turn.
    `with_logprobs`: each reply also carries the sampler's log-prob of its tokens."""
    chats = [e.prompt.chat() for e in batch]
    samples = []
    for k in range(turns):
        step_decoding = replace(decoding, seed=derive_seed(decoding.seed, "turn", k))
        replies = generate(model, tokenizer, chats, step_decoding, with_logprobs=with_logprobs)
        samples += [Sample(chat, reply) for chat, reply in zip(chats, replies)]
        if k + 1 < turns:
            chats = [chat + [{"role": "assistant", "content": r.text}, {"role": "user", "content": e.partner_turns[k]}]
                     for chat, r, e in zip(chats, replies, batch)]
    return samples


@dataclass
class Packed:
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # (B, R), 1 on generated tokens (end-of-turn included)
    prompt_width: int  # P

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device) -> Packed:
        return Packed(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                      self.prompt_width)

    def rows(self, index: torch.Tensor) -> Packed:
        return Packed(self.input_ids[index], self.attention_mask[index], self.response_mask[index], self.prompt_width)


def pack(tokenizer, samples: list[Sample]) -> Packed:
    prompts = [tokenizer(render(tokenizer, s.chat, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for s in samples]
    responses = [s.reply.token_ids or [tokenizer.eos_token_id] for s in samples]
    width, length = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((len(samples), width + length), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids[row, width - len(prompt):width] = torch.tensor(prompt)
        ids[row, width:width + len(response)] = torch.tensor(response)
        attention[row, width - len(prompt):width + len(response)] = 1
        response_mask[row, :len(response)] = 1
    return Packed(ids, attention, response_mask, width)


def sampler_logprobs(samples: list[Sample], packed: Packed) -> torch.Tensor:
    """(B, R): the sampler's log-prob of each response token, laid out as `pack` lays out the tokens."""
    out = torch.zeros(packed.response_mask.shape, dtype=torch.float32)
    for row, sample in enumerate(samples):
        out[row, :len(sample.reply.logprobs)] = torch.tensor(sample.reply.logprobs)
    return out.to(packed.response_mask.device)


def response_logits(model, packed: Packed, temperature: float, with_hidden: bool = False):
    """Logits (B, R, V) scaled by the sampling temperature for each response token, and optionally the
    final hidden states (B, R, H) of the positions that predict them."""
    length = packed.response_mask.shape[1]
    out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids,
                logits_to_keep=length + 1, output_hidden_states=with_hidden, use_cache=False)
    logits = out.logits[:, :-1].float() / max(temperature, 1e-6)
    hidden = out.hidden_states[-1][:, -length - 1:-1] if with_hidden else None
    return logits, hidden


def token_logprobs(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """log p of each generated token (B, R); padding positions are 0."""
    targets = packed.input_ids[:, packed.prompt_width:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp * packed.response_mask
