"""Reward model on the tiny random model: training moves it, the head survives save/load, the score API."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

from persona import reward as reward_stage
from persona.config import ConfigError, PairShares
from persona.data import load_dialogues, split_by_persona
from persona.models import lora_config
from persona.pairs import build_pairs, write_pairs
from persona.paths import Paths
from persona.reward import RewardModel, held_out_metrics, model_scorer, reward_chat, score_held_out
from tests.conftest import params_with

TINY_REWARD = {"max_steps": 24, "batch_size": 4, "save_steps": 12, "eval_steps": 12, "logging_steps": 4,
               "max_eval_sequences": 4, "lr": 3e-2, "lora_top_layers": 1, "score_batch_size": 8}


def train(params, pairs_dir: Path, base: Path, out: Path) -> dict:
    """The reward stage with its adapter in out/adapter, checkpoints in out/ckpt/reward, curves in out/live/reward."""
    paths = Paths(pairs=pairs_dir, base=base, reward=out / "adapter", checkpoints=out / "ckpt", curves=out / "live")
    return reward_stage.run(params, paths)


@pytest.fixture(scope="module")
def pairs_dir(tiny_model_dir, tokenizer, tmp_path_factory) -> Path:
    dialogues, _ = load_dialogues("sample", "unused", "skip")
    splits = split_by_persona(dialogues, 0.1, 0.1, seed=42)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = dataclasses.replace(params_with().pairs, max_new_tokens=6, max_history_turns=2,
                              shares=PairShares(0.25, 0.25, 0.25, 0.25))
    folder = tmp_path_factory.mktemp("pairs")
    for split, n in (("train", 24), ("valid", 12)):
        write_pairs(build_pairs(splits[split], model, tokenizer, cfg, n, split, seed=1)[0], folder / f"{split}.jsonl")
    return folder


@pytest.fixture(scope="module")
def trained(pairs_dir, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    params = params_with(reward=TINY_REWARD, model={"max_length": 256})
    metrics = train(params, pairs_dir, tiny_model_dir, out)
    return metrics, out


def test_reward_trains_and_reports(trained):
    metrics, out = trained
    assert metrics["steps"] == 24 and metrics["train_pairs"] == 24 and metrics["n_pairs"] == 12
    assert metrics["resumed_from_step"] == 0 and metrics["trainable_dtype"] == "float32"
    for strategy in ("swap", "mismatch", "contradiction", "generic"):
        assert metrics[f"n_{strategy}"] == 3 and 0 <= metrics[f"accuracy_{strategy}"] <= 1
    assert 0 <= metrics["persona_only_accuracy"] <= 1 and metrics["n_length_matched"] > 0
    assert metrics["score_std"] > 0 and metrics["trainable_params"] > 0
    assert (out / "adapter" / "reward_info.json").exists()
    assert list((out / "live" / "reward" / "plots" / "metrics").rglob("*.tsv"))
    assert not list((out / "ckpt" / "reward").glob("checkpoint-*"))


def test_training_widens_the_margin_on_training_pairs(trained, pairs_dir, tiny_model_dir, tokenizer):
    """The loop really optimises: the loaded reward model separates its training pairs better than an untrained one."""
    from persona.pairs import read_pairs
    _, out = trained
    pairs = read_pairs(pairs_dir / "train.jsonl")
    torch.manual_seed(0)
    untrained = get_peft_model(_classifier(tiny_model_dir, tokenizer), lora_config(params_with().lora, "SEQ_CLS"))
    before = held_out_metrics(pairs, score_held_out(model_scorer(untrained, tokenizer, 256, 8), pairs), seed=0)
    loaded = RewardModel.load(tiny_model_dir, out / "adapter", "cpu")
    after = held_out_metrics(pairs, score_held_out(loaded.score_chats, pairs), seed=0)
    assert after["margin"] > before["margin"] + 0.05
    assert after["accuracy"] > before["accuracy"]


def _classifier(folder: Path, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def test_score_head_survives_save_and_load(tiny_model_dir, tokenizer, tmp_path):
    torch.manual_seed(3)
    model = get_peft_model(_classifier(tiny_model_dir, tokenizer), lora_config(params_with().lora, "SEQ_CLS"))
    for name, weight in model.named_parameters():
        if "lora_B" in name or "score" in name:
            torch.nn.init.normal_(weight, std=0.3)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("score" in key for key in saved), "the score head must be saved with the adapter"
    chats = [reward_chat(["I have two dogs.", "I am a nurse."], [(1, "hi! what do you do?")], 0, reply)
             for reply in ("i am a nurse, and i walk my dogs.", "i fix cars all day.", "hello")]
    in_memory = RewardModel(model, tokenizer).score_chats(chats)
    loaded = RewardModel.load(tiny_model_dir, tmp_path, "cpu").score_chats(chats)
    assert max(abs(a - b) for a, b in zip(in_memory, loaded)) < 1e-5
    assert len(set(round(s, 6) for s in loaded)) == 3


def test_score_api_builds_the_policy_chat(trained, tiny_model_dir):
    _, out = trained
    reward = RewardModel.load(tiny_model_dir, out / "adapter", "cpu", batch_size=2)
    facts = ["I have two dogs."]
    history = ["hi there", "hello! how are you?", "great. any pets?"]
    direct = reward.score([facts, facts, facts], [history, history, history[:1]], ["yes, two dogs", "no", "hey"])
    chats = [reward_chat(facts, [(1, history[0]), (0, history[1]), (1, history[2])], 0, "yes, two dogs"),
             reward_chat(facts, [(1, history[0]), (0, history[1]), (1, history[2])], 0, "no"),
             reward_chat(facts, [(1, history[0])], 0, "hey")]
    assert direct == pytest.approx(reward.score_chats(chats), abs=1e-6)
    with pytest.raises(ValueError, match="same length"):
        reward.score([facts], [history, history], ["a"])


def test_lora_on_top_layers_only(pairs_dir, tiny_model_dir, tmp_path):
    params = params_with(reward={**TINY_REWARD, "max_steps": 1, "lora_top_layers": 1}, model={"max_length": 256})
    train(params, pairs_dir, tiny_model_dir, tmp_path / "a")
    keys = [k for k in load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors") if "lora_" in k]
    assert keys and all(".layers.1." in k for k in keys)
    too_many = params_with(reward={**TINY_REWARD, "lora_top_layers": 3}, model={"max_length": 256})
    with pytest.raises(ConfigError, match="reward.lora_top_layers"):
        train(too_many, pairs_dir, tiny_model_dir, tmp_path / "b")


def test_merged_reward_model_scores_like_the_adapter(tiny_model_dir, tokenizer):
    """The score head is a saved module of the adapter, so merging keeps the trained head."""
    torch.manual_seed(4)
    model = get_peft_model(_classifier(tiny_model_dir, tokenizer), lora_config(params_with().lora, "SEQ_CLS"))
    for name, weight in model.named_parameters():
        if "lora_B" in name or "score" in name:
            torch.nn.init.normal_(weight, std=0.3)
    chats = [reward_chat(["I have two dogs."], [(1, "any pets?")], 0, reply) for reply in ("two dogs!", "no.")]
    adapter_scores = RewardModel(model, tokenizer).score_chats(chats)
    merged_scores = RewardModel(model.merge_and_unload(), tokenizer).score_chats(chats)
    assert merged_scores == pytest.approx(adapter_scores, abs=1e-5)


def test_interrupted_run_resumes_to_the_same_adapter(trained, pairs_dir, tiny_model_dir, tmp_path):
    """Killed after step 14 (checkpoint-12 saved), the rerun resumes there and writes the uninterrupted run's
    adapter, byte for byte, the same held-out metrics and the same curves (steps 4-12 replayed from the
    checkpoint, the killed run's own points replaced)."""

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 14:
                raise KeyboardInterrupt("simulated kill")

    straight, straight_out = trained
    params = params_with(reward=TINY_REWARD, model={"max_length": 256})
    paths = Paths(pairs=pairs_dir, base=tiny_model_dir, reward=tmp_path / "adapter", checkpoints=tmp_path / "ckpt",
                  curves=tmp_path / "live")
    with pytest.raises(KeyboardInterrupt):
        reward_stage.run(params, paths, callbacks=[Crash()])
    assert not (tmp_path / "adapter").exists()
    resumed = reward_stage.run(params, paths)
    assert resumed["resumed_from_step"] == 12 and resumed["steps"] == 24
    name = "adapter_model.safetensors"
    assert (tmp_path / "adapter" / name).read_bytes() == (straight_out / "adapter" / name).read_bytes()
    for key in ("accuracy", "margin", "persona_only_accuracy", "score_mean", "score_std"):
        assert resumed[key] == straight[key]
    assert curve_files(tmp_path / "live" / "reward") == curve_files(straight_out / "live" / "reward")


def curve_files(live_dir: Path) -> dict[str, bytes]:
    """Every dvclive TSV under `live_dir`, by path: what the `plots` stage depends on."""
    return {path.relative_to(live_dir).as_posix(): path.read_bytes() for path in sorted(live_dir.rglob("*.tsv"))}


def test_a_reply_too_long_for_the_model_names_its_row(pairs_dir, tiny_model_dir, tmp_path):
    params = params_with(reward={**TINY_REWARD, "max_steps": 1}, model={"max_length": 24})
    with pytest.raises(ConfigError, match=r"train\.jsonl:1 \(chosen reply\): model\.max_length: 24 tokens"):
        train(params, pairs_dir, tiny_model_dir, tmp_path)


def test_held_out_chats_score_mismatch_pairs_as_they_were_trained(pairs_dir, tokenizer):
    """The same reply both sides: the rejected side is read under the pair's other persona, as pair_rows encodes it."""
    from persona.pairs import read_pairs
    pairs = [p for p in read_pairs(pairs_dir / "valid.jsonl") if p["strategy"] == "mismatch"]
    chats = reward_stage.held_out_chats(pairs)
    rows = reward_stage.pair_rows(pairs, tokenizer, 256, pairs_dir / "valid.jsonl")
    for i, pair in enumerate(pairs):
        assert chats["chosen"][i] != chats["rejected"][i] and chats["rejected"][i][0]["content"].endswith(
            pair["rejected_facts"][-1])
        assert reward_stage.encode_chat(tokenizer, chats["rejected"][i], 256) == rows["rejected_ids"][i]


def test_held_out_accuracies_the_persona_decides_carry_dialogue_cis():
    """Mismatch and contradiction accuracies each get a CI that resamples dialogues; other strategies do not."""
    strategies = ["mismatch"] * 6 + ["contradiction"] * 6 + ["generic"] * 2
    pairs = [{"strategy": s, "dialogue": f"d{i % 3}", "chosen": "a b", "rejected": "a c"}
             for i, s in enumerate(strategies)]
    # every dialogue's mismatch pairs are right; contradiction pairs are right in dialogue d0 only
    chosen = np.array([1.0] * 6 + [1.0 if i % 3 == 0 else 0.0 for i in range(6, 12)] + [1.0, 0.0])
    metrics = held_out_metrics(pairs, {"chosen": chosen, "rejected": np.zeros(14)}, seed=0)
    assert (metrics["accuracy_mismatch_ci_low"], metrics["accuracy_mismatch_ci_high"]) == (1.0, 1.0)
    assert metrics["accuracy_contradiction"] == round(2 / 6, 4) and metrics["n_contradiction"] == 6
    assert metrics["accuracy_contradiction_ci_low"] == 0.0 and metrics["accuracy_contradiction_ci_high"] == 1.0
    assert "accuracy_generic_ci_low" not in metrics
