"""Evaluation's likelihood scoring: the LM head runs only on positions that predict a scored token.

persona/likelihood.py takes logits at every position, as training needs. Scoring a 12-token reply
after a 160-token prompt needs 13 of them, and for a small model the vocabulary projection and its
softmax are a fifth or more of the forward pass (SmolLM2-135M: 49k x 576 against ~106M body
weights). Sequences are tokenised once (`ScoringRows`) and scored under every policy. Kept apart
from likelihood.py so the training stages, which depend on that file, are not invalidated.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from tqdm import tqdm

from persona.chat_format import encode_messages, messages_for
from persona.likelihood import collate
from persona.models import eval_mode


class ChatScorer(ABC):
    """What every reward (persona.reward.load_scorer) offers: `score_chats(chats)`, one float per chat (system
    persona, history, final assistant reply), and `score(personas, histories, responses)` on plain strings."""

    @abstractmethod
    def score_chats(self, chats: list[list[dict]]) -> list[float]:
        """One score per chat, in input order."""

    def score(self, personas: list[list[str]], histories: list[list[str]], responses: list[str]) -> list[float]:
        """A history is the dialogue so far as plain strings, oldest first, ending with the partner's turn; the
        response is the persona speaker's next turn."""
        if not len(personas) == len(histories) == len(responses):
            raise ValueError("score: personas, histories and responses must have the same length")
        chats = []
        for facts, history, response in zip(personas, histories, responses):
            turns = [(0 if (len(history) - i) % 2 == 0 else 1, text) for i, text in enumerate(history)]
            chats.append(messages_for(facts, [*turns, (0, response)], 0))
        return self.score_chats(chats)


@dataclass(frozen=True)
class CandidateSet:
    """One prompt's shared prefix and its candidate continuations, tokenised once for every policy."""
    prefix: list[int]  # the tokens before the one whose logits predict a reply's first token
    rows: list[dict]  # per candidate: input_ids / completion_mask from the prefix's last token on


def chat_rows(tokenizer, chats: list[list[dict]]) -> list[dict]:
    """Each chat tokenised with its final assistant message (and end-of-turn) as the scored part."""
    rows = []
    for chat in chats:
        encoded = encode_messages(tokenizer, chat, "last")
        rows.append({"input_ids": encoded.input_ids, "completion_mask": encoded.completion_mask})
    return rows


def candidate_set(tokenizer, chat: list[dict], candidates: list[str]) -> CandidateSet | list[dict]:
    """The candidates as continuations of one shared prefix, or plain rows when the chat template
    renders the prompt differently per candidate (then nothing is shared)."""
    rows = chat_rows(tokenizer, [chat + [{"role": "assistant", "content": c}] for c in candidates])
    start = min(r["completion_mask"].index(1) for r in rows) - 1  # the token whose logits predict the reply
    prefix = rows[0]["input_ids"][:start]
    if start < 1 or any(r["input_ids"][:start] != prefix for r in rows):
        return rows
    return CandidateSet(prefix, [{key: r[key][start:] for key in ("input_ids", "completion_mask")} for r in rows])


def _sums(model, ids, attention, mask, cache=None) -> tuple[list[float], list[int]]:
    """Per-row summed NLL and count of the masked tokens; logits only where a masked token is predicted."""
    predicts = torch.zeros_like(mask, dtype=torch.bool)
    predicts[:, :-1] = mask[:, 1:].bool()
    extra = {} if cache is None else {"cache": cache}
    logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=predicts, **extra).logits
    targets = ids[:, 1:][mask[:, 1:].bool()]
    logits = logits.reshape(len(targets), -1)
    # half-precision logits are scored in float32; float64 (the tests' exact reference) stays float64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = predicts.nonzero()[:, 0]
    sums = torch.zeros(len(ids), dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)
    return sums.tolist(), predicts.sum(1).tolist()


@torch.no_grad()
def row_scores(model, rows: list[dict], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each row's completion tokens, in input order; batches sorted by length."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with eval_mode(model):
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="score", unit="batch", leave=False, disable=len(batches) < 4):
            chunk = order[start:start + batch_size]
            tensors = (t.to(device) for t in collate([rows[i] for i in chunk], pad_id))
            for i, total, count in zip(chunk, *_sums(model, *tensors)):
                results[i] = (total, count)
    return results


def mean_logprobs(model, rows: list[dict], pad_id: int, batch_size: int) -> list[float]:
    """Mean log-probability per completion token of each row."""
    return [-total / max(count, 1) for total, count in row_scores(model, rows, pad_id, batch_size)]


@torch.no_grad()
def candidate_logprobs(model, candidates: CandidateSet | list[dict], pad_id: int, batch_size: int) -> list[float]:
    """`mean_logprobs` of each candidate; a shared prefix is encoded once and its KV cache copied per batch,
    so 20 candidates cost one prompt plus 20 short replies instead of 20 full sequences."""
    if not isinstance(candidates, CandidateSet):
        return mean_logprobs(model, candidates, pad_id, batch_size)
    device = next(model.parameters()).device
    scores = []
    with eval_mode(model):
        cache = model(input_ids=torch.tensor([candidates.prefix], device=device), use_cache=True,
                      logits_to_keep=1).cache
        for first in range(0, len(candidates.rows), batch_size):
            rows = candidates.rows[first:first + batch_size]
            ids, attention, mask = (t.to(device) for t in collate(rows, pad_id))
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(rows))
            prefix_attention = torch.ones(len(rows), len(candidates.prefix), dtype=attention.dtype, device=device)
            sums, counts = _sums(model, ids, torch.cat([prefix_attention, attention], 1), mask, batch_cache)
            scores += [-total / max(count, 1) for total, count in zip(sums, counts)]
    return scores
