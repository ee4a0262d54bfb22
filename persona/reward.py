"""The persona-consistency reward model and its scoring API.

Base model + LoRA + a one-output score head (peft trains and saves the head with the adapter,
so it survives save/load and merge), trained with TRL's RewardTrainer on the `pairs` stage's
pairs. It reads exactly what the policy sees: persona as system turn, history, then the reply.

Held-out metrics go beyond pairwise accuracy: accuracy per strategy, on length-matched pairs,
and `persona_only_accuracy`: the *same* reply scored under its true persona vs the swapped one.
A model that only learned "gold-like text" or "longer" gets 0.5 there; one that reads the
persona gets more.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from persona import training
from persona.chat_format import encode_messages, messages_for
from persona.config import ConfigError, Params
from persona.distributed import watch_ranks
from persona.hardware import resolve_compute, run_metrics
from persona.likelihood import collate
from persona.models import eval_mode, load_for_training, lora_config, save_model, trainable_parameters
from persona.pairs import STRATEGIES, read_pairs, words
from persona.paths import DEFAULT, Paths

log = logging.getLogger(__name__)
REWARD_INFO = "reward_info.json"  # held-out score mean/std, for PPO's reward normalisation
LENGTH_MATCHED_WORDS = 2  # pairs whose sides differ by at most this many words


def reward_chat(facts: list[str], history: list[tuple[int, str]], speaker: int, response: str) -> list[dict]:
    return messages_for(facts, list(history) + [(speaker, response)], speaker)


def encode_chat(tokenizer, chat: list[dict], max_length: int) -> list[int]:
    """Token ids of a chat ending with the reply; the oldest history goes first when too long."""
    encoded = encode_messages(tokenizer, chat, "last", max_length)
    if encoded is None:
        raise ConfigError(f"model.max_length: {max_length} tokens cannot hold the persona and one reply; raise it")
    return encoded.input_ids


def pair_rows(pairs: list[dict], tokenizer, max_length: int, source: Path):
    """Pre-tokenised {chosen_ids, rejected_ids} rows, the format RewardTrainer takes as is.

    `source`: the pairs file, whose line i+1 holds `pairs[i]` (named when a pair cannot be encoded).
    """
    from datasets import Dataset
    rows = {"chosen_ids": [], "rejected_ids": []}
    for line, pair in enumerate(pairs, 1):
        for side in ("chosen", "rejected"):
            facts = pair.get("rejected_facts", pair["facts"]) if side == "rejected" else pair["facts"]
            chat = reward_chat(facts, pair["history"], pair["speaker"], pair[side])
            try:
                rows[f"{side}_ids"].append(encode_chat(tokenizer, chat, max_length))
            except ConfigError as error:
                raise ConfigError(f"{source}:{line} ({side} reply): {error}") from None
    return Dataset.from_dict(rows)


class RewardModel:
    """`score(personas, histories, responses)`: one scalar per reply, batched, on CPU or GPU.

    A history is the dialogue so far as plain strings, oldest first, ending with the partner's
    turn; the reply is the persona speaker's next turn.
    """

    def __init__(self, model, tokenizer, max_length: int = 1024, batch_size: int = 16):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def load(cls, base_path: Path, adapter_path: Path, device: str | None = None, max_length: int = 1024,
             batch_size: int = 16, dtype: torch.dtype = torch.float32) -> RewardModel:
        """`dtype` bf16 halves the frozen scorer's memory beside a PPO policy on a bf16 GPU."""
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not (adapter_path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter_path}: no reward model; run the `reward` stage first")
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the head is "newly initialised" until the adapter loads it
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=dtype)
        hf_logging.set_verbosity(verbosity)
        model.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(model, str(adapter_path))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tokenizer, max_length, batch_size)

    def score(self, personas: list[list[str]], histories: list[list[str]], responses: list[str]) -> list[float]:
        if not len(personas) == len(histories) == len(responses):
            raise ValueError("score: personas, histories and responses must have the same length")
        chats = []
        for facts, history, response in zip(personas, histories, responses):
            turns = [(0 if (len(history) - i) % 2 == 0 else 1, text) for i, text in enumerate(history)]
            chats.append(reward_chat(facts, turns, 0, response))
        return self.score_chats(chats)

    @torch.no_grad()
    def score_chats(self, chats: list[list[dict]]) -> list[float]:
        """Scores of chats (system persona, history, final assistant reply), in input order."""
        ids = [encode_chat(self.tokenizer, chat, self.max_length) for chat in chats]
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)


