"""What the align algorithms built on TRL trainers (dpo, grpo) and on transformers' Trainer (mdpo) share: the policy
they start from, the run's fingerprint, the reward model, a stop for resume tests, and the end of a run (adapter saved,
common metrics).

The policy is the base model with the SFT adapter loaded as peft's trainable `default` adapter, so training starts
from the SFT policy. Given such a PeftModel, TRL 1.x's DPOTrainer (always) and GRPOTrainer (when beta > 0) add a
frozen copy of it, the `ref` adapter, and take reference log-probs with it switched in: the KL anchor is the SFT
policy, as PPO's `ppo.reference: sft`, not the adapter-disabled base model. (TRL 1.16 has no
model_adapter_name / ref_adapter_name settings; `ref` is the name it looks up.)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from persona import training
from persona.config import Params, TRLAlignConfig
from persona.hardware import Compute, run_metrics
from persona.held_out import full_softmax, gathered_scores, held_out_prompts, reward_metrics, sample_chats
from persona.models import load_for_training, save_model
from persona.paths import Paths
from persona.reward import REWARD_INFO, load_scorer
from persona.seeds import derive_seed

TRAINABLE = "default"  # the adapter TRL trains (saved at models/policy's root); its frozen copy is "ref"


def load_sft_policy(paths: Paths, compute: Compute, gradient_checkpointing: bool):
    """(base + the SFT adapter as the trainable `default` adapter, tokenizer)."""
    from peft import PeftModel

    if not (paths.sft / "adapter_config.json").exists():
        raise FileNotFoundError(f"{paths.sft}: no SFT adapter; run the `sft` stage first")
    model, tokenizer = load_for_training(paths.base, compute, gradient_checkpointing)
    return PeftModel.from_pretrained(model, str(paths.sft), adapter_name=TRAINABLE, is_trainable=True), tokenizer


def run_fingerprint(params: Params, paths: Paths, cfg: TRLAlignConfig, inputs: list[Path]) -> dict:
    """What a checkpoint of this run depends on (`training.prepare_checkpoints` wipes one from other params)."""
    return training.fingerprint(cfg, [*inputs, paths.sft / "adapter_model.safetensors"], paths.base,
                                algorithm=params.align.algorithm, max_length=params.model.max_length,
                                seed=params.seed, processes=params.launch.processes)


def load_reward_model(params: Params, paths: Paths, compute: Compute, batch_size: int) -> tuple[object, dict]:
    """The frozen reward model on this process's device, and its held-out score mean/std (for normalising)."""
    from accelerate import PartialState

    model = load_scorer(paths.base, paths.reward, paths.sft, str(PartialState().device), params.model.max_length,
                        batch_size, torch.bfloat16 if compute.precision == "bf16" else torch.float32)
    return model, json.loads((paths.reward / REWARD_INFO).read_text())


def held_out(params: Params, paths: Paths, cfg: TRLAlignConfig):
    """(the held-out prompts, the decoding both the SFT policy and the aligned one are sampled with)."""
    prompts = held_out_prompts(paths.prepared, cfg.eval_n, cfg.max_history_turns, params.seed)
    return prompts, full_softmax(cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                                 derive_seed(params.seed, "held-out-reward"))


def held_out_rewards(params: Params, paths: Paths, compute: Compute, cfg: TRLAlignConfig, model, tokenizer, prompts,
                     decoding, sft_chats: list[list[dict]]) -> dict:
    """`held_out.reward_metrics` of the trained policy against `sft_chats` (the SFT policy's samples of `prompts`,
    taken before training), for an algorithm whose training needs no reward model: loaded only now."""
    policy_chats = sample_chats(model, tokenizer, prompts, decoding)
    reward_model, _ = load_reward_model(params, paths, compute, cfg.batch_size)
    scores = [gathered_scores(reward_model, chats, len(prompts)) for chats in (sft_chats, policy_chats)]
    return reward_metrics(*scores, params.seed, params.align.algorithm)


class StopAfter(TrainerCallback):
    """Ends training after optimizer step `step` (None: never), as a killed run would, for tests of resuming; the
    checkpoints already saved stay."""

    def __init__(self, step: int | None):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None and state.global_step >= self.step:
            control.should_training_stop = True


def stopped_early(trainer) -> bool:
    return trainer.state.global_step < trainer.state.max_steps


def save_policy(model, tokenizer, paths: Paths, checkpoint_dir: Path, main_process: bool) -> None:
    """The trained adapter alone, at models/policy's root (as PPO saves it); the finished run's checkpoints go."""
    if main_process:
        training.drop_finished_checkpoints(checkpoint_dir)
        save_model(model, tokenizer, paths.policy, selected_adapters=[TRAINABLE])


def run_summary(trainer, resume: str | None, compute: Compute, ranks, processes: int, result, started: float) -> dict:
    """The metrics every TRL align run reports: steps, resume, trainable dtype, loss, hardware, time."""
    return {"steps": trainer.state.global_step,
            "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
            "trainable_dtype": str(trainer.trainable_dtype), "train_loss": training.logged_train_loss(trainer),
            **run_metrics(compute), **ranks.metrics(processes),
            "train_wall_s": round(result.metrics["train_runtime"], 1),
            "wall_s": round(time.perf_counter() - started, 1)}


def last_eval(trainer) -> dict:
    """The last held-out evaluation the trainer logged (`eval_*` keys), or {} if none ran."""
    return next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), {})
