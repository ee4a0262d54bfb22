"""Preference pairs for the reward model: the chosen reply fits the speaker's persona, the rejected one does not.

Each strategy misses the persona in another way, so the reward model cannot learn one shortcut:
- `swap` (main): rejected = an SFT sample for the same history written under *another* persona.
  Both sides are fluent; they differ in whose persona they fit.
- `mismatch`: the same reply on both sides, under the true persona (chosen) or another one
  (rejected, `rejected_facts`). Nothing but the persona differs, so it is the strategy that
  forces the model to read the persona; no generation needed.
- `contradiction`: a minimal pair. Both sides are the chosen reply plus one rule-based negation: rejected
  negates one of the persona's facts, chosen a fact of another persona on another topic. A restated fact
  (a recitation bonus) or the word "not" cannot separate them; only whose fact is denied does.
- `generic`: rejected = a bland reply or a turn from another conversation.
The chosen side is the gold SPC turn or an SFT sample under the true persona (`pairs.chosen`).

Length cannot be a shortcut either: swap keeps the candidate closest in length to the chosen
reply, mismatch and contradiction match by construction, generic picks the closest-length reply; the
metrics report each side's mean length and how often the longer side is the chosen one.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

from persona.chat_format import Prompt, select_prompts
from persona.config import ConfigError, PairsConfig, Params
from persona.data import Dialogue, MalformedRowError, persona_key, read_dialogues
from persona.files import write_text_atomic
from persona.generation import Decoding, Reply, generate
from persona.metrics import content_words
from persona.models import load_policies
from persona.paths import DEFAULT, Paths
from persona.seeds import derive_seed

log = logging.getLogger(__name__)
STRATEGIES = ("swap", "mismatch", "contradiction", "generic")

BLAND_REPLIES = (
    "that is cool.", "oh nice, i see.", "haha, that sounds fun.", "i do not know what to say about that.",
    "ok, sounds good to me.", "wow, that is interesting. tell me more.", "i am not sure what you mean.",
    "that is nice. what else do you like to do?", "yeah, i guess so.", "hmm, i have never thought about it.",
    "sounds great! how was your day?", "lol ok. what do you do for fun?", "that is awesome, good for you.",
    "i see. well, life is like that sometimes.", "really? i did not know that.", "me too, i think.",
)

# Adverbs a verb may follow ("I just moved", "I currently work"): dropped from the denial, which would otherwise put
# "don't" before them. Past tenses without -ed: "I don't grew up" is no sentence, "I never grew up" is.
_ADVERB = r"(?:also |really |just |recently |currently |now |often |only |usually |still )?"
_IRREGULAR_PAST = ("became", "began", "bought", "broke", "brought", "built", "came", "caught", "chose", "drove", "ate",
                   "fell", "felt", "flew", "forgot", "found", "gave", "got", "grew", "had", "heard", "held", "kept",
                   "knew", "left", "lost", "made", "met", "paid", "ran", "rode", "sang", "saw", "sold", "sent",
                   "slept", "spent", "spoke", "stole", "swam", "taught", "thought", "told", "took", "went", "won",
                   "wore", "wrote")
# (pattern on the fact without its final period, replacement); first match wins. Contractions
# keep most negations as long as the fact, so length does not give the rejected side away.
_NEGATIONS = [
    (r"^(i|I) (do not|don't) (.+)$", r"\1 \3"),
    (r"^(i|I) (did not|didn't) (.+)$", r"\1 did \3"),
    (r"^(i|I) (am|was|have|can|will) (not|never) (.+)$", r"\1 \2 \4"),
    (r"^(i|I) never (.+)$", r"\1 \2"),
    (r"^(i|I) am (?!not\b)(.+)$", r"\1'm not \2"),
    (r"^(i|I)'m (?!not\b)(.+)$", r"\1'm not \2"),
    (r"^(i|I) have (been|had|lived|gone|seen|done|always|visited|traveled|met|won|worked)\b(.*)$",
     r"\1 haven't \2\3"),
    (r"^(i|I) have (?!not\b|never\b)(.+)$", r"\1 don't have \2"),
    (r"^(i|I) " + _ADVERB + r"(was|were) (?!not\b|never\b)(.+)$", r"\1 \2n't \3"),
    (r"^(i|I) do ((?:like|love|enjoy|want|need|have) .+)$", r"\1 don't \2"),  # emphatic "do"; "I do yoga" is not
    (r"^(i|I) can (?!not\b)(.+)$", r"\1 can't \2"),
    (r"^(i|I) will (?!not\b)(.+)$", r"\1 won't \2"),
    (r"^(i|I) " + _ADVERB + r"(like|love|enjoy|adore)s? (.+)$", r"\1 hate \3"),
    (r"^(i|I) " + _ADVERB + r"hate (.+)$", r"\1 love \2"),
    (r"^(my|My) (.+?) (is|are|was|were) (?!not\b)(.+)$", r"\1 \2 \3n't \4"),
    (r"^(i|I) " + _ADVERB + r"(\w+ed|" + "|".join(_IRREGULAR_PAST) + r") (.+)$", r"\1 never \2 \3"),
    (r"^(i|I) " + _ADVERB + r"(\w+) (.+)$", r"\1 don't \2 \3"),
]


def negate(fact: str) -> str | None:
    """The opposite of a first-person persona fact ("I have two dogs." -> "I don't have two dogs."), or None."""
    body = fact.strip().rstrip(".!")
    for pattern, replacement in _NEGATIONS:
        if re.match(pattern, body):
            return re.sub(pattern, replacement, body) + "."
    return None


def unrelated_fact(facts: list[str], candidates: list[str], like: str, rng: random.Random) -> str:
    """Of `candidates` (negatable facts of other personas), one sharing no content word with `facts`, whose
    negation is closest in length to `like`: denying it contradicts nothing the persona says ("I have two
    dogs" rules out "I have a dog", whose negation would)."""
    own = {word for fact in facts for word in content_words(fact)}
    unrelated = [fact for fact in candidates if not own & set(content_words(fact))]
    if not unrelated:
        raise ConfigError("pairs.shares.contradiction: no other persona's fact is unrelated to this persona")
    return min(rng.sample(unrelated, min(32, len(unrelated))), key=lambda fact: abs(words(negate(fact)) - words(like)))


def words(text: str) -> int:
    return len(text.split())


def closest_in_length(target: str, candidates: list[str]) -> str:
    """The candidate whose word count is nearest the target's (first of ties)."""
    return min(candidates, key=lambda c: abs(words(c) - words(target)))


def strategy_counts(n: int, shares: dict[str, float]) -> dict[str, int]:
    """Split n by shares with largest remainders, so counts sum to n exactly."""
    raw = {name: n * share for name, share in shares.items()}
    counts = {name: int(value) for name, value in raw.items()}
    for name in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def assign_strategies(prompts: list[Prompt], shares: dict[str, float], rng: random.Random) -> list[str]:
    """A strategy per prompt; contradiction only where a persona fact can be negated."""
    counts = strategy_counts(len(prompts), shares)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    strategies = [""] * len(prompts)
    negatable = [i for i in order if any(negate(f) for f in prompts[i].facts)]
    for i in negatable[: counts["contradiction"]]:
        strategies[i] = "contradiction"
    rest = [i for i in order if not strategies[i]]
    for i in rest[: counts["generic"]]:
        strategies[i] = "generic"
    for i in rest[counts["generic"]: counts["generic"] + counts["mismatch"]]:
        strategies[i] = "mismatch"
    return [s or "swap" for s in strategies]


def other_persona(prompt: Prompt, pool: list[list[str]], rng: random.Random) -> list[str]:
    own = persona_key(prompt.facts)
    others = [facts for facts in pool if persona_key(facts) != own]
    if not others:
        raise ConfigError("pairs.shares.swap: the split has a single persona; a swap needs another one")
    return rng.choice(others)


def build_pairs(dialogues: list[Dialogue], model, tokenizer, cfg: PairsConfig, n: int, split: str,
                seed: int) -> tuple[list[dict], dict]:
    """n pairs (one per sampled prompt) from `dialogues` with the active policy; returns (pairs, timing)."""
    rng = random.Random(seed)
    prompts = select_prompts(dialogues, n, cfg.max_history_turns, seed)
    if len(prompts) < n:
        log.warning("pairs: %s split has only %d prompts, %d asked for", split, len(prompts), n)
    strategies = assign_strategies(prompts, asdict(cfg.shares), rng)
    pool = list({persona_key(p): p for d in dialogues for p in d.personas}.values())
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, batch_size=cfg.batch_size, seed=seed)
    timer = {"generation_s": 0.0, "generated_tokens": 0}

    def sample(chats: list[list[dict]], salt: int) -> list[Reply]:
        started = time.perf_counter()
        replies = generate(model, tokenizer, chats, replace(decoding, seed=derive_seed(seed, "sample", salt)))
        timer["generation_s"] += time.perf_counter() - started
        timer["generated_tokens"] += sum(len(r.token_ids) for r in replies)
        return replies

    if cfg.chosen == "gold":
        chosen = [p.gold for p in prompts]
    else:
        chosen = [r.text for r in sample([p.chat() for p in prompts], 1)]
    swaps = [i for i, s in enumerate(strategies) if s == "swap"]
    others = {i: other_persona(prompts[i], pool, rng) for i, s in enumerate(strategies) if s in ("swap", "mismatch")}
    chats = [prompts[i].chat(others[i]) for i in swaps for _ in range(cfg.swap_candidates)]
    generated = sample(chats, 2)
    candidates = {i: generated[k * cfg.swap_candidates:(k + 1) * cfg.swap_candidates] for k, i in enumerate(swaps)}
    off_topic = [text for d in dialogues for _, text in d.turns]
    negatable = list(dict.fromkeys(fact.strip() for facts in pool for fact in facts if negate(fact)))

    pairs = []
    for i, (prompt, strategy) in enumerate(zip(prompts, strategies)):
        pair = {"id": f"{split}-{i:05d}", "strategy": strategy, "dialogue": prompt.dialogue, "speaker": prompt.speaker,
                "facts": prompt.facts, "history": prompt.history, "chosen": chosen[i], "chosen_source": cfg.chosen}
        if strategy == "swap":
            mine = candidates[i]
            finished = [r.text for r in mine if r.finished and r.text] or [r.text for r in mine]
            pair.update(rejected=closest_in_length(chosen[i], finished), other_facts=others[i],
                        rejected_finished=any(r.finished for r in mine))
        elif strategy == "mismatch":
            pair.update(rejected=chosen[i], rejected_facts=others[i])
        elif strategy == "contradiction":
            fact = rng.choice([f for f in prompt.facts if negate(f)])
            negation = negate(fact)
            other_fact = unrelated_fact(prompt.facts, negatable, negation, rng)
            other_negation = negate(other_fact)
            pair.update(chosen=f"{chosen[i]} {other_negation}", rejected=f"{chosen[i]} {negation}", fact=fact,
                        negation=negation, other_fact=other_fact, other_negation=other_negation)
        else:
            own_dialogue_turns = {text for d in dialogues if d.id == prompt.dialogue for _, text in d.turns}
            elsewhere = [t for t in off_topic if t not in own_dialogue_turns]
            pool_texts = list(BLAND_REPLIES) + rng.sample(elsewhere, min(32, len(elsewhere)))
            rejected = closest_in_length(chosen[i], rng.sample(pool_texts, len(pool_texts)))
            pair.update(rejected=rejected, rejected_source="bland" if rejected in BLAND_REPLIES else "off_topic")
        pairs.append(pair)
    return pairs, timer


