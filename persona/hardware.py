"""The machine and what it will do: GPUs, native bf16, cores; quant/precision/optimizer resolved
against them, naming the param that asks for what this machine cannot do."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

from persona.config import ConfigError


@dataclass(frozen=True)
class Machine:
    """What this machine offers; tests pass one in to check params against other hardware."""
    gpus: int  # CUDA devices visible
    bf16: bool  # native bf16 (compute capability >= 8.0: A100, H100, RTX 30xx+; not T4 / V100)
    cpus: int

    @classmethod
    def detect(cls) -> Machine:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # is_bf16_supported() says True on a T4 (bf16 emulated, far slower than fp16): ask for native.
        bf16 = gpus > 0 and torch.cuda.is_bf16_supported(including_emulation=False)
        return cls(gpus=gpus, bf16=bf16, cpus=usable_cpus())

    def describe(self) -> str:
        if self.gpus:
            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
            return f"{self.gpus} x {name}"
        return f"CPU only, {self.cpus} cores"


def usable_cpus() -> int:
    """The cores this process may run on (a container or `taskset` can allow fewer than the machine has); macOS
    has no affinity call, so there it is every core."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Compute:
    """What the machine will actually do for a requested quant/precision/optimizer."""
    device: str  # cpu | cuda
    quant: str  # nf4 | none
    precision: str  # fp32 | fp16 | bf16
    optimizer: str  # a transformers `optim` name

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the precision (`--mixed_precision`, `Accelerator(mixed_precision=...)`)."""
        return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[self.precision]


def resolve_compute(quant: str, precision: str, section: str, optimizer: str = "auto",
                    machine: Machine | None = None) -> Compute:
    """Resolve `auto` and reject what this machine cannot honour, naming the param."""
    machine = machine or Machine.detect()
    cuda = machine.gpus > 0
    if precision == "auto":
        precision = ("bf16" if machine.bf16 else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError(f"{section}.precision: fp16 needs a CUDA GPU (CPU fp16 training is not supported); use fp32")
    if precision == "bf16" and not machine.bf16:
        where = "this GPU has no native bf16 (T4 / V100 class); use fp16" if cuda else \
            "CPU bf16 is ~9x slower here; use fp32"
        raise ConfigError(f"{section}.precision: bf16 rejected: {where}")
    if quant == "auto":
        quant = "nf4" if cuda else "none"
    if optimizer == "auto":
        optimizer = "paged_adamw_8bit" if cuda and quant == "nf4" else "adamw_torch"
    if optimizer.startswith("paged_") and not cuda:
        raise ConfigError(f"{section}.optimizer: {optimizer} pages optimizer state through CUDA memory and this "
                          "machine has no CUDA GPU; use adamw_torch or adamw_8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        for key, value in (("quant", quant), ("optimizer", optimizer)):
            if value == "nf4" or value.startswith("paged_") or value.endswith("8bit"):
                raise ConfigError(f"{section}.{key}: {value} needs bitsandbytes (pip install bitsandbytes)")
    return Compute("cuda" if cuda else "cpu", quant, precision, optimizer)


def check_processes(processes: int, machine: Machine, compute: Compute) -> None:
    """One process per GPU (or per CPU core): more would share a device and gain nothing."""
    devices, kind = (machine.gpus, "CUDA GPUs") if compute.device == "cuda" else (machine.cpus, "CPU cores")
    if processes > devices:
        raise ConfigError(f"launch.processes: {processes} processes but this machine has {devices} {kind}")


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


# The libraries whose releases can change a run's numbers (kernels, sampling, trainers, quantization, launch).
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def library_versions() -> dict[str, str | None]:
    """Installed version of each of LIBRARIES (None when absent), so a metrics diff between two runs shows
    when a library moved; requirements.lock pins all but torch, which Kaggle/Colab preinstall."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_metrics(compute: Compute) -> dict:
    """What every training stage reports about how it ran: quant, precision, device, optimizer, peak memory,
    and the library versions it ran with."""
    return {"quant": compute.quant, "precision": compute.precision, "device": compute.device,
            "optimizer": compute.optimizer, "peak_memory_mb": round(peak_memory_mb(compute.device), 1),
            "versions": library_versions()}
