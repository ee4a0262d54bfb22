"""End to end: `dvc repro` of the whole pipeline on a tiny random model, in a scratch git repo."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from persona.profiles import set_values
from tests.conftest import REPO

TINY = {"max_steps": 2, "batch_size": 2, "save_steps": 1, "eval_steps": 1, "logging_steps": 1,
        "max_eval_sequences": 4}
TINY_PAIRS = {"train_n": 16, "valid_n": 8, "max_new_tokens": 6, "max_history_turns": 2}
TINY_REWARD = {"max_steps": 2, "batch_size": 4, "save_steps": 1, "eval_steps": 1, "logging_steps": 1,
               "max_eval_sequences": 4, "lora_top_layers": 1}
TINY_PPO = {"max_steps": 2, "rollout_batch_size": 2, "minibatch_size": 2, "max_new_tokens": 6, "save_steps": 1,
            "eval_n": 4, "batch_size": 4, "max_history_turns": 2}
TINY_TRL_ALIGN = {**TINY, "max_eval_sequences": 2, "eval_n": 2, "max_new_tokens": 4, "max_history_turns": 1}
TINY_EVAL = {"n": 4, "likelihood_n": 2, "persona_candidates": 3, "grounding_candidates": 4, "hits_n": 2,
             "reply_candidates": 4, "multiturn_n": 2, "multiturn_turns": 2, "perplexity_sequences": 2,
             "max_new_tokens": 4, "bootstrap": 50}


def sh(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PERSONA_LOG": "WARNING"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def set_params(root: Path, **sections) -> None:
    """Edit params.yaml in place (comments kept), as `python -m persona profile` does."""
    path = root / "params.yaml"
    leaves = {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}
    path.write_text(set_values(path.read_text(), leaves, path)[0])


def make_project(root: Path, tiny_model_dir: Path) -> Path:
    """The pipeline's files with tiny params, committed in a scratch git repo at `root`; nothing run yet."""
    for item in ("persona", "stages", "profiles", "data/sample", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore",
                 ".gitignore"):
        source, target = REPO / item, root / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    set_params(root, model={"name": str(tiny_model_dir), "max_length": 256}, data={"fraction": 0.5},
               sft=TINY, pairs=TINY_PAIRS, reward=TINY_REWARD, ppo=TINY_PPO, dpo=TINY_TRL_ALIGN,
               grpo={**TINY_TRL_ALIGN, "num_generations": 2}, mdpo={**TINY_TRL_ALIGN, "train_n": 8},
               evaluate=TINY_EVAL)
    sh("git", "init", "-q", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny", cwd=root)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    root = make_project(tmp_path_factory.mktemp("project"), tiny_model_dir)
    sh("dvc", "repro", cwd=root)
    return root


def test_repro_builds_every_output(project):
    assert (project / "models" / "sft" / "adapter_config.json").exists()
    assert (project / "models" / "base" / "model.safetensors").exists()
    data = json.loads((project / "metrics" / "data.json").read_text())
    sft = json.loads((project / "metrics" / "sft.json").read_text())
    assert data["train_dialogues"] > 0 and data["test_dialogues"] > 0
    assert sft["steps"] == 2 and sft["eval_perplexity"] > 0
    assert list((project / "dvclive" / "sft" / "plots" / "metrics").rglob("*.tsv"))
    pairs = json.loads((project / "metrics" / "pairs.json").read_text())
    assert pairs["train"]["all"]["pairs"] == 16 and pairs["valid"]["all"]["pairs"] == 8
    reward = json.loads((project / "metrics" / "reward.json").read_text())
    assert reward["steps"] == 2 and reward["n_pairs"] == 8 and 0 <= reward["accuracy"] <= 1
    assert (project / "models" / "reward" / "adapter_model.safetensors").exists()
    align = json.loads((project / "metrics" / "align.json").read_text())
    assert align["algorithm"] == "ppo" and align["steps"] == 2 and align["processes"] == 1
    assert align["ppo_reward"] is not None and (project / "models" / "policy" / "adapter_model.safetensors").exists()
    base = json.loads((project / "metrics" / "base.json").read_text())
    assert base["architecture"] == "llama" and base["parameters"] > 0
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert evaluation["n_prompts"] == 4 and {"base", "sft", "ppo", "gold"} <= set(evaluation)
    assert all(evaluation[p]["reward_score"] is not None for p in ("base", "sft", "ppo", "gold"))
    assert (project / "metrics" / "report.md").exists() and (project / "metrics" / "eval.png").exists()


# What each training stage writes once its first checkpoint is whole (the Trainer's last file is the manifest).
FIRST_CHECKPOINT = {"sft": "checkpoints/sft/checkpoint-*/manifest.json",
                    "reward": "checkpoints/reward/checkpoint-*/manifest.json",
                    "align": "checkpoints/align/ppo_state.pt"}
ADAPTERS = {"sft": "models/sft", "reward": "models/reward", "align": "models/policy"}


def kill_after_first_checkpoint(root: Path, stage: str) -> None:
    """Force `stage` to rerun under `dvc repro`; once it has saved its first checkpoint, SIGKILL dvc and
    everything it started."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PERSONA_LOG": "WARNING"}
    repro = subprocess.Popen(["dvc", "repro", "--force", "--single-item", stage], cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    while not list(root.glob(FIRST_CHECKPOINT[stage])):
        assert repro.poll() is None, f"dvc repro ended before {stage} saved a checkpoint: {repro.stderr.read()[-2000:]}"
        time.sleep(0.02)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()


def without_resume_fields(metrics: dict) -> dict:
    """Metrics minus timings, memory, and what a resume changes by design: the step it resumed from, and the PPO
    sampler check, which runs on each session's first step."""
    return {key: value for key, value in metrics.items()
            if key not in ("resumed_from_step", "peak_memory_mb", "sampler_logprob_gap_max")}


def test_stages_killed_after_a_checkpoint_resume_to_the_same_result(project):
    """SIGKILL sft, reward and align in turn, each after its first checkpoint; DVC's rerun of the stage resumes it
    and ends with the uninterrupted run's adapter (within 1e-6) and metrics. Then `dvc status` finds every later
    stage's inputs unchanged: the resumed outputs are byte-identical."""
    from safetensors.torch import load_file

    for stage, adapter in ADAPTERS.items():
        straight_weights = load_file(project / adapter / "adapter_model.safetensors")
        straight_metrics = without_timings(project / "metrics" / f"{stage}.json")
        kill_after_first_checkpoint(project, stage)
        assert not (project / adapter).exists()
        # Forced again: dvc.lock still holds the uninterrupted run, whose outputs a plain `dvc repro` would check
        # out of the cache; a stage killed the first time it ran has no such entry and reruns the same way.
        out = sh("dvc", "repro", "--force", "--single-item", stage, cwd=project)
        assert f"Running stage '{stage}'" in out, out
        metrics = without_timings(project / "metrics" / f"{stage}.json")
        assert metrics["resumed_from_step"] > 0, f"{stage} did not resume: the kill came too late"
        resumed_weights = load_file(project / adapter / "adapter_model.safetensors")
        assert resumed_weights.keys() == straight_weights.keys()
        for key in straight_weights:
            torch.testing.assert_close(resumed_weights[key], straight_weights[key], rtol=0, atol=1e-6)
        assert without_resume_fields(metrics) == without_resume_fields(straight_metrics), stage
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=project)


