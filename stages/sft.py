"""DVC stage `sft`: LoRA / QLoRA supervised fine-tuning on the persona speaker's turns (started by persona.launch)."""
from persona.runner import main
from persona.sft import run

main("sft", run)
