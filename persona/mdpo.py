"""mDPO's conditional preference, the persona as the condition (`align.algorithm: mdpo`).

Persona Hits@1 asks whether the policy finds a reply likelier under its speaker's persona than under others. DPO
compares two replies to one prompt, so a pair whose sides are one reply under two personas (the pairs stage's
mismatch pairs) has no DPO form (persona/dpo.py). mDPO (Wang et al. 2024, "mDPO: Conditional Preference
Optimization for Multimodal Large Language Models") gives such a pair a loss of its own; with the persona in the
image's place, for a reply y, its persona p, another persona p' and the history h:

    conditional = -log sigmoid(beta * (r(y | p, h) - r(y | p', h)))
    anchor      = -log sigmoid(beta * r(y | p, h))            r(y | c) = log pi(y | c) - log pi_ref(y | c)

log-probs summed over y's tokens, pi_ref the SFT policy (as DPO's reference). The anchor, weighted by
`mdpo.anchor_weight`, keeps the reply's likelihood under its own persona from falling, which DPO's chosen side
often does and gold-reply perplexity would show. mDPO's third term, standard DPO on two replies, is left to
`align.algorithm: dpo`.

y is a gold reply of the train split: no sampling, so pairs are cheap, and both sides are one text, so neither
style nor length separates them. p' is another persona of the train split (the test split's personas are not in
it). The reference log-probs are taken once, before the first step, while the policy still is the SFT policy.
"""
from __future__ import annotations

import logging
import random
import time

import torch
from transformers import Trainer, TrainingArguments

from persona import likelihood, training, trl_align
from persona import metrics as M
from persona.chat_format import Prompt, encode_messages, select_prompts
from persona.config import ConfigError, Params
from persona.data import persona_key, read_dialogues
from persona.distributed import watch_ranks
from persona.hardware import resolve_compute
from persona.held_out import sample_chats
from persona.pairs import other_persona
from persona.paths import Paths
from persona.scoring import row_scores
from persona.seeds import derive_seed

log = logging.getLogger(__name__)


def conditional_pairs(dialogues, n: int, max_history: int, seed: int) -> list[tuple[Prompt, list[str]]]:
    """Up to n (prompt with its gold reply, another persona of `dialogues`), drawn as `select_prompts` draws."""
    prompts = select_prompts(dialogues, n, max_history, seed)
    pool = list({persona_key(p): p for d in dialogues for p in d.personas}.values())
    rng = random.Random(derive_seed(seed, "mdpo-other-persona"))
    return [(prompt, other_persona(prompt, pool, rng)) for prompt in prompts]


def encode_pairs(pairs: list[tuple[Prompt, list[str]]], tokenizer, max_length: int) -> list[dict]:
    """Each pair's reply under its own persona (`own_*`) and under the other (`other_*`), the reply alone scored,
    and its dialogue; pairs that do not fit `max_length` even without history are dropped."""
    rows = []
    for prompt, other in pairs:
        own = encode_messages(tokenizer, prompt.chat(reply=prompt.gold), "last", max_length)
        rival = encode_messages(tokenizer, prompt.chat(other, prompt.gold), "last", max_length)
        if own is None or rival is None:
            continue
        rows.append({"own_ids": own.input_ids, "own_mask": own.completion_mask,
                     "other_ids": rival.input_ids, "other_mask": rival.completion_mask, "dialogue": prompt.dialogue})
    return rows


def sides(rows: list[dict]) -> list[dict]:
    """The rows' own-persona sequences, then their other-persona ones, as {input_ids, completion_mask}."""
    return [{"input_ids": r[f"{side}_ids"], "completion_mask": r[f"{side}_mask"]}
            for side in ("own", "other") for r in rows]


def reply_logprobs(model, rows: list[dict], pad_id: int, batch_size: int) -> list[float]:
    """Summed log-prob of the reply, own-persona sides first then other-persona sides (no gradient)."""
    return [-total for total, _ in row_scores(model, sides(rows), pad_id, batch_size)]


def with_reference(rows: list[dict], logprobs: list[float]) -> list[dict]:
    half = len(rows)
    return [{**row, "ref_own": logprobs[i], "ref_other": logprobs[half + i]} for i, row in enumerate(rows)]


def collator(pad_id: int):
    def collate(features: list[dict]) -> dict:
        ids, attention, mask = likelihood.collate(sides(features), pad_id)
        reference = [f["ref_own"] for f in features] + [f["ref_other"] for f in features]
        return {"input_ids": ids, "attention_mask": attention, "completion_mask": mask,
                "ref_logps": torch.tensor(reference, dtype=torch.float32)}
    return collate


