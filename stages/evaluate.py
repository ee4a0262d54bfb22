"""DVC stage `evaluate`: base vs SFT vs the aligned policy on held-out personas -> metrics/eval.json + report."""
from persona.evaluate import run
from persona.runner import main

main("evaluate", run)
