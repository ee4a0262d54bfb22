"""What every DVC stage script does: logging, params checked before any work, `run(params)`, metrics JSON.

A stage script is `runner.main("sft", run)`. Errors a user can cause (bad params, a malformed
row, a missing input) print one line naming the key, file or row, and exit 2.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from persona.config import ConfigError, Params, load_params
from persona.data import MalformedRowError
from persona.files import write_text_atomic
from persona.paths import DEFAULT

USER_ERRORS = (ConfigError, MalformedRowError, FileNotFoundError)


def main(stage: str, run: Callable[[Params], dict]) -> None:
    """Run one DVC stage: its params, its `run`, then its metrics file (paths.METRICS_FILES)."""
    write_metrics(DEFAULT.metrics_file(stage), run(start()))
    leave_process_group()


def leave_process_group() -> None:
    """Destroy a launched run's process group before the interpreter exits: gloo's worker threads can still
    hold tensors then, and the teardown aborts the process at random ("terminate called without an active
    exception", SIGABRT) after the stage's work is done, failing the stage (pytorch/pytorch#190489)."""
    distributed = sys.modules.get("torch.distributed")  # a stage that never imported torch has no group
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def start(params_path: str | Path = DEFAULT.params) -> Params:
    """Configure logging and load + validate params before any work starts."""
    sys.excepthook = _report_user_errors
    start_logging()
    return load_params(params_path)


def start_logging() -> None:
    logging.basicConfig(level=os.environ.get("PERSONA_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)  # a library may have configured logging on import
    # bitsandbytes warns on import about an optional CPU kernel package it can live without.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def write_metrics(path: Path, metrics: dict) -> Path:
    """Sorted JSON, so `dvc metrics diff` lines up across commits (rank 0 only), written atomically: a kill
    leaves the previous file, never half of one."""
    if not is_main_process():
        return path
    write_text_atomic(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    logging.getLogger("persona").info("wrote %s", path)
    return path


def is_main_process() -> bool:
    """Rank 0 of a launched multi-process run, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _report_user_errors(kind, error, trace):
    """Bad params or data: one line naming the key, file or row, not a traceback."""
    if issubclass(kind, USER_ERRORS):
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    sys.__excepthook__(kind, error, trace)
