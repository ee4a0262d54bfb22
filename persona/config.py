"""Typed, validated view of `params.yaml`.

Each param is documented by its comment in params.yaml, the one reference (tests/test_params_doc.py checks it).

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
ALGORITHMS = ("ppo", "dpo", "grpo", "mdpo")  # what the `align` stage can run
# base model, + SFT adapter, + the aligned adapter: `aligned` (whatever align.algorithm trains) or its algorithm's name
POLICIES = ("base", "sft", "aligned", *ALGORITHMS)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Quant = Literal["auto", "nf4", "none"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
# transformers `optim` names; paged_* page optimizer state through CUDA unified memory
Optimizer = Literal["auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]


class ConfigError(ValueError):
    """A bad parameter; the message names its key (e.g. `sft.lr`)."""


# Keys and values a params.yaml once had: an old file fails with the reason, not just "unknown key".
RETIRED_KEYS = {
    "ppo.top_p": "removed: PPO scores the full softmax at ppo.temperature, so it samples from it (no top-p/top-k cut)",
    "ppo.kl_horizon": "replaced by ppo.kl_horizon_fraction (the controller's horizon as a share of the run's samples)",
}
RETIRED_VALUES = {
    ("ppo.kl_estimator", "k3"): "k3 is no longer accepted: as a reward its gradient is not grad KL(pi || ref) "
                                "(biased, no restoring force near the reference); use k1 (reward) or k2 (loss)",
}


@dataclass(frozen=True)
class DataConfig:
    source: str = "sample"
    hub_id: str = "google/Synthetic-Persona-Chat"
    fraction: float = 1.0
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
    name: str = "smollm2-135m-instruct"
    trust_remote_code: bool = False
    max_length: int = 768

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
    target_modules: list[str] | str = "auto"

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
    quant: Quant = "auto"
    precision: Precision = "auto"
    optimizer: Optimizer = "auto"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    gradient_checkpointing: bool = False
    logging_steps: int = 5
    eval_steps: int = 20
    save_steps: int = 20
    max_eval_sequences: int = 64

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
    layout: Literal["conversation", "turn"] = "conversation"
    max_steps: int = 20
    lr: float = 1e-3
    eval_steps: int = 8
    save_steps: int = 8
    max_eval_sequences: int = 0


@dataclass(frozen=True)
class PairShares:
    """Share of preference pairs made by each strategy (they must sum to 1)."""
    swap: float = 0.45
    mismatch: float = 0.3
    contradiction: float = 0.15
    generic: float = 0.1


@dataclass(frozen=True)
class PairsConfig:
    train_n: int = 320
    valid_n: int = 80
    shares: PairShares = field(default_factory=PairShares)
    chosen: Literal["gold", "sample"] = "gold"
    swap_candidates: int = 2
    max_history_turns: int = 4
    max_new_tokens: int = 32
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        for key in ("train_n", "valid_n", "swap_candidates", "max_history_turns", "max_new_tokens", "batch_size"):
            _check(getattr(self, key) > 0, f"pairs.{key}", "must be > 0")
        shares = dataclasses.asdict(self.shares)
        for name, share in shares.items():
            _check(0 <= share <= 1, f"pairs.shares.{name}", "must be in [0, 1]")
        _check(abs(sum(shares.values()) - 1) < 1e-6, "pairs.shares", f"must sum to 1, not {sum(shares.values()):g}")
        _check(self.temperature > 0, "pairs.temperature", "must be > 0 (pairs need sampled replies)")
        _check(0 < self.top_p <= 1, "pairs.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "pairs.top_k", "must be >= 0")


@dataclass(frozen=True)
class RewardConfig(TrainConfig):
    kind: Literal["model", "likelihood", "both"] = "model"
    batch_size: int = 8
    lr: float = 3e-3
    max_eval_sequences: int = 16
    center_rewards: float = 0.01
    lora_top_layers: int = 8
    score_batch_size: int = 16
    likelihood_personas: int = 3
    likelihood_contrast: Literal["mean", "max"] = "mean"
    copy_penalty: float = 1.0
    repeat_penalty: float = 1.0

    def validate(self, section: str) -> None:
        super().validate(section)
        _check(self.likelihood_personas > 0, f"{section}.likelihood_personas", "must be > 0")
        _check(self.copy_penalty >= 0, f"{section}.copy_penalty", "must be >= 0")
        _check(self.repeat_penalty >= 0, f"{section}.repeat_penalty", "must be >= 0")
        _check(self.center_rewards >= 0, f"{section}.center_rewards", "must be >= 0")
        _check(self.lora_top_layers >= 0, f"{section}.lora_top_layers", "must be >= 0")
        _check(self.score_batch_size > 0, f"{section}.score_batch_size", "must be > 0")


@dataclass(frozen=True)
class PPOConfig:
    """Our PPO loop (persona/ppo); every knob of the algorithm is here, none in the code."""
    quant: Quant = "auto"
    precision: Precision = "auto"
    optimizer: Optimizer = "auto"
    reference: Literal["sft", "base"] = "sft"
    max_steps: int = 12
    rollout_batch_size: int = 8
    turns: int = 1
    max_history_turns: int = 4
    max_new_tokens: int = 32
    temperature: float = 0.8
    minibatch_size: int = 4
    ppo_epochs: int = 2
    lr: float = 2e-4
    max_grad_norm: float = 1.0
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_estimator: Literal["k1", "k2"] = "k1"
    kl_coef: float = 0.05
    kl_target: float = 2.0
    kl_horizon_fraction: float = 0.25
    kl_stop: float = 20.0
    kl_negative_tolerance: float = 2.0
    normalize_reward: bool = True
    missing_eos_penalty: float = -1.0
    save_steps: int = 4
    gradient_checkpointing: bool = False
    eval_n: int = 32
    batch_size: int = 8
    sampler: Literal["merged", "policy"] = "merged"

    def validate(self) -> None:
        for key in ("max_steps", "rollout_batch_size", "max_new_tokens", "minibatch_size", "ppo_epochs",
                    "save_steps", "eval_n", "batch_size", "max_history_turns"):
            _check(getattr(self, key) > 0, f"ppo.{key}", "must be > 0")
        _check(1 <= self.turns <= 4, "ppo.turns", "must be 1 (single reply) to 4")
        _check(self.rollout_batch_size * self.turns % self.minibatch_size == 0, "ppo.minibatch_size",
               "must divide rollout_batch_size * turns")
        for key in ("lr", "max_grad_norm", "clip_range", "value_clip", "temperature", "kl_horizon_fraction",
                    "kl_stop"):
            _check(getattr(self, key) > 0, f"ppo.{key}", "must be > 0")
        for key in ("gamma", "lam"):
            _check(0 < getattr(self, key) <= 1, f"ppo.{key}", "must be in (0, 1]")
        for key in ("vf_coef", "entropy_coef", "kl_coef", "kl_target", "kl_negative_tolerance"):
            _check(getattr(self, key) >= 0, f"ppo.{key}", "must be >= 0")
        _check(self.kl_coef > 0 or self.kl_target == 0, "ppo.kl_coef",
               "must be > 0 when ppo.kl_target > 0 (the adaptive controller scales it, so 0 would stay 0)")
        _check(self.kl_horizon_fraction * self.max_steps > 0.2 or self.kl_target == 0, "ppo.kl_horizon_fraction",
               "times ppo.max_steps must exceed 0.2: a step moves the coefficient by up to 0.2 / that product, "
               "so a smaller one could drive it to 0 or below")
        _check(self.missing_eos_penalty <= 0, "ppo.missing_eos_penalty", "must be <= 0")


@dataclass(frozen=True)
class TRLAlignConfig(TrainConfig):
    """What the Trainer-based align algorithms (dpo, grpo, mdpo) share: the KL strength, and how the held-out reward
    samples."""
    beta: float = 0.1
    eval_n: int = 32
    max_history_turns: int = 4
    max_new_tokens: int = 32
    temperature: float = 0.8

    def validate(self, section: str) -> None:
        super().validate(section)
        for key in ("beta", "temperature", "eval_n", "max_history_turns", "max_new_tokens"):
            _check(getattr(self, key) > 0, f"{section}.{key}", "must be > 0")


@dataclass(frozen=True)
class DPOConfig(TRLAlignConfig):
    """TRL's DPOTrainer on the preference pairs (persona/dpo.py), used when align.algorithm: dpo."""
    max_steps: int = 40
    lr: float = 5e-4
    eval_steps: int = 20
    save_steps: int = 20
    max_eval_sequences: int = 32


