"""Supervised fine-tuning with TRL's SFTTrainer and a (Q)LoRA adapter.

Rows are pre-tokenised `{input_ids, completion_mask}`: the loss falls only on the persona
speaker's tokens. In the `conversation` layout one sequence carries all of a speaker's turns,
so the history is encoded once instead of once per turn (see `python -m persona.bench sft`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from persona.chat_format import dialogue_examples
from persona.config import Params
from persona.data import Dialogue, read_dialogues
from persona.likelihood import completion_nll
from persona.models import (Compute, load_causal_lm, lora_config, peak_memory_mb, resolve_compute,
                            trainable_parameters)

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"


def build_dataset(dialogues: list[Dialogue], tokenizer, layout: str, max_length: int, limit: int = 0):
    """Tokenised training rows for both speakers of every dialogue (`limit` > 0 caps the rows)."""
    from datasets import Dataset

    rows = {"input_ids": [], "completion_mask": [], "responses": []}
    for dialogue in dialogues:
        for example in dialogue_examples(dialogue, tokenizer, layout, max_length):
            rows["input_ids"].append(example.input_ids)
            rows["completion_mask"].append(example.completion_mask)
            rows["responses"].append(example.responses)
            if limit and len(rows["input_ids"]) >= limit:
                return Dataset.from_dict(rows)
    return Dataset.from_dict(rows)


def fingerprint(params: Params, train_path: Path, base_path: Path) -> dict:
    """What a checkpoint depends on; a checkpoint from other inputs must not be resumed."""
    digest = hashlib.sha256(train_path.read_bytes()).hexdigest()
    base = json.loads((base_path / "persona_base.json").read_text()) if (base_path / "persona_base.json").exists() \
        else str(base_path)
    return {"sft": asdict(params.sft), "lora": asdict(params.lora), "max_length": params.model.max_length,
            "seed": params.seed, "train_sha256": digest, "base": base}


def prepare_checkpoints(folder: Path, expected: dict) -> str | None:
    """Return the checkpoint to resume from, wiping checkpoints of other inputs."""
    stamp = folder / FINGERPRINT
    if folder.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != expected):
        log.info("checkpoints in %s are from other params or data: starting afresh", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(expected, indent=2))
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [c for c in checkpoints if (c / "trainer_state.json").exists()]
    if complete:
        log.info("resuming from %s", complete[-1])
        return str(complete[-1])
    return None


class LiveCurves(TrainerCallback):
    """Trainer logs -> dvclive curves keyed by optimizer step (`train/loss`, `eval/loss`, ...).

    transformers' own DVCLiveCallback advances one dvclive step per log call, so train and
    eval logs interleave and the x axis stops meaning training steps.
    """

    def __init__(self, live):
        self.live = live

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self.live.step = state.global_step
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) and not key.startswith("train_") \
                    and not key.endswith(("runtime", "per_second")):
                split, name = key.split("_", 1) if key.startswith("eval_") else ("train", key)
                self.live.log_metric(f"{split}/{name}", value)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.live.end()


def trl_config(train, compute: Compute, output_dir: Path, seed: int, max_length: int, **extra):
    """A TRL config with precision always explicit: TRL 1.x defaults to bf16, ~9x slower on AVX2 CPUs."""
    from trl import SFTConfig
    return SFTConfig(
        output_dir=str(output_dir), seed=seed, data_seed=seed,
        num_train_epochs=train.epochs, max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size, per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum, learning_rate=train.lr, weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a share of the steps lr_scheduler_type="cosine", optim=compute.optimizer,
        bf16=compute.precision == "bf16", fp16=compute.precision == "fp16", use_cpu=compute.device == "cpu",
        gradient_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps, eval_strategy="steps", eval_steps=train.eval_steps,
        save_strategy="steps", save_steps=train.save_steps, save_total_limit=2,
        report_to="none", disable_tqdm=False, max_length=max_length,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, **extra)


def train_sft(params: Params, prepared: Path, base_path: Path, out_dir: Path, checkpoint_dir: Path,
              live_dir: Path, callbacks: tuple = ()) -> dict:
    """The `sft` stage: train the LoRA adapter, save it, return the metrics."""
    from dvclive import Live
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTTrainer

    cfg = params.sft
    compute = resolve_compute(cfg.quant, cfg.precision, "sft")
    set_seed(params.seed)
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(base_path, compute, cfg.gradient_checkpointing)
    train_set = build_dataset(read_dialogues(prepared / "train.jsonl"), tokenizer, cfg.layout,
                              params.model.max_length)
    eval_set = build_dataset(read_dialogues(prepared / "valid.jsonl"), tokenizer, cfg.layout,
                             params.model.max_length, cfg.max_eval_sequences)
    log.info("%d training and %d eval sequences (%s layout)", len(train_set), len(eval_set), cfg.layout)
    model = get_peft_model(model, lora_config(params.lora))
    trainable, total = trainable_parameters(model)

    # LoRA's B matrix starts at zero, so before training this *is* the base model.
    base_nll, eval_tokens = completion_nll(model, eval_set, tokenizer.pad_token_id, cfg.batch_size)
    resume = prepare_checkpoints(checkpoint_dir, fingerprint(params, prepared / "train.jsonl", base_path))
    live = Live(str(live_dir), resume=resume is not None, save_dvc_exp=False, dvcyaml=None)
    args = trl_config(cfg, compute, checkpoint_dir, params.seed, params.model.max_length,
                      completion_only_loss=True, train_sampling_strategy="group_by_length",
                      remove_unused_columns=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set.remove_columns("responses"),
                         eval_dataset=eval_set.remove_columns("responses"), processing_class=tokenizer,
                         callbacks=[LiveCurves(live), *callbacks])
    result = trainer.train(resume_from_checkpoint=resume)
    for finished in checkpoint_dir.glob("checkpoint-*"):  # they exist to resume a killed run, not a done one
        shutil.rmtree(finished)
    sft_nll, _ = completion_nll(model, eval_set, tokenizer.pad_token_id, cfg.batch_size)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    resumed_step = int(resume.rsplit("-", 1)[1]) if resume else 0
    steps = trainer.state.global_step
    seen = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    runtime = result.metrics["train_runtime"]
    responses_per_row = sum(train_set["responses"]) / max(len(train_set), 1)
    return {
        "layout": cfg.layout, "quant": compute.quant, "precision": compute.precision, "device": compute.device,
        "train_sequences": len(train_set), "eval_sequences": len(eval_set), "eval_tokens": eval_tokens,
        "steps": steps, "resumed_from_step": resumed_step,
        "train_loss": round(result.metrics["train_loss"], 4),
        "base_eval_nll": round(base_nll, 4), "base_eval_perplexity": round(math.exp(base_nll), 3),
        "eval_nll": round(sft_nll, 4), "eval_perplexity": round(math.exp(sft_nll), 3),
        "trainable_params": trainable, "trainable_pct": round(100 * trainable / total, 3),
        "tokens_per_s": round(seen / runtime, 1),
        "responses_per_s": round((steps - resumed_step) * cfg.batch_size * cfg.grad_accum * responses_per_row / runtime, 2),
        "train_wall_s": round(runtime, 1), "stage_wall_s": round(time.perf_counter() - started, 1),
        "peak_memory_mb": round(peak_memory_mb(compute.device), 1),
    }
