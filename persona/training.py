"""Plumbing shared by the training stages (sft, reward, ppo): configs, checkpoints, curves, optimizers.

Kept apart from the stages so all train with the same precision rules, the same
resume-or-wipe checkpoint policy, the same dvclive layout and the same multi-process rules
(rank 0 alone writes files).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from persona.config import TrainConfig
from persona.distributed import check_world_size
from persona.hardware import Compute
from persona.models import BASE_INFO

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"


def fingerprint(train: TrainConfig, inputs: list[Path], base_path: Path, **settings) -> dict:
    """What a checkpoint depends on; a checkpoint from other inputs must not be resumed."""
    info = base_path / BASE_INFO
    base = json.loads(info.read_text()) if info.exists() else str(base_path)
    digests = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs}
    return {"train": asdict(train), "inputs_sha256": digests, "base": base, **settings}


def prepare_checkpoints(folder: Path, expected: dict, writer: bool = True) -> str | None:
    """Return the checkpoint to resume from, wiping checkpoints of other inputs (only if `writer`)."""
    stamp = folder / FINGERPRINT
    if writer:
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


def drop_finished_checkpoints(folder: Path) -> None:
    """Checkpoints exist to resume a killed run, not a finished one."""
    for finished in folder.glob("checkpoint-*"):
        shutil.rmtree(finished)


def start_run(compute: Compute, processes: int, checkpoint_dir: Path, expected: dict, live_dir: Path | None):
    """(process state, checkpoint to resume or None, dvclive logger or None) for a Trainer run of
    `processes` processes (`launch.processes`).

    Initialising accelerate's state first makes each process's GPU current before the model
    loads (QLoRA places the 4-bit weights there). Rank 0 decides about old checkpoints while
    the others wait, then they read the same answer; only rank 0 logs curves.
    """
    from accelerate import PartialState

    state = PartialState(cpu=compute.device == "cpu")
    check_world_size(processes, state.num_processes)
    with state.main_process_first():
        resume = prepare_checkpoints(checkpoint_dir, expected, writer=state.is_main_process)
    return state, resume, open_live(live_dir, resume is not None, state.is_main_process)


def open_live(live_dir: Path | None, resume: bool, main_process: bool):
    """The stage's dvclive logger on rank 0; None elsewhere or without `live_dir` (no dvc needed then)."""
    if live_dir is None or not main_process:
        return None
    from dvclive import Live
    return Live(str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None)


def build_optimizer(name: str, parameters, lr: float):
    """The optimizer a `*.optimizer` param names (as resolved by `resolve_compute`), for our own loops."""
    if name == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=lr)
    import bitsandbytes as bnb
    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name](parameters, lr=lr)


class LiveCurves(TrainerCallback):
    """Trainer logs -> dvclive curves keyed by optimizer step (`train/loss`, `eval/loss`, ...).

    transformers' own DVCLiveCallback advances one dvclive step per log call, so train and
    eval logs interleave and the x axis stops meaning training steps.
    """

    def __init__(self, live):
        self.live = live

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is None or not state.is_world_process_zero:
            return
        self.live.step = state.global_step
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) and not key.startswith("train_") \
                    and not key.endswith(("runtime", "per_second")):
                split, name = key.split("_", 1) if key.startswith("eval_") else ("train", key)
                self.live.log_metric(f"{split}/{name}", value)

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None and state.is_world_process_zero:
            self.live.end()


def trl_config(config_class, train: TrainConfig, compute: Compute, output_dir: Path, seed: int, **extra):
    """A TRL config (SFTConfig, RewardConfig) with precision always explicit: TRL 1.x defaults to
    bf16, ~9x slower on AVX2 CPUs."""
    return config_class(
        output_dir=str(output_dir), seed=seed, data_seed=seed,
        num_train_epochs=train.epochs, max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size, per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum, learning_rate=train.lr, weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a share of the steps
        lr_scheduler_type="cosine", optim=compute.optimizer,
        bf16=compute.precision == "bf16", fp16=compute.precision == "fp16", use_cpu=compute.device == "cpu",
        gradient_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps, eval_strategy="steps", eval_steps=train.eval_steps,
        save_strategy="steps", save_steps=train.save_steps, save_total_limit=2,
        report_to="none", disable_tqdm=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a pass
        **extra)
