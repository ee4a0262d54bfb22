"""Plumbing shared by the training stages (sft, reward, ppo): configs, checkpoints, curves, optimizers.

Kept apart from the stages so all train with the same precision rules, the same
resume-or-wipe checkpoint policy, the same dvclive layout and the same multi-process rules
(rank 0 alone writes files).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from persona.config import TrainConfig
from persona.distributed import check_world_size
from persona.files import write_text_atomic
from persona.hardware import Compute
from persona.models import BASE_INFO

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"
MANIFEST = "manifest.json"  # written last into a checkpoint: its presence and digests say the checkpoint is whole


def fingerprint(train: TrainConfig, inputs: list[Path], base_path: Path, **settings) -> dict:
    """What a checkpoint depends on; a checkpoint from other inputs must not be resumed.

    `inputs`: files, or folders standing for every file in them (a saved scorer: a reward model's adapter, or the
    likelihood reward's config). Digests are keyed folder/name, as models/sft and models/reward hold files of one name.
    """
    info = base_path / BASE_INFO
    base = json.loads(info.read_text()) if info.exists() else str(base_path)
    files = [file for path in inputs for file in (sorted(f for f in path.iterdir() if f.is_file())
                                                  if path.is_dir() else [path])]
    digests = {f"{file.parent.name}/{file.name}": hashlib.sha256(file.read_bytes()).hexdigest() for file in files}
    return {"train": asdict(train), "inputs_sha256": digests, "base": base, **settings}


def prepare_checkpoints(folder: Path, expected: dict, writer: bool = True) -> str | None:
    """Return the newest whole checkpoint to resume from, or None.

    Only the `writer` (rank 0) changes files: it wipes checkpoints of other inputs, and discards, with a
    warning, any checkpoint a kill cut short (no manifest, or a file whose size or digest differs from it),
    so a damaged checkpoint costs the steps since the previous one instead of crashing every rerun.
    """
    stamp = folder / FINGERPRINT
    if writer:
        if folder.exists() and (not stamp.exists() or _read_json(stamp) != expected):
            log.info("checkpoints in %s are from other params or data: starting afresh", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stamp, json.dumps(expected, indent=2))
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for checkpoint in checkpoints:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            log.info("resuming from %s", checkpoint)
            return str(checkpoint)
        log.warning("discarding %s: %s", checkpoint, problem)
        if writer:
            shutil.rmtree(checkpoint)
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError:  # cut off mid-write by an older version: as good as absent
        return None


def write_manifest(checkpoint: Path) -> None:
    """Record each file's size and sha256, then (atomically) the manifest itself: the checkpoint's commit mark."""
    files = {path.relative_to(checkpoint).as_posix(): _digest(path)
             for path in sorted(checkpoint.rglob("*")) if path.is_file() and path.name != MANIFEST}
    write_text_atomic(checkpoint / MANIFEST, json.dumps(files, indent=1, sort_keys=True))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed (no manifest, a file missing, cut short or changed), or None."""
    manifest = _read_json(checkpoint / MANIFEST) if (checkpoint / MANIFEST).exists() else None
    if not isinstance(manifest, dict):
        return "no manifest (the run was killed while saving it)"
    for name, recorded in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if _digest(path) != recorded:
            return f"{name} differs from its manifest ({path.stat().st_size} bytes, {recorded['bytes']} recorded)"
    return None


def _digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


class CheckpointManifest(TrainerCallback):
    """Seals each Trainer checkpoint with a manifest once every process has written its part of it."""

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState
        PartialState().wait_for_everyone()  # other ranks write their rng state into the same folder
        if state.is_world_process_zero:
            write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")


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
    return state, resume, open_live(live_dir, state.is_main_process)


def open_live(live_dir: Path | None, main_process: bool):
    """The stage's dvclive logger on rank 0; None elsewhere or without `live_dir` (no dvc needed then).

    Always a fresh one, its old curves deleted, resumed run or not: a resumed run replays the points its
    checkpoint recorded, so its curves read as the uninterrupted run's. dvclive's own resume would append
    those points to whatever a killed run left there (DVC deletes the folder before a rerun; a run outside
    DVC finds it), steps past the checkpoint included.
    """
    if live_dir is None or not main_process:
        return None
    from dvclive import Live
    return Live(str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None)


def build_optimizer(name: str, parameters, lr: float):
    """The optimizer a `*.optimizer` param names (as resolved by `resolve_compute`), for our own loops."""
    if name == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=lr)
    import bitsandbytes as bnb
    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name](parameters, lr=lr)


