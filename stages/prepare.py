"""DVC stage `prepare`: Synthetic-Persona-Chat -> persona-disjoint train/valid/test dialogues."""
from pathlib import Path

from persona import stage
from persona.data import prepare

params = stage.start()
data = params.data
metrics = prepare(data.source, data.hub_id, data.fraction, data.on_malformed, data.valid_fraction,
                  data.test_fraction, params.seed, out_dir=Path("data/prepared"))
stage.write_metrics("data", metrics)
