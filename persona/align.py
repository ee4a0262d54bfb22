"""The `align` stage: the SFT adapter aligned by `align.algorithm`, saved to models/policy.

Evaluation, chat, web and export find the aligned adapter there and call it by its algorithm's
name, so `dvc exp run -S align.algorithm=...` compares algorithms with one stage and one metrics file.
"""
from __future__ import annotations

from persona.config import Params
from persona.dpo import train_dpo
from persona.grpo import train_grpo
from persona.mdpo import train_mdpo
from persona.paths import DEFAULT, Paths
from persona.ppo.trainer import train_ppo

TRAINERS = {"ppo": train_ppo, "dpo": train_dpo, "grpo": train_grpo, "mdpo": train_mdpo}


def run(params: Params, paths: Paths = DEFAULT, stop_after: int | None = None) -> dict:
    """Align with `align.algorithm`; `stop_after` ends the run after that step (tests of resuming)."""
    algorithm = params.align.algorithm
    return {"algorithm": algorithm, **TRAINERS[algorithm](params, paths, stop_after)}
