"""Evaluation on the tiny random model: batched generation, likelihood scoring, the stage's outputs, the CLI."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig

from persona.__main__ import main as cli
from persona.chat_format import Prompt, select_prompts
from persona.config import ConfigError
from persona.data import load_dialogues, split_by_persona
from persona.evaluate import evaluate, write_outputs
from persona.generation import Decoding, generate_replies
from persona.likelihood import reply_logprobs
from tests.conftest import REPO, SHARED_SPC, params_with

SMALL = {"policies": ["base", "sft"], "n": 6, "likelihood_n": 3, "persona_candidates": 3, "grounding_candidates": 4,
         "hits_n": 2, "reply_candidates": 4, "multiturn_n": 2, "multiturn_turns": 2, "perplexity_sequences": 2,
         "max_new_tokens": 6, "batch_size": 4, "bootstrap": 50}


@pytest.fixture(scope="module")
def test_dialogues():
    dialogues, _ = load_dialogues("sample", "unused", "skip")
    return split_by_persona(dialogues, 0.1, 0.1, seed=42)[0]["test"]


@pytest.fixture(scope="module")
def tiny_nli(tokenizer, tmp_path_factory) -> Path:
    """A random 3-label classifier with NLI label names: exercises the NLI path (its verdicts are noise)."""
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, pad_token_id=tokenizer.pad_token_id,
                        id2label={0: "contradiction", 1: "entailment", 2: "neutral"},
                        label2id={"contradiction": 0, "entailment": 1, "neutral": 2})
    folder = tmp_path_factory.mktemp("nli")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_batched_greedy_generation_equals_one_by_one(tiny_model_dir, test_dialogues, tokenizer):
    """Left padding and length sorting must not change what a prompt generates."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():  # a random model greedily repeats "\n"; zero the (tied) rows of invisible tokens
        model.get_input_embeddings().weight[blank] = 0
    chats = [p.chat() for p in select_prompts(test_dialogues, 5, 4, seed=0)]
    greedy = Decoding(max_new_tokens=8, temperature=0, batch_size=5)
    batched = generate_replies(model, tokenizer, chats, greedy)
    alone = [generate_replies(model, tokenizer, [chat], dataclasses.replace(greedy, batch_size=1))[0]
             for chat in chats]
    assert batched == alone and any(batched)