def pair_stats(pairs: list[dict]) -> dict:
    """Counts and length balance per strategy; `longer_is_chosen` near 0.5 = length carries no signal."""
    def block(rows: list[dict]) -> dict:
        if not rows:
            return {"pairs": 0}
        chosen = [words(r["chosen"]) for r in rows]
        rejected = [words(r["rejected"]) for r in rows]
        longer = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
        return {"pairs": len(rows), "chosen_words": round(sum(chosen) / len(rows), 2),
                "rejected_words": round(sum(rejected) / len(rows), 2),
                "longer_is_chosen": round(sum(longer) / len(rows), 3)}
    stats = {"all": block(pairs)}
    stats.update({s: block([p for p in pairs if p["strategy"] == s]) for s in STRATEGIES})
    return stats


def run(params: Params, paths: Paths = DEFAULT) -> dict:
    """The `pairs` stage: pairs made with the SFT policy (see `make_pairs`)."""
    model, tokenizer = load_policies(paths.base, {"sft": paths.sft}, param="pairs")
    return make_pairs(paths.prepared, model, tokenizer, params.pairs, params.seed, paths.pairs)


def make_pairs(prepared: Path, model, tokenizer, cfg: PairsConfig, seed: int, out_dir: Path) -> dict:
    """Train and held-out (valid) pairs written as JSONL, and their metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"chosen_source": cfg.chosen}
    generation_s, tokens = 0.0, 0
    for split, n in (("train", cfg.train_n), ("valid", cfg.valid_n)):
        dialogues = read_dialogues(prepared / f"{split}.jsonl")
        pairs, timer = build_pairs(dialogues, model, tokenizer, cfg, n, split, derive_seed(seed, "pairs", split))
        write_pairs(pairs, out_dir / f"{split}.jsonl")
        metrics[split] = pair_stats(pairs)
        swaps = [p for p in pairs if p["strategy"] == "swap"]
        metrics[split]["swap_rejected_unfinished"] = sum(not p["rejected_finished"] for p in swaps)
        generation_s += timer["generation_s"]
        tokens += timer["generated_tokens"]
        log.info("%s pairs: %s", split, metrics[split]["all"])
    metrics["generated_tokens"] = tokens
    metrics["generation_s"] = round(generation_s, 1)
    metrics["generation_tokens_per_s"] = round(tokens / generation_s, 1) if generation_s else None
    return metrics


def write_pairs(pairs: list[dict], path: Path) -> None:
    write_text_atomic(path, "".join(json.dumps(pair) + "\n" for pair in pairs))


def read_pairs(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no preference pairs; run the `pairs` stage first")
    pairs = []
    for number, line in enumerate(path.open(), 1):
        try:
            pair = json.loads(line)
            missing = {"dialogue", "facts", "history", "speaker", "chosen", "rejected", "strategy"} - set(pair)
            if missing:
                raise ValueError(f"missing {', '.join(sorted(missing))}")
        except ValueError as error:
            raise MalformedRowError(f"{path}:{number}: not a preference pair ({error})") from None
        pair["history"] = [tuple(turn) for turn in pair["history"]]
        pairs.append(pair)
    return pairs
