"""Start a training stage under `accelerate launch`, after checking params against this machine.

DVC runs `python -m persona.launch stages.sft` (likewise reward, align). This module reads the
`launch` params, checks the stage's quant/precision/optimizer and the process count against
the hardware (bf16 on a T4, fp16 on a CPU, a paged optimizer without CUDA, more processes than
GPUs all fail here, in a second, before a model loads), then runs accelerate's launcher with
explicit flags and a config file of its own, so an `accelerate config` default file left on the
machine does not change what a run does.

One process is the plain case; N > 1 is DDP (`--multi_gpu`, which on a CPU-only machine runs
N CPU processes over gloo; `accelerate launch --cpu` would start only one). A
`launch.accelerate_config` file (FSDP, DeepSpeed ZeRO, ...) replaces the DDP flags; the process
count and mixed precision still come from params.
"""
from __future__ import annotations

import logging
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from persona import runner
from persona.config import LaunchConfig, Params, resolve_path
from persona.hardware import Compute, Machine, check_processes, resolve_compute
from persona.paths import TRAINING_STAGES

log = logging.getLogger(__name__)
MODULES = {f"stages.{stage}": stage for stage in TRAINING_STAGES}


def check_machine(params: Params, stage: str, machine: Machine) -> Compute:
    """What training stage `stage` will run as on `machine`; ConfigError naming the param if it cannot."""
    section = params.training_section(stage)
    cfg = getattr(params, section)
    compute = resolve_compute(cfg.quant, cfg.precision, section, cfg.optimizer, machine)
    check_processes(params.launch.processes, machine, compute)
    return compute


def config_file(launch: LaunchConfig, base_dir: Path, scratch: Path) -> Path:
    """`launch.accelerate_config`, or else a neutral one written into `scratch`: with no
    --config_file, accelerate reads the machine's `accelerate config` default file, and a DeepSpeed
    or FSDP setup left there would silently change the run."""
    if launch.accelerate_config:
        return resolve_path(base_dir, launch.accelerate_config)
    neutral = scratch / "accelerate.yaml"
    neutral.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\n")
    return neutral


def accelerate_command(launch: LaunchConfig, module: str, compute: Compute, machine: Machine,
                       config: Path) -> list[str]:
    """The full `accelerate launch` command line for one stage module (`config`: see `config_file`)."""
    n = launch.processes
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if n > 1 and not launch.accelerate_config:
        command += ["--multi_gpu"]
    command += ["--num_processes", str(n), "--num_machines", "1",
                "--mixed_precision", compute.mixed_precision, "--dynamo_backend", "no"]
    if compute.device == "cpu":  # split the cores; torch would give every process all of them
        command += ["--num_cpu_threads_per_process", str(max(1, machine.cpus // n))]
    if n > 1:  # a free port: two runs on one machine (or a test beside a run) must not collide
        command += ["--main_process_port", str(free_port())]
    return command + ["-m", module]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in MODULES:
        raise SystemExit(f"usage: python -m persona.launch {{{','.join(MODULES)}}}")
    module = argv[0]
    params = runner.start()
    machine = Machine.detect()
    compute = check_machine(params, MODULES[module], machine)
    with tempfile.TemporaryDirectory() as scratch:
        config = config_file(params.launch, Path("."), Path(scratch))
        command = accelerate_command(params.launch, module, compute, machine, config)
        log.info("%s on %s: %s", MODULES[module], machine.describe(), shlex.join(command))
        return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))  # a ConfigError prints one line and exits 2 (runner.start's hook)
