"""Params against hardware, the accelerate command line, and the rank-agreement check of DDP runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from persona.config import ConfigError, LaunchConfig
from persona.hardware import Compute, Machine, resolve_compute
from persona.launch import accelerate_command, check_machine, config_file
from tests.conftest import REPO, params_with

CPU = Machine(gpus=0, bf16=False, cpus=2)
T4x2 = Machine(gpus=2, bf16=False, cpus=4)
H100 = Machine(gpus=1, bf16=True, cpus=16)


@pytest.mark.parametrize("quant,precision,optimizer,machine,expected", [
    ("auto", "auto", "auto", CPU, ("cpu", "none", "fp32", "adamw_torch")),
    ("auto", "auto", "auto", T4x2, ("cuda", "nf4", "fp16", "paged_adamw_8bit")),
    ("auto", "auto", "auto", H100, ("cuda", "nf4", "bf16", "paged_adamw_8bit")),
    ("none", "fp32", "auto", H100, ("cuda", "none", "fp32", "adamw_torch")),
    ("nf4", "fp32", "adamw_8bit", CPU, ("cpu", "nf4", "fp32", "adamw_8bit")),
])
def test_compute_resolution(quant, precision, optimizer, machine, expected):
    compute = resolve_compute(quant, precision, "sft", optimizer, machine)
    assert (compute.device, compute.quant, compute.precision, compute.optimizer) == expected


@pytest.mark.parametrize("stage,changes,machine,key", [
    ("sft", {"sft": {"precision": "bf16"}}, T4x2, "sft.precision"),  # T4 has no native bf16
    ("align", {"ppo": {"precision": "fp16"}}, CPU, "ppo.precision"),
    ("reward", {"reward": {"precision": "bf16"}}, CPU, "reward.precision"),
    ("sft", {"sft": {"optimizer": "paged_adamw_8bit"}}, CPU, "sft.optimizer"),
    ("sft", {"launch": LaunchConfig(processes=3)}, T4x2, "launch.processes"),
    ("align", {"launch": LaunchConfig(processes=3)}, CPU, "launch.processes"),
])
def test_impossible_combinations_are_rejected_naming_the_key(stage, changes, machine, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_machine(params_with(**changes), stage, machine)


def test_possible_combinations_pass():
    assert check_machine(params_with(launch=LaunchConfig(processes=2)), "sft", T4x2).precision == "fp16"
    assert check_machine(params_with(launch=LaunchConfig(processes=2)), "align", CPU).device == "cpu"


def test_accelerate_command_lines(tmp_path):
    fp32 = Compute("cpu", "none", "fp32", "adamw_torch")
    neutral = config_file(LaunchConfig(), tmp_path, tmp_path)
    one = accelerate_command(LaunchConfig(), "stages.sft", fp32, CPU, neutral)
    assert flag(one, "--config_file") == str(neutral)  # never the machine's `accelerate config` default file
    assert "distributed_type: 'NO'" in neutral.read_text()
    assert one[1:3] == ["-m", "accelerate.commands.launch"] and one[-2:] == ["-m", "stages.sft"]
    assert "--multi_gpu" not in one and "--main_process_port" not in one
    assert flag(one, "--num_processes") == "1" and flag(one, "--mixed_precision") == "no"
    assert flag(one, "--num_cpu_threads_per_process") == "2"

    two = accelerate_command(LaunchConfig(processes=2), "stages.align", fp32, CPU, neutral)
    assert "--multi_gpu" in two and flag(two, "--num_processes") == "2"
    assert flag(two, "--num_cpu_threads_per_process") == "1" and int(flag(two, "--main_process_port")) > 0

    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\n")
    fp16 = Compute("cuda", "nf4", "fp16", "paged_adamw_8bit")
    launch = LaunchConfig(processes=2, accelerate_config="fsdp.yaml")
    fsdp = accelerate_command(launch, "stages.sft", fp16, T4x2, config_file(launch, tmp_path, tmp_path / "unused"))
    assert flag(fsdp, "--config_file") == str(config) and "--multi_gpu" not in fsdp
    assert flag(fsdp, "--mixed_precision") == "fp16" and "--num_cpu_threads_per_process" not in fsdp


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize("changes,key", [({"sft": {"precision": "fp16"}}, "sft.precision"),
                                         ({"launch": {"processes": 64}}, "launch.processes"),
                                         ({"launch": {"accelerate_config": "nowhere.yaml"}},
                                          "launch.accelerate_config")])
def test_launcher_refuses_before_any_work(tmp_path, changes, key):
    """The DVC command fails in seconds, with the key named, before a model or a file is touched."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "data" / "sample", tmp_path / "data" / "sample")
    done = subprocess.run([sys.executable, "-m", "persona.launch", "stages.sft"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 2 and f"error: {key}" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]


def _agreement_worker(rank: int, port: int, same_weights: bool, results) -> None:
    import torch.distributed as dist

    from persona.distributed import agreement
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    weights = [torch.ones(3) if same_weights else torch.full((3,), float(rank))]
    try:
        results[rank] = agreement(weights, f"batch-{rank}")
    except RuntimeError as error:
        results[rank] = str(error)
    dist.destroy_process_group()


def _two_ranks(worker, *args) -> dict:
    """Run `worker(rank, port, *args, results)` as 2 spawned processes; {rank: what it put in results}."""
    from persona.launch import free_port
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.spawn(worker, args=(free_port(), *args, results), nprocs=2)
        return dict(results)


@pytest.mark.parametrize("same_weights", [True, False])
def test_rank_agreement_catches_processes_that_train_apart(same_weights):
    results = _two_ranks(_agreement_worker, same_weights)
    if same_weights:
        assert results[0] == results[1] == {"processes": 2, "ranks_in_sync": True, "ranks_distinct_batches": True}
    else:
        assert all("different weights" in results[rank] for rank in (0, 1))


def test_a_run_with_other_than_the_asked_processes_stops():
    from persona.distributed import check_world_size
    check_world_size(2, 2)
    with pytest.raises(ConfigError, match=r"launch\.processes: 2 asked for, but this run has 1 process"):
        check_world_size(2, 1)


def _stage_worker(rank: int, port: int, folder: str, results) -> None:
    import torch.distributed as dist

    from persona import runner
    os.chdir(folder)
    os.environ["RANK"] = str(rank)  # as accelerate launch sets it: rank 0 alone writes the metrics
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def run(params):
        everyone = [None, None]
        dist.all_gather_object(everyone, rank)
        return {"ranks": everyone}

    runner.main("sft", run)
    results[rank] = dist.is_initialized()


def test_a_launched_stage_leaves_its_process_group_before_exit(tmp_path):
    """A process that exits with its gloo group alive can abort in the interpreter's teardown, after the
    stage's work is done ('terminate called without an active exception', SIGABRT): CI saw GRPO's
    2-process align fail so. `runner.main` destroys the group once the metrics are written."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert _two_ranks(_stage_worker, str(tmp_path)) == {0: False, 1: False}
    assert json.loads((tmp_path / "metrics" / "sft.json").read_text()) == {"ranks": [0, 1]}
