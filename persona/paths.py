"""Every file and folder the pipeline reads or writes, named once.

Stage modules, the command line's defaults, benchmarks and tests take their paths from here, and a
test checks that dvc.yaml names the same ones. Paths are relative to the repo root, where DVC runs
every stage; `Paths.under(folder)` moves them all (tests, the GPU check).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

# The DVC stages in pipeline order. The aligned-policy stage is `align` whatever its algorithm, and its
# adapter is evaluated under the algorithm's name (`align.algorithm`). Base and SFT are evaluated in their own
# stage, `evaluate_reference`, which no align experiment invalidates; `evaluate` adds the aligned policy.
STAGES = ("prepare", "base", "sft", "pairs", "reward", "align", "evaluate_reference", "evaluate")
TRAINING_STAGES = ("sft", "reward", "align")  # started by `python -m persona.launch stages.NAME`
METRICS_FILES = {"prepare": "data.json", "base": "base.json", "sft": "sft.json", "pairs": "pairs.json",
                 "reward": "reward.json", "align": "align.json", "evaluate_reference": "eval_reference.json",
                 "evaluate": "eval.json"}


@dataclass(frozen=True)
class Paths:
    params: Path = Path("params.yaml")
    sample: Path = Path("data/sample")  # the bundled SPC sample (`data.source: sample`)
    prepared: Path = Path("data/prepared")  # {train,valid,test}.jsonl, malformed.jsonl
    pairs: Path = Path("data/pairs")  # {train,valid}.jsonl
    base: Path = Path("models/base")
    sft: Path = Path("models/sft")
    reward: Path = Path("models/reward")
    policy: Path = Path("models/policy")  # the aligned policy's adapter
    metrics: Path = Path("metrics")
    # base's and SFT's per-item values and replies, for the evaluate stage's paired comparisons and samples
    eval_reference_items: Path = Path("metrics/eval_reference_items.json")
    eval_samples: Path = Path("metrics/eval_samples.jsonl")  # the evaluate stage's per-prompt replies
    eval_report: Path = Path("metrics/report.md")
    eval_bars: Path = Path("metrics/eval_bars.csv")  # `dvc plots` data
    eval_chart: Path = Path("metrics/eval.png")
    checkpoints: Path = Path("checkpoints")  # checkpoints/<stage>: not DVC outputs, so a killed stage resumes
    curves: Path | None = Path("dvclive")  # dvclive/<stage>; None = no curves (runs without dvc installed)

    @classmethod
    def under(cls, root: Path, **changes) -> Paths:
        """Every output below `root` instead of the repo root; the inputs (params, sample) stay."""
        moved = {f.name: root / f.default for f in dataclasses.fields(cls)
                 if f.default is not None and f.name not in ("params", "sample")}
        return cls(**{**moved, **changes})

    def metrics_file(self, stage: str) -> Path:
        return self.metrics / METRICS_FILES[stage]

    def checkpoint_dir(self, stage: str) -> Path:
        return self.checkpoints / stage

    def curves_dir(self, stage: str) -> Path | None:
        return None if self.curves is None else self.curves / stage

    def adapters(self, algorithm: str) -> dict[str, Path]:
        """Evaluation's policies with an adapter: `sft`, and the aligned one under its algorithm's name."""
        return {"sft": self.sft, algorithm: self.policy}


DEFAULT = Paths()
