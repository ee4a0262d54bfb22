"""PPO on the tiny random model: KL 0 at step 0, a frozen reference, a sampler that draws what is scored, a loop
that really optimises, resume."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from persona import align, data
from persona.data import read_dialogues
from persona.generation import Decoding
from persona.hardware import resolve_compute
from persona.models import lora_config
from persona.models import policy as switch_to
from persona.paths import Paths
from persona.ppo import rollout as ppo_rollout
from persona.ppo.checkpoint import run_fingerprint
from persona.ppo.experience import SAMPLER_GAP_BOUNDS, Setup, make_experience
from persona.ppo.kl import FixedKL
from persona.ppo.policy import PolicyWithValue, load_policy, reference_name
from persona.ppo.rollout import episodes, exact_decoding, pack, response_logits, rollout, token_logprobs
from persona.ppo.trainer import ppo_step
from persona.reward import REWARD_INFO
from tests.conftest import params_with

TINY_PPO = {"max_steps": 4, "rollout_batch_size": 4, "minibatch_size": 2, "max_new_tokens": 6, "save_steps": 2,
            "eval_n": 4, "batch_size": 4, "lr": 1e-3, "max_history_turns": 2}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    data.run(params_with(seed=1, data={"fraction": 0.5}), Paths(prepared=folder))
    return folder


@pytest.fixture(scope="module")
def reward_adapter(tiny_model_dir, tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(2)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(base, lora_config(params_with().lora, "SEQ_CLS"))
    for name, weight in model.named_parameters():
        if "lora_B" in name or "score" in name:
            torch.nn.init.normal_(weight, std=0.3)
    folder = tmp_path_factory.mktemp("reward")
    model.save_pretrained(folder)
    (folder / REWARD_INFO).write_text(json.dumps({"score_mean": 0.0, "score_std": 1.0}))
    return folder


def cfg_with(**changes):
    return dataclasses.replace(params_with(ppo=TINY_PPO).ppo, **changes)


@pytest.fixture(scope="module")
def batch(prepared):
    return episodes(read_dialogues(prepared / "train.jsonl"), 1, 2)[:4]


def samples_for(policy, tokenizer, batch, seed=0):
    return rollout(policy, tokenizer, batch, 1, Decoding(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=seed))


def test_kl_to_the_reference_is_zero_at_step_zero(tiny_model_dir, sft_adapter, tokenizer, batch):
    compute = resolve_compute("none", "fp32", "ppo")
    policy, _ = load_policy(tiny_model_dir, sft_adapter, cfg_with(reference="sft"), compute)
    packed = pack(tokenizer, samples_for(policy, tokenizer, batch))
    with torch.no_grad():
        own = token_logprobs(response_logits(policy, packed, 1.0)[0], packed)
        with switch_to(policy, reference_name("sft")) as ref:
            anchored = token_logprobs(response_logits(ref, packed, 1.0)[0], packed)
        with switch_to(policy, reference_name("base")) as ref:
            base = token_logprobs(response_logits(ref, packed, 1.0)[0], packed)
    assert torch.allclose(own, anchored, atol=1e-6)
    assert (own - base).abs().max() > 1e-3  # the base model is a different anchor
    assert all(p.requires_grad == (".default." in n) for n, p in policy.named_parameters())


def test_packed_logprobs_equal_unpadded_forward(tiny_model_dir, tokenizer, batch):
    """Left-padded prompts and right-padded replies score each token as an unpadded sequence would."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    packed = pack(tokenizer, samples_for(model, tokenizer, batch, seed=4))
    with torch.no_grad():
        batched = token_logprobs(response_logits(model, packed, 0.7)[0], packed)
        for row in range(packed.input_ids.shape[0]):
            ids = packed.input_ids[row][packed.attention_mask[row].bool()][None]
            n = int(packed.response_mask[row].sum())
            logits = model(input_ids=ids).logits[0, -n - 1:-1] / 0.7
            alone = torch.log_softmax(logits, -1).gather(-1, ids[0, -n:, None]).squeeze(-1)
            assert torch.allclose(batched[row, :n], alone, atol=1e-4)
            assert (batched[row, n:] == 0).all()


