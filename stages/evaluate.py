"""DVC stage `evaluate`: the aligned policy beside evaluate_reference's base and SFT -> metrics/eval.json + report."""
from persona.evaluate import run
from persona.runner import main

main("evaluate", run)