@dataclass(frozen=True)
class GRPOConfig(TRLAlignConfig):
    """TRL's GRPOTrainer with the reward model as its reward (persona/grpo.py), used when align.algorithm: grpo."""
    max_steps: int = 12
    batch_size: int = 8
    lr: float = 2e-4
    eval_steps: int = 6
    save_steps: int = 4
    max_eval_sequences: int = 8
    beta: float = 0.04
    num_generations: int = 4
    num_iterations: int = 1
    missing_eos_penalty: float = -1.0

    def validate(self, section: str) -> None:
        super().validate(section)
        _check(self.num_iterations >= 1, f"{section}.num_iterations", "must be >= 1")
        # TRL keeps a generated batch in memory only: a checkpoint inside its iterations would resume onto a new one
        _check(self.save_steps % self.num_iterations == 0, f"{section}.save_steps",
               f"must be a multiple of {section}.num_iterations (checkpoints between generated batches)")
        _check(self.num_generations >= 2, f"{section}.num_generations",
               "must be >= 2 (GRPO compares a prompt's replies)")
        _check(self.batch_size % self.num_generations == 0, f"{section}.batch_size",
               f"must be a multiple of {section}.num_generations (whole groups of one prompt's replies)")
        _check(self.max_eval_sequences > 0, f"{section}.max_eval_sequences", "must be > 0")
        _check(self.missing_eos_penalty <= 0, f"{section}.missing_eos_penalty", "must be <= 0")


