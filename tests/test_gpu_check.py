"""The GPU check end to end on a tiny model and the CPU, and its projection arithmetic with numbers.

On a CPU it runs what a GPU session would, with fp32 in place of fp16/bf16, so a broken path is
found here and not in a GPU session that cannot be debugged. The projection mode runs in the same
process on a small profile shaped like kaggle-2xt4 (two processes, grad accumulation, 2 epochs).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from persona import gpu_projection as gp
from persona.config import ConfigError
from persona.gpu_check import (
    CPU_ROWS,
    GPU_ROWS,
    TRAINER_ALIGN,
    planned_rows,
    print_projection,
    projection_params,
    read_profile,
)
from persona.hardware import Machine
from persona.profiles import available
from tests.conftest import REPO

TINY_PROFILE = """\
data: {source: hub, fraction: 0.3}
model: {name: gpt2-medium, max_length: 128}
lora: {target_modules: [c_attn]}
launch: {processes: 2}
sft: {quant: none, precision: fp32, optimizer: adamw_torch, epochs: 2, max_steps: -1, batch_size: 2, grad_accum: 2,
      gradient_checkpointing: true, max_eval_sequences: 4}
pairs: {train_n: 4000, valid_n: 500, max_new_tokens: 6, batch_size: 4, max_history_turns: 2}
reward: {quant: none, precision: fp32, optimizer: adamw_torch, epochs: 2, batch_size: 2, grad_accum: 2,
         lora_top_layers: 0, max_eval_sequences: 4, score_batch_size: 8}
ppo: {quant: none, precision: fp32, optimizer: adamw_torch, max_steps: 150, rollout_batch_size: 4, minibatch_size: 2,
      max_new_tokens: 6, batch_size: 4, eval_n: 200, max_history_turns: 2}