def sampler_gap(samples, tokenizer, model, temperature: float) -> float:
    """The largest |sampler - scorer| log-prob over the response tokens of `samples`."""
    packed = pack(tokenizer, samples)
    with torch.no_grad():
        scored = token_logprobs(response_logits(model, packed, temperature)[0], packed)
    return ((ppo_rollout.sampler_logprobs(samples, packed) - scored).abs() * packed.response_mask).max().item()


def test_the_sampler_draws_exactly_what_the_scorer_scores(tiny_model_dir, tokenizer, batch):
    """generate's own log-probs of the tokens it sampled are those rollout.py scores: PPO is on-policy."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cfg = cfg_with(temperature=0.8, max_new_tokens=8)
    samples = rollout(model, tokenizer, batch, 1, exact_decoding(cfg, seed=3), with_logprobs=True)
    assert all(len(s.reply.logprobs) == len(s.reply.token_ids) > 0 for s in samples)
    assert sampler_gap(samples, tokenizer, model, cfg.temperature) < 1e-4


def test_a_generation_config_cannot_truncate_the_rollout_sampler(tiny_model_dir, tokenizer, batch):
    """A model whose generation_config says top_k 5 and top_p 0.5 still samples PPO rollouts from the full softmax."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.generation_config.top_k, model.generation_config.top_p = 5, 0.5
    decoding = exact_decoding(cfg_with(temperature=0.8, max_new_tokens=8), seed=3)
    samples = rollout(model, tokenizer, batch, 1, decoding, with_logprobs=True)
    assert sampler_gap(samples, tokenizer, model, decoding.temperature) < 1e-4
    # what rollouts drew before top_k was passed explicitly: transformers' default top-50 cut, far off-policy
    cut = rollout(model, tokenizer, batch, 1, dataclasses.replace(decoding, top_k=50), with_logprobs=True)
    assert sampler_gap(cut, tokenizer, model, decoding.temperature) > 1.0


class TokenSetReward:
    """Programmatic reward: the share of reply tokens whose embedding points along a fixed direction."""

    def __init__(self, model, tokenizer):
        embeddings = model.get_input_embeddings().weight.detach()
        self.good = set(torch.nonzero(embeddings[:, 0] > 0).squeeze(-1).tolist())
        self.tokenizer = tokenizer

    def score_chats(self, chats):
        scores = []
        for chat in chats:
            ids = self.tokenizer(chat[-1]["content"], add_special_tokens=False)["input_ids"]
            scores.append(sum(i in self.good for i in ids) / max(len(ids), 1))
        return scores


def setup_loop(tiny_model_dir, sft_adapter, cfg, reward=TokenSetReward) -> tuple[Setup, torch.optim.Optimizer]:
    """What train_ppo builds, on the tiny model; `reward(policy, tokenizer)` makes the reward model."""
    policy, tokenizer = load_policy(tiny_model_dir, sft_adapter, cfg, resolve_compute("none", "fp32", "ppo"))
    module = PolicyWithValue(policy, policy.config.hidden_size)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.lr)
    accelerator = Accelerator(cpu=True)
    module, optimizer = accelerator.prepare(module, optimizer)
    return Setup(accelerator, module, tokenizer, reward(policy, tokenizer), None, cfg), optimizer


def test_the_loop_raises_a_programmatic_reward_and_never_moves_the_reference(tiny_model_dir, sft_adapter, prepared,
                                                                           batch):
    """The tiny random model's logits are nearly flat (std ~0.16): sampled from the full softmax at temperature 1,
    a reply is 8 of 49k tokens drawn almost uniformly, and no 30-step run moves their share. At 0.05 the policy
    is about as peaked as a trained model's. (Before rollouts sampled what PPO scores, transformers' hidden
    top-50 cut did that sharpening at temperature 1, off-policy.)"""
    cfg = cfg_with(rollout_batch_size=8, minibatch_size=4, max_new_tokens=8, temperature=0.05, lr=3e-3,
                   kl_coef=0.01, normalize_reward=False, missing_eos_penalty=0.0)
    setup, optimizer = setup_loop(tiny_model_dir, sft_adapter, cfg)
    train = episodes(read_dialogues(prepared / "train.jsonl"), 1, 2)
    policy, tokenizer = setup.unwrapped.policy, setup.tokenizer
    probe = pack(tokenizer, samples_for(policy, tokenizer, batch))
    with torch.no_grad(), switch_to(policy, reference_name("sft")) as ref:
        reference_before = response_logits(ref, probe, 1.0)[0]
    controller, rewards = FixedKL(cfg.kl_coef), []
    for step in range(30):
        torch.manual_seed(step)
        stats = ppo_step(setup, optimizer, train[step * 8 % 64:][:8], controller, step)
        rewards.append(stats["reward"])
    with torch.no_grad():
        with switch_to(policy, reference_name("sft")) as ref:
            reference_after = response_logits(ref, probe, 1.0)[0]
        policy_after = response_logits(policy, probe, 1.0)[0]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards
    assert torch.equal(reference_before, reference_after)
    assert not torch.allclose(policy_after, reference_after, atol=1e-3)
    assert stats["kl"] > 0 and 0 <= stats["clip_fraction"] <= 1 and stats["entropy"] > 0


