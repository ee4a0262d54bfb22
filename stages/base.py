"""DVC stage `base`: resolve `model.name` once and save it as a plain safetensors checkpoint."""
from persona.models import run
from persona.runner import main

main("base", run)
