"""The trained module and its anchor: policy + value head as one module, loaded with a frozen reference.

Policy = base model + a trainable LoRA adapter initialised to the SFT adapter's weights.
Reference = the same weights with a frozen copy of the SFT adapter switched in (`ppo.reference:
sft`), or with adapters disabled (`base`), through `persona.models.policy`, the project's one
adapter switch: never a second copy of the model. Value = a linear head on the policy's last
hidden states, zero-initialised, so with normalised rewards the first value loss is the return's
variance (~1), not a random head's guess.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from persona.config import PPOConfig
from persona.models import load_for_training
from persona.ppo.rollout import Packed, response_logits

TRAINABLE, REFERENCE = "default", "reference"  # adapter names; the trainable one saves at the folder's root


class PolicyWithValue(nn.Module):
    """The policy and its value head as one module, so DDP syncs both with one backward."""

    def __init__(self, policy, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        for layer in policy.modules():  # dropout would make the first PPO ratio differ from 1 for no reason
            if isinstance(layer, nn.Dropout):
                layer.p = 0.0

    def forward(self, input_ids, attention_mask, response_mask, prompt_width: int, temperature: float):
        packed = Packed(input_ids, attention_mask, response_mask, prompt_width)
        logits, hidden = response_logits(self.policy, packed, temperature, with_hidden=True)
        return logits, self.value_head(hidden.float()).squeeze(-1)


def load_policy(base_path: Path, sft_path: Path, cfg: PPOConfig, compute):
    """Base + trainable adapter (= SFT weights) + frozen reference adapter (when reference = sft)."""
    from peft import PeftModel

    if not (sft_path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{sft_path}: no SFT adapter; run the `sft` stage first")
    model, tokenizer = load_for_training(base_path, compute, cfg.gradient_checkpointing)
    model = PeftModel.from_pretrained(model, str(sft_path), adapter_name=TRAINABLE, is_trainable=True)
    if cfg.reference == "sft":
        model.load_adapter(str(sft_path), adapter_name=REFERENCE, is_trainable=False)
    model.set_adapter(TRAINABLE)
    return model, tokenizer


def reference_name(kind: str) -> str:
    """The `persona.models.policy` name of the reference `ppo.reference: kind`."""
    return "base" if kind == "base" else REFERENCE
