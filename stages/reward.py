"""DVC stage `reward`: the persona-consistency reward model (LoRA + score head) on the pairs."""
from pathlib import Path

from persona import stage
from persona.reward import train_reward

params = stage.start()
metrics = train_reward(params, pairs_dir=Path("data/pairs"), base_path=Path("models/base"),
                       out_dir=Path("models/reward"), checkpoint_dir=Path("checkpoints/reward"),
                       live_dir=Path("dvclive/reward"))
stage.write_metrics("reward", metrics)
