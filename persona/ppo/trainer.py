"""The PPO loop on accelerate: one CPU, one GPU or several processes (DDP), unchanged.

Policy = base model + a trainable LoRA adapter initialised to the SFT adapter's weights.
Reference = the same weights with a frozen copy of the SFT adapter switched in (`ppo.reference:
sft`), or with adapters disabled (`base`): never a second copy of the model. Value = a linear
head on the policy's last hidden states, zero-initialised, so with normalised rewards the
first value loss is the return's variance (~1), not a random head's guess. Reward = the
`reward` stage's model, frozen, loaded once.

Each step: sample replies -> score them (reward model, KL to the reference per token) ->
GAE -> `ppo_epochs` passes of clipped updates over minibatches. Every source of randomness is
seeded from (seed, step, process), so a resumed run replays exactly what the killed one would.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn
from tqdm import tqdm

from persona import metrics as M
from persona.config import Params, PPOConfig
from persona.data import read_dialogues
from persona.distributed import agreement, check_world_size, not_checked
from persona.generation import Decoding
from persona.hardware import resolve_compute, run_metrics
from persona.models import load_for_training, save_model
from persona.paths import Paths
from persona.ppo.advantages import gae, token_rewards, whiten
from persona.ppo.kl import kl_controller, kl_per_token
from persona.ppo.losses import entropy, policy_loss, value_loss
from persona.ppo.rollout import Episode, Packed, episodes, pack, response_logits, rollout, sample_order, token_logprobs
from persona.reward import REWARD_INFO, RewardModel
from persona.seeds import derive_seed
from persona.training import build_optimizer, fingerprint, open_live

log = logging.getLogger(__name__)
TRAINABLE, REFERENCE = "default", "reference"  # adapter names; the trainable one saves at the folder's root
STATE = "ppo_state.pt"


class PolicyWithValue(nn.Module):
    """The policy and its value head as one module, so DDP syncs both with one backward."""

    def __init__(self, policy, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        for layer in policy.modules():  # dropout would make the first PPO ratio differ from 1 for no reason
            if isinstance(layer, nn.Dropout):
                layer.p = 0.0

    def forward(self, input_ids, attention_mask, response_mask, prompt_width: int, temperature: float):
        packed = Packed(input_ids, attention_mask, response_mask, prompt_width)
        logits, hidden = response_logits(self.policy, packed, temperature, with_hidden=True)
        return logits, self.value_head(hidden.float()).squeeze(-1)


def load_policy(base_path: Path, sft_path: Path, cfg: PPOConfig, compute):
    """Base + trainable adapter (= SFT weights) + frozen reference adapter (when reference = sft)."""
    from peft import PeftModel

    if not (sft_path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{sft_path}: no SFT adapter; run the `sft` stage first")
    model, tokenizer = load_for_training(base_path, compute, cfg.gradient_checkpointing)
    model = PeftModel.from_pretrained(model, str(sft_path), adapter_name=TRAINABLE, is_trainable=True)
    if cfg.reference == "sft":
        model.load_adapter(str(sft_path), adapter_name=REFERENCE, is_trainable=False)
    model.set_adapter(TRAINABLE)
    return model, tokenizer


@contextmanager
def reference(policy, kind: str):
    """Run `policy` as the reference: the frozen SFT adapter switched in, or adapters disabled."""
    if kind == "base":
        with policy.disable_adapter():
            yield policy
        return
    policy.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield policy
    finally:
        policy.set_adapter(TRAINABLE)


@torch.no_grad()
def score_replies(reward_model: RewardModel, samples, cfg: PPOConfig, stats: dict | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward per sample: normalised score + the penalty for a reply cut off, raw reward-model score)."""
    raw = torch.tensor(reward_model.score_chats([s.chat + [{"role": "assistant", "content": s.reply.text}]
                                                 for s in samples]))
    scores = (raw - stats["score_mean"]) / max(stats["score_std"], 1e-6) if stats else raw.clone()
    cut = torch.tensor([not s.reply.finished for s in samples])
    return scores + cfg.missing_eos_penalty * cut, raw


def seed_step(seed: int, step: int, process: int) -> int:
    value = derive_seed(seed, "ppo-step", step, process)
    torch.manual_seed(value)
    return value


