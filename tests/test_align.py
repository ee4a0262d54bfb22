"""DPO, GRPO (TRL trainers) and mDPO (transformers' Trainer) as align algorithms on the tiny random model: the run
writes the adapter and metrics with fp32 trainable weights, resumes a stopped run to the same adapter, refuses another
run's checkpoint, DPO learns a preference, GRPO samples what it scores, mDPO learns which persona a reply is from."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from persona import align, data, dpo, grpo, mdpo, training, trl_align
from persona.config import ALGORITHMS, POLICIES, ConfigError
from persona.dpo import preference_rows
from persona.likelihood import reply_logprobs
from persona.pairs import write_pairs
from persona.paths import Paths
from tests.conftest import REPO, params_with
from tests.test_ppo import reward_adapter  # noqa: F401 (a fixture)

# The smallest runs that still save, resume and evaluate: on the tiny model TRL's chunked log-prob kernel over the
# 49k-token vocabulary costs ~1 s a forward on 2 CPU cores, so every step and sequence counts.
TINY_DPO = {"max_steps": 2, "batch_size": 2, "save_steps": 1, "eval_steps": 2, "logging_steps": 1, "warmup_ratio": 0.0,
            "lr": 1e-2, "max_eval_sequences": 1, "eval_n": 2, "max_new_tokens": 4, "max_history_turns": 1}
TINY_GRPO = {**TINY_DPO, "num_generations": 2}
TINY_MDPO = {**TINY_DPO, "train_n": 8, "max_eval_sequences": 4, "lr": 5e-3}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    data.run(params_with(seed=1, data={"fraction": 0.5}), Paths(prepared=folder))
    return folder


def synthetic_pairs(split: str, n: int) -> list[dict]:
    """Separable pairs on short prompts: chosen is always one reply, rejected another; every fifth pair is a mismatch
    pair (one reply, scored under another persona)."""
    pairs = []
    for i in range(n):
        pair = {"id": f"{split}-{i}", "strategy": "swap", "dialogue": f"d{i}", "speaker": 0,
                "facts": [f"i have {i + 2} dogs."], "history": [(1, "hi! how are you?")],
                "chosen": "i love my dogs.", "rejected": "the weather is cold."}
        if i % 5 == 4:
            pair.update(strategy="mismatch", rejected=pair["chosen"], rejected_facts=["i am a pilot."])
        pairs.append(pair)
    return pairs


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    write_pairs(synthetic_pairs("train", 10), folder / "train.jsonl")
    write_pairs(synthetic_pairs("valid", 2), folder / "valid.jsonl")
    return folder


@pytest.fixture(scope="module")
def grpo_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with top_k 5 in its generation_config: GRPO must sample the full softmax all the same."""
    return with_generation_config(tiny_model_dir, tmp_path_factory.mktemp("grpo-base"), top_k=5)


def with_generation_config(model_dir: Path, folder: Path, **settings) -> Path:
    base = shutil.copytree(model_dir, folder / "base")
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return base


@pytest.fixture(scope="module")
def inputs(prepared, pairs_dir, tiny_model_dir, grpo_base, sft_adapter, reward_adapter):  # noqa: F811
    """The align stage's inputs for an algorithm."""
    def for_algorithm(algorithm: str) -> dict:
        return {"prepared": prepared, "pairs": pairs_dir, "base": grpo_base if algorithm == "grpo" else tiny_model_dir,
                "sft": sft_adapter, "reward": reward_adapter}
    return for_algorithm


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory):
    """(metrics, folder) of one uninterrupted run per algorithm, made once for the tests that read it."""
    runs = {}

    def get(algorithm: str):
        if algorithm not in runs:
            folder = tmp_path_factory.mktemp(f"{algorithm}-straight")
            runs[algorithm] = run(params_for(algorithm), inputs(algorithm), folder), folder
        return runs[algorithm]
    return get


def params_for(algorithm: str, **changes):
    section = {"dpo": TINY_DPO, "grpo": TINY_GRPO, "mdpo": TINY_MDPO}[algorithm]
    return params_with(align={"algorithm": algorithm}, model={"max_length": 256},
                       evaluate={"policies": ["base", "sft", algorithm]}, **{algorithm: {**section, **changes}})


def run(params, inputs: dict, tmp: Path, **kwargs) -> dict:
    paths = Paths(**inputs, policy=tmp / "policy", checkpoints=tmp / "ckpt", curves=tmp / "live")
    return align.run(params, paths, **kwargs)


def adapter(tmp: Path) -> dict:
    return load_file(tmp / "policy" / "adapter_model.safetensors")


def first_logged(tmp: Path, metric: str) -> float:
    """The first point of a dvclive curve (`train/rewards/margins`)."""
    lines = (tmp / "live" / "align" / "plots" / "metrics" / f"{metric}.tsv").read_text().splitlines()
    return float(lines[1].split("\t")[-1])


