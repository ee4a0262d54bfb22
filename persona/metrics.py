"""Pure metric functions for evaluating persona chatbots: text in, numbers out.

No model is loaded here; the evaluation stage computes log-likelihoods and candidate scores
and passes them in. Definitions follow ConvAI2/ParlAI where one exists (answer normalisation,
unigram F1, hits@1), so figures are comparable with published PersonaChat numbers.
Aggregates come with a percentile bootstrap CI, flat enough for `dvc metrics diff`; evaluation
prompts come several per dialogue, so its CIs resample whole dialogues (`clusters`).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from statistics import NormalDist

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

# NLTK's English stopword list, written out so no corpus download is needed. Contractions are
# kept in their apostrophe-free form ("dont"), since keyword_score strips punctuation first.
STOPWORDS = frozenset({
    "i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "youre", "youve", "youll", "youd", "your",
    "yours", "yourself", "yourselves", "he", "him", "his", "himself", "she", "shes", "her", "hers", "herself", "it",
    "its", "itself", "they", "them", "their", "theirs", "themselves", "what", "which", "who", "whom", "this",
    "that", "thatll", "these", "those", "am", "is", "are", "was", "were", "be", "been", "being", "have", "has",
    "had", "having", "do", "does", "did", "doing", "a", "an", "the", "and", "but", "if", "or", "because", "as",
    "until", "while", "of", "at", "by", "for", "with", "about", "against", "between", "into", "through", "during",
    "before", "after", "above", "below", "to", "from", "up", "down", "in", "out", "on", "off", "over", "under",
    "again", "further", "then", "once", "here", "there", "when", "where", "why", "how", "all", "any", "both",
    "each", "few", "more", "most", "other", "some", "such", "no", "nor", "not", "only", "own", "same", "so", "than",
    "too", "very", "s", "t", "can", "will", "just", "don", "dont", "should", "shouldve", "now", "d", "ll", "m", "o",
    "re", "ve", "y", "ain", "aren", "arent", "couldn", "couldnt", "didn", "didnt", "doesn", "doesnt", "hadn",
    "hadnt", "hasn", "hasnt", "haven", "havent", "isn", "isnt", "ma", "mightn", "mightnt", "mustn", "mustnt",
    "needn", "neednt", "shan", "shant", "shouldn", "shouldnt", "wasn", "wasnt", "weren", "werent", "won", "wont",
    "wouldn", "wouldnt"
})

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-./:;<=>?@\[\]\\^`{|}~_']")
_NON_WORD = re.compile(r"[^\w\s]")
_ROUGE = rouge_scorer.RougeScorer(["rougeL"])


def normalize_answer(text: str) -> str:
    """ParlAI's normalisation: lower-case, punctuation and articles to spaces, collapse whitespace."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def unigram_f1(reply: str, gold: str) -> float:
    """ConvAI2 F1: precision/recall over the multiset of normalised tokens the two share."""
    reply_tokens, gold_tokens = normalize_answer(reply).split(), normalize_answer(gold).split()
    common = sum((Counter(reply_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(reply_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.lower().split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(replies: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole set (n-grams never span two replies)."""
    grams = [gram for reply in replies for gram in _ngrams(reply, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(reply: str) -> float:
    """Share of repeated word trigrams within one reply: 1 - distinct/all; 0 below 3 words."""
    trigrams = _ngrams(reply, 3)
    return 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def is_question(reply: str) -> bool:
    """A reply that asks something back keeps the conversation going."""
    return "?" in reply


def _words(text: str) -> list[str]:
    return _NON_WORD.sub("", text.lower()).split()


def keyword_score(reply: str, facts: list[str]) -> float:
    """The original recipe's persona-consistency score: share of facts with a keyword in the reply.

    A fact's keywords are its words (lower-cased, punctuation stripped) longer than 3 letters
    that are not stopwords; a fact counts when any of them appears as a word of the reply.
    Kept for comparison with the original numbers: it is blind to paraphrase and contradiction.
    """
    if not facts:
        return 0.0
    reply_words = set(_words(reply))
    hits = sum(any(len(w) > 3 and w not in STOPWORDS and w in reply_words for w in _words(fact)) for fact in facts)
    return hits / len(facts)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens; symmetric in a and b)."""
    return _ROUGE.score(b, a)["rougeL"].fmeasure


def parrots(reply: str, facts: list[str], threshold: float = 0.6) -> bool:
    """True when the reply copies a persona fact near-verbatim (ROUGE-L F >= threshold with one)."""
    return max((rouge_l(reply, fact) for fact in facts), default=0.0) >= threshold


# fact_copy_rate's tokenizer: lower-cased runs of letters and digits, so an apostrophe splits a
# contraction ("I'm" -> i, m; "don't" -> don, t) into pieces STOPWORDS holds, and punctuation goes.
_WORD = re.compile(r"[^\W_]+")
# A fact is copied when the reply holds at least this share of its content words, in order.
FACT_COPY_RECALL = 0.8
_SENTENCE_END = re.compile(r"[.!?\n]+")


def copy_words(text: str) -> list[str]:
    """fact_copy_rate's tokens: `_WORD` runs of the lower-cased text (curly apostrophes count as ')."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def content_words(text: str) -> list[str]:
    """`copy_words` outside STOPWORDS (NLTK's English list, above), in order."""
    return [word for word in copy_words(text) if word not in STOPWORDS]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (in order, gaps allowed)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def copies_fact(reply: str, fact: str) -> bool:
    """True when the reply holds >= FACT_COPY_RECALL of the fact's content words in the fact's order.

    In order, gaps allowed: "I love chocolate cake" is copied by "I love eating chocolate cake" (3 of 3)
    but not by "Cake? I love chocolate" (love, chocolate: 2 of 3 in order). Recall, not F, so a reply
    that dumps the whole persona copies every fact in it. A fact with no content words ("I am who I
    am") never counts: there is nothing to copy.
    """
    fact_words = content_words(fact)
    if not fact_words:
        return False
    # the tolerance keeps 4/5 = 0.8 on the copied side of the line whatever the float rounding
    return _lcs_length(fact_words, content_words(reply)) / len(fact_words) >= FACT_COPY_RECALL - 1e-9


def facts_copied(reply: str, facts: list[str]) -> int:
    """How many of the persona's facts the reply copies (`copies_fact`)."""
    return sum(copies_fact(reply, fact) for fact in facts)


def repeats_a_sentence(reply: str) -> bool:
    """True when a sentence occurs twice in the reply: sentences end at . ! ? or a line break and
    compare as their `copy_words` (case and punctuation ignored); a decoding loop shows as this."""
    sentences = [" ".join(copy_words(s)) for s in _SENTENCE_END.split(reply)]
    sentences = [s for s in sentences if s]
    return len(set(sentences)) < len(sentences)


def bleu(replies: list[str], golds: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults, one reference per reply), 0-100."""
    return sacrebleu.corpus_bleu(replies, [golds]).score


def rank_of_true(scores: Sequence[float], true_index: int) -> int:
    """1-based rank of the true candidate; ties count against it, so a constant scorer ranks last."""
    true_score = scores[true_index]
    return 1 + sum(score >= true_score for i, score in enumerate(scores) if i != true_index)


def _ranks(score_rows: Sequence[Sequence[float]], true_indices: Sequence[int]) -> np.ndarray:
    return np.array([rank_of_true(row, t) for row, t in zip(score_rows, true_indices, strict=True)])


def hits_at_1(score_rows: Sequence[Sequence[float]], true_indices: Sequence[int]) -> float:
    """Share of rows whose true candidate strictly outscores every distractor (ConvAI2 hits@1)."""
    return float(np.mean(_ranks(score_rows, true_indices) == 1))


def mrr(score_rows: Sequence[Sequence[float]], true_indices: Sequence[int]) -> float:
    """Mean reciprocal rank of the true candidate."""
    return float(np.mean(1 / _ranks(score_rows, true_indices)))


def persona_likelihood_gain(logp_true: float, logp_others: Sequence[float]) -> float:
    """Per-token log-likelihood of a reply under its persona minus the mean under swapped ones.

    Inputs are per-token means. Positive when the model's reply depends on the persona;
    0 for a model that ignores it.
    """
    if len(logp_others) == 0:
        raise ValueError("persona_likelihood_gain needs at least one swapped persona")
    return float(logp_true - np.mean(logp_others))


def _clusters(labels: Sequence[Hashable], size: int) -> list[np.ndarray]:
    """Index arrays of the values sharing each label, labels in sorted order."""
    if len(labels) != size:
        raise ValueError(f"{len(labels)} cluster labels for {size} values")
    _, owner = np.unique(np.asarray(labels), return_inverse=True)
    return [np.flatnonzero(owner == k) for k in range(owner.max() + 1)]


def _bootstrap_statistics(data: np.ndarray, statistic: Callable[[np.ndarray], float], n_resamples: int,
                          rng: np.random.Generator, clusters: Sequence[Hashable] | None) -> np.ndarray:
    """`statistic` of each resample: values drawn with replacement, or with `clusters` (one label per value)
    whole clusters drawn with replacement, as many as there are, each bringing all its values."""
    if clusters is None:
        resamples = rng.integers(0, data.size, size=(n_resamples, data.size))
        return np.array([statistic(data[row]) for row in resamples])
    groups = _clusters(clusters, data.size)
    draws = rng.integers(0, len(groups), size=(n_resamples, len(groups)))
    return np.array([statistic(data[np.concatenate([groups[k] for k in row])]) for row in draws])


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean,
                 n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0,
                 clusters: Sequence[Hashable] | None = None) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of `statistic`; deterministic for a seed.

    `clusters` (a label per value, e.g. the dialogue a prompt comes from) resamples whole clusters:
    values of one dialogue move together, so their correlation widens the CI as it should. One
    cluster per value, labelled 0..n-1, draws exactly the plain bootstrap's resamples.
    (nan, nan) for no values; a single value has no spread, so its CI is the statistic itself.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan")
    if data.size == 1:
        point = float(statistic(data))
        return point, point
    stats = _bootstrap_statistics(data, statistic, n_resamples, np.random.default_rng(seed), clusters)
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def summarize(values: Sequence[float], seed: int = 0, n_resamples: int = 1000,
              clusters: Sequence[Hashable] | None = None) -> dict:
    """Mean, 95% bootstrap CI (clustered when `clusters` are given) and count, rounded to 4 places."""
    mean = float(np.mean(values)) if len(values) else float("nan")
    low, high = bootstrap_ci(values, seed=seed, n_resamples=n_resamples, clusters=clusters)
    return {"mean": round(mean, 4), "ci_low": round(low, 4), "ci_high": round(high, 4), "n": len(values)}


def minimum_detectable_difference(standard_error: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference a two-sided test at `alpha` detects with probability `power`.

    Normal approximation: MDD = (z_(1 - alpha/2) + z_power) * SE, where SE is the standard error of
    the estimated difference; at alpha 0.05 and power 0.8, (1.960 + 0.842) * SE = 2.80 * SE.
    """
    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * standard_error


def paired_difference(values: Sequence[float], baseline: Sequence[float], clusters: Sequence[Hashable],
                      seed: int = 0, n_resamples: int = 1000) -> dict:
    """Mean of the per-item differences values - baseline (same items, same order), its dialogue-clustered
    95% bootstrap CI, and the minimum detectable difference (alpha 0.05, power 0.8) with SE the standard
    deviation of the clustered bootstrap means; rounded to 4 places."""
    differences = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    if differences.size < 2:
        return {"diff": round(float(differences.mean()), 4) if differences.size else None, "n": int(differences.size)}
    stats = _bootstrap_statistics(differences, np.mean, n_resamples, np.random.default_rng(seed), clusters)
    low, high = np.percentile(stats, [2.5, 97.5])
    return {"diff": round(float(differences.mean()), 4), "ci_low": round(float(low), 4),
            "ci_high": round(float(high), 4), "mdd": round(minimum_detectable_difference(float(stats.std(ddof=1))), 4),
            "n": int(differences.size)}


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than 3 points."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return round(float(np.corrcoef(x, y)[0, 1]), 4)
