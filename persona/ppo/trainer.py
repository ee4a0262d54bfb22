"""The PPO loop on accelerate: one CPU, one GPU or several processes (DDP), unchanged.

Each step: make experience (persona/ppo/experience.py: sample replies, score them with the reward
model and the KL to the reference) -> update (persona/ppo/update.py: `ppo_epochs` passes of
clipped minibatch steps) -> move the KL coefficient (persona/ppo/kl.py). Every source of randomness
is seeded from (seed, step, process), so a resumed run (persona/ppo/checkpoint.py) replays exactly
what the killed one would. The first rollout of every run also checks that the sampler drew from
the distribution PPO scores.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from persona.config import ConfigError, Params, PPOConfig
from persona.data import read_dialogues
from persona.distributed import agreement, check_world_size, not_checked
from persona.hardware import resolve_compute, run_metrics
from persona.held_out import held_out_prompts, reward_metrics
from persona.models import save_model
from persona.paths import Paths
from persona.ppo.checkpoint import STATE, resume, run_fingerprint, save_state
from persona.ppo.experience import Setup, check_sampler_gap, make_experience, sample, score_replies, score_tokens
from persona.ppo.kl import kl_controller, kl_per_token
from persona.ppo.policy import TRAINABLE, PolicyWithValue, load_policy
from persona.ppo.rollout import Episode, episode_indices, episodes, pack
from persona.ppo.sampler import MergedSampler
from persona.ppo.update import update
from persona.reward import REWARD_INFO, load_scorer
from persona.seeds import derive_seed
from persona.training import build_optimizer, open_live, trainable_dtype

log = logging.getLogger(__name__)


def train_ppo(params: Params, paths: Paths, stop_after: int | None = None) -> dict:
    """PPO from the SFT adapter to `paths.policy` (the `align` stage with `align.algorithm: ppo`).

    `stop_after` ends the run early after that step (for tests of resuming).
    """
    cfg, started = params.ppo, time.perf_counter()
    compute = resolve_compute(cfg.quant, cfg.precision, "ppo", cfg.optimizer)
    train_episodes, eval_prompts = load_episodes(paths, cfg, params.seed)
    setup, optimizer = build(params, paths, compute)
    accelerator, unwrapped = setup.accelerator, setup.unwrapped
    dtype_at_start = trainable_dtype(unwrapped)
    sft_rewards, _ = held_out_reward(setup, eval_prompts, params.seed)
    controller = kl_controller(cfg, accelerator.num_processes)
    checkpoint_dir, expected = paths.checkpoint_dir("align"), run_fingerprint(params, paths, accelerator.num_processes)
    first_step, curves = resume(checkpoint_dir, expected, unwrapped, optimizer, controller)
    live = open_live(paths.curves_dir("align"), accelerator.is_main_process)
    draw_points(live, curves)  # a resumed run's curves up to its checkpoint, as the killed run logged them
    stopped, skipped, last, steps_done, ranks, gap = None, 0, {}, first_step, None, None
    for step in tqdm(range(first_step, cfg.max_steps), desc="ppo", disable=not accelerator.is_main_process):
        batch = [train_episodes[i] for i in episode_indices(len(train_episodes), step, cfg.rollout_batch_size,
                                                             accelerator.process_index, accelerator.num_processes,
                                                             params.seed)]
        last = ppo_step(setup, optimizer, batch, controller, seed_step(params.seed, step, accelerator.process_index),
                        measure_sampler=step == first_step)
        if step == first_step:
            gap, ranks = first_step_checks(setup, last, batch, compute.precision)
        steps_done, skipped = step + 1, skipped + int(last["skipped"])
        curves.append(log_curves(live, step + 1, last))
        stopped = stop_reason(last, cfg, step + 1)
        if accelerator.is_main_process and ((step + 1) % cfg.save_steps == 0 or stopped):
            save_state(checkpoint_dir, step + 1, unwrapped, optimizer, controller, expected, curves)
        accelerator.wait_for_everyone()
        if stopped:
            log.error("PPO stopped: %s", stopped)
            break
        if stop_after is not None and step + 1 >= stop_after:
            return {"stopped_after": step + 1}

    ppo_rewards, held_out_kl = held_out_reward(setup, eval_prompts, params.seed)
    if accelerator.is_main_process:
        save_policy(setup, paths, live)
    summary = {"steps": steps_done, "trainable_dtype": dtype_at_start, "resumed_from_step": first_step,
               "stopped": stopped, "skipped_updates": skipped,
               **(ranks or not_checked(accelerator.num_processes)), "sampler_logprob_gap_max": gap,
               **reward_metrics(sft_rewards, ppo_rewards, params.seed, "ppo"), **held_out_kl,
               "kl_estimator": cfg.kl_estimator, "final_kl_coef": round(controller.value, 5),
               "final_train_reward": round(last.get("reward", float("nan")), 4),
               "rollout_tokens_per_s": round(last.get("rollout_tokens_per_s", float("nan")), 1),
               **run_metrics(compute), "reference": cfg.reference, "turns": cfg.turns,
               "wall_s": round(time.perf_counter() - started, 1)}
    # only now: a summary that fails (as a bad seed once did in numpy) must leave the checkpoint to resume from
    (checkpoint_dir / STATE).unlink(missing_ok=True)
    return summary


def load_episodes(paths: Paths, cfg: PPOConfig, seed: int) -> tuple[list[Episode], list[Episode]]:
    """(training episodes, the `eval_n` held-out single-turn prompts)."""
    train_episodes = episodes(read_dialogues(paths.prepared / "train.jsonl"), cfg.turns, cfg.max_history_turns)
    if len(train_episodes) < cfg.rollout_batch_size:
        raise ConfigError(f"ppo.rollout_batch_size: {cfg.rollout_batch_size} is more than the "
                          f"{len(train_episodes)} training episodes in {paths.prepared / 'train.jsonl'}")
    return train_episodes, held_out_prompts(paths.prepared, cfg.eval_n, cfg.max_history_turns, seed)


def build(params: Params, paths: Paths, compute) -> tuple[Setup, object]:
    """Accelerate, the policy + value module, its optimizer (both prepared) and the frozen reward model."""
    from accelerate import Accelerator

    cfg = params.ppo
    accelerator = Accelerator(cpu=compute.device == "cpu", mixed_precision=compute.mixed_precision)
    check_world_size(params.launch.processes, accelerator.num_processes)
    reward_stats = json.loads((paths.reward / REWARD_INFO).read_text()) if cfg.normalize_reward else None
    reward_model = load_scorer(paths.base, paths.reward, paths.sft, str(accelerator.device), params.model.max_length,
                               cfg.batch_size, torch.bfloat16 if compute.precision == "bf16" else torch.float32)
    policy, tokenizer = load_policy(paths.base, paths.sft, cfg, compute)
    module = PolicyWithValue(policy, policy.config.hidden_size).to(accelerator.device)
    optimizer = build_optimizer(compute.optimizer, [p for p in module.parameters() if p.requires_grad], cfg.lr)
    module, optimizer = accelerator.prepare(module, optimizer)
    sampler = MergedSampler(policy, compute.dtype) if cfg.sampler == "merged" else None
    return Setup(accelerator, module, tokenizer, reward_model, reward_stats, cfg, sampler), optimizer


def seed_step(seed: int, step: int, process: int) -> int:
    value = derive_seed(seed, "ppo-step", step, process)
    torch.manual_seed(value)
    return value


def first_step_checks(setup: Setup, stats: dict, batch: list[Episode], precision: str) -> tuple[float, dict | None]:
    """After this run's first step: did the sampler draw what PPO scores (raises if not), and does every process
    hold the same weights? (the gap, the agreement metrics)"""
    gap = stats["sampler_logprob_gap_max"]
    log.info("sampler vs scorer log-prob gap: max %.3g nats over the first rollout (%s)", gap, precision)
    check_sampler_gap(gap, precision)
    ranks = agreement((p for p in setup.unwrapped.parameters() if p.requires_grad),
                      hashlib.sha256(repr(batch).encode()).hexdigest())
    return gap, ranks


def ppo_step(setup: Setup, optimizer, batch: list[Episode], controller, seed: int, measure_sampler: bool = False
             ) -> dict:
    """One PPO iteration: experience from `batch`, the update, the KL controller's move; the step's statistics."""
    experience, stats = make_experience(setup, batch, controller.value, seed, measure_sampler)
    if stats["kl"] < -setup.cfg.kl_negative_tolerance:
        log.warning("step skipped: sequence KL %.2f is negative beyond noise (sampling and scoring disagree?)",
                    stats["kl"])
        return {**stats, "skipped": 1.0}
    stats.update(update(setup, optimizer, experience, controller.value))
    controller.update(stats["kl"], len(experience) * setup.accelerator.num_processes)
    return stats


def stop_reason(stats: dict, cfg: PPOConfig, step: int) -> str | None:
    """Why the run must stop after this step, or None."""
    if not all(math.isfinite(stats[k]) for k in ("policy_loss", "value_loss") if k in stats):
        return f"non-finite losses at step {step}"
    if stats["kl"] > cfg.kl_stop:
        return f"sequence KL {stats['kl']:.2f} > ppo.kl_stop {cfg.kl_stop} at step {step}"
    return None


# Step statistics that are no curve: a speed, which differs on every run, and the sampler check, measured on the
# first step of each session (of a resumed run too). Both are in the stage's metrics.
NOT_CURVES = ("rollout_tokens_per_s", "sampler_logprob_gap_max")


def log_curves(live, step: int, stats: dict) -> dict:
    """Log one step's statistics to the curves; the point logged (`step` and each metric's value), which
    checkpoints keep for a resumed run to redraw."""
    point = {"step": step, **{f"ppo/{key}": value for key, value in stats.items()
                              if key not in NOT_CURVES and math.isfinite(value)}}
    draw_points(live, [point])
    return point


def draw_points(live, points: list[dict]) -> None:
    if live:
        for point in points:
            live.step = point["step"]
            for name, value in point.items():
                if name != "step":
                    live.log_metric(name, value)


def save_policy(setup: Setup, paths: Paths, live) -> None:
    """The trained adapter (alone, at the folder's root) and the value head to `paths.policy`; close the curves."""
    value_head = io.BytesIO()
    torch.save(setup.unwrapped.value_head.state_dict(), value_head)
    save_model(setup.unwrapped.policy, setup.tokenizer, paths.policy, {"value_head.pt": value_head.getvalue()},
               selected_adapters=[TRAINABLE])
    if live:
        live.end()


@torch.no_grad()
def held_out_reward(setup: Setup, prompts: list[Episode], seed: int) -> tuple[list[float], dict]:
    """Raw reward of one sampled reply per held-out prompt, in prompt order (gathered over processes), and the
    mean sequence KL to the reference, estimated by k1 (`held_out_kl_k1`) and k3 (`held_out_kl_k3`)."""
    accelerator = setup.accelerator
    shard = prompts[accelerator.process_index::accelerator.num_processes]
    samples = sample(setup, shard, 1, seed)
    _, raw = score_replies(setup, samples)
    packed = pack(setup.tokenizer, samples).to(accelerator.device)
    logprobs, _, ref_logprobs = score_tokens(setup, packed)
    kls = {f"held_out_kl_{name}": round(float(np.mean(gather_object(
        kl_per_token(logprobs, ref_logprobs, name).mul(packed.response_mask).sum(1).tolist()))), 4)
        for name in ("k1", "k3")}
    rewards = gather_object(list(zip(range(accelerator.process_index, len(prompts), accelerator.num_processes),
                                     raw.tolist())))
    return [r for _, r in sorted(rewards)], kls

