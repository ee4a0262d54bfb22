"""SFT on the tiny random model: metrics, resume after an interruption, QLoRA (nf4) on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from persona import data, sft
from persona.paths import Paths
from tests.conftest import params_with

TINY_SFT = {"max_steps": 4, "batch_size": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1,
            "max_eval_sequences": 4, "lr": 5e-3}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    data.run(params_with(seed=1, data={"fraction": 0.5}), Paths(prepared=folder))
    return folder


def run(params, prepared, base, tmp: Path, callbacks=()):
    paths = Paths(prepared=prepared, base=base, sft=tmp / "adapter", checkpoints=tmp / "ckpt", curves=tmp / "live")
    return sft.run(params, paths, callbacks=callbacks)


def adapter_weights(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def curve_files(live_dir: Path) -> dict[str, bytes]:
    """Every dvclive TSV under `live_dir`, by path: what the `plots` stage depends on."""
    return {path.relative_to(live_dir).as_posix(): path.read_bytes() for path in sorted(live_dir.rglob("*.tsv"))}


def test_sft_trains_and_reports(prepared, tiny_model_dir, tmp_path):
    """Loss on persona-speaker tokens falls and every reported figure is present and sane."""
    metrics = run(params_with(sft=TINY_SFT), prepared, tiny_model_dir, tmp_path)
    assert metrics["steps"] == 4 and metrics["quant"] == "none" and metrics["precision"] == "fp32"
    assert metrics["eval_nll"] < metrics["base_eval_nll"]  # lr 5e-3 on a random model: learns fast
    assert 0 < metrics["trainable_pct"] < 100 and metrics["tokens_per_s"] > 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "peft_version" not in config and config["target_modules"] == sorted(config["target_modules"])
    assert not (tmp_path / "adapter" / "README.md").exists()  # peft's placeholder card carries its version
    assert not list((tmp_path / "ckpt" / "sft").glob("checkpoint-*"))  # a finished run leaves nothing to resume
    assert (tmp_path / "live" / "sft" / "plots" / "metrics" / "train" / "loss.tsv").exists()


def test_interrupted_run_resumes_to_the_same_adapter(prepared, tiny_model_dir, tmp_path, caplog):
    """Killed in step 3, with checkpoint-2 then cut off mid-file: the rerun discards checkpoint-2 with a
    warning, resumes from checkpoint-1 and ends where an uninterrupted run ends, its curves too, byte for
    byte: step 1's replayed from the checkpoint, the killed run's points of step 2 replaced."""

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated kill")

    params = params_with(sft={**TINY_SFT, "save_steps": 1})
    with pytest.raises(KeyboardInterrupt):
        run(params, prepared, tiny_model_dir, tmp_path / "killed", callbacks=[Crash()])
    checkpoints = tmp_path / "killed" / "ckpt" / "sft"
    assert (checkpoints / "checkpoint-1" / "manifest.json").is_file()
    damaged = checkpoints / "checkpoint-2" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    resumed = run(params, prepared, tiny_model_dir, tmp_path / "killed")
    assert resumed["resumed_from_step"] == 1 and resumed["steps"] == 4
    assert "discarding" in caplog.text and "checkpoint-2" in caplog.text

    straight = run(params, prepared, tiny_model_dir, tmp_path / "straight")
    assert straight["resumed_from_step"] == 0
    a, b = adapter_weights(tmp_path / "killed" / "adapter"), adapter_weights(tmp_path / "straight" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    straight_curves = curve_files(tmp_path / "straight" / "live" / "sft")
    assert {f"plots/metrics/{name}.tsv" for name in ("train/loss", "eval/loss", "train/num_input_tokens_seen")} \
        <= straight_curves.keys()
    assert curve_files(tmp_path / "killed" / "live" / "sft") == straight_curves


def test_checkpoints_of_other_params_are_not_resumed(prepared, tiny_model_dir, tmp_path):
    run(params_with(sft={**TINY_SFT, "max_steps": 2}), prepared, tiny_model_dir, tmp_path)
    changed = run(params_with(sft={**TINY_SFT, "max_steps": 2, "lr": 1e-3}), prepared, tiny_model_dir, tmp_path)
    assert changed["resumed_from_step"] == 0
    assert json.loads((tmp_path / "ckpt" / "sft" / "fingerprint.json").read_text())["train"]["lr"] == 1e-3


def test_qlora_nf4_trains_on_cpu(prepared, tiny_model_dir, tmp_path):
    """bitsandbytes NF4 + double quant with fp32 compute runs on CPU: the QLoRA path is tested, not trusted."""
    pytest.importorskip("bitsandbytes")
    metrics = run(params_with(sft={**TINY_SFT, "quant": "nf4", "max_steps": 2}), prepared, tiny_model_dir,
                  tmp_path)
    assert metrics["quant"] == "nf4" and metrics["steps"] == 2
    weights = adapter_weights(tmp_path / "adapter")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # B moved off its zero init


def test_turn_layout_trains_one_response_per_sequence(prepared, tiny_model_dir, tmp_path):
    metrics = run(params_with(sft={**TINY_SFT, "layout": "turn", "max_steps": 1}), prepared, tiny_model_dir,
                  tmp_path)
    conversation = run(params_with(sft={**TINY_SFT, "max_steps": 1}), prepared, tiny_model_dir, tmp_path / "c")
    assert metrics["layout"] == "turn" and metrics["train_sequences"] > 5 * conversation["train_sequences"]


def test_gradient_checkpointing_trains(prepared, tiny_model_dir, tmp_path):
    metrics = run(params_with(sft={**TINY_SFT, "gradient_checkpointing": True, "max_steps": 2}), prepared,
                  tiny_model_dir, tmp_path)
    assert metrics["steps"] == 2 and metrics["eval_nll"] < metrics["base_eval_nll"]