class NanReward:
    def __init__(self, policy, tokenizer):
        pass

    def score_chats(self, chats):
        return [float("nan")] * len(chats)


@pytest.mark.parametrize("estimator", ["k1", "k2"])
def test_k1_penalises_in_the_reward_and_k2_in_the_loss(tiny_model_dir, sft_adapter, batch, estimator):
    """Against the base model the SFT policy has a KL to penalise: k1 puts it on every token's reward, k2 leaves
    the rewards to the score and adds its own loss term to the update."""
    cfg = cfg_with(kl_estimator=estimator, reference="base", normalize_reward=False, missing_eos_penalty=0.0)
    setup, optimizer = setup_loop(tiny_model_dir, sft_adapter, cfg)
    experience, stats = make_experience(setup, batch, kl_coef=0.5, seed=0)
    mask = experience.mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()
    penalty = experience.rewards - last * experience.scores[:, None]
    k1 = (experience.old_logprobs - experience.ref_logprobs) * mask
    assert k1.abs().max() > 1e-3
    expected = -0.5 * k1 if estimator == "k1" else torch.zeros_like(k1)
    assert torch.allclose(penalty, expected, atol=1e-6)
    assert ("kl_loss" in ppo_step(setup, optimizer, batch, FixedKL(0.5), 0)) == (estimator == "k2")


def test_a_run_stops_when_its_sampler_is_not_its_scorer(tiny_model_dir, sft_adapter, reward_adapter, prepared,
                                                        tmp_path):
    """A min_p cut in the base model's generation_config (a logits processor that Decoding does not set, so
    transformers applies the model's value) reshapes what rollouts sample: the first rollout's check stops the
    run instead of training off-policy."""
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "min_p": 0.5}))
    params = params_with(ppo=TINY_PPO, model={"max_length": 256})
    with pytest.raises(RuntimeError, match="sampler and scorer disagree"):
        run(params, prepared, base, sft_adapter, reward_adapter, tmp_path / "run")


def test_non_finite_losses_skip_the_update(tiny_model_dir, sft_adapter, prepared, batch):
    cfg = cfg_with(normalize_reward=False)
    setup, optimizer = setup_loop(tiny_model_dir, sft_adapter, cfg, reward=NanReward)
    before = {n: p.detach().clone() for n, p in setup.module.named_parameters() if p.requires_grad}
    stats = ppo_step(setup, optimizer, batch, FixedKL(0.05), 0)
    assert stats["skipped"] == cfg.ppo_epochs * len(batch) // cfg.minibatch_size
    assert all(torch.equal(before[n], p) for n, p in setup.module.named_parameters() if p.requires_grad)


def test_multi_turn_rollout_feeds_replies_back(tiny_model_dir, tokenizer, prepared):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    multi = episodes(read_dialogues(prepared / "train.jsonl"), 3, 2)[:2]
    samples = rollout(model, tokenizer, multi, 3, Decoding(max_new_tokens=4, seed=1))
    assert len(samples) == 6
    for k, episode in enumerate(multi):
        first, second, third = samples[k], samples[2 + k], samples[4 + k]
        assert second.chat[:len(first.chat)] == first.chat
        assert second.chat[-2] == {"role": "assistant", "content": first.reply.text}
        assert second.chat[-1] == {"role": "user", "content": episode.partner_turns[0]}
        assert third.chat[-1] == {"role": "user", "content": episode.partner_turns[1]}


