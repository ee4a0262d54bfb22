"""DVC stage `evaluate_reference`: base and SFT on held-out personas, which no align experiment changes."""
from persona.evaluate import run_reference
from persona.runner import main

main("evaluate_reference", run_reference)
