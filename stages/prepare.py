"""DVC stage `prepare`: Synthetic-Persona-Chat -> persona-disjoint train/valid/test dialogues."""
from persona.data import run
from persona.runner import main

main("prepare", run)
