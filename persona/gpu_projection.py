"""The arithmetic of the GPU check's projection mode (`python -m persona.gpu_check --profile NAME`).

The check times a few steps of each stage at a profile's exact shapes; this module turns those
timings into the profile's full run: how many steps each stage would take on the profile's data,
the wall time that makes, a scaled estimate for a GPU that was not measured, and whether a stage's
peak memory fits the per-GPU bound. Plain functions of numbers, so tests check them with numbers.
It also names the architectures whose random-weight copies the check builds, without the hub.
"""
from __future__ import annotations

import math

from persona.config import Params

# google/Synthetic-Persona-Chat on the hub: the dataset viewer shows train 8.94k (rounded; 8,938 assumed),
# validation 1k and test 968 rows.
# The prepare stage pools the hub's three splits, keeps a `data.fraction` of them and re-splits by persona.
SPC_ROWS = 8_938 + 1_000 + 968
# Of SPC's 1,000 validation rows the prepare stage keeps 655 (345 malformed: 322 placeholders, 23 unprefixed
# lines) and the persona-disjoint split drops 95 of those 655 for persona overlap (README, data section:
# measured on ../shared/data/synthetic-persona-chat/valid.csv). The whole set is assumed to behave alike.
SPC_WELL_FORMED_SHARE = 655 / 1_000
SPC_KEPT_BY_SPLIT_SHARE = (655 - 95) / 655

# Dense fp16 tensor-core throughput (TFLOPS, without sparsity) from NVIDIA's datasheets: T4 65; L4 121 (242
# with sparsity); A100 312; H100 SXM and H200 989 (1,979 with sparsity). An H100 PCIe (756) is matched as
# "H100" and so taken for 1.3x faster than it is.
FP16_TENSOR_TFLOPS = {"T4": 65, "L4": 121, "A100": 312, "H100": 989, "H200": 989}
# The GPU each profile is written for (its header comment). gpu-24gb names several (RTX 3090/4090, A10G, L4):
# L4 stands for them, `--target` picks another GPU of FP16_TENSOR_TFLOPS.
PROFILE_TARGETS = {"kaggle-2xt4": "T4", "gpu-24gb": "L4", "a100-80gb": "A100"}
# Issue 12, item 4: a stage must fit a 16 GB T4 with margin.
MEMORY_BOUND_MB = 12 * 1024

# Architectures the check can build offline from a transformers config, by `model.name`: each model's
# config.json on the hub, shape fields only (rope, norms and dropout do not change step time or memory).
ARCHITECTURES = {
    "gpt2": ("GPT2Config", {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}),
    "gpt2-medium": ("GPT2Config", {"n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024,
                                   "vocab_size": 50257}),
    "smollm2-135m-instruct": ("LlamaConfig", {  # the bundled GGUF's config (models/base/config.json)
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True}),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": ("LlamaConfig", {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True}),
    "Qwen/Qwen2.5-1.5B-Instruct": ("Qwen2Config", {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "tie_word_embeddings": True}),
}
# `--size tiny`: the same family cut to CPU-test size.
TINY_SHAPES = {"GPT2Config": {"n_embd": 64, "n_layer": 2, "n_head": 4},
               "LlamaConfig": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2},
               "Qwen2Config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2}}


def architecture(name: str, tiny: bool = False) -> tuple[str, dict]:
    """(transformers config class name, its shape kwargs) for `model.name`; a clear error for any other name."""
    if name not in ARCHITECTURES:
        raise ValueError(f"model.name {name!r}: no offline architecture for it; known: {', '.join(ARCHITECTURES)} "
                         "(add its config.json shape fields to persona.gpu_projection.ARCHITECTURES)")
    config_class, shape = ARCHITECTURES[name]
    return config_class, {**shape, **(TINY_SHAPES[config_class] if tiny else {})}


def spc_train_conversations(params: Params) -> float:
    """Train-split conversations the prepare stage makes from the whole of SPC under `params.data`."""
    data = params.data
    kept = SPC_ROWS * SPC_WELL_FORMED_SHARE * data.fraction * SPC_KEPT_BY_SPLIT_SHARE
    return kept * (1 - data.valid_fraction - data.test_fraction)


def optimizer_steps(examples: float, batch_size: int, grad_accum: int, processes: int, epochs: float,
                    max_steps: int) -> int:
    """Optimizer steps of a Trainer run, as transformers counts them: batches per process per epoch, grouped
    by `grad_accum` (a last short group still steps), times the epochs; `max_steps > 0` overrides."""
    if max_steps > 0:
        return max_steps
    batches = math.ceil(examples / (batch_size * processes))
    per_epoch = max(math.ceil(batches / grad_accum), 1)
    return math.ceil(epochs * per_epoch)


