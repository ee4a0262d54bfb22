"""PPO checkpoints: save every `ppo.save_steps`, resume a killed run, never resume another run's state.

A checkpoint holds the trainable weights (the policy's adapter and the value head), the optimizer,
the KL coefficient, the step and the points the curves got up to it, plus a fingerprint of everything
the run depends on (params, input files, base model, seed, processes): a checkpoint from other inputs
is ignored, not resumed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from persona.config import Params
from persona.paths import Paths
from persona.ppo.policy import TRAINABLE
from persona.training import fingerprint

log = logging.getLogger(__name__)
STATE = "ppo_state.pt"


def run_fingerprint(params: Params, paths: Paths, processes: int) -> dict:
    return fingerprint(params.ppo, [paths.prepared / "train.jsonl", paths.sft / "adapter_model.safetensors",
                                    paths.reward], paths.base,
                       seed=params.seed, processes=processes)


def save_state(folder: Path, step: int, module, optimizer, controller, expected: dict, curves: list[dict]) -> None:
    """`curves`: each step's point logged so far (trainer.log_curves), for a resumed run to redraw."""
    trainable = {k: v for k, v in module.state_dict().items()
                 if k.startswith("value_head") or f".{TRAINABLE}." in k}
    torch.save({"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(),
                "kl_coef": controller.value, "curves": curves, "fingerprint": expected}, folder / f"{STATE}.tmp")
    (folder / f"{STATE}.tmp").replace(folder / STATE)  # never leave a half-written checkpoint


def load_state(folder: Path, expected: dict) -> dict | None:
    path = folder / STATE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a damaged file fails in torch's zip reader or in unpickling
        log.warning("discarding %s, which cannot be read (%s: %s): starting afresh", path, type(error).__name__,
                    error)
        path.unlink(missing_ok=True)  # every DDP rank gets here: the first one deletes it
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected:
        log.info("PPO checkpoint in %s is from other params or inputs: starting afresh", folder)
        return None
    return state


def resume(folder: Path, expected: dict, module, optimizer, controller) -> tuple[int, list[dict]]:
    """Load this run's checkpoint from `folder` into `module` (unwrapped), `optimizer` and `controller`, if there
    is one; the step to start from and the curves' points up to it."""
    folder.mkdir(parents=True, exist_ok=True)
    state = load_state(folder, expected)
    if state is None:
        return 0, []
    module.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    controller.value = state["kl_coef"]
    log.info("resuming PPO from step %d", state["step"])
    # a checkpoint saved before checkpoints kept the curves resumes too, its curves starting at its step
    return state["step"], state.get("curves", [])
