"""Apple-silicon laptops run the pipeline on the CPU: the machine probe must work without Linux-only calls."""
from __future__ import annotations

import os
import resource
import sys

from persona import hardware
from persona.hardware import Machine, peak_memory_mb, resolve_compute


def test_machine_without_cuda_or_an_affinity_call_is_cpu_only(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS has none
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    machine = Machine.detect()
    assert machine == Machine(gpus=0, bf16=False, cpus=os.cpu_count())
    compute = resolve_compute("auto", "auto", "sft", machine=machine)
    assert (compute.device, compute.quant, compute.precision, compute.optimizer) == ("cpu", "none", "fp32",
                                                                                    "adamw_torch")


def test_peak_rss_in_mib_on_linux_and_macos(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")  # ru_maxrss in bytes there
    monkeypatch.setattr(resource, "getrusage", lambda who: type("Usage", (), {"ru_maxrss": 3 * 2**30})())
    assert peak_memory_mb("cpu") == 3 * 1024
    monkeypatch.setattr(sys, "platform", "linux")  # in KiB
    monkeypatch.setattr(resource, "getrusage", lambda who: type("Usage", (), {"ru_maxrss": 3 * 2**20})())
    assert peak_memory_mb("cpu") == 3 * 1024