def test_the_algorithms_are_policies_evaluation_can_name():
    assert ALGORITHMS == ("ppo", "dpo", "grpo", "mdpo") and set(ALGORITHMS) <= set(POLICIES)
    params_for("dpo").validate(Path("."))
    with pytest.raises(ConfigError, match=r"grpo\.batch_size: must be a multiple of grpo\.num_generations"):
        params_for("grpo", batch_size=3).validate(Path("."))
    with pytest.raises(ConfigError, match=r"grpo\.save_steps: must be a multiple of grpo\.num_iterations"):
        params_for("grpo", num_iterations=2, save_steps=3).validate(Path("."))
    params_for("grpo", num_iterations=2, save_steps=4).validate(Path("."))
    with pytest.raises(ConfigError, match=r"dpo\.beta: must be > 0"):
        params_for("dpo", beta=0.0).validate(Path("."))
    params_for("mdpo").validate(Path("."))
    with pytest.raises(ConfigError, match=r"mdpo\.anchor_weight: must be >= 0"):
        params_for("mdpo", anchor_weight=-1.0).validate(Path("."))
    with pytest.raises(ConfigError, match=r"mdpo\.max_eval_sequences: must be > 0"):
        params_for("mdpo", max_eval_sequences=0).validate(Path("."))


def test_mismatch_pairs_have_no_dpo_form():
    rows, dropped = preference_rows(synthetic_pairs("train", 10))
    assert dropped == 2 and len(rows["prompt"]) == 8
    assert rows["prompt"][0][0]["role"] == "system" and rows["prompt"][0][-1] == {"role": "user",
                                                                                   "content": "hi! how are you?"}
    assert rows["chosen"][0] == [{"role": "assistant", "content": "i love my dogs."}]


@pytest.mark.parametrize("algorithm", ["dpo", "grpo", "mdpo"])
def test_a_run_writes_the_adapter_and_its_metrics(algorithm, straight):
    metrics, folder = straight(algorithm)
    assert (metrics["algorithm"], metrics["steps"], metrics["resumed_from_step"]) == (algorithm, 2, 0)
    assert metrics["trainable_dtype"] == "float32" and metrics["processes"] == 1 and metrics["eval_prompts"] == 2
    for key in ("train_loss", "sft_reward", f"{algorithm}_reward", "reward_gain", "peak_memory_mb", "wall_s"):
        assert metrics[key] is not None, key
    saved = adapter(folder)
    assert saved and not any(".ref." in key for key in saved)  # the trained adapter alone, at the folder's root
    assert not list((folder / "ckpt" / "align").glob("checkpoint-*"))
    if algorithm == "dpo":
        assert (metrics["train_pairs"], metrics["mismatch_pairs_left_out"]) == (8, 2)
        # the reference is the SFT adapter: before the first update the implicit reward margin is exactly 0 (against
        # the adapter-disabled base model it would not be: the SFT fixture's adapter moves every log-prob)
        assert first_logged(folder, "train/rewards/margins") == 0.0
    elif algorithm == "mdpo":
        assert metrics["train_pairs"] == 8 and metrics["valid_pairs"] == 4
        assert first_logged(folder, "train/margin") == 0.0  # the reference is the SFT policy, as in DPO
    else:  # sampled with top_k 0 although the base model's generation_config says 5 (see `grpo_base`)
        assert metrics["sampler_logprob_gap_max"] < 1e-4 and metrics["eval_reward"] is not None


@pytest.mark.parametrize("algorithm", ["dpo", "grpo", "mdpo"])
def test_a_stopped_run_resumes_to_the_same_adapter_and_other_params_do_not(algorithm, straight, inputs, tmp_path):
    params = params_for(algorithm)
    assert run(params, inputs(algorithm), tmp_path, stop_after=1) == {"algorithm": algorithm, "stopped_after": 1}
    paths, fingerprint = Paths(**inputs(algorithm)), {"dpo": dpo.fingerprint, "grpo": grpo.fingerprint,
                                                "mdpo": mdpo.fingerprint}[algorithm]
    copy = shutil.copytree(tmp_path / "ckpt" / "align", tmp_path / "copy")
    assert training.prepare_checkpoints(copy, fingerprint(params, paths)) == str(copy / "checkpoint-1")
    assert training.prepare_checkpoints(copy, fingerprint(params_for(algorithm, beta=0.2), paths)) is None
    assert not list(copy.glob("checkpoint-*"))  # wiped: a checkpoint of other params is never resumed

    resumed = run(params, inputs(algorithm), tmp_path)
    assert (resumed["resumed_from_step"], resumed["steps"]) == (1, 2)
    expected, again = adapter(straight(algorithm)[1]), adapter(tmp_path)
    assert expected.keys() == again.keys()
    assert all(torch.allclose(expected[k], again[k], atol=1e-6) for k in expected)