@dataclass(frozen=True)
class MDPOConfig(DPOConfig):
    """mDPO's conditional preference on gold train replies under their own vs another persona (persona/mdpo.py),
    used when align.algorithm: mdpo: DPO's settings, and where its pairs come from."""
    max_eval_sequences: int = 64
    train_n: int = 320
    anchor_weight: float = 1.0

    def validate(self, section: str) -> None:
        super().validate(section)
        _check(self.train_n > 0, f"{section}.train_n", "must be > 0")
        _check(self.max_eval_sequences > 0, f"{section}.max_eval_sequences",
               "must be > 0 (the held-out pairs the SFT policy and the trained one are compared on)")
        _check(self.anchor_weight >= 0, f"{section}.anchor_weight", "must be >= 0")


@dataclass(frozen=True)
class AlignConfig:
    """The `align` stage: which algorithm turns the SFT adapter into the aligned policy."""
    algorithm: Literal[ALGORITHMS] = "ppo"


@dataclass(frozen=True)
class EvaluateConfig:
    """Held-out evaluation; each `*_n` bounds one family of metrics so CPU runs stay short."""
    split: Literal["test", "valid"] = "test"
    policies: list[str] = field(default_factory=lambda: ["base", "sft", "aligned"])
    n: int = 32
    likelihood_n: int = 16
    persona_candidates: int = 5
    grounding_candidates: int = 10
    hits_n: int = 8
    reply_candidates: int = 20
    multiturn_n: int = 6
    multiturn_turns: int = 5
    perplexity_sequences: int = 16
    max_history_turns: int = 6
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    batch_size: int = 8
    parrot_threshold: float = 0.6
    relevance_threshold: float = 0.5
    embedding_model: str = "all-minilm-l6-v2"
    nli_model: str = ""
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
        _check(self.top_k >= 0, "evaluate.top_k", "must be >= 0")
        for key in ("parrot_threshold", "relevance_threshold"):
            _check(0 < getattr(self, key) <= 1, f"evaluate.{key}", "must be in (0, 1]")


@dataclass(frozen=True)
class LaunchConfig:
    """How the training stages (sft, reward, ppo) start: always through `accelerate launch`."""
    processes: int = 1
    accelerate_config: str = ""

    def validate(self, base_dir: Path) -> None:
        _check(self.processes >= 1, "launch.processes", "must be >= 1")
        if self.accelerate_config:
            path = resolve_path(base_dir, self.accelerate_config)
            _check(path.is_file(), "launch.accelerate_config", f"{path} does not exist")


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    mdpo: MDPOConfig = field(default_factory=MDPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def validate(self, base_dir: Path) -> None:
        # numpy's legacy seeding (transformers' set_seed) takes 0 <= seed < 2**32; checked here, before any work
        _check(0 <= self.seed < 2**32, "seed", f"{self.seed} is outside 0 .. 2**32-1")
        self.data.validate(base_dir)
        self.model.validate(base_dir)
        self.lora.validate()
        self.launch.validate(base_dir)
        self.sft.validate("sft")
        self.pairs.validate()
        self.reward.validate("reward")
        self.ppo.validate()
        self.dpo.validate("dpo")
        self.grpo.validate("grpo")
        self.mdpo.validate("mdpo")
        self.evaluate.validate()
        for name in self.evaluate.policies:
            _check(name in ("base", "sft", "aligned", self.align.algorithm), "evaluate.policies",
                   f"{name!r} is not trained by this pipeline (align.algorithm: {self.align.algorithm})")
        resolved = self.evaluated_policies()
        _check(len(set(resolved)) == len(resolved), "evaluate.policies", f"names a policy twice: {resolved}")

    def evaluated_policies(self) -> list[str]:
        """`evaluate.policies` with `aligned` named after align.algorithm, as the metrics call it."""
        return [self.align.algorithm if name == "aligned" else name for name in self.evaluate.policies]

    def training_section(self, stage: str) -> str:
        """The params section with a training stage's quant/precision/optimizer: `align` reads its algorithm's."""
        return self.align.algorithm if stage == "align" else stage


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
        key = _join(prefix, unknown[0])
        if key in RETIRED_KEYS:
            raise ConfigError(f"{key}: {RETIRED_KEYS[key]}")
        raise ConfigError(f"unknown key {key!r}; allowed under {prefix or 'the top level'}: {sorted(names)}")
    values = {}
    for name, value in raw.items():
        key = _join(prefix, name)
        hint = hints[name]
        values[name] = from_dict(hint, value, key) if dataclasses.is_dataclass(hint) else _coerce(hint, value, key)
    return cls(**values)


def _coerce(hint, value, key: str):
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, str) and (key, value) in RETIRED_VALUES:
            raise ConfigError(f"{key}: {RETIRED_VALUES[key, value]}")
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
