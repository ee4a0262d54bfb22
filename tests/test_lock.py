"""requirements.lock is what `make setup` installs: every range of requirements.txt as an exact version, nothing
of torch's (Kaggle and Colab keep their CUDA torch), and the metrics of each run say which versions it ran with."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from persona import evaluate, hardware
from persona.hardware import Compute, run_metrics
from persona.paths import Paths
from tests.conftest import REPO, params_with

# What the issue asks every training and evaluation metrics file to record.
TRACKED = {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"}


def requirements(path: Path) -> list[Requirement]:
    """The requirements of a requirements file; comments (uv's `# via` annotations included) and blanks dropped."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def locked() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in requirements(REPO / "requirements.lock")}


def test_every_range_is_pinned_inside_it_and_nothing_of_torch_is_locked():
    pins = locked()
    assert {name: str(pin.specifier) for name, pin in pins.items()
            if [spec.operator for spec in pin.specifier] != ["=="]} == {}
    for wanted in requirements(REPO / "requirements.txt"):
        name = canonicalize_name(wanted.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is in requirements.txt but not locked: run `make lock`"
        version = next(iter(pins[name].specifier)).version
        assert wanted.specifier.contains(version, prereleases=True), f"lock has {name}=={version}, outside {wanted}"
    # torch and its CUDA stack stay out (nvidia-ml-py is dvclive's pure-Python NVML binding, not CUDA).
    cuda = {name for name in pins if name in ("torch", "triton") or name.startswith("cuda-")
            or (name.startswith("nvidia-") and name != "nvidia-ml-py")}
    assert cuda == set()


def test_the_installed_versions_are_the_locked_ones():
    """What shows `make setup` (run first by `make test`, so by CI) installed exactly the lock."""
    wrong = {}
    for name, pin in locked().items():
        if pin.marker is not None and not pin.marker.evaluate():
            continue  # another platform's or Python's package (pywin32, audioop-lts, ...)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or not pin.specifier.contains(installed, prereleases=True):
            wrong[name] = f"locked {pin.specifier}, installed {installed}"
    assert wrong == {}


def test_training_metrics_carry_the_library_versions(monkeypatch):
    versions = run_metrics(Compute("cpu", "none", "fp32", "adamw_torch"))["versions"]
    assert set(versions) == TRACKED
    assert versions["torch"] == importlib.metadata.version("torch")
    assert versions["transformers"] == importlib.metadata.version("transformers")
    monkeypatch.setattr(hardware, "LIBRARIES", ("torch", "no-such-library"))
    assert hardware.library_versions()["no-such-library"] is None


def test_eval_metrics_carry_the_library_versions(monkeypatch, tmp_path):
    # Only run()'s own work: no model is loaded and nothing is written.
    monkeypatch.setattr(evaluate, "read_dialogues", lambda path: [])
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: ({"n_prompts": 0}, [], {}))
    monkeypatch.setattr(evaluate, "write_outputs", lambda *args: None)
    paths = Paths.under(tmp_path)
    paths.metrics.mkdir()
    for reference in (paths.metrics_file("evaluate_reference"), paths.eval_reference_items):
        reference.write_text("{}")
    result = evaluate.run(params_with(), paths)
    assert set(result["versions"]) == TRACKED
    assert result["versions"]["peft"] == importlib.metadata.version("peft")
