"""DVC stage `reward`: the persona-consistency reward model, LoRA + score head (started by persona.launch)."""
from persona.reward import run
from persona.runner import main

main("reward", run)
