"""DVC stage `ppo`: RLHF of the SFT adapter against the reward model (persona/ppo).

One process: `python -m stages.ppo`. Several (DDP): `accelerate launch --multi_gpu
--num_processes N --num_machines 1 --mixed_precision no -m stages.ppo` (on CPU as well).
"""
from pathlib import Path

from accelerate import PartialState

from persona import stage
from persona.ppo.trainer import train_ppo

params = stage.start()
metrics = train_ppo(params, prepared=Path("data/prepared"), base_path=Path("models/base"),
                    sft_path=Path("models/sft"), reward_path=Path("models/reward"), out_dir=Path("models/ppo"),
                    checkpoint_dir=Path("checkpoints/ppo"), live_dir=Path("dvclive/ppo"))
if PartialState().is_main_process:
    stage.write_metrics("ppo", metrics)
