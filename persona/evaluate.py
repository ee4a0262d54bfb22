"""Held-out evaluation of base / SFT / PPO policies: persona use, grounding, contradiction, quality.

Three families of persona metrics, because each alone misleads:
- *sampling-free* (the policy's own likelihoods of gold replies): persona likelihood gain and
  persona Hits@1/K; no decoding noise, but says nothing about what the bot actually says;
- *independent judge* on sampled replies: embedding persona identification (top-1, MRR), which
  rewards reciting the persona, hence read beside the fact-copy rate, the gold replies' own score
  and on persona-relevant turns separately; `grounded_not_copied` (persona identified, no fact
  copied) is the headline; and NLI C-score when an NLI model is configured;
- the original recipe's keyword score, labelled as such, for comparison only.
Every headline number carries a 95% CI that resamples dialogues (prompts of one dialogue are not
independent) and the n it rests on; every policy is compared with sft and base on the same
prompts (`paired`), with the same clustered CIs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from persona import metrics as M
from persona.chat_format import Prompt, dialogue_examples, messages_for, select_prompts
from persona.config import ConfigError, EvaluateConfig, Params
from persona.data import Dialogue, persona_key, read_dialogues
from persona.files import write_text_atomic
from persona.generation import Decoding, generate_replies
from persona.hardware import library_versions
from persona.judges import Embedder, load_nli
from persona.models import load_policies, policy
from persona.paths import DEFAULT, Paths
from persona.reward import load_scorer
from persona.scoring import candidate_logprobs, candidate_set, chat_rows, mean_logprobs, row_scores
from persona.seeds import derive_seed

log = logging.getLogger(__name__)
HEADLINE = ("persona_gain", "persona_hits1", "grounded_not_copied", "fact_copy_rate", "grounding_top1",
            "grounding_top1_relevant", "repeated_sentence_rate", "f1", "keyword_score_original", "reward_score")
# compared on the same prompts: every policy against each of these (`paired.<policy>_vs_<other>.<metric>`)
PAIRED_AGAINST = ("sft", "base")
PAIRED = ("persona_gain", "persona_hits1", "grounded_not_copied", "fact_copy_rate", "grounding_top1",
          "grounding_top1_relevant", "repeated_sentence_rate", "reward_score", "gold_perplexity", "f1", "reply_hits1",
          "multiturn_grounding_top1")
# which prompts a per-item metric rests on (the rest: the `n` generation prompts); `clusters` keys
FAMILY = {"persona_gain": "likelihood", "persona_hits1": "likelihood", "reply_hits1": "hits",
          "grounding_top1_relevant": "relevant", "gold_perplexity": "perplexity",
          "multiturn_grounding_top1": "multiturn"}


def distractor_personas(facts: list[str], pool: dict[str, list[str]], k: int, rng: random.Random) -> list[list[str]]:
    """The true persona first, then k-1 personas of other conversations."""
    own = persona_key(facts)
    others = [facts for key, facts in pool.items() if key != own]
    if len(others) < k - 1:
        raise ConfigError(f"evaluate: {k} persona candidates asked for, only {len(others) + 1} personas in the split")
    return [facts] + rng.sample(others, k - 1)


def headline(key: str, values: list[float], seed: int, resamples: int, clusters: list[str]) -> dict:
    """`key`, `key_ci_low`, `key_ci_high` (dialogue-clustered bootstrap), `key_n`; null (not NaN, which is
    no JSON) when n = 0."""
    if not values:
        return {key: None, f"{key}_n": 0}
    summary = M.summarize(values, seed, resamples, clusters)
    return {key: summary["mean"], f"{key}_ci_low": summary["ci_low"], f"{key}_ci_high": summary["ci_high"],
            f"{key}_n": summary["n"]}


def grounding(embedder: Embedder, replies: list[str], candidates: list[list[list[str]]]) -> dict[str, list[float]]:
    """Per reply: true-persona top-1, reciprocal rank, and max fact similarity with the true persona."""
    top1, reciprocal, similarity = [], [], []
    embedder.encode(replies + [fact for personas in candidates for persona in personas for fact in persona])  # one pass
    for reply, personas in zip(replies, candidates):
        scores = embedder.fact_similarity(reply, personas)
        rank = M.rank_of_true(scores, 0)
        top1.append(float(rank == 1))
        reciprocal.append(1.0 / rank)
        similarity.append(scores[0])
    return {"top1": top1, "rr": reciprocal, "fact_sim": similarity}


def nli_scores(nli, replies: list[str], facts: list[list[str]]) -> tuple[float, list[float]]:
    """C-score and per-reply contradiction flags.

    C-score (after Madotto et al. 2019): each (fact, reply) pair scores +1 when the fact entails the
    reply, 0 when neutral, -1 when it contradicts it, averaged over all pairs, so it lies in [-1, 1]
    whatever the persona sizes. A reply is contradicting when it contradicts at least one fact.
    """
    pairs = [(fact, reply) for reply, persona in zip(replies, facts) for fact in persona]
    labels = nli.labels([p for p, _ in pairs], [h for _, h in pairs])
    flags, remaining = [], iter(labels)
    for persona in facts:
        flags.append(float(-1 in [next(remaining) for _ in persona]))
    return float(np.mean(labels)), flags


def copy_and_loop_flags(replies: list[str], facts: list[list[str]], grounded_top1: list[float]) -> dict[str, list]:
    """Per reply: facts copied (metrics.facts_copied), any copied, persona identified with none copied,
    and a sentence repeated."""
    copied = [M.facts_copied(reply, persona) for reply, persona in zip(replies, facts)]
    return {"facts_copied_mean": [float(c) for c in copied],
            "fact_copy_rate": [float(c > 0) for c in copied],
            "grounded_not_copied": [float(top1 == 1 and c == 0) for top1, c in zip(grounded_top1, copied)],
            "repeated_sentence_rate": [float(M.repeats_a_sentence(reply)) for reply in replies]}


def evaluate_policy(model, tokenizer, prompts: list[Prompt], cfg: EvaluateConfig, context: dict
                    ) -> tuple[dict, list, dict[str, list[float]]]:
    """Every metric of one policy; returns (metrics, per-prompt records, per-item values for paired tests)."""
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
        **copy_and_loop_flags(replies, [p.facts for p in prompts], ground["top1"]),
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
    pad, batch = tokenizer.pad_token_id, cfg.batch_size
    # ConvAI2 Hits@1/20: the gold reply against replies from other conversations (gold first).
    mark = time.perf_counter()
    hit_scores = [candidate_logprobs(model, candidates, pad, batch) for candidates in context["reply_candidates"]]
    per["reply_hits1"] = [float(M.rank_of_true(row, 0) == 1) for row in hit_scores]
    timings["time_reply_hits_s"], mark = time.perf_counter() - mark, time.perf_counter()
    # Sampling-free persona use: the policy's likelihood of the gold reply under each persona. The
    # gold under the true persona is reply Hits@1's first candidate: scored there, reused here.
    swapped = iter(mean_logprobs(model, context["persona_rows"], pad, batch))
    k = cfg.persona_candidates
    logps = [[hit_scores[i][0] if i < len(hit_scores) else next(swapped)] + [next(swapped) for _ in range(k - 1)]
             for i in range(len(context["persona_candidates"]))]
    per["persona_gain"] = [M.persona_likelihood_gain(row[0], row[1:]) for row in logps]
    per["persona_hits1"] = [float(M.rank_of_true(row, 0) == 1) for row in logps]
    timings["time_persona_likelihood_s"], mark = time.perf_counter() - mark, time.perf_counter()
    nll = row_scores(model, context["perplexity_rows"], pad, batch)
    tokens = sum(count for _, count in nll)
    per["gold_perplexity"] = [total / max(count, 1) for total, count in nll]  # per-conversation NLL, for paired
    timings["time_perplexity_s"], mark = time.perf_counter() - mark, time.perf_counter()
    out = {"gold_perplexity": round(math.exp(sum(total for total, _ in nll) / max(tokens, 1)), 3),
           "gold_perplexity_tokens": tokens,
           "bleu": round(M.bleu(replies, golds), 3), "distinct_1": round(M.distinct_n(replies, 1), 4),
           "distinct_2": round(M.distinct_n(replies, 2), 4),
           "generation_tokens_per_s": round(new_tokens / gen_seconds, 1)}
    for key, values in per.items():
        if key == "gold_perplexity":
            continue
        if key in HEADLINE:
            out.update(headline(key, values, context["seed"], cfg.bootstrap, context["clusters"][family(key)]))
        else:
            out[key] = round(float(np.mean(values)), 4) if values else None
    nli = context["nli"]
    if nli is not None:
        out["nli_c_score"], contradictions = nli_scores(nli, replies, [p.facts for p in prompts])
        out["nli_c_score"] = round(out["nli_c_score"], 4)
        out["nli_contradiction_rate"] = round(float(np.mean(contradictions)), 4)
    else:
        out["nli_c_score"] = out["nli_contradiction_rate"] = None
    out.setdefault("reward_score", None)
    # Reward hacking check: a policy optimised against the reward model may buy reward with length.
    out["reward_length_correlation"] = M.pearson(per["reward_score"], per["length_words"]) \
        if "reward_score" in per else None
    conversation_metrics, per["multiturn_grounding_top1"] = multiturn(model, tokenizer, cfg, context)
    out.update(conversation_metrics)
    timings["time_multiturn_s"] = time.perf_counter() - mark
    out.update({key: round(value, 1) for key, value in timings.items()})
    records = [{"reply": r, "grounding_top1": g, "f1": round(f, 4), "facts_copied": int(c), "parrots": bool(pr),
                "repeats_sentence": bool(rep)}
               for r, g, f, c, pr, rep in zip(replies, ground["top1"], per["f1"], per["facts_copied_mean"],
                                              per["parroting_rate"], per["repeated_sentence_rate"])]
    for record, score in zip(records, per.get("reward_score", [])):
        record["reward_score"] = round(score, 4)
    return out, records, per


def family(key: str) -> str:
    """The prompt set a per-item metric rests on: its `context["clusters"]` key."""
    return FAMILY.get(key, "prompts")


def paired_block(per: dict[str, dict[str, list[float]]], context: dict, cfg: EvaluateConfig) -> dict:
    """`<policy>_vs_<other>.<metric>`: diff, ci_low, ci_high, mdd, n for every evaluated policy against
    sft and base, on the same prompts, the CI resampling dialogues (metrics.paired_difference).

    `gold_perplexity` is paired per conversation sequence: the mean over sequences of the difference in
    per-token NLL (nats; about the log of the perplexity ratio, negative = the policy predicts the gold
    replies better), clustered by dialogue like the rest.
    """
    out = {}
    for name in per:
        for other in PAIRED_AGAINST:
            if other == name or other not in per:
                continue
            out[f"{name}_vs_{other}"] = {
                key: M.paired_difference(per[name][key], per[other][key], context["clusters"][family(key)],
                                         context["seed"], cfg.bootstrap)
                for key in PAIRED if key in per[name] and key in per[other]}
    return out


def multiturn(model, tokenizer, cfg: EvaluateConfig, context: dict) -> tuple[dict, list[float]]:
    """Conversations of `multiturn_turns` bot turns, partner turns taken from test dialogues.

    The bot plays User 2 (SPC's User 1 opens); grounding is measured per turn, so a persona that
    fades over the conversation shows as a falling curve. Returns the metrics and each conversation's
    grounding over its turns: the conversation is the unit a paired CI of the 5-turn metric resamples.
    """
    dialogues = context["multiturn_dialogues"]
    partner_turns = [[t for t in d.turns if t[0] == 0] for d in dialogues]
    histories = [turns[:1] for turns in partner_turns]
    partner_turns = [turns[1:] for turns in partner_turns]
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, batch_size=cfg.batch_size, seed=derive_seed(context["seed"], "multiturn"))
    out, replies_so_far = {}, [[] for _ in dialogues]
    contradictions, grounded = [], np.zeros(len(dialogues))
    for turn in range(cfg.multiturn_turns):
        chats = [messages_for(d.personas[1], h, 1) for d, h in zip(dialogues, histories)]
        replies = generate_replies(model, tokenizer, chats, decoding)
        candidates = context["multiturn_candidates"]
        ground = grounding(context["embedder"], replies, candidates)
        out[f"multiturn_grounding_top1_turn{turn + 1}"] = round(float(np.mean(ground["top1"])), 4)
        grounded += np.asarray(ground["top1"], dtype=float)
        if context["nli"] is not None and turn > 0:
            pairs = [(earlier, reply) for reply, before in zip(replies, replies_so_far) for earlier in before]
            labels = iter(context["nli"].labels([p for p, _ in pairs], [h for _, h in pairs]))
            contradictions += [float(-1 in [next(labels) for _ in before]) for before in replies_so_far]
        for i, reply in enumerate(replies):
            replies_so_far[i].append(reply)
            histories[i].append((1, reply))
            if turn < len(partner_turns[i]):
                histories[i].append(partner_turns[i][turn])
    per_conversation = grounded / cfg.multiturn_turns
    out["multiturn_grounding_top1"] = round(float(per_conversation.mean()), 4)
    out["multiturn_self_contradiction_rate"] = round(float(np.mean(contradictions)), 4) if contradictions else None
    return out, per_conversation.tolist()


def perplexity_rows(dialogues: list[Dialogue], tokenizer, max_length: int, limit: int) -> tuple[list[dict], list[str]]:
    """Up to `limit` whole-conversation sequences (one per dialogue and speaker, as SFT trains) and the
    dialogue each comes from."""
    rows, owners = [], []
    for dialogue in dialogues:
        for example in dialogue_examples(dialogue, tokenizer, "conversation", max_length):
            rows.append({"input_ids": example.input_ids, "completion_mask": example.completion_mask})
            owners.append(dialogue.id)
            if len(rows) == limit:
                return rows, owners
    return rows, owners


def likelihood_prompts(dialogues: list[Dialogue], prompts: list[Prompt], cfg: EvaluateConfig, seed: int
                       ) -> list[Prompt]:
    """The prompts of the sampling-free persona metrics: the first `likelihood_n` generation prompts, and where
    `likelihood_n` exceeds them, further seeded items of the split. Scoring a gold reply under K personas costs a
    fraction of generating and judging a reply, and persona Hits@1 is one bit per prompt, so its paired CI needs
    more prompts than the generation metrics do. The generation prompts stay the same whatever `likelihood_n`."""
    if cfg.likelihood_n <= len(prompts):
        return prompts[:cfg.likelihood_n]
    def item(p: Prompt) -> tuple:
        return p.dialogue, p.speaker, tuple(p.history), p.gold

    taken = {item(p) for p in prompts}
    every = select_prompts(dialogues, sum(len(d.turns) for d in dialogues), cfg.max_history_turns,
                           derive_seed(seed, "likelihood_prompts"))
    more = [p for p in every if item(p) not in taken]
    return prompts + more[:cfg.likelihood_n - len(prompts)]


def build_context(dialogues: list[Dialogue], tokenizer, cfg: EvaluateConfig, max_length: int, seed: int,
                  reward=None) -> dict:
    """Everything shared by all policies: prompts, candidates, judges, and every sequence scored, tokenised
    once; drawn once so policies compare on the same items."""
    rng = random.Random(seed)
    prompts = select_prompts(dialogues, cfg.n, cfg.max_history_turns, seed)
    scored = likelihood_prompts(dialogues, prompts, cfg, seed)
    pool = {persona_key(p): p for d in dialogues for p in d.personas}
    embedder = Embedder(cfg.embedding_model)
    nli, nli_reason = load_nli(cfg.nli_model)
    grounding_candidates = [distractor_personas(p.facts, pool, cfg.grounding_candidates, rng) for p in prompts]
    persona_candidates = [distractor_personas(p.facts, pool, cfg.persona_candidates, rng)
                          for p in scored[:len(prompts)]]
    # prompts beyond the n draw from a stream of their own: every other draw is the same as with likelihood_n = n
    scored_rng = random.Random(derive_seed(seed, "likelihood_candidates"))
    persona_candidates += [distractor_personas(p.facts, pool, cfg.persona_candidates, scored_rng)
                           for p in scored[len(prompts):]]
    replies_by_dialogue = [(d.id, text) for d in dialogues for _, text in d.turns]
    reply_candidates = []
    for p in prompts[:cfg.hits_n]:
        others = [text for dialogue_id, text in replies_by_dialogue if dialogue_id != p.dialogue]
        texts = [p.gold] + rng.sample(others, cfg.reply_candidates - 1)
        reply_candidates.append(candidate_set(tokenizer, p.chat(), texts))
    # the true persona's row of the first hits_n prompts is reply Hits@1's gold candidate: not scored twice
    persona_rows = chat_rows(tokenizer, [p.chat(facts, p.gold) for i, (p, candidates)
                                         in enumerate(zip(scored, persona_candidates))
                                         for facts in candidates[1 if i < len(reply_candidates) else 0:]])
    gold_ground = grounding(embedder, [p.gold for p in prompts], grounding_candidates)
    starters = [d for d in dialogues if sum(1 for s, _ in d.turns if s == 0) > 1]
    multiturn_dialogues = rng.sample(starters, min(cfg.multiturn_n, len(starters)))
    multiturn_candidates = [distractor_personas(d.personas[1], pool, cfg.grounding_candidates, rng)
                            for d in multiturn_dialogues]
    relevant = [s >= cfg.relevance_threshold for s in gold_ground["fact_sim"]]
    ppl_rows, ppl_dialogues = perplexity_rows(dialogues, tokenizer, max_length, cfg.perplexity_sequences)
    owners = [p.dialogue for p in prompts]
    return {
        "seed": seed, "prompts": prompts, "likelihood_prompts": scored, "embedder": embedder, "nli": nli,
        "nli_reason": nli_reason,
        "grounding_candidates": grounding_candidates, "persona_candidates": persona_candidates,
        "persona_rows": persona_rows, "reply_candidates": reply_candidates, "gold_grounding": gold_ground,
        "relevant": relevant, "perplexity_rows": ppl_rows,
        # the dialogue of each item, per prompt set: the clusters every CI resamples
        "clusters": {"prompts": owners, "relevant": [o for o, r in zip(owners, relevant) if r],
                     "likelihood": [p.dialogue for p in scored], "hits": owners[:cfg.hits_n],
                     "perplexity": ppl_dialogues, "multiturn": [d.id for d in multiturn_dialogues]},
        "multiturn_dialogues": multiturn_dialogues, "multiturn_candidates": multiturn_candidates, "reward": reward,
    }


def gold_block(context: dict, cfg: EvaluateConfig) -> dict:
    """The judge's scores of the gold replies themselves: the ceiling a human-like reply reaches."""
    prompts, ground, clusters = context["prompts"], context["gold_grounding"], context["clusters"]
    golds = [p.gold for p in prompts]
    per = {"grounding_top1": ground["top1"],
           "grounding_top1_relevant": [v for v, r in zip(ground["top1"], context["relevant"]) if r],
           **copy_and_loop_flags(golds, [p.facts for p in prompts], ground["top1"]),
           "parroting_rate": [float(M.parrots(p.gold, p.facts, cfg.parrot_threshold)) for p in prompts],
           "keyword_score_original": [M.keyword_score(p.gold, p.facts) for p in prompts]}
    if context["reward"] is not None:
        per["reward_score"] = context["reward"].score_chats([p.chat(reply=p.gold) for p in prompts])
    out = {"persona_relevant_share": round(float(np.mean(context["relevant"])), 4)}
    for key, values in per.items():
        if key in HEADLINE:
            out.update(headline(key, values, context["seed"], cfg.bootstrap, clusters[family(key)]))
        else:
            out[key] = round(float(np.mean(values)), 4)
    out["grounding_mrr"] = round(float(np.mean(ground["rr"])), 4)
    out["max_fact_similarity"] = round(float(np.mean(ground["fact_sim"])), 4)
    out["question_rate"] = round(float(np.mean([M.is_question(g) for g in golds])), 4)
    out["length_words"] = round(float(np.mean([len(g.split()) for g in golds])), 4)
    return out


def evaluate(dialogues: list[Dialogue], cfg: EvaluateConfig, base_path: Path, adapters: dict[str, Path],
             max_length: int, seed: int, reward_path: Path | None = None, reference: dict | None = None
             ) -> tuple[dict, list[dict], dict[str, dict[str, list[float]]]]:
    """Evaluate `cfg.policies`; returns (eval.json content, per-prompt sample records, per-item values by policy).

    With `reward_path`, replies also get the reward stage's score: what alignment optimised, so a check that it
    transferred to held-out personas, not an independent judge. `reference`: what `evaluate_reference` saved for
    other policies on the same prompts (its metrics, and its `per` values and reply `records`): they join this
    run's policies in the report and the paired comparisons, and its gold block is reused.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    model, tokenizer = load_policies(base_path, {n: adapters[n] for n in cfg.policies if n != "base"})
    reward = load_scorer(base_path, reward_path, adapters["sft"], max_length=max_length, batch_size=cfg.batch_size) \
        if reward_path is not None else None
    context = build_context(dialogues, tokenizer, cfg, max_length, seed, reward)
    prompts, clusters = context["prompts"], context["clusters"]
    scored_only = context["likelihood_prompts"][len(prompts):]  # none unless likelihood_n > n: digests stay
    digest = hashlib.sha256(json.dumps([[p.dialogue, p.gold] for p in prompts + scored_only]).encode()
                            ).hexdigest()[:16]
    if reference is not None and reference["result"]["prompts_digest"] != digest:
        raise ConfigError("evaluate: metrics/eval_reference.json was made on other prompts (other data, seed or "
                          "evaluate params); rerun its stage: dvc repro evaluate_reference")
    result = {"n_prompts": len(prompts), "n_dialogues": len(dialogues), "prompts_digest": digest,
              # the clusters the CIs resample: dialogues the prompts of each family come from
              "n_prompt_dialogues": len(set(clusters["prompts"])),
              "n_likelihood_prompts": len(clusters["likelihood"]),
              "n_likelihood_dialogues": len(set(clusters["likelihood"])),
              "n_hits_dialogues": len(set(clusters["hits"])),
              "time_setup_s": round(time.perf_counter() - started, 1),
              "gold": reference["result"]["gold"] if reference is not None else gold_block(context, cfg)}
    samples = [{"dialogue": p.dialogue, "persona": p.facts, "history": p.history, "gold": p.gold,
                "persona_relevant": r} for p, r in zip(prompts, context["relevant"])]
    per = {}
    earlier = reference["result"]["config"]["policies"] if reference is not None else []
    for name in earlier:
        result[name], per[name] = reference["result"][name], reference["per"][name]
        for sample, record in zip(samples, reference["records"][name]):
            sample[name] = record
    for name in tqdm(cfg.policies, desc="policies"):
        mark = time.perf_counter()
        with policy(model, name) as active:
            result[name], records, per[name] = evaluate_policy(active, tokenizer, prompts, cfg, context)
        result[name]["time_policy_s"] = round(time.perf_counter() - mark, 1)
        for sample, record in zip(samples, records):
            sample[name] = record
        log.info("%s: %s", name, {k: result[name][k] for k in HEADLINE})
    result["paired"] = paired_block(per, context, cfg)
    result["unavailable"] = {
        **({"reward_score": "no reward model given (evaluate ... --reward models/reward)"} if reward is None else {}),
        **({"nli": context["nli_reason"]} if context["nli"] is None else {})}
    result["config"] = {**asdict(cfg), "policies": [*earlier, *cfg.policies]}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result, samples, per


REFERENCE_POLICIES = ("base", "sft")  # what no align experiment changes: the evaluate_reference stage's


def run_reference(params: Params, paths: Paths = DEFAULT) -> dict:
    """The `evaluate_reference` stage: base and SFT, as far as `evaluate.policies` names them. No align experiment
    changes them, so `dvc exp run -S align.algorithm=dpo` reruns only `evaluate`, which adds the aligned policy.
    Writes their per-item values and replies; returns the content of metrics/eval_reference.json."""
    # not params.evaluated_policies(): reading align.algorithm would make an align experiment rerun this stage
    cfg = replace(params.evaluate, policies=[p for p in params.evaluate.policies if p in REFERENCE_POLICIES])
    dialogues = read_dialogues(paths.prepared / f"{cfg.split}.jsonl")
    result, samples, per = evaluate(dialogues, cfg, paths.base, {"sft": paths.sft}, params.model.max_length,
                                    params.seed, reward_path=paths.reward)
    write_text_atomic(paths.eval_reference_items, json.dumps(reference_items(samples, per, cfg.policies)) + "\n")
    result["paired"] = {}  # evaluate pairs every policy, these included
    return result


def reference_items(samples: list[dict], per: dict, policies: list[str]) -> dict:
    """What `evaluate` needs of evaluate_reference's policies beside their metrics: per-item values, replies."""
    return {"per": per, "records": {name: [sample[name] for sample in samples] for name in policies}}


def run(params: Params, paths: Paths = DEFAULT) -> dict:
    """The `evaluate` stage: the aligned policy of `evaluate.policies` beside evaluate_reference's base and SFT on
    the held-out split. Writes the samples, report, bar data and chart; returns the content of metrics/eval.json."""
    cfg = replace(params.evaluate, policies=[p for p in params.evaluated_policies() if p not in REFERENCE_POLICIES])
    reference = {"result": json.loads(paths.metrics_file("evaluate_reference").read_text()),
                 **json.loads(paths.eval_reference_items.read_text())}
    dialogues = read_dialogues(paths.prepared / f"{cfg.split}.jsonl")
    result, samples, _ = evaluate(dialogues, cfg, paths.base, paths.adapters(params.align.algorithm),
                                  params.model.max_length, params.seed, reward_path=paths.reward, reference=reference)
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
    rows = [*HEADLINE, "facts_copied_mean", "parroting_rate", "grounding_mrr", "max_fact_similarity",
            "multiturn_grounding_top1", "reply_hits1", "gold_perplexity", "bleu", "rouge_l", "distinct_1", "distinct_2",
            "length_words", "repetition", "question_rate", "nli_c_score", "nli_contradiction_rate",
            "multiturn_self_contradiction_rate", "reward_length_correlation", "generation_tokens_per_s"]
    columns = [*policies, "gold"]
    config = result["config"]
    lines = ["# Evaluation report", "",
             f"Generation metrics: {result['n_prompts']} held-out prompts from {result['n_prompt_dialogues']} "
             f"dialogues (of {result['n_dialogues']} in the split); persona likelihood: "
             f"{result['n_likelihood_prompts']} prompts from {result['n_likelihood_dialogues']} "
             f"dialogues; reply Hits@1: {min(config['hits_n'], result['n_prompts'])} prompts from "
             f"{result['n_hits_dialogues']} dialogues. 95% CIs in brackets resample dialogues, not prompts. "
             "`gold` scores the dataset's own replies with the same judges.", "",
             "| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key in rows:
        lines.append(f"| {key} | " + " | ".join(_cell(result[c], key) for c in columns) + " |")
    lines += paired_markdown(result["paired"])
    lines += ["", "Notes:",
              "- `grounded_not_copied`: the embedding judge ranks the true persona first and the reply copies no "
              "fact; `fact_copy_rate`: replies holding >= 80% of a fact's content words in order (recitation).",
              "- `keyword_score_original` is the original recipe's keyword-overlap score, kept for "
              "comparison; it rewards parroting and ignores contradiction.",
              "- `grounding_top1` (embedding persona identification) also rewards reciting the persona: read it "
              "with `fact_copy_rate` and the gold column.", "- `persona_gain` and `persona_hits1` use the policy's own "
              "likelihood of the gold reply under the true vs swapped personas (sampling-free).",
              "- Charts that read offline (next to this report in metrics/): [evaluation bars](eval.png); training "
              "curves [SFT](curves_sft.png), [reward model](curves_reward.png), [aligned policy](curves_align.png)."]
    lines += [f"- `{key}` is n/a: {why}" for key, why in result["unavailable"].items()]
    return "\n".join(lines) + "\n"


def paired_markdown(paired: dict) -> list[str]:
    """The paired differences as a table, `*` where the 95% CI excludes 0, and the persona_hits1 power line."""
    if not paired:
        return ["", "No paired comparison: it needs sft or base beside another policy."]
    comparisons = list(paired)
    lines = ["", "## Paired differences (same prompts)", "",
             "Policy minus the other, mean of per-item differences, 95% CI resampling dialogues; `*` = the CI "
             "excludes 0. `gold_perplexity`: per-conversation difference in per-token NLL (nats; negative = "
             "better).", "",
             "| metric | " + " | ".join(c.replace("_vs_", " vs ") for c in comparisons) + " |",
             "|---|" + "---|" * len(comparisons)]
    for key in PAIRED:
        cells = []
        for comparison in comparisons:
            figures = paired[comparison].get(key)
            if figures is None or "ci_low" not in figures:
                cells.append("n/a")
                continue
            significant = figures["ci_low"] > 0 or figures["ci_high"] < 0
            cells.append(f"{figures['diff']:+.3f} [{figures['ci_low']:+.3f}, {figures['ci_high']:+.3f}]"
                         f"{' *' if significant else ''}")
        if any(cell != "n/a" for cell in cells):
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    detectable = [f"{c.replace('_vs_', ' vs ')} {paired[c]['persona_hits1']['mdd']:.3f} "
                  f"(n={paired[c]['persona_hits1']['n']})"
                  for c in comparisons if "mdd" in paired[c].get("persona_hits1", {})]
    if detectable:
        lines += ["", "Smallest persona_hits1 difference this run detects (paired, two-sided alpha 0.05, power 0.8; "
                  "2.80 x the clustered bootstrap standard error): " + "; ".join(detectable) + "."]
    return lines


def bar_chart(result: dict, policies: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["persona_gain", "persona_hits1", "grounded_not_copied", "fact_copy_rate", "f1"]
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
