"""A reward that needs no training (`reward.kind: likelihood`): how much the persona explains the reply.

    score = mean log p(reply | persona) - contrast over K other personas of mean log p(reply | other persona)
            - copy_penalty x (persona facts the reply copies) - repeat_penalty x (the reply repeats a sentence)

Log-probabilities are per reply token under the frozen SFT model (its LoRA merged in), with the same history.
The contrast (`reward.likelihood_contrast`) is the others' mean, or their max: a margin over the persona that fits
the reply best after the true one, above 0 only when the true persona explains the reply better than every other,
which is what persona Hits@1 asks of a policy; the mean also pays for beating personas that never competed.
A reply that only fits the conversation scores about 0 whatever its style or length, since the style is the same
under every persona; one that uses the persona scores above 0. Reciting the persona would score highest of all,
which is what policies trained on persona-consistency rewards alone learned to do (they loop their facts): the
copy penalty (persona.metrics.copies_fact, the evaluation's fact-copy measure) and the repetition penalty
(persona.metrics.repeats_a_sentence) are there to take that gain back.

The K other personas of a prompt are drawn from the training split's personas with a seed taken from the prompt
(persona and history), so every reply to the same prompt is compared against the same personas: the scores of
GRPO's group, or of SFT's and the policy's held-out replies, differ by the replies alone.
"""
from __future__ import annotations

import hashlib
import json
import random
import zlib
from pathlib import Path

import torch

from persona import metrics as M
from persona.chat_format import PERSONA_HEADER, persona_prompt
from persona.data import persona_key
from persona.scoring import ChatScorer, chat_rows, mean_logprobs

CONFIG = "likelihood.json"  # in the reward folder: K, the contrast, the penalties, the persona pool, the SFT digest
# what the reply's log-probability under its persona is compared with: the K others' mean or their max
CONTRASTS = {"mean": lambda others: sum(others) / len(others), "max": max}


def facts_of(chat: list[dict]) -> list[str]:
    """The persona facts of a chat's system message (chat_format.persona_prompt, read back)."""
    header, _, facts = chat[0]["content"].partition("\n")
    if chat[0]["role"] != "system" or header != PERSONA_HEADER:
        raise ValueError("likelihood reward: a chat must open with the persona system message (persona_prompt)")
    return facts.split("\n") if facts else []


class LikelihoodReward(ChatScorer):
    """`score_chats(chats)`: one score per chat (system persona, history, final assistant reply), as RewardModel."""

    def __init__(self, model, tokenizer, personas: list[list[str]], k: int, copy_penalty: float,
                 repeat_penalty: float, batch_size: int = 16, contrast: str = "mean"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pool = {persona_key(p): p for p in personas}
        if len(self.pool) < k + 1:
            raise ValueError(f"likelihood reward: {k} other personas asked for, {len(self.pool)} in the pool")
        self.keys = sorted(self.pool)
        if contrast not in CONTRASTS:
            raise ValueError(f"likelihood reward: contrast {contrast!r}, not one of {sorted(CONTRASTS)}")
        self.k, self.copy_penalty, self.repeat_penalty = k, copy_penalty, repeat_penalty
        self.contrast = contrast
        self.batch_size = batch_size

    def others(self, chat: list[dict], facts: list[str]) -> list[list[str]]:
        """K personas other than `facts`, the same for every reply to this prompt."""
        prompt = json.dumps(chat[:-1], sort_keys=True)
        rng = random.Random(zlib.crc32(prompt.encode()))
        own = persona_key(facts)
        picked = []
        for key in rng.sample(self.keys, min(len(self.keys), self.k + 1)):
            if key != own and len(picked) < self.k:
                picked.append(self.pool[key])
        return picked

    def parts(self, chats: list[dict]) -> dict[str, list[float]]:
        """Per chat: the likelihood gain (nats/token), facts copied, and whether a sentence repeats."""
        variants, facts = [], []
        for chat in chats:
            facts.append(facts_of(chat))
            for persona in [facts[-1], *self.others(chat, facts[-1])]:
                variants.append([{"role": "system", "content": persona_prompt(persona)}, *chat[1:]])
        logps = mean_logprobs(self.model, chat_rows(self.tokenizer, variants), self.tokenizer.pad_token_id,
                              self.batch_size)
        step = self.k + 1
        contrast = CONTRASTS[self.contrast]
        gains = [logps[i] - contrast(logps[i + 1:i + step]) for i in range(0, len(logps), step)]
        replies = [chat[-1]["content"] for chat in chats]
        return {"gain": gains,
                "facts_copied": [float(M.facts_copied(reply, persona)) for reply, persona in zip(replies, facts)],
                "repeats": [float(M.repeats_a_sentence(reply)) for reply in replies]}

    def score_chats(self, chats: list[list[dict]]) -> list[float]:
        if not chats:
            return []
        parts = self.parts(chats)
        return [gain - self.copy_penalty * copied - self.repeat_penalty * repeats
                for gain, copied, repeats in zip(parts["gain"], parts["facts_copied"], parts["repeats"])]

    @classmethod
    def load(cls, base_path: Path, reward_path: Path, sft_path: Path, device: str | None = None,
             batch_size: int = 16, dtype: torch.dtype = torch.float32) -> LikelihoodReward:
        """The scorer a reward stage described (`config_text`): base + the SFT adapter it was made with, merged."""
        config = json.loads((reward_path / CONFIG).read_text())
        if adapter_digest(sft_path) != config["sft_adapter_sha256"]:
            raise ValueError(f"{sft_path}: not the SFT adapter the reward at {reward_path} was made with; rerun reward")
        model, tokenizer = load_sft_merged(base_path, sft_path, dtype, device)
        return cls(model, tokenizer, config["personas"], config["k"], config["copy_penalty"],
                   config["repeat_penalty"], batch_size, config.get("contrast", "mean"))  # older folders: mean


def load_sft_merged(base_path: Path, sft_path: Path, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(the frozen SFT policy as a plain model, its LoRA merged in: no adapter overhead per token; tokenizer)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (sft_path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{sft_path}: no SFT adapter; run the `sft` stage first")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(sft_path)).merge_and_unload()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def adapter_digest(sft_path: Path) -> str:
    return hashlib.sha256((sft_path / "adapter_model.safetensors").read_bytes()).hexdigest()


def config_text(sft_path: Path, personas: list[list[str]], k: int, copy_penalty: float, repeat_penalty: float,
                contrast: str) -> str:
    """The reward folder's description of the scorer (`LikelihoodReward.load` reads it): K, the contrast, the
    penalties, the persona pool (unique, in a fixed order) and the SFT adapter's digest."""
    unique = {persona_key(p): p for p in personas}
    return json.dumps({"k": k, "contrast": contrast, "copy_penalty": copy_penalty, "repeat_penalty": repeat_penalty,
                       "sft_adapter_sha256": adapter_digest(sft_path),
                       "personas": [unique[key] for key in sorted(unique)]}, indent=1) + "\n"