def test_dpo_prefers_the_chosen_reply_more_than_the_sft_policy(straight, tiny_model_dir, sft_adapter, tokenizer):
    """Every pair has the same chosen and rejected replies: after DPO the policy's log-prob margin of chosen over
    rejected exceeds the SFT policy's, measured by our own likelihood code, not TRL's logs (a swapped pair would
    lower it)."""
    metrics, folder = straight("dpo")
    assert metrics["eval_preference_accuracy"] == 1.0
    rows, _ = preference_rows(synthetic_pairs("valid", 2))
    chats = [prompt + reply for prompt, chosen, rejected in zip(rows["prompt"], rows["chosen"], rows["rejected"])
             for reply in (chosen, rejected)]

    def margin(adapter_dir: Path) -> float:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
        scores = reply_logprobs(model, tokenizer, chats)
        return sum(scores[0::2]) - sum(scores[1::2])

    assert margin(folder / "policy") > margin(sft_adapter) + 0.1


def test_grpo_stops_when_its_sampler_is_not_its_scorer(inputs, tiny_model_dir, tmp_path):
    """min_p 0.5 in the base model's generation_config (TRL leaves it to the model's config) truncates what GRPO
    samples: the first-batch check stops the run before any step."""
    base = with_generation_config(tiny_model_dir, tmp_path, min_p=0.5)
    with pytest.raises(RuntimeError, match="sampler and scorer disagree"):
        run(params_for("grpo"), {**inputs("grpo"), "base": base}, tmp_path)
    assert not list((tmp_path / "ckpt" / "align").glob("checkpoint-*"))


def test_grpo_steps_num_iterations_times_on_each_generated_batch(inputs, tmp_path, monkeypatch):
    """4 steps at num_iterations 2 generate (and so reward) 2 training batches, not 4; then the last evaluation."""
    rewarded = []
    make_reward = grpo.persona_reward

    def counting_reward(*args):
        reward = make_reward(*args)

        def persona_reward(prompts, **kwargs):
            rewarded.append(len(prompts))
            return reward(prompts, **kwargs)
        return persona_reward

    monkeypatch.setattr(grpo, "persona_reward", counting_reward)
    params = params_for("grpo", num_iterations=2, max_steps=4, save_steps=2, eval_steps=10)
    metrics = run(params, inputs("grpo"), tmp_path)
    assert (metrics["steps"], metrics["num_iterations"]) == (4, 2)
    assert rewarded == [2, 2, 2]  # 2 batches of 1 prompt x 2 replies, then the final evaluation's 1 prompt x 2


def test_mdpo_loss_is_the_conditional_term_plus_the_weighted_anchor():
    """Hand-computed: margins 1.0 and -0.5 at beta 2; the anchor on the own-persona log-ratios 0.5 and 0.0."""
    logratios = torch.tensor([0.5, 0.0, -0.5, 0.5])  # own sides, then other sides
    loss, margin = mdpo.conditional_loss(logratios, beta=2.0, anchor_weight=0.5)
    assert margin.tolist() == [1.0, -0.5]
    softplus = torch.nn.functional.softplus  # -log sigmoid(x) = softplus(-x)
    conditional = (softplus(torch.tensor(-2.0)) + softplus(torch.tensor(1.0))) / 2
    anchor = (softplus(torch.tensor(-1.0)) + softplus(torch.tensor(0.0))) / 2
    assert torch.isclose(loss, conditional + 0.5 * anchor)
    assert torch.isclose(mdpo.conditional_loss(logratios, 2.0, 0.0)[0], conditional)


def test_mdpo_valid_accuracy_ci_resamples_dialogues_not_pairs():
    """20 held-out pairs from 2 dialogues: after training, all of one dialogue's pairs rank right and none of the
    other's. Resampling the 2 dialogues gives a CI from 0 to 1; resampling the 20 pairs would give a narrow one."""
    before = [0.0] * 20 + [1.0] * 20  # own-persona log-probs, then other-persona: SFT ranks every pair wrong
    after = [1.0] * 10 + [0.0] * 10 + [0.5] * 20
    accuracy = mdpo.persona_accuracy(before, after, ["a"] * 10 + ["b"] * 10, seed=0)
    assert (accuracy["valid_pairs"], accuracy["valid_persona_accuracy_sft"], accuracy["valid_persona_accuracy"]) == (
        20, 0.0, 0.5)
    assert accuracy["valid_persona_accuracy_gain"] == 0.5
    assert (accuracy["valid_persona_accuracy_gain_ci_low"], accuracy["valid_persona_accuracy_gain_ci_high"]) == (
        0.0, 1.0)