def test_second_repro_is_a_no_op(project):
    out = sh("dvc", "repro", cwd=project)
    assert "Running stage" not in out


def test_a_fresh_clone_pulls_instead_of_rerunning(project, tmp_path):
    """Results kept between machines: git (dvc.lock, metrics) + a DVC remote (models, data) is all it takes."""
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outputs", cwd=project)
    sh("dvc", "push", cwd=project)
    sh("git", "clone", "-q", str(project), str(tmp_path / "clone"), cwd=tmp_path)
    sh("dvc", "pull", cwd=tmp_path / "clone")
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=tmp_path / "clone")
    assert (tmp_path / "clone" / "models" / "policy" / "adapter_model.safetensors").exists()

    # Only the DVC cache kept (say on a mounted Drive), not even dvc.lock: DVC's run-cache restores every stage
    # but `evaluate`, whose git-tracked outputs (report, samples) the run-cache does not cover: it reruns, and
    # on the restored models it gives the same metrics.
    first = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=project).strip()
    sh("git", "clone", "-q", str(project), str(tmp_path / "bare"), cwd=tmp_path)
    sh("git", "checkout", "-q", first, cwd=tmp_path / "bare")
    assert not (tmp_path / "bare" / "dvc.lock").exists()
    sh("dvc", "cache", "dir", "--local", str(project / ".dvc" / "cache"), cwd=tmp_path / "bare")
    out = sh("dvc", "repro", cwd=tmp_path / "bare")
    for stage in ("prepare", "base", "sft", "pairs", "reward", "align"):
        assert f"Stage '{stage}' is cached - skipping run" in out, out
    assert "Running stage 'evaluate'" in out
    restored = without_timings(tmp_path / "bare" / "metrics" / "eval.json")
    assert restored == without_timings(project / "metrics" / "eval.json")


