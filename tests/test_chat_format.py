"""Prompt formatting and loss masks, checked with the real bundled SmolLM2 tokenizer."""
from __future__ import annotations

import copy

import pytest

from persona.chat_format import (
    PERSONA_HEADER,
    PROJECT_TEMPLATE,
    dialogue_examples,
    encode_messages,
    ensure_chat_template,
    messages_for,
    persona_prompt,
    render,
)
from persona.data import Dialogue

EOT = "<|im_end|>"

FACTS_0 = ["I am a nurse.", "I have two beagles."]
FACTS_1 = ["I drive a truck.", "I love audiobooks."]
TURNS = [
    (0, "Hi there, I just finished a night shift at the hospital."),
    (1, "Long night? I drive trucks so I know that feeling well."),
    (0, "Very long. My beagles were happy to see me though."),
    (1, "Dogs are the best. I listen to audiobooks on the road."),
    (0, "Which audiobook are you listening to right now?"),
]


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """A copy without chat template or pad token, as a GPT-2-like model would come."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = None
    copied.pad_token = None
    assert ensure_chat_template(copied) is True
    return copied


def masked_runs(tokenizer, encoded) -> list[str]:
    """Decoded text of each contiguous run of loss-masked tokens."""
    assert len(encoded.completion_mask) == len(encoded.input_ids)
    runs, current = [], []
    for token, flag in zip(encoded.input_ids, encoded.completion_mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in runs]


def decoded(tokenizer, encoded) -> str:
    return tokenizer.decode(encoded.input_ids, clean_up_tokenization_spaces=False)


def n_tokens(tokenizer, messages) -> int:
    return len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])


# --- messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("speaker", [0, 1])
def test_messages_for_roles(speaker):
    """The persona is the system turn; the speaker's own turns are `assistant`, the partner's `user`."""
    facts = FACTS_0 if speaker == 0 else FACTS_1
    messages = messages_for(facts, TURNS, speaker)
    assert messages[0] == {"role": "system", "content": persona_prompt(facts)}
    assert messages[0]["content"].startswith(PERSONA_HEADER)
    assert all(fact in messages[0]["content"] for fact in facts)
    expected = [{"role": "assistant" if who == speaker else "user", "content": text} for who, text in TURNS]
    assert messages[1:] == expected
    own = [m["content"] for m in messages if m["role"] == "assistant"]
    assert own == [text for who, text in TURNS if who == speaker]


# --- encode_messages with the model's own template ---------------------------------------------------


def test_encode_matches_rendered_text(tokenizer):
    """input_ids are exactly the rendered chat, with no extra special tokens added."""
    messages = messages_for(FACTS_0, TURNS, 0)
    encoded = encode_messages(tokenizer, messages, "all")
    assert decoded(tokenizer, encoded) == render(tokenizer, messages)
    assert encoded.input_ids == tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("speaker", [0, 1])
def test_mask_all_is_exactly_assistant_turns(tokenizer, speaker):
    """`all`: the mask decodes to each assistant content followed by <|im_end|>, and nothing else."""
    facts = FACTS_0 if speaker == 0 else FACTS_1
    messages = messages_for(facts, TURNS, speaker)
    encoded = encode_messages(tokenizer, messages, "all")
    own = [text for who, text in TURNS if who == speaker]
    partner = [text for who, text in TURNS if who != speaker]
    runs = masked_runs(tokenizer, encoded)
    assert runs == [text + EOT for text in own]
    assert encoded.responses == len(own)
    masked = "".join(runs)
    assert "<|im_start|>" not in masked
    assert PERSONA_HEADER not in masked and not any(f in masked for f in facts)
    assert not any(text in masked for text in partner)
    assert "assistant" not in masked and "user" not in masked  # no role headers


def test_mask_last_is_final_assistant_only(tokenizer):
    """`last`: only the final assistant message (and its <|im_end|>) carries loss."""
    messages = messages_for(FACTS_0, TURNS, 0)
    encoded = encode_messages(tokenizer, messages, "last")
    assert masked_runs(tokenizer, encoded) == [TURNS[-1][1] + EOT]
    assert encoded.responses == 1


def test_last_with_trailing_user_message(tokenizer):
    """`last` trains on the last assistant message even when a user message follows it."""
    messages = messages_for(FACTS_1, TURNS, 1)  # speaker 1's last turn is TURNS[3]; TURNS[4] is the partner's
    encoded = encode_messages(tokenizer, messages, "last")
    assert masked_runs(tokenizer, encoded) == [TURNS[3][1] + EOT]


def test_no_assistant_message_gives_none(tokenizer):
    """A chat with nothing to train on is None, not an all-zero mask."""
    messages = [{"role": "system", "content": "persona"}, {"role": "user", "content": "hello"}]
    assert encode_messages(tokenizer, messages, "all") is None
    assert encode_messages(tokenizer, messages, "last") is None


# --- truncation --------------------------------------------------------------------------------------


def test_truncate_all_drops_trailing_messages(tokenizer):
    """`all` over budget drops trailing messages at boundaries, keeping whole earlier responses."""
    messages = messages_for(FACTS_0, TURNS, 0)  # system, a, u, a, u, a
    full = n_tokens(tokenizer, messages)
    budget = n_tokens(tokenizer, messages[:4])  # system, a, u, a
    assert budget < full
    encoded = encode_messages(tokenizer, messages, "all", max_length=budget)
    assert len(encoded.input_ids) == budget
    assert decoded(tokenizer, encoded) == render(tokenizer, messages[:4])
    assert masked_runs(tokenizer, encoded) == [TURNS[0][1] + EOT, TURNS[2][1] + EOT]
    assert encoded.responses == 2

    # One token less: the second response no longer fits and the partner turn before it goes too.
    encoded = encode_messages(tokenizer, messages, "all", max_length=budget - 1)
    assert decoded(tokenizer, encoded) == render(tokenizer, messages[:2])
    assert masked_runs(tokenizer, encoded) == [TURNS[0][1] + EOT]
    assert encoded.responses == 1


def test_truncate_all_never_cuts_a_response(tokenizer):
    """For every budget, each masked run is a complete response + <|im_end|> and the length fits."""
    messages = messages_for(FACTS_0, TURNS, 0)
    whole = {text + EOT for who, text in TURNS if who == 0}
    smallest = n_tokens(tokenizer, messages[:2])
    for budget in range(smallest, n_tokens(tokenizer, messages) + 1, 3):
        encoded = encode_messages(tokenizer, messages, "all", max_length=budget)
        assert len(encoded.input_ids) <= budget
        runs = masked_runs(tokenizer, encoded)
        assert runs and set(runs) <= whole and len(runs) == encoded.responses


def test_truncate_last_drops_oldest_history(tokenizer):
    """`last` over budget drops the oldest history first, keeping the system turn and the response."""
    messages = messages_for(FACTS_0, TURNS, 0)  # system, a1, u1, a2, u2, a3
    expected = [messages[0]] + messages[4:]  # system, u2, a3
    budget = n_tokens(tokenizer, expected)
    encoded = encode_messages(tokenizer, messages, "last", max_length=budget)
    assert decoded(tokenizer, encoded) == render(tokenizer, expected)
    assert masked_runs(tokenizer, encoded) == [TURNS[4][1] + EOT]

    # A budget one token below what the full history needs drops exactly the oldest message.
    budget = n_tokens(tokenizer, messages) - 1
    encoded = encode_messages(tokenizer, messages, "last", max_length=budget)
    assert decoded(tokenizer, encoded) == render(tokenizer, [messages[0]] + messages[2:])
    assert masked_runs(tokenizer, encoded) == [TURNS[4][1] + EOT]


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_truncate_returns_none_when_nothing_fits(tokenizer, train_on):
    """When not even the system turn and one response fit, the result is None."""
    messages = messages_for(FACTS_0, TURNS, 0)
    too_small = n_tokens(tokenizer, messages[:2]) - 1 if train_on == "all" else \
        n_tokens(tokenizer, [messages[0], messages[-1]]) - 1
    assert encode_messages(tokenizer, messages, train_on, max_length=too_small) is None
    assert encode_messages(tokenizer, messages, train_on, max_length=8) is None


# --- the project template for template-less tokenizers -------------------------------------------------


def test_ensure_chat_template_keeps_existing(tokenizer):
    """A tokenizer that has a template and pad token is left alone."""
    copied = copy.deepcopy(tokenizer)
    before = copied.chat_template
    assert before and copied.pad_token is not None
    assert ensure_chat_template(copied) is False
    assert copied.chat_template == before


def test_project_template_installed(plain_tokenizer):
    """A template-less tokenizer gets PROJECT_TEMPLATE and eos as pad; rendering shows its tags."""
    assert plain_tokenizer.chat_template == PROJECT_TEMPLATE
    assert plain_tokenizer.pad_token == plain_tokenizer.eos_token == EOT
    messages = messages_for(FACTS_0, TURNS, 0)
    text = render(plain_tokenizer, messages)
    for tag in ("[PERSONA]", "[DIALOGUE]", "[USER]", "[RESPONSE]"):
        assert tag in text
    assert "<|im_start|>" not in text
    assert text.count("[RESPONSE]") == 3 and text.count("[USER]") == 2
    assert render(plain_tokenizer, messages, add_generation_prompt=True).endswith("[RESPONSE]")


def test_project_template_mask_has_no_prompt(plain_tokenizer):
    """Under the project template the mask holds no tags, persona or partner text, and ends each run with eos."""
    messages = messages_for(FACTS_0, TURNS, 0)
    encoded = encode_messages(plain_tokenizer, messages, "all")
    runs = masked_runs(plain_tokenizer, encoded)
    assert encoded.responses == 3 and len(runs) == 3
    for run, (_, text) in zip(runs, [t for t in TURNS if t[0] == 0]):
        assert run.endswith(EOT)
        assert text.endswith(run[: -len(EOT)].strip())
        assert not any(tag in run for tag in ("[PERSONA]", "[DIALOGUE]", "[USER]", "[RESPONSE]"))
    masked = "".join(runs)
    assert not any(text in masked for who, text in TURNS if who == 1)
    assert PERSONA_HEADER not in masked


def test_project_template_mask_is_exactly_responses(plain_tokenizer):
    """Under the project template the mask covers each whole response plus eos."""
    messages = messages_for(FACTS_0, TURNS, 0)
    encoded = encode_messages(plain_tokenizer, messages, "all")
    runs = [run.strip() for run in masked_runs(plain_tokenizer, encoded)]
    assert runs == [text + EOT for who, text in TURNS if who == 0]


def test_non_prefix_template_rejected(tokenizer):
    """A template whose prefix renderings are not text prefixes cannot give masks: ValueError."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = ("{{ messages|length }}\n{% for m in messages %}"
                            "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    messages = messages_for(FACTS_0, TURNS, 0)
    with pytest.raises(ValueError, match="prefix"):
        encode_messages(copied, messages, "all")
    dialogue = Dialogue("d", (FACTS_0, FACTS_1), list(TURNS))
    with pytest.raises(ValueError, match="prefix"):
        dialogue_examples(dialogue, copied, "conversation", 1024)


