"""Supervised fine-tuning with TRL's SFTTrainer and a (Q)LoRA adapter.

Rows are pre-tokenised `{input_ids, completion_mask}`: the loss falls only on the persona
speaker's tokens. In the `conversation` layout one sequence carries all of a speaker's turns,
so the history is encoded once instead of once per turn (see `python -m persona.bench sft`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

from persona import training
from persona.chat_format import build_dataset
from persona.config import Params
from persona.data import read_dialogues
from persona.distributed import watch_ranks
from persona.hardware import resolve_compute, run_metrics
from persona.likelihood import completion_nll
from persona.models import load_for_training, lora_config, save_model, trainable_parameters
from persona.paths import DEFAULT, Paths

log = logging.getLogger(__name__)


def run(params: Params, paths: Paths = DEFAULT, callbacks: tuple = ()) -> dict:
    """The `sft` stage: train the LoRA adapter, save it (rank 0), return the metrics.

    `callbacks`: extra Trainer callbacks (tests kill a run with one).
    """
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    cfg = params.sft
    prepared, base_path, out_dir, checkpoint_dir = paths.prepared, paths.base, paths.sft, paths.checkpoint_dir("sft")
    compute = resolve_compute(cfg.quant, cfg.precision, "sft", cfg.optimizer)
    expected = training.fingerprint(cfg, [prepared / "train.jsonl"], base_path, lora=asdict(params.lora),
                                    max_length=params.model.max_length, seed=params.seed)
    state, resume, live = training.start_run(compute, params.launch.processes, checkpoint_dir, expected,
                                             paths.curves_dir("sft"))
    set_seed(params.seed)
    started = time.perf_counter()
    model, tokenizer = load_for_training(base_path, compute, cfg.gradient_checkpointing)
    train_set = build_dataset(read_dialogues(prepared / "train.jsonl"), tokenizer, cfg.layout,
                              params.model.max_length)
    eval_set = build_dataset(read_dialogues(prepared / "valid.jsonl"), tokenizer, cfg.layout,
                             params.model.max_length, cfg.max_eval_sequences)
    log.info("%d training and %d eval sequences (%s layout)", len(train_set), len(eval_set), cfg.layout)
    model = get_peft_model(model, lora_config(params.lora))
    trainable, total = trainable_parameters(model)

    # LoRA's B matrix starts at zero, so before training this *is* the base model.
    base_nll, eval_tokens = completion_nll(model, eval_set, tokenizer.pad_token_id, cfg.batch_size)
    args = training.trl_config(SFTConfig, cfg, compute, checkpoint_dir, params.seed,
                               max_length=params.model.max_length, include_num_input_tokens_seen="non_padding",
                               completion_only_loss=True, train_sampling_strategy="group_by_length",
                               remove_unused_columns=True)
    trainer = training.build_trainer(SFTTrainer, model, args, compute, live, callbacks,
                                     train_dataset=train_set.remove_columns("responses"),
                                     eval_dataset=eval_set.remove_columns("responses"), processing_class=tokenizer)
    ranks = watch_ranks(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    sft_nll, _ = completion_nll(model, eval_set, tokenizer.pad_token_id, cfg.batch_size)
    if state.is_main_process:
        training.drop_finished_checkpoints(checkpoint_dir)
        save_model(model, tokenizer, out_dir)
    resumed_step = int(resume.rsplit("-", 1)[1]) if resume else 0
    steps = trainer.state.global_step
    seen = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    runtime = result.metrics["train_runtime"]
    responses_per_row = sum(train_set["responses"]) / max(len(train_set), 1)
    return {
        "layout": cfg.layout, **run_metrics(compute), **ranks.metrics(state.num_processes),
        "trainable_dtype": str(trainer.trainable_dtype),
        "train_sequences": len(train_set), "eval_sequences": len(eval_set), "eval_tokens": eval_tokens,
        "steps": steps, "resumed_from_step": resumed_step,
        "train_loss": training.logged_train_loss(trainer),
        "base_eval_nll": round(base_nll, 4), "base_eval_perplexity": round(math.exp(base_nll), 3),
        "eval_nll": round(sft_nll, 4), "eval_perplexity": round(math.exp(sft_nll), 3),
        "trainable_params": trainable, "trainable_pct": round(100 * trainable / total, 3),
        "tokens_per_s": round(seen / runtime, 1),
        "responses_per_s": round((steps - resumed_step) * cfg.batch_size * cfg.grad_accum * responses_per_row
                                 / runtime, 2),
        "train_wall_s": round(runtime, 1), "stage_wall_s": round(time.perf_counter() - started, 1),
    }
