"""DVC stage `ppo`: RLHF of the SFT adapter against the reward model (persona/ppo).

Started by `python -m persona.launch stages.ppo` (accelerate launch, `launch` params).
"""
from pathlib import Path

from persona import stage
from persona.ppo.trainer import train_ppo

params = stage.start()
metrics = train_ppo(params, prepared=Path("data/prepared"), base_path=Path("models/base"),
                    sft_path=Path("models/sft"), reward_path=Path("models/reward"), out_dir=Path("models/ppo"),
                    checkpoint_dir=Path("checkpoints/ppo"), live_dir=Path("dvclive/ppo"))
stage.write_metrics("ppo", metrics)