# Logged, but no curve: TRL's trainers count `num_tokens` on the trainer object, which checkpoints do not save,
# so a resumed run counts from 0 again and its curve would not be the uninterrupted run's. The Trainer's own
# `num_input_tokens_seen` (SFT), kept in its checkpointed state, counts the same tokens.
NOT_CURVES = ("num_tokens",)


class LiveCurves(TrainerCallback):
    """Trainer logs -> dvclive curves keyed by optimizer step (`train/loss`, `eval/loss`, ...).

    transformers' own DVCLiveCallback advances one dvclive step per log call, so train and
    eval logs interleave and the x axis stops meaning training steps. Speeds and run totals
    (`*_runtime`, `*_per_second`, `train_*`) differ run to run: they are left out.
    """

    def __init__(self, live):
        self.live = live

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run: the Trainer has restored the checkpoint's log history, whose entries are the logs
        `on_log` got, each with its `step`. Replayed, they redraw the curves up to the checkpoint exactly."""
        if self.live is None or not state.is_world_process_zero or state.global_step == 0:
            return
        for entry in state.log_history:
            self.log(entry["step"], {key: value for key, value in entry.items() if key != "step"})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None and state.is_world_process_zero:
            self.log(state.global_step, logs or {})

    def log(self, step: int, logs: dict) -> None:
        self.live.step = step
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not key.startswith("train_") \
                    and not key.endswith(("runtime", "per_second")):
                split, name = key.split("_", 1) if key.startswith("eval_") else ("train", key)
                if name not in NOT_CURVES:
                    self.live.log_metric(f"{split}/{name}", value)

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None and state.is_world_process_zero:
            self.live.end()


def build_trainer(trainer_class, model, args, compute: Compute, live, callbacks=(), **kwargs):
    """The one way the project builds a TRL trainer (SFT, reward): curves, sealed checkpoints, trainable dtype.

    TRL 1.x casts every trainable parameter of a quantized model to bf16 in its trainers' constructors,
    whatever `fp16` says: fp16's GradScaler then refuses bf16 gradients (seen on an H200), and on these
    CPUs a bf16 matmul is hundreds of times slower than fp32. So under fp16 and fp32 the trainable
    weights go back to fp32 here, before the optimizer exists; under bf16 TRL's cast stays (bf16 QLoRA
    trained on an H200 that way). `trainer.trainable_dtype` is read when training begins.
    """
    probe = TrainableDtype()
    trainer = trainer_class(model=model, args=args, callbacks=[LiveCurves(live), CheckpointManifest(), probe,
                                                               *callbacks], **kwargs)
    if compute.precision != "bf16":
        for parameter in trainer.model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    trainer.trainable_dtype = probe
    return trainer


def logged_train_loss(trainer) -> float | None:
    """The mean of every logged training loss of the run, sessions before a resume included: the Trainer's own
    `train_loss` averages only the last session's steps, so a resumed run would report another figure."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    mean = sum(losses) / len(losses) if losses else float("nan")
    return round(mean, 4) if math.isfinite(mean) else None


def trainable_dtype(model) -> str:
    """The dtype of the trainable parameters (`float32`), or each of them joined by `+` if they differ."""
    return "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}))


class TrainableDtype(TrainerCallback):
    """`str(probe)`: `trainable_dtype` of the model when training begins (after every cast)."""

    def __init__(self):
        self.value = "unknown"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.value = trainable_dtype(model)

    def __str__(self) -> str:
        return self.value


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