def test_mdpo_pairs_put_one_gold_reply_under_its_own_and_another_train_persona(prepared, tokenizer):
    dialogues = data.read_dialogues(prepared / "train.jsonl")
    pairs = mdpo.conditional_pairs(dialogues, 6, 1, seed=3)
    assert len(pairs) == 6 and pairs == mdpo.conditional_pairs(dialogues, 6, 1, seed=3)
    train_personas = {data.persona_key(p) for d in dialogues for p in d.personas}
    for prompt, other in pairs:
        assert data.persona_key(other) != data.persona_key(prompt.facts) and data.persona_key(other) in train_personas
    rows = mdpo.encode_pairs(pairs, tokenizer, 256)
    assert [row["dialogue"] for row in rows] == [prompt.dialogue for prompt, _ in pairs]  # every pair fits 256
    for row in rows:  # the scored tokens are the same reply on both sides
        own = [t for t, m in zip(row["own_ids"], row["own_mask"]) if m]
        assert own == [t for t, m in zip(row["other_ids"], row["other_mask"]) if m] and own
    assert len(mdpo.encode_pairs(pairs, tokenizer, 8)) == 0  # nothing fits 8 tokens: dropped, not cut


def test_mdpo_raises_the_own_persona_margin_it_trains_on(straight, tiny_model_dir, sft_adapter, prepared, tokenizer):
    """The trained policy's own-persona minus other-persona log-prob margin on its training pairs, measured again
    here from the saved adapter by our own scoring, exceeds the SFT policy's (a swapped sign would lower it); on the
    held-out pairs the same measure gives the accuracies the metrics report."""
    metrics, folder = straight("mdpo")
    params = params_for("mdpo")

    def rows(split: str, n: int, seed: int) -> list[dict]:
        dialogues = data.read_dialogues(prepared / f"{split}.jsonl")
        return mdpo.encode_pairs(mdpo.conditional_pairs(dialogues, n, params.mdpo.max_history_turns, seed), tokenizer,
                                 params.model.max_length)

    def margins(adapter_dir: Path, pairs: list[dict]) -> list[float]:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
        scores = mdpo.reply_logprobs(model, pairs, tokenizer.pad_token_id, 4)
        return [own - other for own, other in zip(scores[:len(pairs)], scores[len(pairs):])]

    train = rows("train", params.mdpo.train_n, params.seed)
    assert sum(margins(folder / "policy", train)) > sum(margins(sft_adapter, train)) + 0.1
    valid = rows("valid", params.mdpo.max_eval_sequences, mdpo.derive_seed(params.seed, "mdpo-valid"))
    for adapter_dir, key in ((folder / "policy", "valid_persona_accuracy"),
                             (sft_adapter, "valid_persona_accuracy_sft")):
        assert metrics[key] == round(sum(m > 0 for m in margins(adapter_dir, valid)) / len(valid), 4)


def test_the_mdpo_probe_trains_without_a_reward_model_and_writes_only_under_its_folder(straight, inputs, tmp_path):
    """scripts/mdpo_probe.py: the align stage's mDPO from a run's SFT adapter with `mdpo.*` overridden. Without
    sampling or a reward model (the run's reward folder is missing here) it reports the held-out valid pairs as the
    stage does; its policy and metrics go under its own folder; a key mdpo does not have is refused."""
    spec = importlib.util.spec_from_file_location("mdpo_probe", REPO / "scripts" / "mdpo_probe.py")
    probe_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe_script)
    params = probe_script.with_overrides(params_for("mdpo"), ["mdpo.anchor_weight=0"])
    assert params.mdpo.anchor_weight == 0.0 and params.mdpo.lr == params_for("mdpo").mdpo.lr
    assert probe_script.with_overrides(params, ["mdpo.gradient_checkpointing=true"]).mdpo.gradient_checkpointing is True
    for bad in ("mdpo.no_such_key=1", "anchor_weight=0", "mdpo.anchor_weight=-1"):
        with pytest.raises(ConfigError):
            probe_script.with_overrides(params, [bad])

    held_out_rewards, sample_chats = trl_align.held_out_rewards, mdpo.sample_chats
    read = Paths(**{**inputs("mdpo"), "reward": tmp_path / "no-reward"})
    metrics = probe_script.probe(params, read, tmp_path / "out")
    assert trl_align.held_out_rewards is held_out_rewards  # the stage's own code is left as it was
    assert mdpo.sample_chats is sample_chats
    assert (metrics["steps"], metrics["anchor_weight"], metrics["valid_pairs"]) == (2, 0.0, 4)
    assert metrics["valid_persona_accuracy_sft"] == straight("mdpo")[0]["valid_persona_accuracy_sft"]
    assert "reward_gain" not in metrics
    assert (tmp_path / "out" / "models" / "policy" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
