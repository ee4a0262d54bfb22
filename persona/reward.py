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
from persona.data import read_dialogues
from persona.distributed import watch_ranks
from persona.files import replace_folder
from persona.hardware import Compute, resolve_compute, run_metrics
from persona.likelihood import collate
from persona.likelihood_reward import CONFIG as LIKELIHOOD_CONFIG
from persona.likelihood_reward import LikelihoodReward, load_sft_merged
from persona.likelihood_reward import config_text as likelihood_config_text
from persona.metrics import bootstrap_ci
from persona.models import eval_mode, load_for_training, lora_config, save_model, trainable_parameters
from persona.pairs import STRATEGIES, read_pairs, words
from persona.paths import DEFAULT, Paths
from persona.scoring import ChatScorer

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
            try:
                rows[f"{side}_ids"].append(encode_chat(tokenizer, pair_chat(pair, side), max_length))
            except ConfigError as error:
                raise ConfigError(f"{source}:{line} ({side} reply): {error}") from None
    return Dataset.from_dict(rows)


class RewardModel(ChatScorer):
    """The trained reward model: one scalar per reply, batched, on CPU or GPU."""

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

    @torch.no_grad()
    def score_chats(self, chats: list[list[dict]]) -> list[float]:
        """Scores of chats (system persona, history, final assistant reply), in input order."""
        ids = [encode_chat(self.tokenizer, chat, self.max_length) for chat in chats]
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)


def pair_chat(pair: dict, side: str) -> list[dict]:
    """One side of a preference pair as the scorer reads it. A mismatch pair's rejected side is the chosen reply
    under another persona (`rejected_facts`); every other side is under the pair's own persona."""
    facts = pair.get("rejected_facts", pair["facts"]) if side == "rejected" else pair["facts"]
    return reward_chat(facts, pair["history"], pair["speaker"], pair[side])


class CombinedReward(ChatScorer):
    """`reward.kind: both`: per chat, the sum over scorers of (score - its held-out mean) / its held-out std."""

    def __init__(self, scorers: dict[str, object], stats: dict[str, dict]):
        self.scorers, self.stats = scorers, stats

    def score_chats(self, chats: list[list[dict]]) -> list[float]:
        parts = {name: np.array(scorer.score_chats(chats), dtype=float) for name, scorer in self.scorers.items()}
        return normalised_sum(parts, self.stats).tolist()


def load_scorer(base_path: Path, reward_path: Path, sft_path: Path, device: str | None = None,
                max_length: int = 1024, batch_size: int = 16, dtype: torch.dtype = torch.float32):
    """What the reward stage saved at `reward_path`, ready to score: a RewardModel, a LikelihoodReward (which runs
    the SFT adapter at `sft_path`) or their CombinedReward, after the folder's reward_info.json `kind`."""
    info_path = reward_path / REWARD_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    kind = info.get("kind", "model")
    scorers = {}
    if kind != "likelihood":
        scorers["model"] = RewardModel.load(base_path, reward_path, device, max_length, batch_size, dtype)
    if kind != "model":
        scorers["likelihood"] = LikelihoodReward.load(base_path, reward_path, sft_path, device, batch_size, dtype)
    return scorers[kind] if kind in scorers else CombinedReward(scorers, info["parts"])


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


def held_out_chats(pairs: list[dict]) -> dict[str, list[list[dict]]]:
    """The chats held-out pairs are scored on: each side under the true persona, and each swap pair's chosen
    reply under the other persona (for persona_only_accuracy)."""
    chats = {side: [pair_chat(p, side) for p in pairs] for side in ("chosen", "rejected")}
    chats["swapped"] = [reward_chat(p["other_facts"], p["history"], p["speaker"], p["chosen"])
                        for p in pairs if p["strategy"] == "swap"]
    return chats


def score_held_out(score_chats, pairs: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.array(score_chats(chats), dtype=float) for name, chats in held_out_chats(pairs).items()}


