"""DPO: TRL's DPOTrainer from the SFT adapter on the pairs stage's preference pairs (`align.algorithm: dpo`).

The policy trains the SFT adapter's weights; the reference is a frozen copy of them (persona/trl_align.py), so
DPO's implicit reward is measured against the SFT policy. A pair is one prompt (persona as system turn, the
history) with the chosen and the rejected reply, in TRL's conversational format; TRL renders both with the
tokenizer's chat template, as every stage does.

Mismatch pairs (persona/pairs.py) are left out: their two sides are the *same* reply, scored under the true
persona (chosen) and under another one (rejected). DPO compares two replies to one prompt; with a shared prompt
such a pair's loss is the constant log 2, with no gradient, and with two prompts it is no DPO pair. Reading the
persona is what they teach the reward model; here swap and contradiction pairs carry it. Their count is reported.
"""
from __future__ import annotations

import logging
import time

from persona import training, trl_align
from persona.chat_format import messages_for
from persona.config import ConfigError, Params
from persona.distributed import watch_ranks
from persona.hardware import resolve_compute
from persona.held_out import sample_chats
from persona.pairs import read_pairs
from persona.paths import Paths

log = logging.getLogger(__name__)


def preference_rows(pairs: list[dict]) -> tuple[dict[str, list], int]:
    """TRL's conversational preference rows {prompt, chosen, rejected} of the pairs with one prompt, and how many
    pairs were left out (those whose rejected side is scored under another persona: see the module docstring)."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for pair in pairs:
        if "rejected_facts" in pair:
            continue
        rows["prompt"].append(messages_for(pair["facts"], pair["history"], pair["speaker"]))
        for side in ("chosen", "rejected"):
            rows[side].append([{"role": "assistant", "content": pair[side]}])
    return rows, len(pairs) - len(rows["prompt"])


def preference_dataset(pairs: list[dict], source, limit: int = 0):
    """(Dataset of `preference_rows`, at most `limit` rows if > 0; pairs left out)."""
    from datasets import Dataset

    rows, dropped = preference_rows(pairs)
    if not rows["prompt"]:
        raise ConfigError(f"pairs.shares: {source} holds no pair DPO can use (mismatch pairs have one reply)")
    dataset = Dataset.from_dict(rows)
    return (dataset.select(range(min(limit, len(dataset)))) if limit else dataset), dropped


def fingerprint(params: Params, paths: Paths) -> dict:
    """What a DPO checkpoint depends on: a checkpoint with another fingerprint is not resumed."""
    return trl_align.run_fingerprint(params, paths, params.dpo, [paths.pairs / "train.jsonl"])


def train_dpo(params: Params, paths: Paths, stop_after: int | None = None) -> dict:
    """DPO from the SFT adapter to `paths.policy`; `stop_after` ends the run after that step (tests of resuming)."""
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    cfg = params.dpo
    compute = resolve_compute(cfg.quant, cfg.precision, "dpo", cfg.optimizer)
    checkpoint_dir = paths.checkpoint_dir("align")
    expected = fingerprint(params, paths)
    state, resume, live = training.start_run(compute, params.launch.processes, checkpoint_dir, expected,
                                             paths.curves_dir("align"))
    started = time.perf_counter()
    train_set, dropped = preference_dataset(read_pairs(paths.pairs / "train.jsonl"), paths.pairs / "train.jsonl")
    eval_set, _ = preference_dataset(read_pairs(paths.pairs / "valid.jsonl"), paths.pairs / "valid.jsonl",
                                     cfg.max_eval_sequences)
    log.info("%d DPO pairs (%d mismatch pairs left out), %d held out", len(train_set), dropped, len(eval_set))
    set_seed(params.seed)
    model, tokenizer = trl_align.load_sft_policy(paths, compute, cfg.gradient_checkpointing)
    prompts, decoding = trl_align.held_out(params, paths, cfg)
    sft_chats = sample_chats(model, tokenizer, prompts, decoding)

    args = training.trl_config(DPOConfig, cfg, compute, checkpoint_dir, params.seed, beta=cfg.beta,
                               max_length=params.model.max_length, disable_dropout=True)
    trainer = training.build_trainer(DPOTrainer, model, args, compute, live, (trl_align.StopAfter(stop_after),),
                                     train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer)
    ranks = watch_ranks(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    if trl_align.stopped_early(trainer):
        return {"stopped_after": trainer.state.global_step}

    rewards = trl_align.held_out_rewards(params, paths, compute, cfg, model, tokenizer, prompts, decoding, sft_chats)
    trl_align.save_policy(model, tokenizer, paths, checkpoint_dir, state.is_main_process)
    held = trl_align.last_eval(trainer)
    return {**trl_align.run_summary(trainer, resume, compute, ranks, state.num_processes, result, started),
            "train_pairs": len(train_set), "mismatch_pairs_left_out": dropped, "beta": cfg.beta,
            "eval_pairs": len(eval_set), "eval_loss": held.get("eval_loss"),
            "eval_preference_accuracy": held.get("eval_rewards/accuracies"),
            "eval_reward_margin": held.get("eval_rewards/margins"), **rewards}
