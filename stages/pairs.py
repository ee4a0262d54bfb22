"""DVC stage `pairs`: chosen/rejected reply pairs for the reward model, made with the SFT policy."""
from persona.pairs import run
from persona.runner import main

main("pairs", run)
