"""DVC stage `base`: resolve `model.name` once and save it as a plain safetensors checkpoint."""
from pathlib import Path

from persona import stage
from persona.models import materialize_base

params = stage.start()
materialize_base(params.model.name, Path("models/base"), trust_remote_code=params.model.trust_remote_code)
