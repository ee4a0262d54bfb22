"""The rollout sampler (`ppo.sampler: merged`): a plain copy of the policy, LoRA merged in, to generate from.

Generating through the trained module pays, at every layer and every new token, for the unmerged
adapter (two extra matmuls and peft's dispatch) and, in QLoRA, for dequantising each 4-bit weight;
the GPU check measured 3-5x lost that way. The copy is a plain model of the same architecture in
the compute dtype, its weights read off the policy itself, and refreshed before every rollout, so it
always samples from the weights PPO is training. Only the tokens come from it: every log-prob PPO
divides by, every value and every KL still comes from the trained module (experience.score_tokens),
and each run's first-rollout sampler check bounds how far the copy's distribution is from the
scorer's (rounding only: fp32 copies agree to ~1e-5 nats; fp16/bf16 copies to what experience.py's
precision-aware bounds allow).

Each weight is read off its layer's own forward, W = layer(I) - layer(0): whatever wraps the layer
(a LoRA adapter, a bitsandbytes 4-bit weight, GPT-2's transposed Conv1D), the copy applies what
the layer applies, with no per-format merge code to get wrong.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from persona.models import eval_mode


def linear_like(module: nn.Module) -> bool:
    """An nn.Linear or transformers' Conv1D (GPT-2's linear layers, their weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (nn.Linear, Conv1D))


def adapted(module: nn.Module) -> bool:
    """A LoRA-wrapped layer: its effective weight changes with every update."""
    return hasattr(module, "lora_A")


def quantized(module: nn.Module) -> bool:
    """A layer whose weight is not a plain float tensor (bitsandbytes 4-bit): only its forward can read it."""
    weight = getattr(module, "weight", None)
    return weight is not None and not weight.dtype.is_floating_point


@torch.no_grad()
def applied_weight(layer: nn.Module, in_features: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) with layer(x) = x @ A + b for every x, read off the layer's forward: A = layer(I) - layer(0)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
    probe = torch.cat([torch.eye(in_features, device=device, dtype=dtype),
                       torch.zeros(1, in_features, device=device, dtype=dtype)])
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        out = layer(probe).float()
    return out[:-1] - out[-1], out[-1]


class MergedSampler:
    """A plain model of the policy's architecture in `dtype`, holding the weights the policy applies with its
    active adapter (PPO's trainable one). `refresh()` before each rollout returns the model to generate from."""

    def __init__(self, peft_model, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.source = peft_model
        inner = peft_model.get_base_model()  # the transformers model, LoRA layers injected in place
        config = copy.deepcopy(inner.config)
        config.quantization_config = None  # the copy is plain floats, whatever the policy is stored in
        self.device = next(inner.parameters()).device
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.model.generation_config = copy.deepcopy(inner.generation_config)
        self.model.requires_grad_(False)
        read_off = {name for name, module in self.model.named_modules()
                    if linear_like(module) and (adapted(inner.get_submodule(name))
                                                or quantized(inner.get_submodule(name)))}
        self.adapted = sorted(name for name in read_off if adapted(inner.get_submodule(name)))
        self._copy_plain_tensors(inner, read_off)
        self._read_off(read_off)

    def _copy_plain_tensors(self, inner: nn.Module, read_off: set[str]) -> None:
        """Every parameter and buffer the copy does not read off a forward, by name (a LoRA-wrapped layer keeps
        its own weights under `base_layer`)."""
        with torch.no_grad():
            for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
                owner, _, leaf = name.rpartition(".")
                if owner in read_off:
                    continue
                source = inner.get_submodule(owner)
                source = source.get_base_layer() if adapted(source) else source
                tensor.copy_(getattr(source, leaf))

    @torch.no_grad()
    def _read_off(self, names) -> None:
        from transformers.pytorch_utils import Conv1D

        inner = self.source.get_base_model()
        with eval_mode(self.source):
            for name in names:
                target = self.model.get_submodule(name)
                in_features = target.weight.shape[0] if isinstance(target, Conv1D) else target.weight.shape[1]
                applied, bias = applied_weight(inner.get_submodule(name), in_features, self.device)
                target.weight.copy_(applied if isinstance(target, Conv1D) else applied.T)
                if target.bias is not None:
                    target.bias.copy_(bias)

    def refresh(self) -> nn.Module:
        """The copy, with the adapter's current weights merged in (only adapted layers change after an update)."""
        self._read_off(self.adapted)
        return self.model
