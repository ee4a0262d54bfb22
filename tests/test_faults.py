"""Kills and damaged files: atomic writes, sealed checkpoints, the trainable dtype every TRL trainer starts with."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from transformers import TrainerCallback

from persona import data, reward, sft
from persona.files import replace_folder, write_text_atomic
from persona.paths import Paths
from persona.ppo.checkpoint import STATE, load_state
from persona.runner import write_metrics
from persona.training import MANIFEST, prepare_checkpoints, write_manifest
from tests.conftest import params_with


def killed_mid_write(monkeypatch):
    """Make the next fsync raise, as if the process died after writing part of a file."""
    def die(descriptor):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(os, "fsync", die)


def test_a_kill_mid_write_leaves_the_previous_metrics(tmp_path, monkeypatch):
    path = tmp_path / "metrics" / "sft.json"
    write_metrics(path, {"steps": 4})
    killed_mid_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        write_metrics(path, {"steps": 8, "padding": "x" * 100_000})
    assert json.loads(path.read_text()) == {"steps": 4}
    assert [p.name for p in path.parent.iterdir()] == ["sft.json"]


def test_write_text_atomic_replaces_whole(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "b.txt", "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["b.txt"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with replace_folder(target) as folder:
        (folder / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt), replace_folder(target) as folder:
        (folder / "weights").write_text("new, half written")
        raise KeyboardInterrupt("killed")
    assert (target / "weights").read_text() == "old"
    with replace_folder(target) as folder:
        (folder / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def fake_checkpoint(folder, step: int, sealed: bool = True):
    checkpoint = folder / f"checkpoint-{step}"
    (checkpoint / "nested").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoint / "nested" / "optimizer.pt").write_bytes(os.urandom(4096))
    if sealed:
        write_manifest(checkpoint)
    return checkpoint


@pytest.mark.parametrize("damage", ["truncate", "delete", "unsealed", "manifest cut short"])
def test_a_damaged_checkpoint_is_discarded_for_the_previous_one(tmp_path, caplog, damage):
    expected = {"run": 1}
    folder = tmp_path / "ckpt"
    prepare_checkpoints(folder, expected)
    fake_checkpoint(folder, 2)
    newest = fake_checkpoint(folder, 3, sealed=damage != "unsealed")
    weights = newest / "nested" / "optimizer.pt"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        weights.unlink()
    elif damage == "manifest cut short":
        (newest / MANIFEST).write_text((newest / MANIFEST).read_text()[:30])
    with caplog.at_level(logging.WARNING):
        assert prepare_checkpoints(folder, expected) == str(folder / "checkpoint-2")
    assert "discarding" in caplog.text and "checkpoint-3" in caplog.text
    assert not newest.exists()
    assert prepare_checkpoints(folder, expected) == str(folder / "checkpoint-2")  # and again: no crash loop


def test_other_ranks_never_delete(tmp_path):
    folder = tmp_path / "ckpt"
    prepare_checkpoints(folder, {"run": 1})
    unsealed = fake_checkpoint(folder, 1, sealed=False)
    assert prepare_checkpoints(folder, {"run": 1}, writer=False) is None and unsealed.exists()


def test_a_cut_off_ppo_checkpoint_starts_afresh(tmp_path, caplog):
    expected = {"run": 1}
    torch.save({"step": 2, "fingerprint": expected, "trainable": {"w": torch.ones(1000)}}, tmp_path / STATE)
    assert load_state(tmp_path, expected)["step"] == 2
    (tmp_path / STATE).write_bytes((tmp_path / STATE).read_bytes()[:500])
    with caplog.at_level(logging.WARNING):
        assert load_state(tmp_path, expected) is None
    assert "cannot be read" in caplog.text and not (tmp_path / STATE).exists()


def test_ranks_discarding_the_same_unreadable_ppo_checkpoint_do_not_race(tmp_path, monkeypatch):
    """Every DDP rank reads ppo_state.pt; when it is damaged each deletes it, and those after the first find it
    gone: as if another rank deleted it between this one's failed read and its delete."""
    (tmp_path / STATE).write_bytes(b"not a checkpoint")

    def another_rank_deletes_it_first(path, **kwargs):
        path.unlink()
        raise RuntimeError("damaged")
    monkeypatch.setattr(torch, "load", another_rank_deletes_it_first)
    assert load_state(tmp_path, {"run": 1}) is None


class TrainableDtypes(TrainerCallback):
    """Every trainable parameter's dtype when training begins, seen independently of the stage's own probe."""

    def __init__(self):
        self.seen: set[torch.dtype] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen = {p.dtype for p in model.parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    data.run(params_with(seed=1, data={"fraction": 0.3}), Paths(prepared=folder))
    return folder


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_sft_trains_fp32_weights_in_fp32(prepared, tiny_model_dir, tmp_path, quant):
    """TRL's SFTTrainer casts a quantized model's trainable weights to bf16; the project's builder undoes it."""
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    probe = TrainableDtypes()
    params = params_with(sft={"max_steps": 1, "batch_size": 2, "max_eval_sequences": 2, "quant": quant,
                              "precision": "fp32"})
    paths = Paths(prepared=prepared, base=tiny_model_dir, sft=tmp_path / "a", checkpoints=tmp_path / "c", curves=None)
    metrics = sft.run(params, paths, callbacks=[probe])
    assert probe.seen == {torch.float32} and metrics["trainable_dtype"] == "float32"


def test_reward_trains_fp32_weights_in_nf4(tiny_model_dir, tokenizer, tmp_path):
    """The same for TRL's RewardTrainer: nf4 base, fp32 precision, every trainable weight fp32 at step 0."""
    pytest.importorskip("bitsandbytes")
    from persona.pairs import write_pairs
    pair = {"dialogue": "d0", "facts": ["I have two dogs."], "history": [[1, "any pets?"]], "speaker": 0,
            "strategy": "swap",
            "chosen": "yes, two dogs.", "rejected": "no pets.", "other_facts": ["I am a nurse."]}
    for split in ("train", "valid"):
        write_pairs([pair] * 4, tmp_path / "pairs" / f"{split}.jsonl")
    probe = TrainableDtypes()
    params = params_with(reward={"max_steps": 1, "batch_size": 2, "quant": "nf4", "precision": "fp32",
                                 "lora_top_layers": 1, "max_eval_sequences": 2}, model={"max_length": 128})
    paths = Paths(pairs=tmp_path / "pairs", base=tiny_model_dir, reward=tmp_path / "r", checkpoints=tmp_path / "c",
                  curves=None)
    metrics = reward.run(params, paths, callbacks=[probe])
    assert probe.seen == {torch.float32} and metrics["trainable_dtype"] == "float32"