def episode_indices(n: int, step: int, per_process: int, process: int, processes: int, seed: int) -> list[int]:
    """The episodes a process rolls out at `step`: consecutive slices of a fresh permutation per pass."""
    first = (step * processes + process) * per_process
    return [sample_order(n, (first + k) // n, seed)[(first + k) % n] for k in range(per_process)]


def ppo_step(accelerator, module, optimizer, tokenizer, reward_model, batch: list[Episode], cfg: PPOConfig,
             controller, reward_stats: dict | None, step_seed: int) -> dict:
    """One rollout + update; returns the step's statistics (reduced over processes)."""
    unwrapped = accelerator.unwrap_model(module)
    policy = unwrapped.policy
    decoding = Decoding(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, step_seed)
    started = time.perf_counter()
    samples = rollout(policy, tokenizer, batch, cfg.turns, decoding)
    generation_s = time.perf_counter() - started
    packed = pack(tokenizer, samples).to(accelerator.device)
    mask = packed.response_mask.float()
    with torch.no_grad():
        module.eval()
        logits, values = unwrapped(packed.input_ids, packed.attention_mask, packed.response_mask,
                                   packed.prompt_width, cfg.temperature)
        old_logprobs = token_logprobs(logits, packed)
        with reference(policy, cfg.reference) as ref:
            ref_logits, _ = response_logits(ref, packed, cfg.temperature)
        ref_logprobs = token_logprobs(ref_logits, packed)
        del logits, ref_logits
        scores, raw = score_replies(reward_model, samples, cfg, reward_stats)
        scores = scores.to(accelerator.device)
        kl = kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
        k1_sequence = ((old_logprobs - ref_logprobs) * mask).sum(1)
        rewards = token_rewards(scores, kl, mask, controller.value)
        advantages, returns = gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

    reduce = lambda x: accelerator.reduce(torch.as_tensor(x, dtype=torch.float32, device=accelerator.device),
                                          "mean").item()
    stats = {"reward": reduce(raw.mean()), "reward_normalised": reduce(scores.mean()),
             "kl": reduce(kl.sum(1).mean()), "kl_k1": reduce(k1_sequence.mean()), "kl_coef": controller.value,
             "response_length": reduce(mask.sum(1).mean()),
             "finished_rate": reduce(np.mean([s.reply.finished for s in samples])),
             "rollout_tokens_per_s": reduce(mask.sum().item() / generation_s) * accelerator.num_processes}
    stats["skipped"] = 0.0
    if stats["kl_k1"] < -cfg.kl_negative_tolerance:
        log.warning("step skipped: sequence KL %.2f is negative beyond noise (sampling and scoring disagree?)",
                    stats["kl_k1"])
        stats["skipped"] = 1.0
        return stats

    module.train()
    history = {"policy_loss": [], "value_loss": [], "entropy": [], "clip_fraction": [], "approx_kl": [],
               "value_clip_fraction": [], "grad_norm": []}
    n = packed.input_ids.shape[0]
    for _ in range(cfg.ppo_epochs):
        permutation = torch.randperm(n)
        for start in range(0, n, cfg.minibatch_size):
            index = permutation[start:start + cfg.minibatch_size].to(accelerator.device)
            part = packed.rows(index)
            logits, new_values = module(part.input_ids, part.attention_mask, part.response_mask, part.prompt_width,
                                        cfg.temperature)
            part_mask = mask[index]
            new_logprobs = token_logprobs(logits, part)
            pg, pg_stats = policy_loss(new_logprobs, old_logprobs[index], advantages[index], part_mask,
                                       cfg.clip_range)
            vf, vf_stats = value_loss(new_values, values[index], returns[index], part_mask, cfg.value_clip)
            ent = entropy(logits, part_mask)
            loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * ent
            finite = reduce(float(torch.isfinite(loss).item()))
            if finite < 1:  # any process saw NaN/inf: every process skips, or DDP would deadlock
                log.warning("minibatch skipped: non-finite loss (policy %s, value %s)", pg.item(), vf.item())
                optimizer.zero_grad()
                stats["skipped"] += 1.0
                continue
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            for key, value in (("policy_loss", pg.item()), ("value_loss", vf.item()), ("entropy", ent.item()),
                               ("grad_norm", float(grad_norm)), *pg_stats.items(), *vf_stats.items()):
                history[key].append(value)
    stats.update({key: reduce(np.mean(series)) if series else float("nan") for key, series in history.items()})
    controller.update(stats["kl"], n * accelerator.num_processes)
    return stats


@torch.no_grad()
def held_out_reward(policy, tokenizer, reward_model, prompts: list[Episode], cfg: PPOConfig, seed: int,
                    accelerator) -> tuple[list[float], float]:
    """Raw reward of one sampled reply per held-out prompt (gathered over processes), and mean sequence KL."""
    shard = prompts[accelerator.process_index::accelerator.num_processes]
    decoding = Decoding(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, seed)
    samples = rollout(policy, tokenizer, shard, 1, decoding)
    _, raw = score_replies(reward_model, samples, cfg, None)
    packed = pack(tokenizer, samples).to(accelerator.device)
    logprobs = token_logprobs(response_logits(policy, packed, cfg.temperature)[0], packed)
    with reference(policy, cfg.reference) as ref:
        ref_logprobs = token_logprobs(response_logits(ref, packed, cfg.temperature)[0], packed)
    kl = kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator).mul(packed.response_mask).sum(1)
    rewards = gather_object([(i, r) for i, r in zip(range(accelerator.process_index, len(prompts),
                                                              accelerator.num_processes), raw.tolist())])
    kls = gather_object(kl.tolist())
    return [r for _, r in sorted(rewards)], float(np.mean(kls))


def save_state(folder: Path, step: int, module, optimizer, controller, expected: dict) -> None:
    trainable = {k: v for k, v in module.state_dict().items()
                 if k.startswith("value_head") or f".{TRAINABLE}." in k}
    torch.save({"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(),
                "kl_coef": controller.value, "fingerprint": expected}, folder / f"{STATE}.tmp")
    (folder / f"{STATE}.tmp").replace(folder / STATE)  # never leave a half-written checkpoint


def load_state(folder: Path, expected: dict) -> dict | None:
    path = folder / STATE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["fingerprint"] != expected:
        log.info("PPO checkpoint in %s is from other params or inputs: starting afresh", folder)
        return None
    return state


def train_ppo(params: Params, paths: Paths, stop_after: int | None = None) -> dict:
    """PPO from the SFT adapter to `paths.policy` (the `align` stage with `align.algorithm: ppo`).

    `stop_after` ends the run early after that step (for tests of resuming).
    """
    from accelerate import Accelerator

    cfg = params.ppo
    prepared, base_path, sft_path, reward_path = paths.prepared, paths.base, paths.sft, paths.reward
    out_dir, checkpoint_dir = paths.policy, paths.checkpoint_dir("align")
    compute = resolve_compute(cfg.quant, cfg.precision, "ppo", cfg.optimizer)
    accelerator = Accelerator(cpu=compute.device == "cpu",
                              mixed_precision=compute.mixed_precision)
    check_world_size(params.launch.processes, accelerator.num_processes)
    started = time.perf_counter()
    train_episodes = episodes(read_dialogues(prepared / "train.jsonl"), cfg.turns, cfg.max_history_turns)
    eval_prompts = episodes(read_dialogues(prepared / "valid.jsonl"), 1, cfg.max_history_turns)
    eval_prompts = [eval_prompts[i] for i in sample_order(len(eval_prompts), -1, params.seed)[:cfg.eval_n]]
    if len(train_episodes) < cfg.rollout_batch_size:
        raise ValueError(f"ppo.rollout_batch_size: only {len(train_episodes)} training episodes")
    reward_stats = json.loads((reward_path / REWARD_INFO).read_text()) if cfg.normalize_reward else None
    reward_model = RewardModel.load(base_path, reward_path, str(accelerator.device), params.model.max_length,
                                    cfg.batch_size, torch.bfloat16 if compute.precision == "bf16" else torch.float32)
    policy, tokenizer = load_policy(base_path, sft_path, cfg, compute)
    module = PolicyWithValue(policy, policy.config.hidden_size).to(accelerator.device)
    sft_rewards, _ = held_out_reward(policy, tokenizer, reward_model, eval_prompts, cfg, params.seed, accelerator)
    optimizer = build_optimizer(compute.optimizer, [p for p in module.parameters() if p.requires_grad], cfg.lr)
    controller = kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    expected = fingerprint(cfg, [prepared / "train.jsonl", sft_path / "adapter_model.safetensors",
                                 reward_path / "adapter_model.safetensors"], base_path,
                           seed=params.seed, processes=accelerator.num_processes)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(checkpoint_dir, expected)
    first_step = 0
    if state:
        module.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        controller.value, first_step = state["kl_coef"], state["step"]
        log.info("resuming PPO from step %d", first_step)
    module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped = accelerator.unwrap_model(module)

    live = open_live(paths.curves_dir("align"), first_step > 0, accelerator.is_main_process)
    stopped, skipped, last, steps_done, ranks = "", 0, {}, first_step, None
    for step in tqdm(range(first_step, cfg.max_steps), desc="ppo", disable=not accelerator.is_main_process):
        step_seed = seed_step(params.seed, step, accelerator.process_index)
        batch = [train_episodes[i] for i in episode_indices(len(train_episodes), step, cfg.rollout_batch_size,
                                                             accelerator.process_index, accelerator.num_processes,
                                                             params.seed)]
        last = ppo_step(accelerator, module, optimizer, tokenizer, reward_model, batch, cfg, controller,
                        reward_stats, step_seed)
        if ranks is None:  # the first update of this run: did every process end with the same weights?
            ranks = agreement((p for p in unwrapped.parameters() if p.requires_grad),
                              hashlib.sha256(repr(batch).encode()).hexdigest())
        steps_done = step + 1
        skipped += int(last["skipped"])
        if live:
            live.step = step + 1
            for key, value in last.items():
                if math.isfinite(value):
                    live.log_metric(f"ppo/{key}", value)
        if not all(math.isfinite(last[k]) for k in ("policy_loss", "value_loss") if k in last):
            stopped = f"non-finite losses at step {step + 1}"
        elif last["kl"] > cfg.kl_stop:
            stopped = f"sequence KL {last['kl']:.2f} > ppo.kl_stop {cfg.kl_stop} at step {step + 1}"
        if accelerator.is_main_process and ((step + 1) % cfg.save_steps == 0 or stopped):
            save_state(checkpoint_dir, step + 1, unwrapped, optimizer, controller, expected)
        accelerator.wait_for_everyone()
        if stopped:
            log.error("PPO stopped: %s", stopped)
            break
        if stop_after is not None and step + 1 >= stop_after:
            return {"stopped_after": step + 1}

    ppo_rewards, held_out_kl = held_out_reward(unwrapped.policy, tokenizer, reward_model, eval_prompts, cfg,
                                               params.seed, accelerator)
    if accelerator.is_main_process:
        save_model(unwrapped.policy, tokenizer, out_dir, selected_adapters=[TRAINABLE])
        torch.save(unwrapped.value_head.state_dict(), out_dir / "value_head.pt")
        if live:
            live.end()
    (checkpoint_dir / STATE).unlink(missing_ok=True)
    gain = [p - s for p, s in zip(ppo_rewards, sft_rewards)]
    summary = M.summarize(gain, params.seed, 1000) if gain else {}
    return {
        "steps": steps_done, "resumed_from_step": first_step,
        "stopped": stopped or None, "skipped_updates": skipped,
        **(ranks or not_checked(accelerator.num_processes)),
        "eval_prompts": len(eval_prompts),
        "sft_reward": round(float(np.mean(sft_rewards)), 4) if sft_rewards else None,
        "ppo_reward": round(float(np.mean(ppo_rewards)), 4),
        "reward_gain": summary.get("mean"), "reward_gain_ci_low": summary.get("ci_low"),
        "reward_gain_ci_high": summary.get("ci_high"),
        "held_out_kl": round(held_out_kl, 4), "final_kl_coef": round(controller.value, 5),
        "final_train_reward": round(last.get("reward", float("nan")), 4),
        "rollout_tokens_per_s": round(last.get("rollout_tokens_per_s", float("nan")), 1),
        **run_metrics(compute), "reference": cfg.reference, "turns": cfg.turns,
        "wall_s": round(time.perf_counter() - started, 1),
    }