def run(params, prepared, tiny, sft, reward, tmp: Path, **kwargs):
    paths = Paths(prepared=prepared, base=tiny, sft=sft, reward=reward, policy=tmp / "ppo", checkpoints=tmp / "ckpt",
                  curves=tmp / "live")
    return align.run(params, paths, **kwargs)


def test_stage_metrics_and_resume_after_interruption(tiny_model_dir, sft_adapter, reward_adapter, prepared, tmp_path):
    params = params_with(ppo=TINY_PPO, model={"max_length": 256})
    straight = run(params, prepared, tiny_model_dir, sft_adapter, reward_adapter, tmp_path / "a")
    assert straight["steps"] == 4 and straight["processes"] == 1 and straight["eval_prompts"] == 4
    for key in ("sft_reward", "ppo_reward", "held_out_kl_k1", "held_out_kl_k3", "final_kl_coef",
                "rollout_tokens_per_s", "peak_memory_mb"):
        assert straight[key] is not None
    assert straight["kl_estimator"] == "k1" and straight["sampler_logprob_gap_max"] < SAMPLER_GAP_BOUNDS["fp32"]
    assert (tmp_path / "a" / "ppo" / "adapter_config.json").exists()
    assert list((tmp_path / "a" / "live" / "align" / "plots" / "metrics").rglob("kl_coef.tsv"))

    interrupted = run(params, prepared, tiny_model_dir, sft_adapter, reward_adapter, tmp_path / "b", stop_after=3)
    assert interrupted == {"algorithm": "ppo", "stopped_after": 3}
    resumed = run(params, prepared, tiny_model_dir, sft_adapter, reward_adapter, tmp_path / "b")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    a = load_file(tmp_path / "a" / "ppo" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "ppo" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert resumed["ppo_reward"] == pytest.approx(straight["ppo_reward"], abs=1e-4)
    # steps 1-2 replayed from the checkpoint, the interrupted run's point of step 3 replaced, not repeated
    assert curve_files(tmp_path / "b" / "live" / "align") == curve_files(tmp_path / "a" / "live" / "align")


def curve_files(live_dir: Path) -> dict[str, bytes]:
    """Every dvclive TSV under `live_dir`, by path: what the `plots` stage depends on."""
    return {path.relative_to(live_dir).as_posix(): path.read_bytes() for path in sorted(live_dir.rglob("*.tsv"))}


def test_a_multi_turn_step_trains_on_every_policy_turn(tiny_model_dir, sft_adapter, prepared):
    cfg = cfg_with(turns=2, rollout_batch_size=2, minibatch_size=2, normalize_reward=False)
    setup, optimizer = setup_loop(tiny_model_dir, sft_adapter, cfg)
    multi = episodes(read_dialogues(prepared / "train.jsonl"), 2, 2)[:2]
    before = {n: p.detach().clone() for n, p in setup.module.named_parameters() if p.requires_grad}
    stats = ppo_step(setup, optimizer, multi, FixedKL(0.05), 0)
    assert stats["skipped"] == 0 and all(torch.isfinite(torch.tensor(stats[k])) for k in ("policy_loss", "value_loss"))
    assert any(not torch.equal(before[n], p) for n, p in setup.module.named_parameters() if p.requires_grad)


def test_a_checkpoint_depends_on_both_the_sft_adapter_and_the_reward_model(tiny_model_dir, sft_adapter, reward_adapter,
                                                                          prepared, tmp_path):
    """Both folders hold an adapter_model.safetensors: neither digest may hide the other's."""
    sft, reward = shutil.copytree(sft_adapter, tmp_path / "sft"), shutil.copytree(reward_adapter, tmp_path / "reward")
    paths = Paths(prepared=prepared, base=tiny_model_dir, sft=sft, reward=reward)
    params = params_with(ppo=TINY_PPO)
    seen = [run_fingerprint(params, paths, 1)]
    for folder in (sft, reward):
        (folder / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes() + b" ")
        seen.append(run_fingerprint(params, paths, 1))
    assert seen[0] != seen[1] != seen[2] != seen[0]