@torch.no_grad()
def score_ids(model, ids: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """Scalar scores of token sequences; length-sorted batches, results in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = [0.0] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        tensors, attention, _ = collate([{"input_ids": ids[i], "completion_mask": [0] * len(ids[i])}
                                         for i in chunk], pad_id)
        logits = model(input_ids=tensors.to(device), attention_mask=attention.to(device)).logits[:, 0]
        for i, value in zip(chunk, logits.float().tolist()):
            scores[i] = value
    return scores


def held_out_metrics(model, tokenizer, pairs: list[dict], max_length: int, batch_size: int, source: Path) -> dict:
    """Pairwise accuracy (overall, per strategy, length-matched), margin, persona-only accuracy.

    `source`: the pairs file (see `pair_rows`)."""
    with eval_mode(model):
        rows = pair_rows(pairs, tokenizer, max_length, source)
        chosen = np.array(score_ids(model, rows["chosen_ids"], tokenizer.pad_token_id, batch_size))
        rejected = np.array(score_ids(model, rows["rejected_ids"], tokenizer.pad_token_id, batch_size))
        correct = (chosen > rejected).astype(float)
        out = {"accuracy": round(float(correct.mean()), 4), "n_pairs": len(pairs),
               "margin": round(float((chosen - rejected).mean()), 4)}
        for strategy in STRATEGIES:
            picked = [i for i, p in enumerate(pairs) if p["strategy"] == strategy]
            out[f"accuracy_{strategy}"] = round(float(correct[picked].mean()), 4) if picked else None
            out[f"n_{strategy}"] = len(picked)
        matched = [i for i, p in enumerate(pairs)
                   if abs(words(p["chosen"]) - words(p["rejected"])) <= LENGTH_MATCHED_WORDS]
        out["accuracy_length_matched"] = round(float(correct[matched].mean()), 4) if matched else None
        out["n_length_matched"] = len(matched)
        swaps = [p for p in pairs if p["strategy"] == "swap"]
        if swaps:
            swapped = [encode_chat(tokenizer, reward_chat(p["other_facts"], p["history"], p["speaker"], p["chosen"]),
                                   max_length) for p in swaps]
            own = chosen[[i for i, p in enumerate(pairs) if p["strategy"] == "swap"]]
            under_other = np.array(score_ids(model, swapped, tokenizer.pad_token_id, batch_size))
            out["persona_only_accuracy"] = round(float((own > under_other).mean()), 4)
        both = np.concatenate([chosen, rejected])
        out["score_mean"], out["score_std"] = round(float(both.mean()), 4), round(float(both.std()), 4)
    return out


def run(params: Params, paths: Paths = DEFAULT, callbacks: tuple = ()) -> dict:
    """The `reward` stage: train the reward LoRA + head on train pairs, test on held-out pairs.

    Files are written by rank 0 only; `callbacks`: extra Trainer callbacks (tests kill a run with one).
    """
    from peft import get_peft_model
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    cfg = params.reward
    pairs_dir, base_path, out_dir = paths.pairs, paths.base, paths.reward
    checkpoint_dir = paths.checkpoint_dir("reward")
    compute = resolve_compute(cfg.quant, cfg.precision, "reward", cfg.optimizer)
    expected = training.fingerprint(cfg, [pairs_dir / "train.jsonl"], base_path, lora=asdict(params.lora),
                                    max_length=params.model.max_length, seed=params.seed)
    state, resume, live = training.start_run(compute, params.launch.processes, checkpoint_dir, expected,
                                             paths.curves_dir("reward"))
    started = time.perf_counter()
    train_pairs, valid_pairs = read_pairs(pairs_dir / "train.jsonl"), read_pairs(pairs_dir / "valid.jsonl")
    set_seed(params.seed)  # the score head is initialised randomly
    model, tokenizer = load_for_training(base_path, compute, cfg.gradient_checkpointing, scalar_head=True)
    layers = model.config.num_hidden_layers
    if cfg.lora_top_layers > layers:
        raise ConfigError(f"reward.lora_top_layers: {cfg.lora_top_layers} > the model's {layers} layers")
    top = list(range(layers - cfg.lora_top_layers, layers)) if cfg.lora_top_layers else None
    model = get_peft_model(model, lora_config(params.lora, "SEQ_CLS", top))
    trainable, total = trainable_parameters(model)
    train_set = pair_rows(train_pairs, tokenizer, params.model.max_length, pairs_dir / "train.jsonl")
    eval_pairs = valid_pairs[: cfg.max_eval_sequences] if cfg.max_eval_sequences else valid_pairs
    eval_set = pair_rows(eval_pairs, tokenizer, params.model.max_length, pairs_dir / "valid.jsonl")
    before = held_out_metrics(model, tokenizer, valid_pairs, params.model.max_length, cfg.score_batch_size,
                              pairs_dir / "valid.jsonl")

    args = training.trl_config(RewardConfig, cfg, compute, checkpoint_dir, params.seed,
                               max_length=params.model.max_length,
                               center_rewards_coefficient=cfg.center_rewards or None, disable_dropout=True)
    trainer = training.build_trainer(RewardTrainer, model, args, compute, live, callbacks, train_dataset=train_set,
                                     eval_dataset=eval_set, processing_class=tokenizer)
    ranks = watch_ranks(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    after = held_out_metrics(model, tokenizer, valid_pairs, params.model.max_length, cfg.score_batch_size,
                             pairs_dir / "valid.jsonl")
    if state.is_main_process:
        training.drop_finished_checkpoints(checkpoint_dir)
        save_model(model, tokenizer, out_dir, {REWARD_INFO: json.dumps(
            {"score_mean": after["score_mean"], "score_std": after["score_std"]}, indent=2)})
    runtime = result.metrics["train_runtime"]
    tokens = sum(len(r) for column in ("chosen_ids", "rejected_ids") for r in train_set[column])
    epochs_run = trainer.state.global_step * cfg.batch_size * cfg.grad_accum / max(len(train_set), 1)
    return {
        **after, "untrained_accuracy": before["accuracy"],
        "untrained_accuracy_swap": before["accuracy_swap"],
        **run_metrics(compute), **ranks.metrics(state.num_processes),
        "trainable_dtype": str(trainer.trainable_dtype),
        "train_pairs": len(train_set), "steps": trainer.state.global_step,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "train_loss": training.logged_train_loss(trainer),
        "lora_top_layers": cfg.lora_top_layers, "trainable_params": trainable,
        "trainable_pct": round(100 * trainable / total, 3),
        "tokens_per_s": round(tokens * epochs_run / runtime, 1),
        "train_wall_s": round(runtime, 1), "stage_wall_s": round(time.perf_counter() - started, 1),
    }
