"""The likelihood reward (`reward.kind: likelihood | both`) on the tiny random model and its SFT adapter: the score
is exactly the gain minus the penalties, the other personas depend on the prompt only, and the reward stage saves
a scorer that the align and evaluate stages load back."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from persona import grpo
from persona import reward as reward_stage
from persona.chat_format import messages_for, persona_prompt
from persona.config import PairShares
from persona.data import load_dialogues, persona_key, split_by_persona
from persona.likelihood_reward import CONFIG, LikelihoodReward, facts_of, load_sft_merged
from persona.pairs import build_pairs, read_pairs, write_pairs
from persona.paths import Paths
from persona.ppo.checkpoint import run_fingerprint
from persona.reward import CombinedReward, load_scorer
from persona.scoring import chat_rows, mean_logprobs
from tests.conftest import params_with

FACTS = ["I have two dogs.", "I am a nurse.", "I love hiking in the mountains."]
OTHERS = [["I fix cars.", "I live in Ohio."], ["I am a chef.", "I hate the cold."], ["I play chess."],
          ["I am a pilot.", "I have a cat."]]
HISTORY = [(1, "hi! what do you do for a living?")]


@pytest.fixture(scope="module")
def scorer(tiny_model_dir, sft_adapter):
    model, tokenizer = load_sft_merged(tiny_model_dir, sft_adapter)
    return LikelihoodReward(model, tokenizer, [FACTS, *OTHERS], k=2, copy_penalty=0.7, repeat_penalty=0.3,
                            batch_size=3)


def test_facts_are_read_back_from_the_persona_prompt():
    assert facts_of(messages_for(FACTS, HISTORY, 0)) == FACTS
    with pytest.raises(ValueError, match="persona system message"):
        facts_of([{"role": "system", "content": "You are helpful."}, {"role": "assistant", "content": "hi"}])


def test_score_is_the_likelihood_gain_minus_the_penalties(scorer):
    reply = "I have two dogs. I am a nurse. I have two dogs."  # copies two facts and repeats a sentence
    chat = messages_for(FACTS, [*HISTORY, (0, reply)], 0)
    others = scorer.others(chat, FACTS)
    variants = [[{"role": "system", "content": persona_prompt(p)}, *chat[1:]] for p in [FACTS, *others]]
    logps = mean_logprobs(scorer.model, chat_rows(scorer.tokenizer, variants), scorer.tokenizer.pad_token_id, 1)
    gain = logps[0] - (logps[1] + logps[2]) / 2
    assert scorer.score_chats([chat]) == pytest.approx([gain - 2 * 0.7 - 0.3], abs=1e-5)
    plain = messages_for(FACTS, [*HISTORY, (0, "I look after patients at night.")], 0)
    assert scorer.parts([plain])["facts_copied"] == [0.0] and scorer.parts([plain])["repeats"] == [0.0]


def test_max_contrast_is_the_margin_over_the_best_fitting_other_persona(scorer):
    """reward.likelihood_contrast: max compares with the other persona that explains the reply best, so the gain is
    above 0 only when the true persona beats every other (persona Hits@1's question), and never above the mean's."""
    strongest = LikelihoodReward(scorer.model, scorer.tokenizer, [FACTS, *OTHERS], k=2, copy_penalty=0.7,
                                 repeat_penalty=0.3, batch_size=3, contrast="max")
    chats = [messages_for(FACTS, [*HISTORY, (0, reply)], 0)
             for reply in ("I look after patients at night.", "I fix cars in Ohio.", "I have two dogs.")]
    for chat in chats:
        variants = [[{"role": "system", "content": persona_prompt(p)}, *chat[1:]]
                    for p in [FACTS, *strongest.others(chat, FACTS)]]
        logps = mean_logprobs(scorer.model, chat_rows(scorer.tokenizer, variants), scorer.tokenizer.pad_token_id, 1)
        copied = strongest.parts([chat])["facts_copied"][0]
        assert strongest.score_chats([chat]) == pytest.approx([logps[0] - max(logps[1:]) - 0.7 * copied], abs=1e-5)
    assert all(low <= high + 1e-6 for low, high in zip(strongest.parts(chats)["gain"], scorer.parts(chats)["gain"]))
    with pytest.raises(ValueError, match="contrast 'median'"):
        LikelihoodReward(scorer.model, scorer.tokenizer, [FACTS, *OTHERS], k=2, copy_penalty=0, repeat_penalty=0,
                         contrast="median")


def test_other_personas_depend_on_the_prompt_only(scorer):
    chats = [messages_for(FACTS, [*HISTORY, (0, reply)], 0) for reply in ("I am a nurse.", "I work at a bank.")]
    first, second = (scorer.others(chat, FACTS) for chat in chats)
    assert first == second and len(first) == 2
    assert persona_key(FACTS) not in {persona_key(p) for p in first}
    assert scorer.others(chats[0], FACTS) == first  # deterministic


def test_batching_does_not_change_scores(scorer):
    replies = ["hello", "I am a nurse and I love my two dogs, they come hiking with me.", "cars."]
    chats = [messages_for(FACTS, [*HISTORY, (0, reply)], 0) for reply in replies]
    together = scorer.score_chats(chats)
    alone = [scorer.score_chats([chat])[0] for chat in chats]
    assert together == pytest.approx(alone, abs=1e-4)


@pytest.fixture(scope="module")
def stage_inputs(tiny_model_dir, tokenizer, tmp_path_factory) -> Path:
    """data/prepared/train.jsonl (the persona pool) and data/pairs/{train,valid}.jsonl from the sample."""
    root = tmp_path_factory.mktemp("likelihood-stage")
    dialogues, _ = load_dialogues("sample", "unused", "skip")
    splits = split_by_persona(dialogues, 0.1, 0.1, seed=42)[0]
    (root / "prepared").mkdir()
    (root / "prepared" / "train.jsonl").write_text("".join(d.to_json() + "\n" for d in splits["train"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = dataclasses.replace(params_with().pairs, max_new_tokens=6, max_history_turns=2,
                              shares=PairShares(0.5, 0.25, 0.25, 0.0))
    (root / "pairs").mkdir()
    for split, n in (("train", 8), ("valid", 12)):
        write_pairs(build_pairs(splits[split], model, tokenizer, cfg, n, split, seed=1)[0],
                    root / "pairs" / f"{split}.jsonl")
    return root


def stage_paths(root: Path, tiny_model_dir: Path, sft_adapter: Path, out: Path) -> Paths:
    return Paths(prepared=root / "prepared", pairs=root / "pairs", base=tiny_model_dir, sft=sft_adapter,
                 reward=out / "reward", checkpoints=out / "ckpt", curves=out / "live")


def test_likelihood_reward_stage_saves_a_scorer_align_and_evaluate_load(stage_inputs, tiny_model_dir, sft_adapter,
                                                                        tmp_path):
    params = params_with(reward={"kind": "likelihood", "likelihood_personas": 2, "likelihood_contrast": "max",
                                 "score_batch_size": 4}, model={"max_length": 256})
    paths = stage_paths(stage_inputs, tiny_model_dir, sft_adapter, tmp_path)
    metrics = reward_stage.run(params, paths)
    assert metrics["kind"] == "likelihood" and metrics["n_pairs"] == 12 and "steps" not in metrics
    assert metrics["persona_only_accuracy_ci_low"] <= metrics["persona_only_accuracy"] \
        <= metrics["persona_only_accuracy_ci_high"]
    assert "accuracy_mismatch_ci_low" in metrics
    curves = tmp_path / "live" / "reward" / "plots" / "metrics" / "eval"  # the outputs dvc.yaml declares exist
    assert sorted(p.name for p in curves.iterdir()) == ["accuracy.tsv", "margin.tsv"]
    assert sorted(p.name for p in paths.reward.iterdir()) == [CONFIG, reward_stage.REWARD_INFO]
    loaded = load_scorer(tiny_model_dir, paths.reward, sft_adapter, "cpu", batch_size=4)
    assert isinstance(loaded, LikelihoodReward) and loaded.k == 2 and loaded.contrast == "max"
    chats = reward_stage.held_out_chats(read_pairs(stage_inputs / "pairs" / "valid.jsonl"))["chosen"]
    scores = loaded.score_chats(chats)
    info = json.loads((paths.reward / reward_stage.REWARD_INFO).read_text())
    assert info["kind"] == "likelihood" and info["score_std"] > 0
    assert len(scores) == 12 and len({round(s, 5) for s in scores}) > 1
    saved = json.loads((paths.reward / CONFIG).read_text())  # a folder made before the contrast existed: mean
    (paths.reward / CONFIG).write_text(json.dumps({k: v for k, v in saved.items() if k != "contrast"}))
    assert load_scorer(tiny_model_dir, paths.reward, sft_adapter, "cpu").contrast == "mean"
    (paths.reward / CONFIG).write_text(json.dumps(saved))
    # a checkpoint of a policy trained against this scorer depends on its config (there is no reward adapter)
    for fingerprint in (lambda p: run_fingerprint(p, paths, 1), lambda p: grpo.fingerprint(p, paths)):
        before = fingerprint(params)
        assert fingerprint(params) == before
        (paths.reward / CONFIG).write_text((paths.reward / CONFIG).read_text() + " ")
        assert fingerprint(params) != before

    other = tmp_path / "other-sft"  # an SFT adapter other than the one the reward was made with is refused
    shutil.copytree(sft_adapter, other)
    (other / "adapter_model.safetensors").write_bytes((other / "adapter_model.safetensors").read_bytes() + b" ")
    with pytest.raises(ValueError, match="not the SFT adapter"):
        load_scorer(tiny_model_dir, paths.reward, other, "cpu")


def test_both_sums_the_normalised_scorers(stage_inputs, tiny_model_dir, sft_adapter, tmp_path):
    params = params_with(reward={"kind": "both", "likelihood_personas": 2, "score_batch_size": 4, "max_steps": 2,
                                 "batch_size": 4, "lora_top_layers": 1, "max_eval_sequences": 4},
                         model={"max_length": 256})
    paths = stage_paths(stage_inputs, tiny_model_dir, sft_adapter, tmp_path)
    metrics = reward_stage.run(params, paths)
    assert metrics["kind"] == "both" and metrics["steps"] == 2
    assert set(metrics["by_scorer"]) == {"model", "likelihood"}
    loaded = load_scorer(tiny_model_dir, paths.reward, sft_adapter, "cpu", batch_size=4)
    assert isinstance(loaded, CombinedReward)
    chats = [messages_for(FACTS, [*HISTORY, (0, reply)], 0) for reply in ("I am a nurse.", "I fix cars.")]
    stats = json.loads((paths.reward / reward_stage.REWARD_INFO).read_text())["parts"]
    expected = [sum((part.score_chats([chat])[0] - stats[name]["score_mean"]) / stats[name]["score_std"]
                    for name, part in loaded.scorers.items()) for chat in chats]
    assert loaded.score_chats(chats) == pytest.approx(expected, abs=1e-4)
