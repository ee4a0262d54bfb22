"""GRPO: TRL's GRPOTrainer from the SFT adapter, the reward model as its reward (`align.algorithm: grpo`).

Prompts are the training episodes PPO rolls out (single-turn); each gets `num_generations` replies, and a reply's
advantage is its reward against theirs, so no value head is needed. The reward is PPO's: the reward model's score
normalised with the reward stage's held-out mean/std, plus `missing_eos_penalty` for a reply cut off. The KL
(`beta`) is to a frozen copy of the SFT adapter (persona/trl_align.py).

Replies sample the full softmax at `temperature` (top_k 0, top_p 1): the distribution GRPO's log-probs score.
TRL measures how far its sampler is from its scorer only under vLLM; with transformers' generate it assumes they
agree. So each session starts by measuring it as PPO does: a batch generated exactly as GRPO's training step
generates, each sampled token's log-prob from the processed scores generate drew it from, against the log-prob
GRPO's own scorer gives it. Above `SAMPLER_GAP_BOUNDS` (persona/ppo/experience.py) the run stops.
"""
from __future__ import annotations

import hashlib
import logging
import time

import torch
from transformers import TrainerCallback

from persona import training, trl_align
from persona.config import ConfigError, Params
from persona.data import read_dialogues
from persona.distributed import RankAgreement
from persona.generation import sampled_logprobs
from persona.hardware import resolve_compute
from persona.held_out import gathered_scores, held_out_prompts, reward_metrics, sample_chats
from persona.paths import Paths
from persona.ppo.experience import check_sampler_gap
from persona.ppo.rollout import episodes
from persona.seeds import derive_seed

log = logging.getLogger(__name__)


def persona_reward(reward_model, stats: dict, missing_eos_penalty: float, eos_ids: list[int]):
    """GRPO's reward function: normalised reward-model score of each (prompt, reply), + the penalty if cut off."""
    def persona_reward(prompts, completions, completion_ids, **_) -> list[float]:
        raw = reward_model.score_chats([prompt + completion for prompt, completion in zip(prompts, completions)])
        cut = [not ids or ids[-1] not in eos_ids for ids in completion_ids]
        return [(score - stats["score_mean"]) / max(stats["score_std"], 1e-6) + missing_eos_penalty * was_cut
                for score, was_cut in zip(raw, cut)]
    return persona_reward


@torch.no_grad()
def sampler_gap(trainer, prompts: list[list[dict]], seed: int) -> float:
    """The largest |sampler - scorer| log-prob of any token GRPO's generation samples for `prompts`, over every
    process. Generation goes through TRL's own path (trl 1.16 `_generate_single_turn`: its generation config, the
    model unwrapped as for training) with the processed scores kept; scoring through GRPO's own scorer."""
    from trl.models import unwrap_model_for_generation
    from trl.trainer.utils import pad

    device, pad_id = trainer.accelerator.device, trainer.processing_class.pad_token_id
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    rows = [torch.tensor(ids) for ids in prompt_ids]
    ids = pad(rows, padding_value=pad_id, padding_side="left").to(device)
    attention = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left").to(device)
    # a forked generator: the check must not move the random stream training draws from
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                        generation_kwargs=trainer.generation_kwargs) as model:
        torch.manual_seed(derive_seed(seed, "grpo-sampler-check", trainer.accelerator.process_index))
        out = model.generate(input_ids=ids, attention_mask=attention, generation_config=trainer.generation_config,
                             output_scores=True, return_dict_in_generate=True)
    completion = out.sequences[:, ids.shape[1]:]
    is_eos = torch.isin(completion, torch.tensor(trainer.eos_token_ids, device=device)).int()
    mask = (is_eos.cumsum(1) - is_eos) == 0  # every token up to and including the first end-of-turn
    scored, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, out.sequences, torch.cat([attention, mask.int()], 1), completion.shape[1])
    gap = ((sampled_logprobs(out.scores, completion) - scored.float()).abs() * mask).max()
    return trainer.accelerator.gather(gap[None]).max().item()


