"""Profiles: one command rewrites params.yaml (comments kept) and they pass or fail the machine check.

`dvc repro --dry` of each profile: tests/test_pipeline.py (it needs a pipeline with outputs).
"""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from persona.config import ConfigError, Params, from_dict, load_params
from persona.hardware import Machine
from persona.launch import check_machine
from persona.paths import TRAINING_STAGES
from persona.profiles import apply_profile, available, profile_values, root
from tests.conftest import REPO, SHARED_SPC

T4x2 = Machine(gpus=2, bf16=False, cpus=4)
A100 = Machine(gpus=1, bf16=True, cpus=12)
PROFILES = ["a100-80gb", "cpu-quick", "cpu-spc", "cpu-spc-36-steps", "cpu-spc-36-steps-likelihood-1000",
            "cpu-spc-contradiction", "cpu-spc-dpo", "cpu-spc-floors", "cpu-spc-grpo", "cpu-spc-likelihood-1000",
            "cpu-spc-max-contrast", "cpu-spc-mdpo", "cpu-spc-mdpo-1200-pairs", "cpu-spc-mdpo-beta-1",
            "cpu-spc-multiturn", "gpu-24gb", "kaggle-2xt4"]


def test_the_committed_params_are_the_cpu_quick_profile(tmp_path):
    assert available() == PROFILES
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == dataclasses.asdict(Params())
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    assert apply_profile("cpu-quick", params)[1] == []  # no changes
    assert params.read_text() == (REPO / "params.yaml").read_text()


@pytest.mark.parametrize("name", PROFILES)
def test_applying_a_profile_sets_every_value_and_keeps_comments(tmp_path, name):
    if name.startswith("cpu-spc"):  # its data.source, ../shared/data/synthetic-persona-chat, must exist beside the copy
        if not SHARED_SPC.exists():
            pytest.skip("no shared SPC data beside the repository")
        (tmp_path / "shared").symlink_to(REPO.parent / "shared")
        tmp_path = tmp_path / "repo"
        tmp_path.mkdir()
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_profile("kaggle-2xt4" if name != "kaggle-2xt4" else "gpu-24gb", params)  # profiles must not stack
    apply_profile(name, params)
    assert yaml.safe_load(params.read_text()) == profile_values(name)
    assert params.read_text().splitlines()[0].startswith(f"# profile: {name} ")
    comments = lambda path: [line.split("#", 1)[1] for line in path.read_text().splitlines()[1:] if "#" in line]
    assert comments(params) == comments(REPO / "params.yaml")
    load_params(params)


def test_kaggle_profile_is_the_original_recipe():
    params = _load("kaggle-2xt4")
    assert (params.model.name, params.data.fraction, params.launch.processes) == ("gpt2-medium", 0.3, 2)
    assert (params.lora.r, params.lora.alpha, params.lora.dropout, params.lora.target_modules) == (8, 16, 0.05,
                                                                                                  ["c_attn"])
    sft = params.sft
    assert (sft.quant, sft.precision, sft.optimizer) == ("nf4", "fp16", "paged_adamw_8bit")
    assert (sft.batch_size, sft.grad_accum, sft.epochs, sft.max_steps) == (8, 4, 2, -1)
    assert sft.gradient_checkpointing


def _load(name: str) -> Params:
    return from_dict(Params, profile_values(name), "")


@pytest.mark.parametrize("name,machine,problem", [
    ("kaggle-2xt4", T4x2, None),
    ("gpu-24gb", A100, None),
    ("a100-80gb", A100, None),
    ("gpu-24gb", T4x2, r"sft\.precision: bf16 rejected: this GPU has no native bf16"),
    ("kaggle-2xt4", Machine(gpus=1, bf16=False, cpus=2), r"launch\.processes: 2 processes but this machine has 1 CUDA"),
    ("kaggle-2xt4", Machine(gpus=0, bf16=False, cpus=4), r"sft\.precision: fp16 needs a CUDA GPU"),
])
def test_profiles_against_machines(name, machine, problem):
    params = _load(name)
    if problem is None:
        for stage in TRAINING_STAGES:
            check_machine(params, stage, machine)
    else:
        with pytest.raises(ConfigError, match=problem):
            check_machine(params, "sft", machine)


def test_a_bad_profile_names_its_file_and_key(tmp_path):
    (tmp_path / "broken.yaml").write_text("sft:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: unknown key 'sft\.batchsize'"):
        profile_values("broken", tmp_path)
    (tmp_path / "typed.yaml").write_text("sft:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match=r"typed\.yaml: sft\.precision: 'fp8' is not one of"):
        profile_values("typed", tmp_path)


@pytest.mark.parametrize("name", ["cpu-spc-floors", "gpu-24gb", "a100-80gb", "kaggle-2xt4"])
def test_real_data_profiles_evaluate_enough_to_see_a_difference(name):
    """Issue 14's floor: >= 500 generation prompts, >= 300 likelihood, >= 100 reply Hits@1, >= 30 conversations."""
    cfg = _load(name).evaluate
    assert cfg.n >= 500 and cfg.likelihood_n >= 300 and cfg.hits_n >= 100 and cfg.multiturn_n >= 30


def test_a_profile_extends_another(tmp_path):
    (tmp_path / "parent.yaml").write_text("sft:\n  max_steps: 7\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("extends: parent\nsft:\n  lr: 0.25\n")
    values = profile_values("child", tmp_path)
    assert values["sft"]["max_steps"] == 7 and values["sft"]["lr"] == 0.25
    assert values["ppo"] == profile_values("parent", tmp_path)["ppo"]
    spc, floors = profile_values("cpu-spc"), profile_values("cpu-spc-floors")
    assert {k: v for k, v in floors.items() if k != "evaluate"} == {k: v for k, v in spc.items() if k != "evaluate"}


def test_a_profile_runs_in_the_worktree_of_its_extends_root():
    assert [root(name) for name in ("cpu-quick", "cpu-spc", "cpu-spc-grpo", "cpu-spc-dpo", "cpu-spc-floors")] == \
        ["cpu-quick", "cpu-spc", "cpu-spc", "cpu-spc", "cpu-spc"]
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        root("nope")
