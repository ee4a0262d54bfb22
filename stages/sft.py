"""DVC stage `sft`: LoRA / QLoRA supervised fine-tuning on the persona speaker's turns."""
from pathlib import Path

from persona import stage
from persona.sft import train_sft

params = stage.start()
metrics = train_sft(params, prepared=Path("data/prepared"), base_path=Path("models/base"),
                    out_dir=Path("models/sft"), checkpoint_dir=Path("checkpoints/sft"),
                    live_dir=Path("dvclive/sft"))
stage.write_metrics("sft", metrics)
