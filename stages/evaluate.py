"""DVC stage `evaluate`: base vs SFT (vs PPO) on held-out personas -> metrics/eval.json + report."""
from pathlib import Path

from persona import stage
from persona.data import read_dialogues
from persona.evaluate import POLICY_ADAPTERS, evaluate, write_outputs

params = stage.start()
cfg = params.evaluate
dialogues = read_dialogues(Path("data/prepared") / f"{cfg.split}.jsonl")
result, samples = evaluate(dialogues, cfg, Path("models/base"), POLICY_ADAPTERS, params.model.max_length,
                           params.seed, reward_path=Path("models/reward"))
metrics = Path("metrics")
write_outputs(result, samples, metrics / "eval.json", metrics / "eval_samples.jsonl", metrics / "report.md",
              metrics / "eval_bars.csv", metrics / "eval.png")
