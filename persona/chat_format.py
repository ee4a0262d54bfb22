"""Persona + dialogue history -> chat messages -> token ids with a loss mask.

The one place prompts are built, so SFT, pairs, PPO, evaluation and chat cannot drift apart.
The persona is the system turn; the persona speaker is `assistant`, the partner `user`.
Models without a chat template (GPT-2) get `PROJECT_TEMPLATE` set as theirs, so one code
path serves both. Loss masks come from character spans of each assistant message in the
rendered text, mapped to tokens through the fast tokenizer's offsets; that works for any
template whose rendering of a prefix of the messages is a prefix of the full rendering.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from persona.config import ConfigError
from persona.data import Dialogue

PERSONA_HEADER = "You are chatting with a new friend. Stay true to your persona:"

# The original recipe's [PERSONA] ... [DIALOGUE] ... [RESPONSE] layout, as a Jinja chat template.
PROJECT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[PERSONA] {{ message['content'] }}\n[DIALOGUE]\n"
    "{% elif message['role'] == 'user' %}[USER] {{ message['content'] }}\n"
    "{% else %}[RESPONSE] {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[RESPONSE]{% endif %}"  # no trailing space: BPE glues it to the next word
)


def persona_prompt(facts: list[str]) -> str:
    return PERSONA_HEADER + "\n" + "\n".join(facts)


def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer the project template and a pad token; True if changed."""
    changed = False
    if not tokenizer.chat_template:
        tokenizer.chat_template = PROJECT_TEMPLATE
        changed = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        changed = True
    return changed


def messages_for(facts: list[str], turns: list[tuple[int, str]], speaker: int) -> list[dict]:
    """Messages as `speaker` sees the dialogue: their persona as system, their turns as assistant."""
    messages = [{"role": "system", "content": persona_prompt(facts)}]
    messages += [{"role": "assistant" if who == speaker else "user", "content": text} for who, text in turns]
    return messages


@dataclass
class Prompt:
    """One evaluation item: a speaker's persona, the dialogue so far, and the gold next reply."""
    dialogue: str
    speaker: int
    facts: list[str]
    history: list[tuple[int, str]]
    gold: str

    @classmethod
    def at(cls, dialogue: Dialogue, turn: int, max_history: int) -> Prompt:
        """Turn `turn` of `dialogue` as the gold reply, its speaker's persona, up to `max_history` turns before."""
        speaker, gold = dialogue.turns[turn]
        return cls(dialogue.id, speaker, dialogue.personas[speaker], dialogue.turns[max(0, turn - max_history):turn],
                   gold)

    def chat(self, facts: list[str] | None = None, reply: str | None = None) -> list[dict]:
        turns = self.history + ([(self.speaker, reply)] if reply is not None else [])
        return messages_for(self.facts if facts is None else facts, turns, self.speaker)


def select_prompts(dialogues: list[Dialogue], n: int, max_history: int, seed: int) -> list[Prompt]:
    """n seeded (dialogue, speaker, turn) items with at least one earlier turn as history."""
    items = [(d, i) for d in dialogues for i in range(1, len(d.turns))]
    chosen = random.Random(seed).sample(items, min(n, len(items)))
    return [Prompt.at(d, i, max_history) for d, i in chosen]


@dataclass
class Encoded:
    input_ids: list[int]
    completion_mask: list[int]  # 1 on tokens the loss is taken on
    responses: int  # assistant messages trained on


def encode_messages(tokenizer, messages: list[dict], train_on: str = "all", max_length: int | None = None
                    ) -> Encoded | None:
    """Tokenise a chat with loss on assistant messages (`all`, or only the `last` one).

    Too-long chats lose their trailing messages (`all`) or their oldest history (`last`), at
    message boundaries so no response is cut mid-way; None if nothing trainable fits.
    """
    while True:
        encoded = _encode(tokenizer, messages, train_on)
        if max_length is None or len(encoded.input_ids) <= max_length:
            return encoded if encoded.responses else None
        if train_on == "all":
            messages = _without_trailing(messages)
        else:
            messages = [messages[0]] + messages[2:]
        if not any(m["role"] == "assistant" for m in messages[1:]):
            return None


def _without_trailing(messages: list[dict]) -> list[dict]:
    messages = messages[:-1]
    while len(messages) > 1 and messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    return messages


def _encode(tokenizer, messages: list[dict], train_on: str) -> Encoded:
    text = render(tokenizer, messages)
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        targets = targets[-1:]
    spans = []
    for index in targets:
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        full = render(tokenizer, messages[: index + 1]).rstrip()
        if not (text.startswith(full) and full.startswith(prompt)):
            raise ConfigError("model.name: its chat template does not render message prefixes as text prefixes, "
                              "so loss masks cannot be located; use a model whose template does, or one without one")
        spans.append((len(prompt), len(full)))
    tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # Overlap, not start: a byte-level BPE token may carry the space before a reply's first word.
    mask = [int(any(begin < e and end > s for s, e in spans)) for begin, end in tokens["offset_mapping"]]
    return Encoded(tokens["input_ids"], mask, len(spans))


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def dialogue_examples(dialogue: Dialogue, tokenizer, layout: str, max_length: int) -> list[Encoded]:
    """Training sequences for both speakers of a dialogue.

    `conversation`: one sequence per speaker, loss on all of that speaker's turns (the history
    is encoded once). `turn`: one sequence per speaker turn, loss on that turn only.
    """
    examples = []
    for speaker in (0, 1):
        messages = messages_for(dialogue.personas[speaker], dialogue.turns, speaker)
        if layout == "conversation":
            candidates = [encode_messages(tokenizer, messages, "all", max_length)]
        else:
            ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
            candidates = [encode_messages(tokenizer, messages[:end], "last", max_length) for end in ends]
        examples += [c for c in candidates if c is not None]
    return examples


def build_dataset(dialogues: list[Dialogue], tokenizer, layout: str, max_length: int, limit: int = 0):
    """Tokenised training rows for both speakers of every dialogue (`limit` > 0 caps the rows)."""
    from datasets import Dataset

    rows = {"input_ids": [], "completion_mask": [], "responses": []}
    for dialogue in dialogues:
        for example in dialogue_examples(dialogue, tokenizer, layout, max_length):
            rows["input_ids"].append(example.input_ids)
            rows["completion_mask"].append(example.completion_mask)
            rows["responses"].append(example.responses)
            if limit and len(rows["input_ids"]) >= limit:
                return Dataset.from_dict(rows)
    return Dataset.from_dict(rows)