def held_out_metrics(pairs: list[dict], scores: dict[str, np.ndarray], seed: int, resamples: int = 1000) -> dict:
    """Pairwise accuracy (overall, per strategy, length-matched), margin, persona-only accuracy, from the scores
    of `score_held_out`. The accuracies that only the persona decides, persona_only_accuracy (the same gold reply
    under its persona vs another), accuracy_mismatch and accuracy_contradiction (the same reply denying one of the
    persona's facts or an unrelated one), carry 95% CIs that resample dialogues."""
    chosen, rejected = scores["chosen"], scores["rejected"]
    correct = (chosen > rejected).astype(float)
    out = {"accuracy": round(float(correct.mean()), 4), "n_pairs": len(pairs),
           "margin": round(float((chosen - rejected).mean()), 4)}
    dialogues = [p["dialogue"] for p in pairs]
    for strategy in STRATEGIES:
        picked = [i for i, p in enumerate(pairs) if p["strategy"] == strategy]
        out[f"accuracy_{strategy}"] = round(float(correct[picked].mean()), 4) if picked else None
        out[f"n_{strategy}"] = len(picked)
        if strategy in ("mismatch", "contradiction") and picked:
            out.update(_with_ci(f"accuracy_{strategy}", correct[picked], [dialogues[i] for i in picked], seed,
                                resamples))
    matched = [i for i, p in enumerate(pairs)
               if abs(words(p["chosen"]) - words(p["rejected"])) <= LENGTH_MATCHED_WORDS]
    out["accuracy_length_matched"] = round(float(correct[matched].mean()), 4) if matched else None
    out["n_length_matched"] = len(matched)
    swaps = [i for i, p in enumerate(pairs) if p["strategy"] == "swap"]
    if swaps:
        own_better = (chosen[swaps] > scores["swapped"]).astype(float)
        out.update(_with_ci("persona_only_accuracy", own_better, [dialogues[i] for i in swaps], seed, resamples))
    both = np.concatenate([chosen, rejected])
    out["score_mean"], out["score_std"] = round(float(both.mean()), 4), round(float(both.std()), 4)
    return out


def _with_ci(key: str, values: np.ndarray, dialogues: list[str], seed: int, resamples: int) -> dict:
    low, high = bootstrap_ci(values, n_resamples=resamples, seed=seed, clusters=dialogues)
    return {key: round(float(values.mean()), 4), f"{key}_ci_low": round(low, 4), f"{key}_ci_high": round(high, 4)}


def model_scorer(model, tokenizer, max_length: int, batch_size: int):
    """`score_chats` of a reward model being trained (switched to eval mode for the call)."""
    def score_chats(chats: list[list[dict]]) -> list[float]:
        with eval_mode(model):
            return score_ids(model, [encode_chat(tokenizer, chat, max_length) for chat in chats],
                             tokenizer.pad_token_id, batch_size)
    return score_chats


def run(params: Params, paths: Paths = DEFAULT, callbacks: tuple = ()) -> dict:
    """The `reward` stage: the scorer of `reward.kind`, tested on the held-out pairs, saved to models/reward.

    model: train the reward LoRA + head on the train pairs. likelihood: nothing to train; the frozen SFT model
    scores (persona/likelihood_reward.py). both: the two, summed after normalising each by its held-out scores.
    Files are written by rank 0 only; `callbacks`: extra Trainer callbacks (tests kill a run with one).
    """
    cfg = params.reward
    started = time.perf_counter()
    valid_pairs = read_pairs(paths.pairs / "valid.jsonl")
    parts, files, out = {}, {}, {}
    saved = None
    if cfg.kind != "likelihood":
        out, parts["model"], saved = train_reward_model(params, paths, valid_pairs, callbacks)
    if cfg.kind != "model":
        scorer = likelihood_scorer(params, paths)
        parts["likelihood"] = score_held_out(scorer.score_chats, valid_pairs)
        files[LIKELIHOOD_CONFIG] = likelihood_config_text(paths.sft, scorer.pool.values(), cfg.likelihood_personas,
                                                          cfg.copy_penalty, cfg.repeat_penalty,
                                                          cfg.likelihood_contrast)
    part_stats = {name: _stats(scores) for name, scores in parts.items()}
    scores = parts[cfg.kind] if cfg.kind in parts else combine(parts, part_stats)
    held = held_out_metrics(valid_pairs, scores, params.seed)
    info = {"kind": cfg.kind, "score_mean": held["score_mean"], "score_std": held["score_std"]}
    if cfg.kind == "both":
        info["parts"] = part_stats
        held["by_scorer"] = {name: held_out_metrics(valid_pairs, part, params.seed) for name, part in parts.items()}
    files[REWARD_INFO] = json.dumps(info, indent=2)
    if saved is not None:
        saved(files)
    else:
        from accelerate import PartialState

        main = PartialState().is_main_process
        if main:
            with replace_folder(paths.reward) as folder:
                for name, content in files.items():
                    (folder / name).write_text(content)
        live = training.open_live(paths.curves_dir("reward"), main)
        if live is not None:  # nothing trains: the curves are the held-out figures, one point at step 0
            for key in ("accuracy", "margin"):
                live.log_metric(f"eval/{key}", held[key])
            live.end()
        out = run_metrics(scorer_compute(cfg))
    return {**out, **held, "kind": cfg.kind, "stage_wall_s": round(time.perf_counter() - started, 1)}