# --- dialogue_examples --------------------------------------------------------------------------------


DIALOGUE = Dialogue("000001-abc", (FACTS_0, FACTS_1), list(TURNS), "test:2")


def test_dialogue_examples_conversation(tokenizer):
    """`conversation`: one sequence per speaker, trained on all of that speaker's turns."""
    examples = dialogue_examples(DIALOGUE, tokenizer, "conversation", 1024)
    assert len(examples) == 2
    for speaker, example in zip((0, 1), examples):
        own = [text for who, text in TURNS if who == speaker]
        assert example.responses == len(own)
        assert masked_runs(tokenizer, example) == [text + EOT for text in own]
        persona = FACTS_0 if speaker == 0 else FACTS_1
        other = FACTS_1 if speaker == 0 else FACTS_0
        text = decoded(tokenizer, example)
        assert all(f in text for f in persona) and not any(f in text for f in other)


def test_dialogue_examples_turn(tokenizer):
    """`turn`: one sequence per speaker turn, each trained on that turn only, history before it."""
    examples = dialogue_examples(DIALOGUE, tokenizer, "turn", 1024)
    order = [i for i, (who, _) in enumerate(TURNS) if who == 0] + [i for i, (who, _) in enumerate(TURNS) if who == 1]
    assert len(examples) == len(TURNS)
    for index, example in zip(order, examples):
        assert example.responses == 1
        assert masked_runs(tokenizer, example) == [TURNS[index][1] + EOT]
        text = decoded(tokenizer, example)
        assert text.rstrip().endswith(TURNS[index][1] + EOT)  # nothing after the trained turn
        assert all(TURNS[j][1] in text for j in range(index))  # the whole history before it


def test_dialogue_examples_skip_what_cannot_fit(tokenizer):
    """With a tiny max_length nothing fits and no example is produced (no half responses)."""
    assert dialogue_examples(DIALOGUE, tokenizer, "conversation", 8) == []
    assert dialogue_examples(DIALOGUE, tokenizer, "turn", 8) == []