def conditional_loss(logratios: torch.Tensor, beta: float, anchor_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair margin r(own) - r(other)); `logratios`: [2B] log pi - log pi_ref, own sides first."""
    own, other = logratios.chunk(2)
    margin = own - other
    loss = -torch.nn.functional.logsigmoid(beta * margin) - anchor_weight * torch.nn.functional.logsigmoid(beta * own)
    return loss.mean(), margin


class ConditionalDPOTrainer(Trainer):
    """transformers' Trainer with the conditional loss; logs the mean margin and the share of pairs it ranks right
    (`margin`, `accuracy`) beside the loss, for training and held-out pairs alike."""

    def __init__(self, *args, beta: float, anchor_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.anchor_weight = beta, anchor_weight
        self.margins = {"train": [], "eval": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        nll, _ = likelihood.masked_nll(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        loss, margin = conditional_loss(-nll - inputs["ref_logps"], self.beta, self.anchor_weight)
        self.margins["train" if model.training else "eval"] += margin.detach().float().tolist()
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        margins, prefix = self.margins[split], "eval_" if split == "eval" else ""
        if margins and ("loss" in logs or "eval_loss" in logs):
            logs = {**logs, f"{prefix}margin": round(sum(margins) / len(margins), 4),
                    f"{prefix}accuracy": round(sum(m > 0 for m in margins) / len(margins), 4)}
            margins.clear()
        super().log(logs, *args, **kwargs)


def persona_accuracy(before: list[float], after: list[float], dialogues: list[str], seed: int) -> dict:
    """Held-out pairs whose reply the SFT policy (`before`) and the trained one (`after`) find likelier under its own
    persona than under the other, and the paired difference with its 95% CI; the CI resamples `dialogues` (one per
    pair), as the evaluation's do: a dialogue's pairs share its speakers and topic."""
    half = len(before) // 2
    sft = [float(before[i] > before[half + i]) for i in range(half)]
    policy = [float(after[i] > after[half + i]) for i in range(half)]
    gain = M.paired_difference(policy, sft, dialogues, seed)
    return {"valid_pairs": half, "valid_persona_accuracy_sft": round(sum(sft) / half, 4),
            "valid_persona_accuracy": round(sum(policy) / half, 4),
            "valid_persona_accuracy_gain": gain["diff"], "valid_persona_accuracy_gain_ci_low": gain.get("ci_low"),
            "valid_persona_accuracy_gain_ci_high": gain.get("ci_high")}


def fingerprint(params: Params, paths: Paths) -> dict:
    """What an mDPO checkpoint depends on: a checkpoint with another fingerprint is not resumed."""
    return trl_align.run_fingerprint(params, paths, params.mdpo,
                                     [paths.prepared / "train.jsonl", paths.prepared / "valid.jsonl"])


def train_mdpo(params: Params, paths: Paths, stop_after: int | None = None) -> dict:
    """mDPO from the SFT adapter to `paths.policy`; `stop_after` ends the run after that step (tests of resuming)."""
    from datasets import Dataset
    from transformers import set_seed

    cfg, max_length = params.mdpo, params.model.max_length
    compute = resolve_compute(cfg.quant, cfg.precision, "mdpo", cfg.optimizer)
    checkpoint_dir = paths.checkpoint_dir("align")
    state, resume, live = training.start_run(compute, params.launch.processes, checkpoint_dir,
                                             fingerprint(params, paths), paths.curves_dir("align"))
    started = time.perf_counter()
    train_dialogues = read_dialogues(paths.prepared / "train.jsonl")
    valid_dialogues = read_dialogues(paths.prepared / "valid.jsonl")
    set_seed(params.seed)
    model, tokenizer = trl_align.load_sft_policy(paths, compute, cfg.gradient_checkpointing)
    pad = tokenizer.pad_token_id
    train_rows = encode_pairs(conditional_pairs(train_dialogues, cfg.train_n, cfg.max_history_turns, params.seed),
                              tokenizer, max_length)
    valid_rows = encode_pairs(conditional_pairs(valid_dialogues, cfg.max_eval_sequences, cfg.max_history_turns,
                                                derive_seed(params.seed, "mdpo-valid")), tokenizer, max_length)
    if not train_rows or not valid_rows:
        raise ConfigError(f"mdpo: no conditional pair fits model.max_length {max_length} "
                          f"({len(train_rows)} train, {len(valid_rows)} valid)")
    log.info("%d conditional pairs, %d held out: reference log-probs of the SFT policy", len(train_rows),
             len(valid_rows))
    # DPO's rule (TRL's disable_dropout): the policy's log-probs are compared with the reference's, taken without it
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    train_rows = with_reference(train_rows, reply_logprobs(model, train_rows, pad, cfg.batch_size))
    valid_before = reply_logprobs(model, valid_rows, pad, cfg.batch_size)
    valid_rows = with_reference(valid_rows, valid_before)
    prompts, decoding = trl_align.held_out(params, paths, cfg)
    sft_chats = sample_chats(model, tokenizer, prompts, decoding)

    args = training.trl_config(TrainingArguments, cfg, compute, checkpoint_dir, params.seed,
                               remove_unused_columns=False, label_names=[])
    trainer = training.build_trainer(ConditionalDPOTrainer, model, args, compute, live,
                                     (trl_align.StopAfter(stop_after),), beta=cfg.beta,
                                     anchor_weight=cfg.anchor_weight, train_dataset=Dataset.from_list(train_rows),
                                     eval_dataset=Dataset.from_list(valid_rows), data_collator=collator(pad))
    ranks = watch_ranks(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    if trl_align.stopped_early(trainer):
        return {"stopped_after": trainer.state.global_step}

    accuracy = persona_accuracy(valid_before, reply_logprobs(model, valid_rows, pad, cfg.batch_size),
                                [row["dialogue"] for row in valid_rows], params.seed)
    rewards = trl_align.held_out_rewards(params, paths, compute, cfg, model, tokenizer, prompts, decoding, sft_chats)
    trl_align.save_policy(model, tokenizer, paths, checkpoint_dir, state.is_main_process)
    held = trl_align.last_eval(trainer)
    return {**trl_align.run_summary(trainer, resume, compute, ranks, state.num_processes, result, started),
            "train_pairs": len(train_rows), "beta": cfg.beta, "anchor_weight": cfg.anchor_weight,
            "eval_loss": held.get("eval_loss"), "eval_margin": held.get("eval_margin"), **accuracy, **rewards}
