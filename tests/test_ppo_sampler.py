"""The merged rollout sampler: a plain copy that applies exactly the policy's weights (LoRA, 4-bit, GPT-2's
Conv1D and biases), follows every update once refreshed, and keeps PPO's first-rollout check within bound."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

from persona.config import LoraConfig
from persona.hardware import resolve_compute
from persona.models import lora_config
from persona.ppo.experience import SAMPLER_GAP_BOUNDS, make_experience
from persona.ppo.kl import FixedKL
from persona.ppo.policy import load_policy
from persona.ppo.rollout import exact_decoding, pack, response_logits, rollout, sampler_logprobs, token_logprobs
from persona.ppo.sampler import MergedSampler
from tests.test_ppo import TokenSetReward, batch, cfg_with, prepared, setup_loop  # noqa: F401 (fixtures)


def logits_of(model, tokenizer, texts):
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**encoded).logits * encoded["attention_mask"][..., None]


TEXTS = ["I have two dogs and a cat.", "what do you do for a living?"]


def nudge_adapter(model, seed: int) -> None:
    """What an optimizer step does to the trainable LoRA weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.requires_grad:
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_the_copy_applies_the_policy_and_follows_its_updates(tiny_model_dir, sft_adapter, tokenizer, quant):
    policy, _ = load_policy(tiny_model_dir, sft_adapter, cfg_with(), resolve_compute(quant, "fp32", "ppo"))
    policy.eval()
    sampler = MergedSampler(policy, torch.float32)
    copy = sampler.refresh()
    assert not any(hasattr(m, "lora_A") for m in copy.modules())  # a plain model: nothing to dispatch per token
    assert torch.allclose(logits_of(copy, tokenizer, TEXTS), logits_of(policy, tokenizer, TEXTS), atol=1e-4)
    nudge_adapter(policy, 0)
    stale = logits_of(copy, tokenizer, TEXTS)
    assert (stale - logits_of(policy, tokenizer, TEXTS)).abs().max() > 1e-2  # without a refresh it lags behind
    assert torch.allclose(logits_of(sampler.refresh(), tokenizer, TEXTS), logits_of(policy, tokenizer, TEXTS),
                          atol=1e-4)


def test_gpt2_conv1d_layers_and_biases_are_read_off_in_their_own_layout(tokenizer):
    """GPT-2 stores its linear weights transposed (Conv1D) and has biases; c_attn is 3x wider than it is tall."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    base = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, weight in base.named_parameters():
            if name.endswith(".bias"):
                weight.normal_(std=0.1)
    policy = get_peft_model(base, lora_config(LoraConfig(target_modules=["c_attn", "c_proj"]))).eval()
    nudge_adapter(policy, 1)
    copy = MergedSampler(policy, torch.float32).refresh()
    ids = torch.tensor([[1, 5, 9, 300, 42, 7]])
    with torch.no_grad():
        assert torch.allclose(copy(ids).logits, policy(ids).logits, atol=1e-4)


def test_a_ppo_step_on_the_merged_sampler_stays_on_policy(tiny_model_dir, sft_adapter, batch):  # noqa: F811
    """Through make_experience: the tokens come from the copy, their log-probs from the trained module, and the
    gap between the two is rounding, far inside the fp32 bound; after an update the copy follows."""
    cfg = dataclasses.replace(cfg_with(normalize_reward=False, max_new_tokens=8), sampler="merged")
    setup, _ = setup_loop(tiny_model_dir, sft_adapter, cfg)
    setup = dataclasses.replace(setup, sampler=MergedSampler(setup.unwrapped.policy, torch.float32))
    for seed in (0, 1):
        _, stats = make_experience(setup, batch, FixedKL(0.05).value, seed, measure_sampler=True)
        assert stats["sampler_logprob_gap_max"] < SAMPLER_GAP_BOUNDS["fp32"] / 10
        nudge_adapter(setup.unwrapped.policy, seed)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_half_precision_copy_stays_within_its_precision_bound(tiny_model_dir, sft_adapter, tokenizer, batch,  # noqa: F811
                                                                precision):
    """On a GPU the copy is stored in the compute dtype: its weights are rounded once, unlike the scorer's fp32
    LoRA weights, so it cannot match the scorer to fp32's 1e-3; the check uses the precision's own bound.
    (CPU autocast stands in for the GPU's here.)"""
    compute = resolve_compute("none", "fp32", "ppo")
    policy, _ = load_policy(tiny_model_dir, sft_adapter, cfg_with(), compute)
    nudge_adapter(policy, 2)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    copy = MergedSampler(policy.eval(), dtype).refresh()
    decoding = exact_decoding(cfg_with(temperature=0.8, max_new_tokens=4), seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # few tokens: half precision is slow on a CPU
        samples = rollout(copy, tokenizer, batch[:2], 1, decoding, with_logprobs=True)
        packed = pack(tokenizer, samples)
        scored = token_logprobs(response_logits(policy, packed, decoding.temperature)[0], packed)
    gap = ((sampler_logprobs(samples, packed) - scored).abs() * packed.response_mask).max().item()
    assert 1e-5 < gap < SAMPLER_GAP_BOUNDS[precision]  # visibly not fp32's exact agreement, yet within bound
