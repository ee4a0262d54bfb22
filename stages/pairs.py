"""DVC stage `pairs`: chosen/rejected reply pairs for the reward model, made with the SFT policy."""
from pathlib import Path

from persona import stage
from persona.models import load_policies
from persona.pairs import make_pairs

params = stage.start()
model, tokenizer = load_policies(Path("models/base"), {"sft": Path("models/sft")}, param="pairs")
metrics = make_pairs(Path("data/prepared"), model, tokenizer, params.pairs, params.seed, Path("data/pairs"))
stage.write_metrics("pairs", metrics)
