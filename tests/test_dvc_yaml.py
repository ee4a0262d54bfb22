"""dvc.yaml says exactly what each stage reads and writes: `dvc repro` reruns every stage an edit affects, and
only those. The deps are checked against each stage's import closure, the outputs against persona/paths.py."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from persona.paths import DEFAULT, METRICS_FILES, STAGES, TRAINING_STAGES
from persona.plots import curves_chart, curves_folder
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# `plots` draws the training curves as PNGs (persona/plots.py). It reads no params and writes no metrics file,
# unlike every stage in paths.STAGES.
PLOTS = "plots"


def module_file(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def imported_modules(path: Path) -> set[str]:
    """Every persona module `path` imports, at module level or inside functions (`from persona import x` too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}")}
    return {name for name in found if name.split(".")[0] == "persona"}


def closure(modules: list[str]) -> set[str]:
    """Repo-relative files of `modules` and everything they import, transitively; a package's __init__
    counts, as importing a submodule runs it."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # persona.ppo.kl runs persona/__init__ and persona/ppo/__init__
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                todo += imported_modules(path)
    return {p.relative_to(REPO).as_posix() for p in seen}


def entry_modules(stage: str) -> list[str]:
    return [f"stages.{stage}"] + (["persona.launch"] if stage in TRAINING_STAGES else [])


def code_deps(stage: str) -> set[str]:
    """What dvc.yaml must list for `stage`: its script and every persona file it imports."""
    return {f for f in closure(entry_modules(stage)) if f.startswith(("persona/", "stages/"))} - {"stages/__init__.py"}


def listed_deps(stage: str) -> list[str]:
    return DVC[stage]["deps"]


def dep_problems(stage: str, deps: list[str]) -> list[str]:
    wanted = code_deps(stage)
    listed = {d for d in deps if d.startswith(("persona/", "stages/"))}
    return [f"{stage}: missing dep {f} (imported)" for f in sorted(wanted - listed)] + \
        [f"{stage}: dep {f} is never imported" for f in sorted(listed - wanted)]


def test_the_stages_are_the_ones_paths_names():
    assert list(DVC) == [*STAGES, PLOTS]


def test_the_committed_lock_records_only_pipeline_stages():
    """DVC never drops a removed stage from dvc.lock by itself: a stale entry would outlive its stage's rename."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(DVC)


@pytest.mark.parametrize("stage", [*STAGES, PLOTS])
def test_deps_are_exactly_the_code_a_stage_imports(stage):
    assert dep_problems(stage, listed_deps(stage)) == []


@pytest.mark.parametrize("stage", [*STAGES, PLOTS])
def test_dropping_any_one_code_dep_is_caught(stage):
    deps = listed_deps(stage)
    for dep in [d for d in deps if d.startswith("persona/")]:
        assert dep_problems(stage, [d for d in deps if d != dep]) == [f"{stage}: missing dep {dep} (imported)"]


def test_function_level_imports_are_followed():
    """pairs loads its policies through persona.models, and the base stage's GGUF path is a function import."""
    assert "persona/models.py" in code_deps("pairs")
    assert "persona/ppo/trainer.py" in code_deps("align")


def outputs(stage: str) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for o in DVC[stage].get("outs", [])}


def metrics(stage: str) -> set[str]:
    return {next(iter(m)) for m in DVC[stage].get("metrics", [])}


def test_outputs_and_metrics_are_the_paths_module_names():
    expected_outs = {"prepare": {DEFAULT.prepared}, "base": {DEFAULT.base}, "sft": {DEFAULT.sft},
                     "pairs": {DEFAULT.pairs}, "reward": {DEFAULT.reward}, "align": {DEFAULT.policy},
                     "evaluate_reference": {DEFAULT.eval_reference_items},
                     "evaluate": {DEFAULT.eval_samples, DEFAULT.eval_report, DEFAULT.eval_chart}}
    for stage in STAGES:
        assert outputs(stage) == {p.as_posix() for p in expected_outs[stage]}, stage
        assert metrics(stage) == {DEFAULT.metrics_file(stage).as_posix()}, stage
    assert set(METRICS_FILES) == set(STAGES)


def test_data_deps_are_what_each_stage_reads():
    """Artifact deps: each one produced by an earlier stage (or the bundled sample)."""
    produced = {"data/sample"}
    for stage in STAGES:
        data_deps = {d for d in listed_deps(stage) if not d.startswith(("persona/", "stages/"))}
        assert data_deps <= produced, f"{stage} reads {data_deps - produced}, which no earlier stage writes"
        produced |= outputs(stage) | metrics(stage)  # evaluate reads evaluate_reference's metrics


def test_training_stages_start_through_the_launcher_and_the_rest_directly():
    for stage in STAGES:
        launcher = "python -m persona.launch " if stage in TRAINING_STAGES else "python -m "
        assert DVC[stage]["cmd"].split("#")[0].strip() == f"{launcher}stages.{stage}"


def test_curves_and_plots_name_the_stage_folders():
    for stage in TRAINING_STAGES:
        plots = {next(iter(p)) for p in DVC[stage]["plots"]}
        assert plots == {curves_folder(DEFAULT, stage).as_posix()}


def test_the_plots_stage_draws_every_training_stage_curves():
    """It reruns when any training stage's curves change, and only then (or when its code does)."""
    data_deps = {d for d in listed_deps(PLOTS) if not d.startswith(("persona/", "stages/"))}
    assert data_deps == {curves_folder(DEFAULT, stage).as_posix() for stage in TRAINING_STAGES}
    assert outputs(PLOTS) == {curves_chart(DEFAULT, stage).as_posix() for stage in TRAINING_STAGES}
    assert all(out[path]["cache"] is False for out in DVC[PLOTS]["outs"] for path in out)  # git keeps them
    assert "params" not in DVC[PLOTS] and "metrics" not in DVC[PLOTS]
