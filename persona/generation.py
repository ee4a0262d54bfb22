"""Batched, seeded reply generation: the one place pairs, PPO rollouts, evaluation and chat generate.

Prompts are left-padded (so every row's next token sits at the same position and the KV cache
serves the whole batch) and sorted by length so batches carry little padding; replies come back
in input order. Each batch is seeded from (seed, its first prompt's index), so a reply does not
depend on what else happened to run before it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from persona.chat_format import render
from persona.models import eval_mode
from persona.seeds import derive_seed


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 32
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    # 0 = no truncation; passed on every call, or transformers fills in its own default (50)
    top_k: int = 50
    batch_size: int = 8
    seed: int = 0


@dataclass
class Reply:
    text: str
    token_ids: list[int]  # generated tokens, end-of-turn included, padding excluded
    finished: bool  # ended with end-of-turn rather than at max_new_tokens
    # the sampler's own log-prob of each token in token_ids (after temperature, top-k, top-p); None unless asked
    logprobs: list[float] | None = None


def generate_replies(model, tokenizer, chats: list[list[dict]], decoding: Decoding) -> list[str]:
    """The next assistant reply text for each chat (messages ending with the partner's turn)."""
    return [reply.text for reply in generate(model, tokenizer, chats, decoding)]


def stream_reply(model, tokenizer, chat: list[dict], decoding: Decoding, on_text) -> Reply:
    """One reply, handed to `on_text` piece by piece as it is generated (the terminal chat)."""
    from transformers import TextStreamer

    class Forward(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    streamer = Forward(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate(model, tokenizer, [chat], replace(decoding, batch_size=1), streamer)[0]


@torch.no_grad()
def generate(model, tokenizer, chats: list[list[dict]], decoding: Decoding, streamer=None,
             with_logprobs: bool = False) -> list[Reply]:
    """The next assistant reply for each chat, with its tokens and whether it ended on its own.

    `with_logprobs`: also the log-prob the sampler drew each token with, from the processed scores generate
    returns (one (batch, vocabulary) tensor per step: asked for only when needed).
    """
    with eval_mode(model):
        device = next(model.parameters()).device
        texts = [render(tokenizer, chat, add_generation_prompt=True) for chat in chats]
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        order = sorted(range(len(chats)), key=lambda i: len(encoded[i]))
        replies: list[Reply] = [None] * len(chats)
        batches = range(0, len(order), decoding.batch_size)
        for start in tqdm(batches, desc="generate", unit="batch", leave=False, disable=len(batches) < 4):
            chunk = order[start:start + decoding.batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attention[row, width - len(encoded[i]):] = 1
            torch.manual_seed(derive_seed(decoding.seed, "batch", min(chunk)))
            sampling = {"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p,
                        "top_k": decoding.top_k} if decoding.temperature > 0 else {"do_sample": False}
            output = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                    max_new_tokens=decoding.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, use_cache=True, streamer=streamer,
                                    return_dict_in_generate=True, output_scores=with_logprobs, **sampling)
            generated = output.sequences[:, width:]
            logprobs = sampled_logprobs(output.scores, generated) if with_logprobs else None
            for row, i in enumerate(chunk):
                tokens = generated[row].tolist()
                finished = tokenizer.eos_token_id in tokens
                tokens = tokens[:tokens.index(tokenizer.eos_token_id) + 1] if finished else tokens
                replies[i] = Reply(tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, finished,
                                   logprobs[row, :len(tokens)].tolist() if with_logprobs else None)
    return replies


def sampled_logprobs(scores: tuple[torch.Tensor, ...], generated: torch.Tensor) -> torch.Tensor:
    """(batch, steps) log-prob of each generated token under the distribution it was drawn from: the log-softmax
    of that step's processed scores (temperature, top-k and top-p applied), taken one step at a time."""
    return torch.stack([torch.log_softmax(step.float(), -1).gather(-1, generated[:, k, None]).squeeze(-1)
                        for k, step in enumerate(scores)], 1)
