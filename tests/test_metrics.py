"""Metric functions on hand-made cases whose answers are worked out in the comments."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from persona.metrics import (
    STOPWORDS,
    bleu,
    bootstrap_ci,
    content_words,
    copies_fact,
    copy_words,
    distinct_n,
    facts_copied,
    hits_at_1,
    is_question,
    keyword_score,
    minimum_detectable_difference,
    mrr,
    normalize_answer,
    paired_difference,
    parrots,
    persona_likelihood_gain,
    rank_of_true,
    repeats_a_sentence,
    repetition_rate,
    rouge_l,
    summarize,
    unigram_f1,
)


def test_normalize_answer_drops_case_punctuation_and_articles():
    # "the  cat's hat, an apple!" -> punctuation to spaces -> "the  cat s hat  an apple "
    # -> articles to spaces -> "cat s hat apple"
    assert normalize_answer("The  Cat's hat, an apple!") == "cat s hat apple"
    # Articles are whole words only: "then" and "theory" keep their "the".
    assert normalize_answer("Then the theory") == "then theory"


def test_unigram_f1_exact_and_disjoint():
    assert unigram_f1("I love my dog", "I love my dog") == 1.0
    assert unigram_f1("I love my dog", "we hate cats") == 0.0
    assert unigram_f1("", "anything") == 0.0
    assert unigram_f1("anything", "") == 0.0


def test_unigram_f1_partial_overlap():
    # reply {i, like, dogs}, gold {i, like, cats, and, birds}: 2 shared.
    # P = 2/3, R = 2/5, F1 = 2 * (4/15) / (16/15) = 0.5
    assert unigram_f1("I like dogs", "I like cats and birds") == pytest.approx(0.5)
    # Multiset: "dog" 3 times in the reply, once in the gold -> 1 shared.
    # P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert unigram_f1("dog dog dog", "dog cat") == pytest.approx(0.4)
    # "dog" twice on both sides -> 2 shared (a set would count 1). P = R = 2/3, F1 = 2/3
    assert unigram_f1("dog dog cat", "dog dog bird") == pytest.approx(2 / 3)


def test_unigram_f1_ignores_articles_and_punctuation():
    # Both normalise to "dog".
    assert unigram_f1("The dog!", "a dog") == 1.0
    # "An apple, please." -> "apple please"; gold "apple" -> P = 1/2, R = 1, F1 = 2/3
    assert unigram_f1("An apple, please.", "the apple") == pytest.approx(2 / 3)


def test_distinct_n():
    replies = ["a b a b", "A B"]
    # unigrams (lower-cased): a b a b a b -> 6 total, 2 distinct -> 1/3
    assert distinct_n(replies, 1) == pytest.approx(1 / 3)
    # bigrams per reply: (a b) (b a) (a b) | (a b) -> 4 total, 2 distinct -> 0.5
    # (joining the replies would add a spanning (b a) and give 2/5)
    assert distinct_n(replies, 2) == pytest.approx(0.5)
    assert distinct_n(["one two three"], 2) == 1.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["one"], 2) == 0.0


def test_repetition_rate():
    # trigrams: (i like it) (like it i) (it i like) (i like it) -> 4 total, 3 distinct -> 1 - 3/4
    assert repetition_rate("I like it i like it") == pytest.approx(0.25)
    # 3 trigrams, all (go go go) -> 1 - 1/3
    assert repetition_rate("go go go go go") == pytest.approx(2 / 3)
    assert repetition_rate("a b c d") == 0.0
    assert repetition_rate("hi there") == 0.0


def test_is_question():
    assert is_question("Where do you live?")
    assert not is_question("I live in Ohio.")


def test_keyword_score_follows_the_original_definition():
    facts = ["I have a dog.", "I love hiking in the mountains.", "My favorite color is blue."]
    # Keywords: fact 1 none ("have" is a stopword, "dog" has 3 letters); fact 2 {love, hiking, mountains};
    # fact 3 {favorite, color, blue}. "love" hits fact 2 only -> 1/3.
    assert keyword_score("I have a dog and I love it.", facts) == pytest.approx(1 / 3)
    # Case and punctuation are ignored: "MOUNTAINS!" and "Blue," hit facts 2 and 3 -> 2/3.
    assert keyword_score("The MOUNTAINS! Blue, like the sky.", facts) == pytest.approx(2 / 3)
    # Whole words only: "bluebird" is not "blue", "colors" is not "color".
    assert keyword_score("A bluebird of many colors.", facts) == 0.0


def test_keyword_score_never_counts_stopwords_or_short_words():
    assert "have" in STOPWORDS and "there" in STOPWORDS
    # Saying the fact word for word still scores 0: it has no keyword.
    assert keyword_score("I have a dog", ["I have a dog."]) == 0.0
    # "they", "were", "there" are longer than 3 letters but stopwords.
    assert keyword_score("they were there", ["They were there."]) == 0.0
    # "from" is a stopword, "ohio" a keyword.
    assert keyword_score("I am from Texas", ["I am from Ohio."]) == 0.0
    assert keyword_score("Ohio is cold", ["I am from Ohio."]) == 1.0
    assert keyword_score("anything", []) == 0.0


def test_rouge_l():
    # LCS of "the cat sat on the mat" / "the cat lay on a mat" is "the cat on mat": 4 of 6 tokens each side.
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    assert rouge_l("same words here", "same words here") == pytest.approx(1.0)
    # Unequal lengths: LCS "the cat" = 2; P = 2/2, R = 2/6, F = 2 * (1/3) / (4/3) = 0.5, either order.
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(0.5)
    assert rouge_l("the cat sat on the mat", "the cat") == pytest.approx(0.5)
    assert rouge_l("alpha beta", "gamma delta") == 0.0


def test_parrots():
    facts = ["I have two beagles.", "I love hiking in the mountains."]
    assert parrots("I love hiking in the mountains!", facts)
    assert parrots("I love hiking in the mountains!", facts, threshold=1.0)  # the threshold itself counts
    assert not parrots("Trekking up high peaks is my passion.", facts)
    assert not parrots("anything at all", [])
    # ROUGE-L F = 4/6 with the fact: copied at 0.6, not at 0.7.
    assert parrots("the cat sat on the mat", ["the cat lay on a mat"], threshold=0.6)
    assert not parrots("the cat sat on the mat", ["the cat lay on a mat"], threshold=0.7)


def test_bleu():
    golds = ["the cat sat on the mat today", "my dog likes long walks in the park"]
    assert bleu(golds, golds) == pytest.approx(100.0)
    assert bleu(["zebras eat grass quietly", "violins play loud music"], golds) == 0.0
    # Replies paired with the wrong gold share only a few words.
    assert bleu(golds[::-1], golds) < 10.0


def test_rank_of_true_ties_count_against_the_true_candidate():
    assert rank_of_true([0.9, 0.1, 0.5], 0) == 1
    assert rank_of_true([0.9, 0.1, 0.5], 2) == 2
    assert rank_of_true([0.9, 0.1, 0.5], 1) == 3
    # One tie: the other 0.7 counts as ahead -> rank 2, whichever of the two is true.
    assert rank_of_true([0.7, 0.7, 0.1], 0) == 2
    assert rank_of_true([0.7, 0.7, 0.1], 1) == 2
    # A constant scorer puts the true candidate last.
    assert rank_of_true([0.5, 0.5, 0.5], 0) == 3


def test_hits_at_1_and_mrr_on_3x3():
    rows = [[0.9, 0.1, 0.2],   # true 0: rank 1
            [0.3, 0.8, 0.8],   # true 1: tied with index 2 -> rank 2
            [0.5, 0.6, 0.4]]   # true 2: lowest -> rank 3
    truth = [0, 1, 2]
    assert hits_at_1(rows, truth) == pytest.approx(1 / 3)
    # (1 + 1/2 + 1/3) / 3 = 11/18
    assert mrr(rows, truth) == pytest.approx(11 / 18)
    constant = [[1.0, 1.0, 1.0]] * 3
    assert hits_at_1(constant, truth) == 0.0
    assert mrr(constant, truth) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        hits_at_1(rows, [0, 1])


def test_persona_likelihood_gain():
    # A model that ignores the persona gives every persona the same likelihood.
    assert persona_likelihood_gain(-2.0, [-2.0, -2.0, -2.0]) == 0.0
    # -1.5 - mean(-2.0, -3.0) = -1.5 + 2.5 = 1.0
    assert persona_likelihood_gain(-1.5, [-2.0, -3.0]) == pytest.approx(1.0)
    assert persona_likelihood_gain(-3.0, [-2.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        persona_likelihood_gain(-1.0, [])


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = [0.2, 0.9, 0.4, 0.7, 0.1, 0.8, 0.5, 0.3, 0.6, 1.0]
    low, high = bootstrap_ci(values, seed=3)
    assert low < np.mean(values) < high
    assert bootstrap_ci(values, seed=3) == (low, high)
    assert bootstrap_ci(values, seed=4) != (low, high)


def test_bootstrap_ci_width_matches_theory_and_narrows_with_data():
    # Mean of n values of 0 and 1: standard error 0.5 / sqrt(n), 95% CI about 2 * 1.96 * that wide.
    small, large = [0.0, 1.0] * 10, [0.0, 1.0] * 1000
    small_low, small_high = bootstrap_ci(small)
    large_low, large_high = bootstrap_ci(large)
    assert large_high - large_low == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(2000), rel=0.15)
    # 100x the data: about 10x narrower.
    assert large_high - large_low < (small_high - small_low) / 5
    # A wider alpha gives a narrower interval.
    low90, high90 = bootstrap_ci(large, alpha=0.10)
    assert high90 - low90 < large_high - large_low


def test_bootstrap_ci_degenerate_inputs():
    low, high = bootstrap_ci([])
    assert math.isnan(low) and math.isnan(high)
    assert bootstrap_ci([0.25]) == (0.25, 0.25)


def test_summarize():
    values = [1 / 3, 2 / 3, 1 / 3]
    summary = summarize(values)
    assert set(summary) == {"mean", "ci_low", "ci_high", "n"}
    assert summary["n"] == 3
    assert summary["mean"] == 0.4444  # 4/9 rounded to 4 places
    assert (summary["ci_low"], summary["ci_high"]) == tuple(round(x, 4) for x in bootstrap_ci(values))
    assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    assert json.loads(json.dumps(summary)) == summary


def test_pearson():
    from persona.metrics import pearson
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == 1.0
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == -1.0
    assert pearson([1, 2, 3], [5, 5, 5]) is None and pearson([1, 2], [3, 4]) is None


PERSONA = ["I am a retired opera singer.", "I live in a nursing home.", "I love chocolate cake.", "My son is a lawyer."]


def test_a_persona_dump_copies_every_fact():
    # The PPO sample ROUGE-L F (parroting_rate) let through: each sentence holds all of one fact's content words.
    dump = "I'm a retired opera singer. I live in a nursing home. I love chocolate cake. My son is a lawyer."
    assert facts_copied(dump, PERSONA) == 4
    assert not parrots(dump, PERSONA)  # why fact_copy_rate replaced it


def test_a_fact_said_in_new_words_is_not_copied():
    # content words of the fact: work, night, shifts, nurse; the reply shares "shifts" only (1/4 < 0.8)
    assert not copies_fact("Long shifts at the hospital, yes.", "I work night shifts as a nurse.")
    assert facts_copied("I used to sing at the opera house, a long time ago.", PERSONA) == 0


def test_fact_copy_is_recall_in_order_with_gaps():
    fact = "I love chocolate cake."  # love, chocolate, cake
    assert copies_fact("I really love eating chocolate cake on Sundays", fact)  # 3/3 with gaps
    assert not copies_fact("Cake? I love chocolate.", fact)  # in order: love, chocolate = 2/3
    fact = "I adopted three rescue dogs yesterday."  # adopted, three, rescue, dogs, yesterday
    assert copies_fact("We adopted three dogs yesterday!", fact)  # 4/5 = 0.8 exactly: copied
    assert not copies_fact("We adopted three dogs.", fact)  # 3/5


def test_fact_copy_tokenizer_and_stopwords():
    # apostrophes split contractions into pieces the stopword list holds; case and punctuation go
    assert copy_words("I'm sure you DON'T, it’s fine!") == ["i", "m", "sure", "you", "don", "t", "it", "s", "fine"]
    assert content_words("I'm sure you don't, it's fine!") == ["sure", "fine"]
    # a fact with no content words is never copied, whatever the reply
    assert content_words("I am who I am.") == [] and not copies_fact("I am who I am.", "I am who I am.")
    assert facts_copied("anything", []) == 0


def test_repeated_sentence_detection():
    assert repeats_a_sentence("I like dogs. I LIKE dogs! Do you?")  # case and punctuation ignored
    assert repeats_a_sentence("Me too\nme too")  # a line break ends a sentence
    assert not repeats_a_sentence("I like dogs. I like cats. Do you?")
    assert not repeats_a_sentence("Hello... hello there.") and not repeats_a_sentence("")


def test_clustered_bootstrap_widens_for_correlated_clusters():
    # 10 dialogues of 5 prompts each, all prompts of a dialogue alike: 10 independent values, not 50
    values = [float(d % 2) for d in range(10) for _ in range(5)]
    clusters = [d for d in range(10) for _ in range(5)]
    plain_low, plain_high = bootstrap_ci(values, seed=1)
    low, high = bootstrap_ci(values, seed=1, clusters=clusters)
    assert low <= 0.5 <= high and (high - low) > 1.8 * (plain_high - plain_low)  # about sqrt(5) wider
    assert bootstrap_ci(values, seed=1, clusters=clusters) == (low, high)  # deterministic for a seed
    # one cluster per value (labelled 0..n-1): the plain bootstrap's resamples exactly
    assert bootstrap_ci(values, seed=1, clusters=list(range(50))) == (plain_low, plain_high)
    assert summarize(values, 1, 1000, clusters)["ci_low"] == round(low, 4)
    with pytest.raises(ValueError):
        bootstrap_ci(values, clusters=[0, 1])


def test_paired_difference_and_minimum_detectable_difference():
    assert minimum_detectable_difference(1.0) == pytest.approx(1.95996 + 0.84162, abs=1e-4)
    base = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    same = paired_difference(base, base, clusters=[0, 0, 1, 1, 2, 2, 3, 3])
    assert (same["diff"], same["ci_low"], same["ci_high"], same["mdd"], same["n"]) == (0.0, 0.0, 0.0, 0.0, 8)
    # every item +1: the shift is certain, however items cluster
    up = paired_difference([v + 1 for v in base], base, clusters=[0, 0, 1, 1, 2, 2, 3, 3])
    assert up["diff"] == up["ci_low"] == up["ci_high"] == 1.0
    # differences +1 in two dialogues, 0 in two: the mean is 0.5 and the CI spans dialogue-level noise
    mixed = paired_difference([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 8, clusters=[0, 0, 1, 1, 2, 2, 3, 3])
    assert mixed["diff"] == 0.5 and mixed["ci_low"] < 0.5 < mixed["ci_high"] and mixed["mdd"] > 0
    assert json.loads(json.dumps(mixed)) == mixed