def test_sampling_is_seeded(tiny_model_dir, test_dialogues, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chats = [p.chat() for p in select_prompts(test_dialogues, 4, 4, seed=0)]
    first = generate_replies(model, tokenizer, chats, Decoding(max_new_tokens=8, seed=3))
    again = generate_replies(model, tokenizer, chats, Decoding(max_new_tokens=8, seed=3))
    other = generate_replies(model, tokenizer, chats, Decoding(max_new_tokens=8, seed=4))
    assert first == again and first != other


def test_reply_logprob_matches_a_manual_forward_pass(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = Prompt("d", 1, ["I have a dog."], [(0, "Hi there!")], "Hello, my dog says hi.")
    (score,) = reply_logprobs(model, tokenizer, [prompt.chat(reply=prompt.gold)])
    context = tokenizer.apply_chat_template(prompt.chat(), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt.chat(reply=prompt.gold), tokenize=False).rstrip()
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt").input_ids
    start = len(tokenizer(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    manual = logp[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]].mean().item()
    assert score == pytest.approx(manual, abs=1e-4)


def test_identical_persona_candidates_give_zero_gain(tiny_model_dir, test_dialogues, tokenizer):
    """When every candidate persona is the true one, the policy cannot prefer it: gain is exactly 0."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = select_prompts(test_dialogues, 1, 4, seed=0)[0]
    scores = reply_logprobs(model, tokenizer, [prompt.chat(prompt.facts, prompt.gold)] * 3)
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) == pytest.approx(scores[2], abs=1e-6)


def run_evaluate(test_dialogues, tiny_model_dir, sft_adapter, **changes):
    cfg = dataclasses.replace(params_with(evaluate=SMALL).evaluate, **changes)
    return evaluate(test_dialogues, cfg, tiny_model_dir, {"sft": sft_adapter}, 256, seed=0)[:2]


def test_evaluate_writes_every_output_with_cis(test_dialogues, tiny_model_dir, sft_adapter, tmp_path):
    result, samples = run_evaluate(test_dialogues, tiny_model_dir, sft_adapter)
    paths = [tmp_path / n for n in ("samples.jsonl", "report.md", "bars.csv", "eval.png")]
    write_outputs(result, samples, *paths)
    assert all(p.stat().st_size > 0 for p in paths)
    saved = json.loads(json.dumps(result))  # what metrics/eval.json holds
    for name in ("base", "sft"):
        block = saved[name]
        assert block["grounding_top1_n"] == 6 and block["persona_gain_n"] == 3
        for key in ("grounding_top1", "persona_hits1", "grounded_not_copied", "fact_copy_rate", "f1"):
            assert block[f"{key}_ci_low"] <= block[key] <= block[f"{key}_ci_high"]
        assert 0 <= block["grounding_top1"] <= 1 and block["gold_perplexity"] > 1
        assert block["nli_c_score"] is None and block["reward_score"] is None
        assert set(block) >= {"multiturn_grounding_top1_turn1", "multiturn_grounding_top1_turn2", "reply_hits1"}
    assert saved["base"]["persona_gain"] != saved["sft"]["persona_gain"]  # the adapter is really switched
    assert "NLI" in saved["unavailable"]["nli"] or "nli" in saved["unavailable"]["nli"]
    first = json.loads(paths[0].read_text().splitlines()[0])
    assert {"persona", "history", "gold", "base", "sft"} <= set(first)
    report = paths[1].read_text()
    assert "| grounding_top1 |" in report and "| persona_hits1 |" in report.split("## Paired")[1]
    assert f"6 held-out prompts from {saved['n_prompt_dialogues']} dialogues" in report
    assert "fact_copy_rate_ci_low" in saved["gold"] and "grounded_not_copied" in saved["gold"]
    paired = saved["paired"]["sft_vs_base"]
    assert set(paired) >= {"persona_gain", "persona_hits1", "grounding_top1_relevant", "fact_copy_rate",
                           "grounded_not_copied", "gold_perplexity", "f1"}
    for figures in paired.values():
        assert figures["n"] < 2 or figures["ci_low"] <= figures["diff"] <= figures["ci_high"]
    gain = [saved[name]["persona_gain"] for name in ("sft", "base")]
    assert paired["persona_gain"]["diff"] == pytest.approx(gain[0] - gain[1], abs=2e-4)
    # the 5-turn metric is paired per conversation: its mean over conversations is the policies' difference
    assert paired["multiturn_grounding_top1"]["n"] == SMALL["multiturn_n"]
    turns = [saved[name]["multiturn_grounding_top1"] for name in ("sft", "base")]
    assert paired["multiturn_grounding_top1"]["diff"] == pytest.approx(turns[0] - turns[1], abs=2e-4)
    assert "| multiturn_grounding_top1 |" in report.split("## Paired")[1]


def test_evaluate_is_deterministic(test_dialogues, tiny_model_dir, sft_adapter):
    first, _ = run_evaluate(test_dialogues, tiny_model_dir, sft_adapter, policies=["sft"])
    second, _ = run_evaluate(test_dialogues, tiny_model_dir, sft_adapter, policies=["sft"])
    for block in (first, second, first["sft"], second["sft"]):  # drop the timings
        block.pop("wall_s", None)
        for key in [k for k in block if k.startswith("time_") or k == "generation_tokens_per_s"]:
            block.pop(key)
    assert first == second


def test_nli_metrics_are_numbers_when_a_model_is_configured(test_dialogues, tiny_model_dir, sft_adapter, tiny_nli):
    result, _ = run_evaluate(test_dialogues, tiny_model_dir, sft_adapter, policies=["base"], nli_model=str(tiny_nli))
    block = result["base"]
    assert -1 <= block["nli_c_score"] <= 1 and 0 <= block["nli_contradiction_rate"] <= 1
    assert 0 <= block["multiturn_self_contradiction_rate"] <= 1
    assert "nli" not in result["unavailable"]


def test_missing_adapter_is_a_clear_error(test_dialogues, tiny_model_dir, tmp_path):
    cfg = params_with(evaluate=SMALL).evaluate
    with pytest.raises(ConfigError, match="evaluate.policies: 'sft' needs an adapter"):
        evaluate(test_dialogues, cfg, tiny_model_dir, {"sft": tmp_path / "nothing"}, 256, seed=0)


def test_cli_evaluates_an_spc_csv(tiny_model_dir, sft_adapter, tmp_path, capsys):
    """The CLI on a real SPC CSV when present (else the bundled one), with --n bounding the work."""
    data = SHARED_SPC if SHARED_SPC.exists() else REPO / "data" / "sample" / "conversations.csv"
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    import yaml
    raw = yaml.safe_load(params.read_text())
    raw["evaluate"].update(SMALL)
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cli.json"
    cli(["evaluate", "--data", str(data), "--split", "test", "--policies", "base,sft", "--n", "4",
         "--out", str(out), "--params", str(params), "--base", str(tiny_model_dir), "--sft", str(sft_adapter)])
    result = json.loads(out.read_text())
    assert result["n_prompts"] == 4 and result["config"]["policies"] == ["base", "sft"]
    assert out.with_suffix(".md").exists() and "| persona_gain |" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["evaluate", "--data", str(tmp_path / "missing"), "--params", str(REPO / "params.yaml")])
    assert exit_info.value.code == 2 and "error: --data" in capsys.readouterr().err


def test_a_reply_repeating_a_fact_ranks_its_persona_first_and_parrots():
    """The real bundled MiniLM judge: reciting a fact identifies the persona (and is flagged as parroting)."""
    from persona.evaluate import grounding
    from persona.judges import Embedder
    from persona.metrics import parrots
    personas = [["I have two beagles.", "I work night shifts as a nurse."],
                ["I collect vintage stamps.", "I live in Lisbon."],
                ["I am training for a marathon.", "I hate spicy food."],
                ["I play the cello in an orchestra.", "My sister is a pilot."]]
    reply, embedder = "I work night shifts as a nurse.", Embedder("all-minilm-l6-v2")
    for true_index in range(4):  # the true persona goes first in the candidate list
        order = [personas[true_index]] + [p for i, p in enumerate(personas) if i != true_index]
        scores = grounding(embedder, [reply], [order])
        assert scores["top1"] == [float(true_index == 0)]
    assert parrots(reply, personas[0]) and not parrots("Long shifts at the hospital, yes.", personas[0])


def test_candidate_scoring_with_a_shared_prompt_cache_matches_full_scoring(tiny_model_dir, test_dialogues, tokenizer,
                                                                          monkeypatch):
    from persona import likelihood
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = select_prompts(test_dialogues, 1, 4, seed=0)[0]
    candidates = [prompt.gold, "Yes.", "I have never been to Lisbon, but I would love to go someday!", "ok"]
    full = reply_logprobs(model, tokenizer, [prompt.chat(reply=c) for c in candidates])
    monkeypatch.setattr(likelihood, "reply_logprobs", None)  # the cached path must not fall back
    shared = likelihood.candidate_logprobs(model, tokenizer, prompt.chat(), candidates, batch_size=3)
    assert shared == pytest.approx(full, abs=1e-4)


def test_evaluation_scoring_matches_full_logits_in_float64(tiny_model_dir, test_dialogues, tokenizer):
    """persona/scoring.py takes logits only where a scored token is predicted, and shares a candidate
    set's prompt: in float64 (no rounding to hide behind) it must equal log-softmax over full logits."""
    from persona import scoring
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    prompt = select_prompts(test_dialogues, 1, 4, seed=0)[0]
    candidates = [prompt.gold, "Yes.", "I have never been to Lisbon, but I would love to go someday!", "ok"]
    rows = scoring.chat_rows(tokenizer, [prompt.chat(reply=c) for c in candidates])
    expected = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        picked = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        mask = torch.tensor(row["completion_mask"][1:], dtype=torch.float64)
        expected.append(float((picked * mask).sum() / mask.sum()))
    plain = scoring.mean_logprobs(model, rows, tokenizer.pad_token_id, batch_size=3)
    shared_set = scoring.candidate_set(tokenizer, prompt.chat(), candidates)
    assert isinstance(shared_set, scoring.CandidateSet) and len(shared_set.rows) == 4
    shared = scoring.candidate_logprobs(model, shared_set, tokenizer.pad_token_id, batch_size=3)
    assert plain == pytest.approx(expected, abs=1e-9) and shared == pytest.approx(expected, abs=1e-9)


def test_the_reference_stage_and_evaluate_give_what_one_pass_gives(test_dialogues, tiny_model_dir, sft_adapter):
    """evaluate_reference's part (base here) then evaluate's (sft beside it) = one evaluation of both, timings aside."""
    from persona.evaluate import reference_items

    both = dataclasses.replace(params_with(evaluate=SMALL).evaluate, policies=["base", "sft"])
    one_pass, samples, _ = evaluate(test_dialogues, both, tiny_model_dir, {"sft": sft_adapter}, 256, seed=0)
    first, first_samples, per = evaluate(test_dialogues, dataclasses.replace(both, policies=["base"]),
                                         tiny_model_dir, {"sft": sft_adapter}, 256, seed=0)
    reference = json.loads(json.dumps({"result": first, **reference_items(first_samples, per, ["base"])}))
    split, split_samples, _ = evaluate(test_dialogues, dataclasses.replace(both, policies=["sft"]), tiny_model_dir,
                                       {"sft": sft_adapter}, 256, seed=0, reference=reference)
    strip = lambda block: {k: v for k, v in block.items()
                           if not (k.startswith("time_") or k.endswith(("_per_s", "wall_s")))}
    for key in ("base", "sft", "gold", "paired", "config"):
        assert json.loads(json.dumps(strip(split[key]))) == json.loads(json.dumps(strip(one_pass[key]))), key
    assert json.loads(json.dumps(split_samples)) == json.loads(json.dumps(samples))
    with pytest.raises(ConfigError, match="other prompts"):
        evaluate(test_dialogues, dataclasses.replace(both, policies=["sft"], n=5), tiny_model_dir,
                 {"sft": sft_adapter}, 256, seed=0, reference=reference)


def test_likelihood_n_above_n_scores_more_prompts_and_keeps_the_generation_ones(test_dialogues, tiny_model_dir,
                                                                                sft_adapter):
    """Persona Hits@1 is one bit per prompt: its paired CI needs more prompts than generation can afford, so
    likelihood_n > n scores further prompts of the split while the n generation prompts and their metrics stay."""
    cfg = dataclasses.replace(params_with(evaluate=SMALL).evaluate, policies=["sft"], likelihood_n=SMALL["n"])
    more = dataclasses.replace(cfg, likelihood_n=14)
    few, few_samples, _ = evaluate(test_dialogues, cfg, tiny_model_dir, {"sft": sft_adapter}, 256, seed=0)
    many, many_samples, per = evaluate(test_dialogues, more, tiny_model_dir, {"sft": sft_adapter}, 256, seed=0)
    assert many["sft"]["persona_gain_n"] == len(per["sft"]["persona_hits1"]) == 14
    assert many["n_likelihood_prompts"] == 14
    assert many["n_prompts"] == few["n_prompts"] == 6 and many_samples == few_samples
    assert many["gold"] == few["gold"]
    for key in [k for k in few["sft"] if not k.startswith(("persona_", "time_", "generation_tokens"))]:
        assert many["sft"][key] == few["sft"][key], key  # the same draws: candidates, conversations, judges
    assert many["prompts_digest"] != few["prompts_digest"]  # evaluate's reference check sees the extra prompts
    from persona.evaluate import likelihood_prompts

    generation = select_prompts(test_dialogues, more.n, more.max_history_turns, seed=0)
    scored = likelihood_prompts(test_dialogues, generation, more, seed=0)
    keys = [(p.dialogue, p.speaker, tuple(p.history), p.gold) for p in scored]
    assert scored[:more.n] == generation and len(set(keys)) == len(keys) == 14