"""


def test_tiny_gpu_check_on_cpu_reports_every_row_and_a_projection(tmp_path, tokenizer):
    profile = tmp_path / "tiny-2xt4.yaml"
    profile.write_text(TINY_PROFILE)
    # a saved tokenizer, as scripts/gpu_check.sh passes one: the session's, not a second parse of the GGUF file
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    env = {**os.environ, "PERSONA_LOG": "WARNING", "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a GPU box
    done = subprocess.run([sys.executable, "-m", "persona.gpu_check", "--size", "tiny", "--steps", "2", "--rows",
                           "--profile", str(profile), "--target", "T4", "--tokenizer", str(tmp_path / "tokenizer"),
                           "--out", str(tmp_path / "work"), "--json", str(tmp_path / "report.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((tmp_path / "report.json").read_text())
    rows = {(row["stage"], row["quant"], row["precision"]): row for row in report["rows"]}
    assert set(rows) == {(stage, quant, "fp32") for stage in ("sft", "reward", "ppo") for quant in ("none", "nf4")
                         } | {("pairs", "none", "fp32"), ("dpo", "none", "fp32"), ("grpo", "none", "fp32"),
                           ("mdpo", "none", "fp32")}
    for key, row in rows.items():
        assert row["error"] is None and row["peak_memory_mb"] > 0, row
        if key[0] != "pairs":
            assert row["steps"] == 2 and row["trainable_dtype"] == "float32", row
        if key[0] not in TRAINER_ALIGN:  # the Trainer-based align algorithms have no step clock, no tokens/s
            assert row["tokens_per_s"] > 0, row
        if key[0] not in ("pairs", *TRAINER_ALIGN):
            assert row["seconds_per_step"] > 0, row
    assert report["versions"]["torch"] and report["versions"]["bitsandbytes"]
    assert {(s["stage"], s["quant"], s["precision"]) for s in report["skipped"]} == {
        (stage, quant, precision) for stage, runs in GPU_ROWS.items() for quant, precision in runs}

    assert re.search(r"^sft +none +fp32 +adamw_torch +float32 +2 ", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^sft +nf4 +fp32 +adamw_torch +float32 +2 ", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^ppo +nf4 +fp32 +adamw_torch +float32 +2 ", done.stdout, re.MULTILINE), done.stdout
    assert "skipped (no CUDA GPU" in done.stdout and "ppo nf4/fp16" in done.stdout

    projection = report["projection"]
    assert [row["stage"] for row in projection["rows"]] == ["sft", "pairs", "reward", "ppo"]
    assert all(row["error"] is None for row in projection["rows"])
    stages = {stage["stage"]: stage for stage in projection["stages"]}
    # 2 sequences per conversation (one per speaker) on the sample; 2 processes x batch 2 x accumulation 2
    sequences = gp.spc_train_conversations(read_profile(str(profile))[1]) * 2
    assert stages["sft"]["units"] == 2 * math.ceil(math.ceil(sequences / 4) / 2)
    assert stages["reward"]["units"] == 2 * math.ceil(4000 / 4 / 2) and stages["ppo"]["units"] == 150
    assert stages["pairs"]["units"] == 4500
    for stage in stages.values():
        assert stage["projected_s"] == pytest.approx(stage["units"] * stage["seconds_per_unit"]), stage
        assert stage["estimated_s"] is None and stage["over_memory_bound"] is None  # a CPU measures no GPU
    assert projection["projected_s"] == pytest.approx(sum(s["projected_s"] for s in stages.values()))
    assert "no T4 estimate" in projection["scaling"]
    assert re.search(r"^total +\d", done.stdout, re.MULTILINE), done.stdout
    assert "14 runs passed, 0 failed" in done.stdout


def test_unknown_profile_or_architecture_fails_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="no offline architecture for it; known: gpt2"):
        gp.architecture("someone/unknown-7b")
    profile = tmp_path / "odd.yaml"
    profile.write_text("model: {name: someone/unknown-7b}\n")
    with pytest.raises(ValueError, match="someone/unknown-7b"):
        read_profile(str(profile))
    with pytest.raises(ConfigError, match="no profile 'nonesuch'"):
        read_profile("nonesuch")


@pytest.mark.parametrize("name", available())
def test_every_profile_has_an_offline_architecture(name):
    _, params = read_profile(name)
    config_class, shape = gp.architecture(params.model.name)
    assert config_class and shape["vocab_size"] > 0


def test_rows_per_machine():
    runs, skipped = planned_rows(Machine(gpus=0, bf16=False, cpus=2))
    assert runs == CPU_ROWS and len(skipped) == 13 and all("no CUDA GPU" in s["why"] for s in skipped)
    runs, skipped = planned_rows(Machine(gpus=2, bf16=False, cpus=4))  # a T4: fp16 rows only
    assert runs == {stage: (("nf4", "fp16"),) for stage in ("sft", "reward", "ppo", "dpo", "grpo", "mdpo")}
    assert {(s["stage"], s["quant"]) for s in skipped} == {("sft", "nf4"), ("sft", "none"), ("reward", "nf4"),
                                                           ("ppo", "nf4"), ("dpo", "nf4"), ("grpo", "nf4"),
                                                           ("mdpo", "nf4")}
    assert all(s["precision"] == "bf16" and s["why"] == "this GPU has no native bf16" for s in skipped)
    runs, skipped = planned_rows(Machine(gpus=1, bf16=True, cpus=16))  # an H200: the fp16 rows run there too
    assert runs == GPU_ROWS and not skipped and all(("nf4", "fp16") in stage_runs for stage_runs in runs.values())


def test_projection_keeps_every_shape_of_kaggle_2xt4():
    _, params = read_profile("kaggle-2xt4")
    timed = projection_params(params, steps=4, layers=24, sample_fraction=1.0)
    for stage in ("sft", "reward"):
        original, cut = getattr(params, stage), getattr(timed, stage)
        for key in ("quant", "precision", "optimizer", "batch_size", "grad_accum", "gradient_checkpointing"):
            assert getattr(cut, key) == getattr(original, key), (stage, key)
        assert cut.max_steps == 4
    for key in ("quant", "precision", "optimizer", "rollout_batch_size", "minibatch_size", "batch_size",
                "max_new_tokens", "gradient_checkpointing"):
        assert getattr(timed.ppo, key) == getattr(params.ppo, key), key
    assert timed.ppo.max_steps == 4 and timed.model == params.model and timed.lora == params.lora
    assert timed.pairs.batch_size == params.pairs.batch_size == 32 and timed.pairs.train_n == 64
    assert timed.launch.processes == 1 and timed.data.source == "sample"


def test_kaggle_2xt4_step_counts():
    _, params = read_profile("kaggle-2xt4")
    # 10,906 SPC rows x 0.655 well formed x 0.3 x 560/655 kept by the split x 0.8 train = 1,465.7 conversations
    assert gp.spc_train_conversations(params) == pytest.approx(10_906 * 0.3 * 0.56 * 0.8)
    plan = gp.planned_work(params, sft_sequences_per_conversation=2.0)
    # 2,931.5 sequences / (batch 8 x 2 GPUs) = 184 batches per GPU; / grad-accum 4 = 46 steps per epoch; x 2 epochs
    assert plan["sft"]["units"] == 92
    # 4,000 pairs / 16 = 250 batches per GPU; / grad-accum 2 = 125 steps per epoch; x 2 epochs
    assert plan["reward"]["units"] == 250
    assert plan["pairs"]["units"] == 4_500 and plan["ppo"]["units"] == 150


def test_optimizer_steps_count_as_transformers_does():
    assert gp.optimizer_steps(100, batch_size=8, grad_accum=4, processes=1, epochs=1, max_steps=-1) == 4  # 13 / 4
    assert gp.optimizer_steps(100, batch_size=8, grad_accum=4, processes=2, epochs=1, max_steps=-1) == 2  # 7 / 4
    assert gp.optimizer_steps(100, batch_size=8, grad_accum=4, processes=1, epochs=1.5, max_steps=-1) == 6
    assert gp.optimizer_steps(3, batch_size=8, grad_accum=4, processes=1, epochs=1, max_steps=-1) == 1
    assert gp.optimizer_steps(10_000, batch_size=8, grad_accum=4, processes=1, epochs=1, max_steps=20) == 20


def test_scaling_to_an_unmeasured_gpu_is_labelled_an_estimate():
    assert gp.gpu_class("NVIDIA H200") == "H200" and gp.gpu_class("Tesla T4") == "T4"
    assert gp.gpu_class("NVIDIA A100-SXM4-80GB") == "A100" and gp.gpu_class("NVIDIA GeForce RTX 4090") is None
    factor, statement = gp.scaling("H200", "T4")
    assert factor == pytest.approx(989 / 65) and statement.startswith("ESTIMATE for T4")
    assert "989 / 65 TFLOPS" in statement
    assert gp.scaling("T4", "T4") == (1.0, "measured on a T4")
    assert gp.scaling(None, "T4")[0] is None and gp.scaling("H200", None)[0] is None


def test_projection_multiplies_out_and_flags_memory_over_12_gib():
    plan = {"sft": {"unit": "step", "units": 92, "basis": ""}, "pairs": {"unit": "pair", "units": 4500, "basis": ""},
            "ppo": {"unit": "step", "units": 150, "basis": ""}}
    measured = {"sft": {"seconds_per_unit": 2.0, "peak_allocated_mb": 9000.0, "peak_reserved_mb": 12_288.0},
                "pairs": {"seconds_per_unit": 0.1, "peak_allocated_mb": 3000.0, "peak_reserved_mb": 3500.0},
                "ppo": {"seconds_per_unit": 5.0, "peak_allocated_mb": 11_000.0, "peak_reserved_mb": 12_289.0}}
    rows = {row["stage"]: row for row in gp.project(plan, measured, factor=15.0)}
    assert rows["sft"]["projected_s"] == 184 and rows["sft"]["estimated_s"] == 2760
    assert rows["pairs"]["projected_s"] == pytest.approx(450) and rows["ppo"]["projected_s"] == 750
    assert gp.MEMORY_BOUND_MB == 12_288
    assert rows["sft"]["over_memory_bound"] is False and rows["ppo"]["over_memory_bound"] is True
    assert gp.total(list(rows.values()), "projected_s") == pytest.approx(1384)
    partial = gp.project(plan, {"sft": measured["sft"]}, factor=None)
    assert partial[1]["projected_s"] is None and gp.total(partial, "projected_s") is None  # no partial total
    assert partial[0]["estimated_s"] is None and partial[1]["over_memory_bound"] is None


def test_step_time_is_the_median_after_warm_up():
    assert gp.median_seconds([10.0, 1.0, 3.0, 2.0]) == 2.0
    assert gp.median_seconds([10.0, 1.0, 3.0]) == 2.0
    assert gp.median_seconds([4.0]) == 4.0 and gp.median_seconds([]) is None


def test_tiny_architecture_keeps_the_family():
    assert gp.architecture("gpt2-medium", tiny=True) == ("GPT2Config", {
        "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "vocab_size": 50257})
    config_class, shape = gp.architecture("Qwen/Qwen2.5-1.5B-Instruct", tiny=True)
    assert config_class == "Qwen2Config" and shape["vocab_size"] == 151936 and shape["num_hidden_layers"] == 2


def test_a_projection_from_an_h200_prints_a_labelled_t4_estimate_and_the_memory_flag(capsys):
    plan = {"sft": {"unit": "step", "units": 92, "basis": "2,932 sequences"},
            "ppo": {"unit": "step", "units": 150, "basis": "ppo.max_steps"}}
    measured = {"sft": {"seconds_per_unit": 2.0, "peak_allocated_mb": 9000.0, "peak_reserved_mb": 10_000.0},
                "ppo": {"seconds_per_unit": 4.0, "peak_allocated_mb": 12_000.0, "peak_reserved_mb": 13_000.0}}
    factor, scaling = gp.scaling("H200", "T4")
    stages = gp.project(plan, measured, factor)
    report = {"profile": "kaggle-2xt4", "model": "gpt2-medium", "processes": 2, "target": "T4",
              "scaling_factor": factor, "scaling": scaling, "stages": stages,
              "projected_s": gp.total(stages, "projected_s"), "estimated_s": gp.total(stages, "estimated_s"),
              "memory_bound_mb": gp.MEMORY_BOUND_MB, "assumptions": ["an assumption"]}
    print_projection(report, "1 x NVIDIA H200")
    out = capsys.readouterr().out
    assert re.search(r"^stage +units +unit +s/unit +projected +T4 est\. +peak MB +reserved +fits 12 GiB$", out,
                     re.MULTILINE), out
    # 92 x 2 s = 3.1 min on the H200; x 989/65 = 46.7 min estimated on a T4
    assert re.search(r"^sft +92 +step +2\.000 +3\.1 min +46\.7 min +9,000 +10,000 +yes$", out, re.MULTILINE), out
    assert re.search(r"^ppo +150 +step +4\.000 +10\.0 min +2h32m +12,000 +13,000 +NO$", out, re.MULTILINE), out
    assert "scaling: ESTIMATE for T4: H200 seconds x 15.2" in out and "assumed: an assumption" in out
