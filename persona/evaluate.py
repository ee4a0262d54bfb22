"""Held-out evaluation of base / SFT / PPO policies: persona use, grounding, contradiction, quality.

Three families of persona metrics, because each alone misleads:
- *sampling-free* (the policy's own likelihoods of gold replies): persona likelihood gain and
  persona Hits@1/K; no decoding noise, but says nothing about what the bot actually says;
- *independent judge* on sampled replies: embedding persona identification (top-1, MRR), which
  rewards reciting the persona, hence reported beside the gold replies' own score, on
  persona-relevant turns separately, and with the parroting rate; and NLI C-score when an NLI
  model is configured;
- the original recipe's keyword score, labelled as such, for comparison only.
Every headline number carries a bootstrap 95% CI and the n it rests on.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from persona import metrics as M
from persona.chat_format import Prompt, build_dataset, messages_for, select_prompts
from persona.config import ConfigError, EvaluateConfig, Params
from persona.data import Dialogue, persona_key, read_dialogues
from persona.files import write_text_atomic
from persona.generation import Decoding, generate_replies
from persona.hardware import library_versions
from persona.judges import Embedder, load_nli
from persona.likelihood import candidate_logprobs, completion_nll, reply_logprobs
from persona.models import load_policies, policy
from persona.paths import DEFAULT, Paths
from persona.reward import RewardModel
from persona.seeds import derive_seed

log = logging.getLogger(__name__)
HEADLINE = ("persona_gain", "persona_hits1", "grounding_top1", "grounding_top1_relevant", "parroting_rate",
            "f1", "keyword_score_original", "reward_score")


def distractor_personas(facts: list[str], pool: dict[str, list[str]], k: int, rng: random.Random) -> list[list[str]]:
    """The true persona first, then k-1 personas of other conversations."""
    own = persona_key(facts)
    others = [facts for key, facts in pool.items() if key != own]
    if len(others) < k - 1:
        raise ConfigError(f"evaluate: {k} persona candidates asked for, only {len(others) + 1} personas in the split")
    return [facts] + rng.sample(others, k - 1)


def headline(key: str, values: list[float], seed: int, resamples: int) -> dict:
    """`key`, `key_ci_low`, `key_ci_high`, `key_n`; null (not NaN, which is no JSON) when n = 0."""
    if not values:
        return {key: None, f"{key}_n": 0}
    summary = M.summarize(values, seed, resamples)
    return {key: summary["mean"], f"{key}_ci_low": summary["ci_low"], f"{key}_ci_high": summary["ci_high"],
            f"{key}_n": summary["n"]}


def grounding(embedder: Embedder, replies: list[str], candidates: list[list[list[str]]]) -> dict[str, list[float]]:
    """Per reply: true-persona top-1, reciprocal rank, and max fact similarity with the true persona."""
    top1, reciprocal, similarity = [], [], []
    for reply, personas in zip(replies, candidates):
        scores = embedder.fact_similarity(reply, personas)
        rank = M.rank_of_true(scores, 0)
        top1.append(float(rank == 1))
        reciprocal.append(1.0 / rank)
        similarity.append(scores[0])
    return {"top1": top1, "rr": reciprocal, "fact_sim": similarity}


def nli_scores(nli, replies: list[str], facts: list[list[str]]) -> tuple[list[float], list[float]]:
    """C-score (Madotto et al. 2019: sum over facts of +1 entail / -1 contradict) and contradiction flags."""
    pairs = [(fact, reply) for reply, persona in zip(replies, facts) for fact in persona]
    labels = iter(nli.labels([p for p, _ in pairs], [h for _, h in pairs]))
    c_scores, contradicts = [], []
    for persona in facts:
        row = [next(labels) for _ in persona]
        c_scores.append(float(sum(row)))
        contradicts.append(float(-1 in row))
    return c_scores, contradicts


def evaluate_policy(model, tokenizer, prompts: list[Prompt], cfg: EvaluateConfig, context: dict) -> tuple[dict, list]:
    """Every metric of one policy; returns (flat metrics, per-prompt records)."""
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, batch_size=cfg.batch_size, seed=context["seed"])
    started = time.perf_counter()
    replies = generate_replies(model, tokenizer, [p.chat() for p in prompts], decoding)
    gen_seconds = time.perf_counter() - started
    timings = {"time_generate_s": gen_seconds}
    new_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    golds = [p.gold for p in prompts]
    ground = grounding(context["embedder"], replies, context["grounding_candidates"])
    relevant = context["relevant"]
    per = {
        "grounding_top1": ground["top1"], "grounding_mrr": ground["rr"], "max_fact_similarity": ground["fact_sim"],
        "grounding_top1_relevant": [v for v, r in zip(ground["top1"], relevant) if r],
        "parroting_rate": [float(M.parrots(r, p.facts, cfg.parrot_threshold)) for r, p in zip(replies, prompts)],
        "keyword_score_original": [M.keyword_score(r, p.facts) for r, p in zip(replies, prompts)],
        "f1": [M.unigram_f1(r, g) for r, g in zip(replies, golds)],
        "rouge_l": [M.rouge_l(r, g) for r, g in zip(replies, golds)],
        "repetition": [M.repetition_rate(r) for r in replies],
        "question_rate": [float(M.is_question(r)) for r in replies],
        "length_words": [float(len(r.split())) for r in replies],
    }
    if context["reward"] is not None:
        per["reward_score"] = context["reward"].score_chats([p.chat(reply=r) for p, r in zip(prompts, replies)])
    # Sampling-free persona use: the policy's likelihood of the gold reply under each persona.
    mark = time.perf_counter()
    gain_prompts = prompts[:cfg.likelihood_n]
    chats = [p.chat(facts, p.gold) for p, cands in zip(gain_prompts, context["persona_candidates"]) for facts in cands]
    logps = np.array(reply_logprobs(model, tokenizer, chats, cfg.batch_size)).reshape(len(gain_prompts), -1)
    per["persona_gain"] = [M.persona_likelihood_gain(row[0], row[1:]) for row in logps]
    per["persona_hits1"] = [float(M.rank_of_true(row, 0) == 1) for row in logps]
    timings["time_persona_likelihood_s"], mark = time.perf_counter() - mark, time.perf_counter()
    # ConvAI2 Hits@1/20: the gold reply against replies from other conversations.
    hit_scores = [candidate_logprobs(model, tokenizer, p.chat(), cands, cfg.batch_size)
                  for p, cands in zip(prompts, context["reply_candidates"])]
    per["reply_hits1"] = [float(M.rank_of_true(row, 0) == 1) for row in hit_scores]
    timings["time_reply_hits_s"], mark = time.perf_counter() - mark, time.perf_counter()
    nll, tokens = completion_nll(model, context["perplexity_set"], tokenizer.pad_token_id, cfg.batch_size)
    timings["time_perplexity_s"], mark = time.perf_counter() - mark, time.perf_counter()
    out = {"gold_perplexity": round(math.exp(nll), 3), "gold_perplexity_tokens": tokens,
           "bleu": round(M.bleu(replies, golds), 3), "distinct_1": round(M.distinct_n(replies, 1), 4),
           "distinct_2": round(M.distinct_n(replies, 2), 4),
           "generation_tokens_per_s": round(new_tokens / gen_seconds, 1)}
    for key, values in per.items():
        if key in HEADLINE:
            out.update(headline(key, values, context["seed"], cfg.bootstrap))
        else:
            out[key] = round(float(np.mean(values)), 4) if values else None
    nli = context["nli"]
    if nli is not None:
        c_scores, contradictions = nli_scores(nli, replies, [p.facts for p in prompts])
        out["nli_c_score"] = round(float(np.mean(c_scores)), 4)
        out["nli_contradiction_rate"] = round(float(np.mean(contradictions)), 4)
    else:
        out["nli_c_score"] = out["nli_contradiction_rate"] = None
    out.setdefault("reward_score", None)
    # Reward hacking check: a policy optimised against the reward model may buy reward with length.
    out["reward_length_correlation"] = M.pearson(per["reward_score"], per["length_words"]) \
        if "reward_score" in per else None
    out.update(multiturn(model, tokenizer, cfg, context))
    timings["time_multiturn_s"] = time.perf_counter() - mark
    out.update({key: round(value, 1) for key, value in timings.items()})
    records = [{"reply": r, "grounding_top1": g, "f1": round(f, 4), "parrots": bool(pr)}
               for r, g, f, pr in zip(replies, ground["top1"], per["f1"], per["parroting_rate"])]
    for record, score in zip(records, per.get("reward_score", [])):
        record["reward_score"] = round(score, 4)
    return out, records


def multiturn(model, tokenizer, cfg: EvaluateConfig, context: dict) -> dict:
    """Conversations of `multiturn_turns` bot turns, partner turns taken from test dialogues.

    The bot plays User 2 (SPC's User 1 opens); grounding is measured per turn, so a persona that
    fades over the conversation shows as a falling curve.
    """
    dialogues = context["multiturn_dialogues"]
    partner_turns = [[t for t in d.turns if t[0] == 0] for d in dialogues]
    histories = [turns[:1] for turns in partner_turns]
    partner_turns = [turns[1:] for turns in partner_turns]
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, batch_size=cfg.batch_size, seed=derive_seed(context["seed"], "multiturn"))
    out, replies_so_far = {}, [[] for _ in dialogues]
    contradictions = []
    for turn in range(cfg.multiturn_turns):
        chats = [messages_for(d.personas[1], h, 1) for d, h in zip(dialogues, histories)]
        replies = generate_replies(model, tokenizer, chats, decoding)
        candidates = context["multiturn_candidates"]
        ground = grounding(context["embedder"], replies, candidates)
        out[f"multiturn_grounding_top1_turn{turn + 1}"] = round(float(np.mean(ground["top1"])), 4)
        if context["nli"] is not None and turn > 0:
            pairs = [(earlier, reply) for reply, before in zip(replies, replies_so_far) for earlier in before]
            labels = iter(context["nli"].labels([p for p, _ in pairs], [h for _, h in pairs]))
            contradictions += [float(-1 in [next(labels) for _ in before]) for before in replies_so_far]
        for i, reply in enumerate(replies):
            replies_so_far[i].append(reply)
            histories[i].append((1, reply))
            if turn < len(partner_turns[i]):
                histories[i].append(partner_turns[i][turn])
    turns = [out[f"multiturn_grounding_top1_turn{t + 1}"] for t in range(cfg.multiturn_turns)]
    out["multiturn_grounding_top1"] = round(float(np.mean(turns)), 4)
    out["multiturn_self_contradiction_rate"] = round(float(np.mean(contradictions)), 4) if contradictions else None
    return out


def build_context(dialogues: list[Dialogue], tokenizer, cfg: EvaluateConfig, max_length: int, seed: int,
                  reward: RewardModel | None = None) -> dict:
    """Everything shared by all policies: prompts, candidates, judges; drawn once so policies compare."""
    rng = random.Random(seed)
    prompts = select_prompts(dialogues, cfg.n, cfg.max_history_turns, seed)
    pool = {persona_key(p): p for d in dialogues for p in d.personas}
    embedder = Embedder(cfg.embedding_model)
    nli, nli_reason = load_nli(cfg.nli_model)
    grounding_candidates = [distractor_personas(p.facts, pool, cfg.grounding_candidates, rng) for p in prompts]
    persona_candidates = [distractor_personas(p.facts, pool, cfg.persona_candidates, rng)
                          for p in prompts[:cfg.likelihood_n]]
    replies_by_dialogue = [(d.id, text) for d in dialogues for _, text in d.turns]
    reply_candidates = []
    for p in prompts[:cfg.hits_n]:
        others = [text for dialogue_id, text in replies_by_dialogue if dialogue_id != p.dialogue]
        reply_candidates.append([p.gold] + rng.sample(others, cfg.reply_candidates - 1))
    gold_ground = grounding(embedder, [p.gold for p in prompts], grounding_candidates)
    starters = [d for d in dialogues if sum(1 for s, _ in d.turns if s == 0) > 1]
    multiturn_dialogues = rng.sample(starters, min(cfg.multiturn_n, len(starters)))
    multiturn_candidates = [distractor_personas(d.personas[1], pool, cfg.grounding_candidates, rng)
                            for d in multiturn_dialogues]
    return {
        "seed": seed, "prompts": prompts, "embedder": embedder, "nli": nli, "nli_reason": nli_reason,
        "grounding_candidates": grounding_candidates, "persona_candidates": persona_candidates,
        "reply_candidates": reply_candidates, "gold_grounding": gold_ground,
        "relevant": [s >= cfg.relevance_threshold for s in gold_ground["fact_sim"]],
        "perplexity_set": build_dataset(dialogues, tokenizer, "conversation", max_length, cfg.perplexity_sequences),
        "multiturn_dialogues": multiturn_dialogues, "multiturn_candidates": multiturn_candidates, "reward": reward,
    }


def gold_block(context: dict, cfg: EvaluateConfig) -> dict:
    """The judge's scores of the gold replies themselves: the ceiling a human-like reply reaches."""
    prompts, ground = context["prompts"], context["gold_grounding"]
    out = {"persona_relevant_share": round(float(np.mean(context["relevant"])), 4)}
    for key, values in (("grounding_top1", ground["top1"]),
                        ("grounding_top1_relevant", [v for v, r in zip(ground["top1"], context["relevant"]) if r]),
                        ("parroting_rate", [float(M.parrots(p.gold, p.facts, cfg.parrot_threshold)) for p in prompts]),
                        ("keyword_score_original", [M.keyword_score(p.gold, p.facts) for p in prompts])):
        out.update(headline(key, values, context["seed"], cfg.bootstrap))
    out["grounding_mrr"] = round(float(np.mean(ground["rr"])), 4)
    out["max_fact_similarity"] = round(float(np.mean(ground["fact_sim"])), 4)
    out["question_rate"] = round(float(np.mean([M.is_question(p.gold) for p in prompts])), 4)
    out["length_words"] = round(float(np.mean([len(p.gold.split()) for p in prompts])), 4)
    if context["reward"] is not None:
        out.update(headline("reward_score", context["reward"].score_chats([p.chat(reply=p.gold) for p in prompts]),
                            context["seed"], cfg.bootstrap))
    return out


def evaluate(dialogues: list[Dialogue], cfg: EvaluateConfig, base_path: Path, adapters: dict[str, Path],
             max_length: int, seed: int, reward_path: Path | None = None) -> tuple[dict, list[dict]]:
    """Evaluate `cfg.policies`; returns (eval.json content, per-prompt sample records).

    With `reward_path`, replies also get the reward model's score: what PPO optimised, so a
    check that it transferred to held-out personas, not an independent judge.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    model, tokenizer = load_policies(base_path, {n: adapters[n] for n in cfg.policies if n != "base"})
    reward = RewardModel.load(base_path, reward_path, max_length=max_length, batch_size=cfg.batch_size) \
        if reward_path is not None else None
    context = build_context(dialogues, tokenizer, cfg, max_length, seed, reward)
    prompts = context["prompts"]
    result = {"n_prompts": len(prompts), "n_dialogues": len(dialogues), "gold": gold_block(context, cfg)}
    samples = [{"dialogue": p.dialogue, "persona": p.facts, "history": p.history, "gold": p.gold,
                "persona_relevant": r} for p, r in zip(prompts, context["relevant"])]
    for name in tqdm(cfg.policies, desc="policies"):
        with policy(model, name) as active:
            result[name], records = evaluate_policy(active, tokenizer, prompts, cfg, context)
        for sample, record in zip(samples, records):
            sample[name] = record
        log.info("%s: %s", name, {k: result[name][k] for k in HEADLINE})
    result["unavailable"] = {
        **({"reward_score": "no reward model given (evaluate ... --reward models/reward)"} if reward is None else {}),
        **({"nli": context["nli_reason"]} if context["nli"] is None else {})}
    result["config"] = asdict(cfg)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result, samples


def run(params: Params, paths: Paths = DEFAULT) -> dict:
    """The `evaluate` stage: every policy of `evaluate.policies` on the held-out split. Writes the samples,
    report, bar data and chart; returns the content of metrics/eval.json."""
    cfg = params.evaluate
    dialogues = read_dialogues(paths.prepared / f"{cfg.split}.jsonl")
    result, samples = evaluate(dialogues, cfg, paths.base, paths.adapters(params.align.algorithm),
                               params.model.max_length, params.seed, reward_path=paths.reward)
    result["versions"] = library_versions()  # as in the training stages' metrics (persona.hardware.run_metrics)
    write_outputs(result, samples, paths.eval_samples, paths.eval_report, paths.eval_bars, paths.eval_chart)
    return result


def write_outputs(result: dict, samples: list[dict], samples_path: Path, report_path: Path,
                  bars_path: Path | None = None, png_path: Path | None = None) -> None:
    """Everything beside the metrics JSON: per-prompt samples, the markdown report, bar data and chart."""
    write_text_atomic(samples_path, "".join(json.dumps(sample) + "\n" for sample in samples))
    policies = result["config"]["policies"]
    write_text_atomic(report_path, report_markdown(result, policies))
    if bars_path is not None:
        rows = ["policy," + ",".join(HEADLINE)]
        for name in [*policies, "gold"]:
            rows.append(name + "," + ",".join(str(result[name].get(k, "")) for k in HEADLINE))
        write_text_atomic(bars_path, "\n".join(rows) + "\n")
    if png_path is not None:
        bar_chart(result, policies, png_path)


def _cell(block: dict, key: str) -> str:
    value = block.get(key)
    if value is None:
        return "n/a"
    if f"{key}_ci_low" in block:
        return f"{value:.3f} [{block[key + '_ci_low']:.3f}, {block[key + '_ci_high']:.3f}] (n={block[key + '_n']})"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def report_markdown(result: dict, policies: list[str]) -> str:
    rows = [*HEADLINE, "grounding_mrr", "max_fact_similarity", "multiturn_grounding_top1", "reply_hits1",
            "gold_perplexity", "bleu", "rouge_l", "distinct_1", "distinct_2", "length_words", "repetition",
            "question_rate", "nli_c_score", "nli_contradiction_rate", "multiturn_self_contradiction_rate",
            "reward_length_correlation", "generation_tokens_per_s"]
    columns = [*policies, "gold"]
    lines = ["# Evaluation report", "",
             f"{result['n_prompts']} held-out prompts from {result['n_dialogues']} test dialogues; "
             "95% bootstrap CIs in brackets. `gold` scores the dataset's own replies with the same judge.", "",
             "| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key in rows:
        lines.append(f"| {key} | " + " | ".join(_cell(result[c], key) for c in columns) + " |")
    lines += ["", "Notes:", "- `keyword_score_original` is the original recipe's keyword-overlap score, kept for "
              "comparison; it rewards parroting and ignores contradiction.",
              "- `grounding_top1` (embedding persona identification) also rewards reciting the persona: read it "
              "with `parroting_rate` and the gold column.", "- `persona_gain` and `persona_hits1` use the policy's own "
              "likelihood of the gold reply under the true vs swapped personas (sampling-free)."]
    lines += [f"- `{key}` is n/a: {why}" for key, why in result["unavailable"].items()]
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, policies: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["persona_gain", "persona_hits1", "grounding_top1", "parroting_rate", "f1"]
    columns = [*policies, "gold"]
    figure, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3))
    for axis, key in zip(axes, keys):
        names = [c for c in columns if result[c].get(key) is not None]
        values = [result[c][key] for c in names]
        errors = [[v - result[c].get(f"{key}_ci_low", v) for c, v in zip(names, values)],
                  [result[c].get(f"{key}_ci_high", v) - v for c, v in zip(names, values)]]
        axis.bar(names, values, yerr=errors, capsize=3, color="#4c72b0")
        axis.set_title(key, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
