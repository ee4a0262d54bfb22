"""Preference pairs: every strategy builds what it claims, lengths are balanced, bad files are named."""
from __future__ import annotations

import dataclasses
import random

import pytest
from transformers import AutoModelForCausalLM

from persona.chat_format import Prompt
from persona.config import ConfigError, PairShares
from persona.data import MalformedRowError, load_dialogues, persona_key, split_by_persona
from persona.metrics import content_words
from persona.pairs import (
    BLAND_REPLIES,
    STRATEGIES,
    assign_strategies,
    build_pairs,
    closest_in_length,
    negate,
    pair_stats,
    read_pairs,
    strategy_counts,
    write_pairs,
)
from tests.conftest import params_with

CFG = dataclasses.replace(params_with().pairs, max_new_tokens=6, batch_size=8, swap_candidates=3)


@pytest.fixture(scope="module")
def train_dialogues():
    dialogues, _ = load_dialogues("sample", "unused", "skip")
    return split_by_persona(dialogues, 0.1, 0.1, seed=42)[0]["train"]


@pytest.fixture(scope="module")
def pairs(train_dialogues, tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    built, timer = build_pairs(train_dialogues, model, tokenizer, CFG, 40, "train", seed=3)
    assert timer["generated_tokens"] > 0
    return built


@pytest.mark.parametrize("fact, expected", [
    ("I have two dogs.", "I don't have two dogs."),
    ("I am a nurse.", "I'm not a nurse."),
    ("i like to hike.", "i hate to hike."),
    ("My favorite color is blue.", "My favorite color isn't blue."),
    ("I was born in Egypt.", "I wasn't born in Egypt."),
    ("I have met lots of famous actors.", "I haven't met lots of famous actors."),
    ("I do not eat meat.", "I eat meat."),
    ("I play volleyball.", "I don't play volleyball."),
    ("I worked at a bank.", "I never worked at a bank."),
    ("Cooking is my passion.", None),
    # SPC facts whose denial read "I don't grew up ...", "I don't just moved ...", "I don't am not ...":
    ("I grew up in manhattan.", "I never grew up in manhattan."),
    ("I won homecoming queen this year.", "I never won homecoming queen this year."),
    ("I just moved into my first home.", "I never moved into my first home."),
    ("I recently got an apartment with my best friend.", "I never got an apartment with my best friend."),
    ("I currently work for a watch dealer.", "I don't work for a watch dealer."),
    ("I am not a good swimmer at all.", "I am a good swimmer at all."),
    ("I have never had a steady relationship.", "I have had a steady relationship."),
    ("I did not graduate high school.", "I did graduate high school."),
    ("I never broke a bone.", "I broke a bone."),
    ("I recently was fired.", "I wasn't fired."),
    ("I do like watching cooking shows.", "I don't like watching cooking shows."),
    ("I do triathlons.", "I don't do triathlons."),
])
def test_negation_states_the_opposite(fact, expected):
    assert negate(fact) == expected


def test_strategy_counts_follow_shares_and_sum_to_n():
    assert strategy_counts(10, {"swap": 0.5, "mismatch": 0.2, "contradiction": 0.2, "generic": 0.1}) == \
        {"swap": 5, "mismatch": 2, "contradiction": 2, "generic": 1}
    counts = strategy_counts(7, {"swap": 0.5, "mismatch": 0.0, "contradiction": 0.25, "generic": 0.25})
    assert sum(counts.values()) == 7 and counts["swap"] >= 3


def test_contradiction_only_where_a_fact_can_be_negated():
    prompts = [Prompt("a", 0, ["Cooking is my passion."], [(1, "hi")], "hello"),
               Prompt("b", 0, ["I have a cat."], [(1, "hi")], "hello")]
    shares = {"swap": 0.5, "mismatch": 0.0, "contradiction": 0.5, "generic": 0.0}
    strategies = assign_strategies(prompts, shares, random.Random(0))
    assert strategies == ["swap", "contradiction"]


def test_pairs_have_every_strategy_in_share(pairs):
    counts = {s: sum(p["strategy"] == s for p in pairs) for s in STRATEGIES}
    assert counts == {"swap": 18, "mismatch": 12, "contradiction": 6, "generic": 4}
    assert all(p["chosen"] and p["rejected"] for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs if p["strategy"] != "mismatch")


def test_swap_rejected_is_written_under_another_persona(pairs, train_dialogues):
    personas = {persona_key(p) for d in train_dialogues for p in d.personas}
    for pair in (p for p in pairs if p["strategy"] == "swap"):
        assert persona_key(pair["other_facts"]) != persona_key(pair["facts"])
        assert persona_key(pair["other_facts"]) in personas
        dialogue = next(d for d in train_dialogues if d.id == pair["dialogue"])
        assert (pair["speaker"], pair["chosen"]) in dialogue.turns  # chosen: the gold turn


def test_mismatch_keeps_the_reply_and_swaps_the_persona(pairs):
    for pair in (p for p in pairs if p["strategy"] == "mismatch"):
        assert pair["chosen"] == pair["rejected"]
        assert persona_key(pair["rejected_facts"]) != persona_key(pair["facts"])


def test_contradiction_pairs_carry_no_recitation_bonus(pairs):
    """Both sides are the reply plus a negated fact, so neither restating a fact nor saying "not" wins the pair:
    rejected negates one of the persona's own facts, chosen a fact of another persona on another topic."""
    contradictions = [p for p in pairs if p["strategy"] == "contradiction"]
    assert contradictions
    for pair in contradictions:
        own_words = {word for fact in pair["facts"] for word in content_words(fact)}
        assert pair["fact"] in pair["facts"] and pair["negation"] == negate(pair["fact"])
        assert pair["other_negation"] == negate(pair["other_fact"])
        assert not own_words & set(content_words(pair["other_fact"]))  # denying it contradicts nothing held
        reply = pair["chosen"][: -len(pair["other_negation"]) - 1]
        assert pair["chosen"] == f"{reply} {pair['other_negation']}"
        assert pair["rejected"] == f"{reply} {pair['negation']}"


def test_generic_rejected_is_bland_or_from_another_dialogue(pairs, train_dialogues):
    for pair in (p for p in pairs if p["strategy"] == "generic"):
        own = {text for d in train_dialogues if d.id == pair["dialogue"] for _, text in d.turns}
        assert pair["rejected"] not in own
        assert (pair["rejected"] in BLAND_REPLIES) == (pair["rejected_source"] == "bland")


def test_length_balancing_picks_the_closest_candidate():
    assert closest_in_length("one two three four", ["a", "a b c", "a b c d e f g"]) == "a b c"


def test_swap_rejected_is_the_closest_in_length_of_its_candidates(train_dialogues, tiny_model_dir, tokenizer):
    """More candidates can only bring the rejected side closer in length to the chosen one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gaps = {}
    for k in (1, 4):
        cfg = dataclasses.replace(CFG, swap_candidates=k, shares=PairShares(1.0, 0.0, 0.0, 0.0))
        built, _ = build_pairs(train_dialogues, model, tokenizer, cfg, 16, "train", seed=5)
        gaps[k] = sum(abs(len(p["chosen"].split()) - len(p["rejected"].split())) for p in built)
    assert gaps[4] < gaps[1]


def test_stats_report_each_side_and_the_length_baseline():
    rows = [{"strategy": "swap", "chosen": "a b c", "rejected": "a"},
            {"strategy": "swap", "chosen": "a", "rejected": "a b"},
            {"strategy": "generic", "chosen": "a b", "rejected": "c d"}]
    stats = pair_stats(rows)
    assert stats["all"] == {"pairs": 3, "chosen_words": 2.0, "rejected_words": 1.67,
                            "longer_is_chosen": 0.5}
    assert stats["swap"]["longer_is_chosen"] == 0.5 and stats["contradiction"] == {"pairs": 0}


def test_pairs_round_trip_and_bad_rows_are_named(pairs, tmp_path):
    path = tmp_path / "train.jsonl"
    write_pairs(pairs, path)
    again = read_pairs(path)
    assert [p["rejected"] for p in again] == [p["rejected"] for p in pairs]
    assert again[0]["history"] == [tuple(t) for t in pairs[0]["history"]]
    path.write_text(path.read_text() + '{"chosen": "x"}\n')
    with pytest.raises(MalformedRowError, match=f"train.jsonl:{len(pairs) + 1}: .*missing dialogue"):
        read_pairs(path)


def test_shares_must_sum_to_one():
    with pytest.raises(ConfigError, match="pairs.shares"):
        dataclasses.replace(CFG, shares=PairShares(0.5, 0.2, 0.1, 0.1)).validate()


def test_chosen_can_be_an_sft_sample_under_the_true_persona(train_dialogues, tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = dataclasses.replace(CFG, chosen="sample", shares=PairShares(0.5, 0.5, 0.0, 0.0), swap_candidates=1)
    built, timer = build_pairs(train_dialogues, model, tokenizer, cfg, 8, "train", seed=2)
    golds = {text for d in train_dialogues for _, text in d.turns}
    assert all(p["chosen_source"] == "sample" and p["chosen"] not in golds for p in built)
    assert timer["generated_tokens"] > 0