def likelihood_scorer(params: Params, paths: Paths) -> LikelihoodReward:
    """The likelihood reward of `reward.*` on this machine's device, its persona pool the train split's."""
    from accelerate import PartialState

    cfg = params.reward
    personas = [p for d in read_dialogues(paths.prepared / "train.jsonl") for p in d.personas]
    model, tokenizer = load_sft_merged(paths.base, paths.sft, scorer_compute(cfg).dtype, str(PartialState().device))
    return LikelihoodReward(model, tokenizer, personas, cfg.likelihood_personas, cfg.copy_penalty,
                            cfg.repeat_penalty, cfg.score_batch_size, cfg.likelihood_contrast)


def scorer_compute(cfg) -> Compute:
    """The likelihood scorer's precision: `reward.precision` on an unquantised model (it trains nothing)."""
    return resolve_compute("none", cfg.precision, "reward", "adamw_torch")


def _stats(scores: dict[str, np.ndarray]) -> dict:
    both = np.concatenate([scores["chosen"], scores["rejected"]])
    return {"score_mean": float(both.mean()), "score_std": float(both.std()) or 1.0}


def normalised_sum(scores: dict[str, np.ndarray], stats: dict[str, dict]) -> np.ndarray:
    """`both`: per chat, the sum over scorers of (score - its held-out mean) / its held-out std."""
    return sum((scores[name] - stats[name]["score_mean"]) / stats[name]["score_std"] for name in scores)


def combine(parts: dict[str, dict[str, np.ndarray]], stats: dict[str, dict]) -> dict[str, np.ndarray]:
    """`normalised_sum` of each held-out chat set (chosen, rejected, swapped) scored by every scorer."""
    return {key: normalised_sum({name: part[key] for name, part in parts.items()}, stats) for key in parts["model"]}


def train_reward_model(params: Params, paths: Paths, valid_pairs: list[dict], callbacks: tuple):
    """Train the reward LoRA + head; returns (training metrics, held-out scores, a function that saves the
    adapter with extra files on rank 0)."""
    from peft import get_peft_model
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    cfg = params.reward
    pairs_dir, base_path = paths.pairs, paths.base
    checkpoint_dir = paths.checkpoint_dir("reward")
    compute = resolve_compute(cfg.quant, cfg.precision, "reward", cfg.optimizer)
    expected = training.fingerprint(cfg, [pairs_dir / "train.jsonl"], base_path, lora=asdict(params.lora),
                                    max_length=params.model.max_length, seed=params.seed)
    state, resume, live = training.start_run(compute, params.launch.processes, checkpoint_dir, expected,
                                             paths.curves_dir("reward"))
    train_pairs = read_pairs(pairs_dir / "train.jsonl")
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
    pair_rows(valid_pairs, tokenizer, params.model.max_length, pairs_dir / "valid.jsonl")  # names a bad row
    score = model_scorer(model, tokenizer, params.model.max_length, cfg.score_batch_size)
    before = held_out_metrics(valid_pairs, score_held_out(score, valid_pairs), params.seed)

    args = training.trl_config(RewardConfig, cfg, compute, checkpoint_dir, params.seed,
                               max_length=params.model.max_length,
                               center_rewards_coefficient=cfg.center_rewards or None, disable_dropout=True)
    trainer = training.build_trainer(RewardTrainer, model, args, compute, live, callbacks, train_dataset=train_set,
                                     eval_dataset=eval_set, processing_class=tokenizer)
    ranks = watch_ranks(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    scores = score_held_out(score, valid_pairs)

    def saved(files: dict[str, str]) -> None:
        if state.is_main_process:
            training.drop_finished_checkpoints(checkpoint_dir)
            save_model(model, tokenizer, paths.reward, files)

    runtime = result.metrics["train_runtime"]
    tokens = sum(len(r) for column in ("chosen_ids", "rejected_ids") for r in train_set[column])
    epochs_run = trainer.state.global_step * cfg.batch_size * cfg.grad_accum / max(len(train_set), 1)
    metrics = {
        "untrained_accuracy": before["accuracy"], "untrained_accuracy_swap": before["accuracy_swap"],
        **run_metrics(compute), **ranks.metrics(state.num_processes),
        "trainable_dtype": str(trainer.trainable_dtype),
        "train_pairs": len(train_set), "steps": trainer.state.global_step,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "train_loss": training.logged_train_loss(trainer),
        "lora_top_layers": cfg.lora_top_layers, "trainable_params": trainable,
        "trainable_pct": round(100 * trainable / total, 3),
        "tokens_per_s": round(tokens * epochs_run / runtime, 1), "train_wall_s": round(runtime, 1),
    }
    return metrics, scores, saved