def positions_from_mask(model) -> None:
    """Make a forward without `position_ids` take them from the attention mask, as generation does.

    TRL's GRPO scores left-padded prompt + completion rows with only input_ids and attention_mask, so the model
    numbers positions 0..L-1 from the padding on, while `generate` numbered each row from its first real token.
    Rotary models (Llama) do not notice a shift shared by every token; models with absolute position embeddings
    (GPT-2, the T4 recipe's) score other distributions than they sampled from: 0.37 nats on the GPU check's tiny
    GPT-2, which the sampler check stopped. PPO numbers positions the same way (persona/ppo/rollout.py)."""
    def add_positions(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and mask is not None and kwargs.get("past_key_values") is None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return args, kwargs

    model.get_base_model().register_forward_pre_hook(add_positions, with_kwargs=True)


class SamplerCheck(TrainerCallback):
    """`sampler_gap` on the first batch of prompts when each session's training begins; stops a run above the
    bound for its precision."""

    def __init__(self, trainer, prompts: list[list[dict]], precision: str, seed: int):
        self.trainer, self.prompts, self.precision, self.seed, self.gap = trainer, prompts, precision, seed, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.gap = sampler_gap(self.trainer, self.prompts, self.seed)
        log.info("GRPO sampler vs scorer log-prob gap: max %.3g nats (%s)", self.gap, self.precision)
        check_sampler_gap(self.gap, self.precision)


class FirstPrompts:
    """distributed.FirstBatch for GRPO, whose collator passes rows of prompts through (tokenised after
    generation): remembers a digest of this process's first batch."""

    def __init__(self, collator):
        self.collator, self.digest = collator, None

    def __call__(self, features):
        if self.digest is None:
            self.digest = hashlib.sha256(repr(features).encode()).hexdigest()
        return self.collator(features)


def watch_ranks(trainer) -> RankAgreement:
    first = FirstPrompts(trainer.data_collator)
    trainer.data_collator = first
    callback = RankAgreement(first)
    trainer.add_callback(callback)
    return callback


def fingerprint(params: Params, paths: Paths) -> dict:
    """What a GRPO checkpoint depends on: a checkpoint with another fingerprint is not resumed."""
    return trl_align.run_fingerprint(params, paths, params.grpo, [paths.prepared / "train.jsonl", paths.reward])


def train_grpo(params: Params, paths: Paths, stop_after: int | None = None) -> dict:
    """GRPO from the SFT adapter to `paths.policy`; `stop_after` ends the run after that step (tests of resuming)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer

    cfg = params.grpo
    compute = resolve_compute(cfg.quant, cfg.precision, "grpo", cfg.optimizer)
    checkpoint_dir = paths.checkpoint_dir("align")
    expected = fingerprint(params, paths)
    state, resume, live = training.start_run(compute, params.launch.processes, checkpoint_dir, expected,
                                             paths.curves_dir("align"))
    started = time.perf_counter()
    train_prompts = [e.prompt.chat() for e in episodes(read_dialogues(paths.prepared / "train.jsonl"), 1,
                                                        cfg.max_history_turns)]
    groups = cfg.batch_size // cfg.num_generations
    if len(train_prompts) < groups:
        raise ConfigError(f"grpo.batch_size: {groups} prompts per step, more than the {len(train_prompts)} training "
                          f"episodes in {paths.prepared / 'train.jsonl'}")
    eval_prompts = [e.prompt.chat() for e in held_out_prompts(paths.prepared, cfg.max_eval_sequences,
                                                                cfg.max_history_turns, params.seed)]
    set_seed(params.seed)
    model, tokenizer = trl_align.load_sft_policy(paths, compute, cfg.gradient_checkpointing)
    positions_from_mask(model)
    reward_model, stats = trl_align.load_reward_model(params, paths, compute, cfg.batch_size)
    prompts, decoding = trl_align.held_out(params, paths, cfg)
    sft_chats = sample_chats(model, tokenizer, prompts, decoding)

    args = training.trl_config(GRPOConfig, cfg, compute, checkpoint_dir, params.seed, beta=cfg.beta,
                               num_generations=cfg.num_generations, num_iterations=cfg.num_iterations,
                               max_completion_length=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_k=0, top_p=1.0, disable_dropout=True)
    reward = persona_reward(reward_model, stats, cfg.missing_eos_penalty, [tokenizer.eos_token_id])
    trainer = training.build_trainer(GRPOTrainer, model, args, compute, live, (trl_align.StopAfter(stop_after),),
                                     reward_funcs=reward, processing_class=tokenizer,
                                     train_dataset=Dataset.from_dict({"prompt": train_prompts}),
                                     eval_dataset=Dataset.from_dict({"prompt": eval_prompts}))
    check = SamplerCheck(trainer, train_prompts[:cfg.batch_size], compute.precision, params.seed)
    trainer.add_callback(check)
    ranks = watch_ranks(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    if trl_align.stopped_early(trainer):
        return {"stopped_after": trainer.state.global_step}

    policy_chats = sample_chats(model, tokenizer, prompts, decoding)
    rewards = reward_metrics(gathered_scores(reward_model, sft_chats, len(prompts)),
                             gathered_scores(reward_model, policy_chats, len(prompts)), params.seed, "grpo")
    trl_align.save_policy(model, tokenizer, paths, checkpoint_dir, state.is_main_process)
    held = trl_align.last_eval(trainer)
    return {**trl_align.run_summary(trainer, resume, compute, ranks, state.num_processes, result, started),
            "sampler_logprob_gap_max": check.gap, "beta": cfg.beta, "num_generations": cfg.num_generations,
            "num_iterations": cfg.num_iterations,
            "train_prompts": len(train_prompts), "eval_reward": held.get("eval_reward"), **rewards}