def planned_work(params: Params, sft_sequences_per_conversation: float) -> dict[str, dict]:
    """What the profile's full run does per stage: `units` of work, each timed by the check as one `unit`.

    sft and reward: optimizer steps (each `batch_size x grad_accum` per process); pairs: pairs made (one
    process: the stage is not launched under accelerate); ppo: its fixed `max_steps` iterations.
    """
    processes = params.launch.processes
    conversations = spc_train_conversations(params)
    sft_sequences = conversations * sft_sequences_per_conversation
    sft, reward, pairs, ppo = params.sft, params.reward, params.pairs, params.ppo
    return {
        "sft": {"unit": "step", "units": optimizer_steps(sft_sequences, sft.batch_size, sft.grad_accum, processes,
                                                         sft.epochs, sft.max_steps),
                "basis": f"{sft_sequences:,.0f} sequences ({conversations:,.0f} SPC train conversations x "
                         f"{sft_sequences_per_conversation:.2f})"},
        "pairs": {"unit": "pair", "units": pairs.train_n + pairs.valid_n,
                  "basis": f"pairs.train_n {pairs.train_n} + valid_n {pairs.valid_n}, one process"},
        "reward": {"unit": "step", "units": optimizer_steps(pairs.train_n, reward.batch_size, reward.grad_accum,
                                                            processes, reward.epochs, reward.max_steps),
                   "basis": f"{pairs.train_n} train pairs"},
        "ppo": {"unit": "step", "units": ppo.max_steps,
                "basis": f"ppo.max_steps, {ppo.rollout_batch_size} episodes per process per step"},
    }


def gpu_class(device_name: str) -> str | None:
    """The FP16_TENSOR_TFLOPS key a CUDA device name contains ("NVIDIA H200" -> "H200"), or None."""
    found = [key for key in FP16_TENSOR_TFLOPS if key.lower() in device_name.lower()]
    return max(found, key=len) if found else None


def scaling(measured_on: str | None, target: str | None) -> tuple[float | None, str]:
    """(factor from measured seconds to the target GPU's, how it was derived). No factor without both ends
    known, or when the target was measured itself."""
    if target is None:
        return None, "no target GPU"
    if measured_on is None:
        return None, f"no {target} estimate: measured on a device with no fp16 tensor throughput figure"
    if measured_on == target:
        return 1.0, f"measured on a {target}"
    factor = FP16_TENSOR_TFLOPS[measured_on] / FP16_TENSOR_TFLOPS[target]
    return factor, (f"ESTIMATE for {target}: {measured_on} seconds x {factor:.1f}, the ratio of dense fp16 tensor "
                    f"throughput ({FP16_TENSOR_TFLOPS[measured_on]} / {FP16_TENSOR_TFLOPS[target]} TFLOPS); "
                    "per-step overheads that do not scale with it make this rough")


def project(plan: dict[str, dict], measured: dict[str, dict], factor: float | None,
            bound_mb: float = MEMORY_BOUND_MB) -> list[dict]:
    """One row per stage: the plan's units x the measured seconds per unit, the same scaled by `factor`, and
    the stage's measured peak memory against `bound_mb` (per GPU: under DDP each process holds what one
    process held here). A stage the check could not time projects to None."""
    rows = []
    for stage, work in plan.items():
        seen = measured.get(stage, {})
        per_unit = seen.get("seconds_per_unit")
        seconds = None if per_unit is None else work["units"] * per_unit
        peak = seen.get("peak_reserved_mb")
        rows.append({"stage": stage, **work, "seconds_per_unit": per_unit, "projected_s": seconds,
                     "estimated_s": None if seconds is None or factor is None else seconds * factor,
                     "peak_allocated_mb": seen.get("peak_allocated_mb"), "peak_reserved_mb": peak,
                     "over_memory_bound": None if peak is None else peak > bound_mb})
    return rows


def total(rows: list[dict], key: str) -> float | None:
    """The rows' sum of `key`; None if any stage is missing it (a partial total would read as the whole)."""
    values = [row[key] for row in rows]
    return None if any(value is None for value in values) else sum(values)


def median_seconds(durations: list[float]) -> float | None:
    """Seconds per step from a run's step durations: the median, leaving out the first (warm-up: kernels
    chosen, memory pools grown) when there are others."""
    timed = durations[1:] if len(durations) > 1 else durations
    if not timed:
        return None
    ordered = sorted(timed)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
