"""What every DVC stage script does first and last: logging, params, metrics JSON."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from persona.config import Params, load_params

METRICS_DIR = Path("metrics")


def start(params_path: str = "params.yaml") -> Params:
    """Configure logging and load + validate params before any work starts."""
    logging.basicConfig(level=os.environ.get("PERSONA_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return load_params(params_path)


def write_metrics(name: str, metrics: dict) -> Path:
    """metrics/<name>.json, flat and sorted so `dvc metrics diff` lines up across commits."""
    METRICS_DIR.mkdir(exist_ok=True)
    path = METRICS_DIR / f"{name}.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    logging.getLogger("persona").info("wrote %s: %s", path, json.dumps(metrics, sort_keys=True))
    return path
