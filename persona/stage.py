"""What every DVC stage script does first and last: logging, params, metrics JSON."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from persona.config import ConfigError, Params, load_params
from persona.data import MalformedRowError

USER_ERRORS = (ConfigError, MalformedRowError, FileNotFoundError)

METRICS_DIR = Path("metrics")


def start(params_path: str = "params.yaml") -> Params:
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


def write_metrics(name: str, metrics: dict) -> Path:
    """metrics/<name>.json, flat and sorted so `dvc metrics diff` lines up across commits (rank 0 only)."""
    path = METRICS_DIR / f"{name}.json"
    if not is_main_process():
        return path
    METRICS_DIR.mkdir(exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    logging.getLogger("persona").info("wrote %s: %s", path, json.dumps(metrics, sort_keys=True))
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
