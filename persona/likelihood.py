"""Log-likelihoods of loss-masked tokens: perplexity, reply scoring, persona ranking.

Shared by SFT (held-out perplexity), evaluation (persona likelihood gain, Hits@1) and the
benchmarks, so every figure uses the same masking as training.
"""
from __future__ import annotations

import copy

import torch

from persona.chat_format import encode_messages
from persona.models import eval_mode


def collate(rows: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, completion_mask) tensors."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        attention[i, :n] = 1
        mask[i, :n] = torch.tensor(row["completion_mask"])
    return ids, attention, mask


def masked_nll(model, ids, attention, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token NLL over loss-masked tokens, and per-row token counts."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    target = mask[:, 1:].to(nll.dtype)
    return (nll * target).sum(1), target.sum(1)


@torch.no_grad()
def row_nll(model, rows: list[dict], pad_id: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL, token count) per row, in input order; batches sorted by length for little padding."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            tensors = (t.to(device) for t in collate([rows[i] for i in chunk], pad_id))
            sums, counts = masked_nll(model, *tensors)
            for i, total, count in zip(chunk, sums.tolist(), counts.tolist()):
                results[i] = (total, int(count))
    return results


def completion_nll(model, dataset, pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean NLL per loss-masked token over a dataset, and the token count.

    Token-weighted over the whole set (the Trainer's eval_loss averages batch means instead),
    so exp() of it is the perplexity of the persona speaker's replies.
    """
    results = row_nll(model, [dataset[i] for i in range(len(dataset))], pad_id, batch_size)
    count = sum(c for _, c in results)
    return sum(t for t, _ in results) / max(count, 1), count


def reply_logprobs(model, tokenizer, chats: list[list[dict]], batch_size: int = 8) -> list[float]:
    """Mean log-probability per token of each chat's final assistant message (and its end-of-turn)."""
    rows = []
    for chat in chats:
        encoded = encode_messages(tokenizer, chat, "last")
        rows.append({"input_ids": encoded.input_ids, "completion_mask": encoded.completion_mask})
    return [-total / max(count, 1) for total, count in row_nll(model, rows, tokenizer.pad_token_id, batch_size)]


@torch.no_grad()
def candidate_logprobs(model, tokenizer, chat: list[dict], candidates: list[str], batch_size: int = 8) -> list[float]:
    """`reply_logprobs` of many candidate replies to one chat, encoding the shared prompt once.

    The prompt's KV cache is computed once and copied per batch, so ranking 20 candidates
    costs about one prompt plus 20 short replies instead of 20 full sequences.
    """
    device = next(model.parameters()).device
    encoded = [encode_messages(tokenizer, chat + [{"role": "assistant", "content": c}], "last") for c in candidates]
    start = min(e.completion_mask.index(1) for e in encoded) - 1  # the token whose logits predict the reply
    prefix = encoded[0].input_ids[:start]
    if any(e.input_ids[:start] != prefix for e in encoded) or start < 1:
        return reply_logprobs(model, tokenizer, [chat + [{"role": "assistant", "content": c}] for c in candidates],
                              batch_size)
    scores = []
    with eval_mode(model):
        cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache
        for first in range(0, len(encoded), batch_size):
            rows = [{"input_ids": e.input_ids[start:], "completion_mask": e.completion_mask[start:]}
                    for e in encoded[first:first + batch_size]]
            ids, attention, mask = (t.to(device) for t in collate(rows, tokenizer.pad_token_id))
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(rows))
            full_attention = torch.cat([torch.ones(len(rows), start, dtype=attention.dtype, device=device),
                                        attention], 1)
            logits = model(input_ids=ids, attention_mask=full_attention, cache=batch_cache).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            target = mask[:, 1:].to(nll.dtype)
            scores += (-(nll * target).sum(1) / target.sum(1).clamp(min=1)).tolist()
    return scores