def without_timings(path: Path) -> dict:
    """A metrics file minus wall times and speeds, which differ run to run."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if not (k.endswith(("_s", "_per_s")) or k.startswith("time_"))}
        return value
    return strip(json.loads(path.read_text()))


def change_param(project: Path, **sections) -> set[str]:
    """Commit the current outputs, change params; the stages `dvc status` then reports as changed."""
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", "outputs", cwd=project)
    set_params(project, **sections)
    status = sh("dvc", "status", "--json", cwd=project)
    return set(json.loads(status[status.index("{"):]))


def test_an_align_experiment_reevaluates_only_the_aligned_policy(project):
    """Base and SFT are evaluated in their own stage: changing the aligned policy's params leaves it alone."""
    before = (project / "params.yaml").read_text()
    try:
        assert change_param(project, ppo={"lr": 1e-3}) == {"align"}
        out = sh("dvc", "repro", "--dry", cwd=project)
    finally:
        (project / "params.yaml").write_text(before)
    # a dry run cannot know that align's output will change, so it stops there; evaluate reads models/policy
    assert "Running stage 'align'" in out and "Stage 'evaluate_reference' didn't change" in out
    assert "models/policy" in [next(iter(d)) if isinstance(d, dict) else d for d in
                               yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["evaluate"]["deps"]]


def test_reward_param_change_reruns_only_reward_and_what_follows(project):
    """A dry run: DVC reruns what follows a changed stage (the sft test above runs it); here, nothing before it."""
    assert change_param(project, reward={"lr": 5e-3}) == {"reward"}
    out = sh("dvc", "repro", "--dry", cwd=project)
    assert "Running stage 'reward'" in out
    assert all(f"Running stage '{s}'" not in out for s in ("prepare", "base", "sft", "pairs"))


@pytest.mark.parametrize("profile", ["kaggle-2xt4", "gpu-24gb", "a100-80gb", "cpu-quick"])
def test_each_profile_gives_a_valid_dvc_pipeline(project, profile):
    """`python -m persona profile NAME` then `dvc repro --dry`: every stage's command, nothing run."""
    tiny = (project / "params.yaml").read_text()
    try:
        assert f"profile {profile}" in sh("python", "-m", "persona", "profile", profile, cwd=project)
        dry = sh("dvc", "repro", "--dry", cwd=project)
    finally:
        (project / "params.yaml").write_text(tiny)
    for stage in ("sft", "reward", "align"):
        assert f"> python -m persona.launch stages.{stage}" in dry
    if profile != "cpu-quick":  # a new base model: everything from `base` on must rerun
        assert all(f"Running stage '{s}'" in dry for s in ("base", "sft", "pairs", "reward", "align", "evaluate"))


def test_training_stages_run_as_two_process_ddp_on_cpu(project, tiny_model_dir):
    """launch.processes 2: sft, reward and align rerun under accelerate as 2 CPU processes (gloo DDP), and with
    them what follows sft, whose adapter changes (as any sft param's change would): never prepare or base. Then
    align alone with DPO and with GRPO, under the same 2 processes.

    Real DDP: each process trained on other data, yet both held identical weights after a step.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert change_param(project, launch={"processes": 2}) == {"sft", "reward", "align"}
    out = sh("dvc", "repro", cwd=project)
    for stage in ("sft", "pairs", "reward", "align", "evaluate_reference", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'base'" not in out
    sft_diff = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=project))["metrics/sft.json"]
    assert sft_diff["processes"] == {"old": 1, "new": 2, "diff": 1}
    for name in ("sft", "reward", "align"):
        metrics = json.loads((project / "metrics" / f"{name}.json").read_text())
        assert (metrics["processes"], metrics["ranks_in_sync"], metrics["ranks_distinct_batches"]) == (2, True, True)
    sft = json.loads((project / "metrics" / "sft.json").read_text())
    assert sft["steps"] == 2 and sft["eval_nll"] < sft["base_eval_nll"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), project / "models" / "sft")
    trained = [w for name, w in model.named_parameters() if "lora_B" in name]
    assert trained and all(w.abs().sum() > 0 for w in trained)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    for algorithm in ("dpo", "grpo", "mdpo"):
        set_params(project, align={"algorithm": algorithm})
        sh("dvc", "repro", "--single-item", "align", cwd=project)
        metrics = json.loads((project / "metrics" / "align.json").read_text())
        assert (metrics["algorithm"], metrics["steps"], metrics["reward_gain"] is not None) == (algorithm, 2, True)
        assert (metrics["processes"], metrics["ranks_in_sync"], metrics["ranks_distinct_batches"]) == (2, True, True)
