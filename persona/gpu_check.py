"""One-shot GPU check: every training path of the pipeline, a few steps each, and a profile's projection.

    python -m persona.gpu_check [--size medium|tiny] [--steps N] [--out DIR] [--json PATH] [--tokenizer DIR]
    python -m persona.gpu_check --profile NAME|PATH [--target GPU] [--rows] [same options]

A GPU session is short and cannot be debugged interactively, so this runs, in minutes and without
network, through the very functions the DVC stages call, on a random-weight model (throughput and
memory do not depend on the weights) whose vocabulary is that of the bundled SmolLM2 tokenizer.

Rows (the default): GPT-2 medium's shape; SFT, reward and PPO in QLoRA (nf4) + fp16, the T4's path,
on any CUDA GPU, and in nf4 + bf16 (and SFT also unquantised in bf16) where the GPU has native bf16;
preference pairs once. On a CPU the same stages run in fp32, unquantised and nf4, and the GPU rows
are listed as skipped with the reason. One row per run: trainable dtype when training began,
seconds per step, tokens/s, peak memory. A run that fails prints its error and the others go on.

Projection (`--profile`): the profile's own architecture (random weights, built from its config
offline) and its exact shapes: batch, max_length, grad accumulation, gradient checkpointing,
quant/precision/optimizer, pairs batch, reward batch, PPO rollout batch, minibatch and reply length.
A few steps of each stage are timed on the project's sample data, then multiplied out to the steps
the profile would run on SPC (persona.gpu_projection states how), with each stage's peak memory held
against the 12 GiB per-GPU bound. A target GPU that was not measured gets an estimate, labelled as one.

The exit status is 1 if any run failed. `--size tiny` runs on a CPU in about a minute (the tests do).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from persona import align, data, gpu_projection, pairs, reward, sft
from persona.chat_format import ensure_chat_template
from persona.config import ConfigError, Params, from_dict
from persona.hardware import Machine, library_versions, peak_memory_mb
from persona.models import BASE_INFO, bundled_gguf
from persona.paths import Paths
from persona.profiles import profile_values
from persona.runner import start_logging

log = logging.getLogger(__name__)

CHECK_MODEL = "gpt2-medium"  # the rows' shape: the original recipe's model (kaggle-2xt4)
NO_EVAL = 10_000  # eval/save period past the last step: the check times training, not periodic evaluation
# (quant, precision) per stage. fp16 runs on every CUDA GPU and is the T4's only mixed precision, so its rows run
# even where bf16 exists; bf16 only where the GPU has it natively. CPUs train in fp32 only (fp16 needs CUDA,
# a bf16 matmul is far slower there); bitsandbytes runs nf4 on CPU too.
GPU_ROWS = {"sft": (("nf4", "fp16"), ("nf4", "bf16"), ("none", "bf16")),
            "reward": (("nf4", "fp16"), ("nf4", "bf16")),
            "ppo": (("nf4", "fp16"), ("nf4", "bf16")),
            "dpo": (("nf4", "fp16"), ("nf4", "bf16")),
            "grpo": (("nf4", "fp16"), ("nf4", "bf16")),
            "mdpo": (("nf4", "fp16"), ("nf4", "bf16"))}
TRAINER_ALIGN = ("dpo", "grpo", "mdpo")  # the align algorithms built on a (TRL or transformers) Trainer
# those run unquantised only on a CPU: their nf4 + fp32 path is the reward stage's (the same build_trainer cast),
# and each tiny row costs CI ~10 s
CPU_ROWS = {stage: (("none", "fp32"),) if stage in TRAINER_ALIGN else (("none", "fp32"), ("nf4", "fp32"))
            for stage in GPU_ROWS}
# `--size tiny` uses this share of the sample: rendering the SFT dataset's chat templates, not training,
# is most of a tiny SFT run's time, and a few tiny steps need few conversations.
TINY_SAMPLE_FRACTION = 0.25
# the Paths field each stage writes
STAGE_OUTPUT = {"sft": "sft", "reward": "reward", "ppo": "policy", **{stage: "policy" for stage in TRAINER_ALIGN}}


def load_tokenizer(folder: Path | None):
    """The SmolLM2 tokenizer: a saved copy (3 MB, what scripts/gpu_wheels.sh carries) or the bundled GGUF."""
    from transformers import AutoTokenizer
    if folder is not None:
        return AutoTokenizer.from_pretrained(folder)
    gguf_folder, filename = bundled_gguf("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(gguf_folder, gguf_file=filename)


def build_base(model_name: str, tiny: bool, tokenizer, out_dir: Path):
    """A random-weight model of `model_name`'s architecture saved like the `base` stage's output (a GGUF model
    refuses save_pretrained); its config."""
    import transformers
    from transformers import AutoModelForCausalLM
    config_class, shape = gpu_projection.architecture(model_name, tiny)
    added_template = ensure_chat_template(tokenizer)
    # token ids come from the SmolLM2 tokenizer: the embedding must hold all of them
    shape = {**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))}
    config = getattr(transformers, config_class)(bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    label = f"random {model_name}{' (tiny)' if tiny else ''}"
    info = {"name": label, "source": f"{config_class}, random weights", "architecture": config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()), "project_chat_template": added_template}
    (out_dir / BASE_INFO).write_text(json.dumps(info, indent=2))
    log.info("%s: %s parameters in %s", label, f"{info['parameters']:,}", out_dir)
    return config


def check_params(size: str, steps: int) -> Params:
    """Params() (= params.yaml defaults) cut to a few steps; each row sets its stage's quant and precision."""
    tiny = size == "tiny"
    params = Params()
    short = {"eval_steps": NO_EVAL, "save_steps": NO_EVAL, "logging_steps": 1, "gradient_checkpointing": True}
    params = dataclasses.replace(
        params,
        data=dataclasses.replace(params.data, fraction=TINY_SAMPLE_FRACTION if tiny else 1.0),
        model=dataclasses.replace(params.model, max_length=128 if tiny else 512),
        lora=dataclasses.replace(params.lora, target_modules=["c_attn"]),
        sft=dataclasses.replace(params.sft, max_steps=steps, batch_size=2 if tiny else 8,
                                max_eval_sequences=4 if tiny else 16, **short),
        pairs=dataclasses.replace(params.pairs, train_n=8 if tiny else 16, valid_n=4 if tiny else 8,
                                  max_new_tokens=6 if tiny else 16, max_history_turns=2 if tiny else 4),
        reward=dataclasses.replace(params.reward, max_steps=2 if tiny else 4, batch_size=4 if tiny else 8,
                                   max_eval_sequences=4, score_batch_size=8, lora_top_layers=1 if tiny else 8,
                                   **short),
        ppo=dataclasses.replace(params.ppo, max_steps=2 if tiny else 3, rollout_batch_size=4 if tiny else 8,
                                minibatch_size=2 if tiny else 4, max_new_tokens=6 if tiny else 32,
                                eval_n=4 if tiny else 8, batch_size=8, max_history_turns=2 if tiny else 4,
                                save_steps=NO_EVAL),
        dpo=dataclasses.replace(params.dpo, max_steps=2 if tiny else 4, batch_size=2 if tiny else 8,
                                max_eval_sequences=4, eval_n=4 if tiny else 8, max_new_tokens=6 if tiny else 32,
                                max_history_turns=2 if tiny else 4, **short),
        grpo=dataclasses.replace(params.grpo, max_steps=2 if tiny else 3, batch_size=4 if tiny else 16,
                                 num_generations=2 if tiny else 4, max_eval_sequences=4, eval_n=4 if tiny else 8,
                                 max_new_tokens=6 if tiny else 32, max_history_turns=2 if tiny else 4, **short),
        mdpo=dataclasses.replace(params.mdpo, max_steps=2 if tiny else 4, batch_size=2 if tiny else 8,
                                 train_n=8 if tiny else 64, max_eval_sequences=4, eval_n=4 if tiny else 8,
                                 max_new_tokens=6 if tiny else 32, max_history_turns=2 if tiny else 4, **short),
    )
    params.validate(Path("."))  # the cut-down values must still be valid params
    return params


def planned_rows(machine: Machine) -> tuple[dict[str, tuple], list[dict]]:
    """The (quant, precision) runs of each stage on this machine, and every GPU row it skips, with why."""
    if not machine.gpus:
        why = "no CUDA GPU (a CPU trains in fp32 only: fp16 needs CUDA, bf16 matmuls run far slower there)"
        return CPU_ROWS, [{"stage": stage, "quant": quant, "precision": precision, "why": why}
                          for stage, runs in GPU_ROWS.items() for quant, precision in runs]
    if machine.bf16:
        return GPU_ROWS, []
    kept = {stage: tuple(run for run in runs if run[1] != "bf16") for stage, runs in GPU_ROWS.items()}
    return kept, [{"stage": stage, "quant": quant, "precision": precision, "why": "this GPU has no native bf16"}
                  for stage, runs in GPU_ROWS.items() for quant, precision in runs if precision == "bf16"]


def empty_row(stage: str, quant: str = "-", precision: str = "-", error: str | None = None) -> dict:
    return {"stage": stage, "quant": quant, "precision": precision, "optimizer": "-", "trainable_dtype": None,
            "steps": None, "seconds_per_step": None, "tokens_per_s": None, "peak_memory_mb": None,
            "peak_reserved_mb": None, "wall_s": None, "error": error, "metrics": {}}


def synchronize() -> None:
    """Wait for queued GPU work, so a clock read after it includes that work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Appends each optimizer step's duration, step end to step end (data loading and logging included)."""

    def __init__(self, durations: list[float]):
        self.durations, self.last = durations, None

    def on_train_begin(self, args, state, control, **kwargs):
        synchronize()
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.last = now


@contextmanager
def ppo_step_clock(durations: list[float]):
    """Appends each PPO iteration's duration. The PPO loop takes no callbacks, but it looks `ppo_step` up in its
    module at every iteration, so a wrapper put there for the run sees every step."""
    from persona.ppo import trainer
    step = trainer.ppo_step

    def timed_step(*args, **kwargs):
        synchronize()
        started = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            synchronize()
            durations.append(time.perf_counter() - started)

    trainer.ppo_step = timed_step
    try:
        yield
    finally:
        trainer.ppo_step = step


def run_stage(stage: str, params: Params, paths: Paths) -> dict:
    """The stage's metrics, plus `step_seconds`: the duration of each of its optimizer steps (PPO: iterations)."""
    durations: list[float] = []
    if stage == "ppo":
        with ppo_step_clock(durations):
            metrics = align.run(params, paths)
    elif stage in TRAINER_ALIGN:  # no step clock: their trainers are built inside align.run
        metrics = align.run(dataclasses.replace(params, align=dataclasses.replace(params.align, algorithm=stage)),
                            paths)
    else:
        metrics = {"sft": sft.run, "reward": reward.run}[stage](params, paths, callbacks=(StepClock(durations),))
    return {**metrics, "step_seconds": durations}


def run_pairs(params: Params, paths: Paths) -> dict:
    """Preference pairs sampled from the SFT policy; load_policies keeps the model in fp32."""
    metrics = pairs.run(params, paths)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {**metrics, "quant": "none", "precision": "fp32", "tokens_per_s": metrics["generation_tokens_per_s"],
            "peak_memory_mb": round(peak_memory_mb(device), 1)}


def timed(stage: str, quant: str, precision: str, run, *args) -> dict:
    """`run(*args)` as one row; a failure becomes the row's error, so the runs after it still happen."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = empty_row(stage, quant, precision)
    started = time.perf_counter()
    try:
        metrics = run(*args)
    except Exception as error:  # reported on the row; the other runs go on
        log.exception("%s %s/%s failed", stage, quant, precision)
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return row
    finally:
        row["wall_s"] = round(time.perf_counter() - started, 1)
    step_seconds = gpu_projection.median_seconds(metrics.get("step_seconds", []))
    row.update({key: metrics[key] for key in ("quant", "precision", "optimizer", "steps", "trainable_dtype")
                if key in metrics},
               metrics=metrics, peak_memory_mb=metrics.get("peak_memory_mb"),
               seconds_per_step=None if step_seconds is None else round(step_seconds, 3),
               # what the caching allocator held: what must fit on the card, above what tensors used
               peak_reserved_mb=round(torch.cuda.max_memory_reserved() / 2**20, 1) if torch.cuda.is_available()
               else None,
               tokens_per_s=metrics.get("tokens_per_s", metrics.get("rollout_tokens_per_s")))
    return row


def with_compute(params: Params, stage: str, quant: str, precision: str) -> Params:
    section = getattr(params, stage)
    return dataclasses.replace(params, **{stage: dataclasses.replace(section, quant=quant, precision=precision)})


def stage_rows(stage: str, runs: tuple, params: Params, paths: Paths, work: Path) -> tuple[list[dict], Path | None]:
    """A row per (quant, precision) of `stage`, each writing its own folders; the output of the first that passed."""
    rows, output = [], None
    for quant, precision in runs:
        name = f"{stage}-{quant}-{precision}"
        run_paths = dataclasses.replace(paths, checkpoints=work / f"{name}-checkpoints",
                                        **{STAGE_OUTPUT[stage]: work / name})
        rows.append(timed(stage, quant, precision, run_stage, stage, with_compute(params, stage, quant, precision),
                          run_paths))
        if output is None and rows[-1]["error"] is None:
            output = work / name
    return rows, output


def run_rows(size: str, steps: int, work: Path, tokenizer) -> tuple[list[dict], list[dict]]:
    """(one row per run, every row this machine skips)."""
    params = check_params(size, steps)
    paths = Paths.under(work, curves=None)  # no dvclive: the check runs without dvc installed
    build_base(CHECK_MODEL, size == "tiny", tokenizer, paths.base)
    data.run(params, paths)
    runs, skipped = planned_rows(Machine.detect())
    rows, adapter = stage_rows("sft", runs["sft"], params, paths, work)
    if adapter is None:
        return rows + [empty_row(stage, error="skipped: no SFT run passed")
                       for stage in ("pairs", "reward", "ppo", *TRAINER_ALIGN)], skipped
    paths = dataclasses.replace(paths, sft=adapter)
    rows.append(timed("pairs", "none", "fp32", run_pairs, params, paths))
    if rows[-1]["error"]:
        return rows + [empty_row(stage, error="skipped: the pairs run failed")
                       for stage in ("reward", "ppo", *TRAINER_ALIGN)], skipped
    reward_rows, reward_model = stage_rows("reward", runs["reward"], params, paths, work)
    rows += reward_rows
    if reward_model is None:
        return rows + [empty_row(stage, error="skipped: no reward run passed") for stage in ("ppo", *TRAINER_ALIGN)
                       ], skipped
    for stage in ("ppo", *TRAINER_ALIGN):
        rows += stage_rows(stage, runs[stage], params, dataclasses.replace(paths, reward=reward_model), work)[0]
    return rows, skipped


def read_profile(profile: str) -> tuple[str, Params]:
    """(name, params) of `profiles/NAME.yaml`, or of a profile file given by its path (tests); a profile whose
    model the check cannot build offline fails here, before anything runs."""
    path = Path(profile)
    values = profile_values(path.stem, path.parent) if path.suffix == ".yaml" else profile_values(profile)
    params = from_dict(Params, values, "")
    gpu_projection.architecture(params.model.name)
    return path.stem, params


def projection_params(params: Params, steps: int, layers: int, sample_fraction: float) -> Params:
    """The profile's params, timed for `steps` steps a stage on one process and the sample data: every shape
    stays; only run lengths, periodic evaluation and saving are cut (and reward LoRA layers to `layers`)."""
    pairs_cfg, ppo = params.pairs, params.ppo
    no_eval = {"max_steps": steps, "eval_steps": NO_EVAL, "save_steps": NO_EVAL}
    timed_params = dataclasses.replace(
        params,
        # the bundled sample (offline): SPC conversations, so SPC's sequence lengths
        data=dataclasses.replace(type(params.data)(), fraction=sample_fraction),
        launch=dataclasses.replace(params.launch, processes=1),  # one GPU measures what each DDP process does
        sft=dataclasses.replace(params.sft, **no_eval),
        # two full generation batches of train pairs, one of held-out pairs
        pairs=dataclasses.replace(pairs_cfg, train_n=2 * pairs_cfg.batch_size, valid_n=pairs_cfg.batch_size),
        reward=dataclasses.replace(params.reward, **no_eval,
                                   lora_top_layers=min(params.reward.lora_top_layers, layers)),
        ppo=dataclasses.replace(ppo, max_steps=steps, save_steps=NO_EVAL, eval_n=min(ppo.eval_n, ppo.batch_size)),
    )
    timed_params.validate(Path("."))
    return timed_params


def measured_units(rows: list[dict], pairs_made: int) -> dict[str, dict]:
    """Seconds per unit of each stage that passed (optimizer step; pairs: a pair, generation only) and its peaks."""
    measured = {}
    for row in rows:
        if row["error"]:
            continue
        if row["stage"] == "pairs":
            metrics = row["metrics"]
            tokens_per_s = metrics.get("generation_tokens_per_s")
            per_unit = metrics["generated_tokens"] / tokens_per_s / pairs_made if tokens_per_s else None
        else:
            per_unit = row["seconds_per_step"]
        measured[row["stage"]] = {"seconds_per_unit": per_unit, "peak_allocated_mb": row["peak_memory_mb"],
                                  "peak_reserved_mb": row["peak_reserved_mb"]}
    return measured


def run_projection(name: str, params: Params, size: str, steps: int, work: Path, tokenizer, target: str | None
                   ) -> dict:
    """Time profile `name`'s shapes for a few steps a stage, then project its full run (persona.gpu_projection)."""
    paths = Paths.under(work, curves=None)
    tiny = size == "tiny"
    config = build_base(params.model.name, tiny, tokenizer, paths.base)
    timed_params = projection_params(params, steps, config.num_hidden_layers, TINY_SAMPLE_FRACTION if tiny else 1.0)
    prepared = data.run(timed_params, paths)
    rows = [timed("sft", timed_params.sft.quant, timed_params.sft.precision, run_stage, "sft", timed_params, paths)]
    if rows[-1]["error"] is None:
        rows.append(timed("pairs", "none", "fp32", run_pairs, timed_params, paths))
    if rows[-1]["error"] is None:
        rows.append(timed("reward", timed_params.reward.quant, timed_params.reward.precision, run_stage, "reward",
                          timed_params, paths))
    if rows[-1]["error"] is None:
        rows.append(timed("ppo", timed_params.ppo.quant, timed_params.ppo.precision, run_stage, "ppo", timed_params,
                          paths))
    sft_metrics = rows[0]["metrics"]
    # sequences per conversation in the sft layout (conversation: one per speaker), counted on the sample
    per_conversation = sft_metrics["train_sequences"] / prepared["train_dialogues"] if sft_metrics else 0.0
    plan = gpu_projection.planned_work(params, per_conversation)
    measured_on = gpu_projection.gpu_class(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    target = target or gpu_projection.PROFILE_TARGETS.get(name)
    factor, scaling = gpu_projection.scaling(measured_on, target)
    stages = gpu_projection.project(plan, measured_units(rows, timed_params.pairs.train_n
                                                        + timed_params.pairs.valid_n), factor)
    return {"profile": name, "model": params.model.name, "processes": params.launch.processes,
            "target": target, "scaling_factor": factor, "scaling": scaling, "rows": rows, "stages": stages,
            "projected_s": gpu_projection.total(stages, "projected_s"),
            "estimated_s": gpu_projection.total(stages, "estimated_s"),
            "memory_bound_mb": gpu_projection.MEMORY_BOUND_MB, "assumptions": assumptions(params, timed_params)}


def assumptions(params: Params, timed_params: Params) -> list[str]:
    data_cfg = params.data
    return [
        f"SPC: {gpu_projection.SPC_ROWS:,} rows on the hub, {gpu_projection.SPC_WELL_FORMED_SHARE:.1%} well formed"
        f" and {gpu_projection.SPC_KEPT_BY_SPLIT_SHARE:.1%}"
        " of those kept by the persona-disjoint split (both measured on SPC's validation split only), x data.fraction"
        f" {data_cfg.fraction} x train share {1 - data_cfg.valid_fraction - data_cfg.test_fraction:.2f}",
        "sequence lengths: the project's SPC sample, SmolLM2 tokenizer, cut at model.max_length "
        f"{params.model.max_length}",
        "random weights never end a reply early: every pairs and PPO reply runs to max_new_tokens (an upper bound)",
        "step time: the median of the timed steps after the first (warm-up); under DDP each process is assumed to"
        " step as fast as this one process (the LoRA gradient all-reduce is not timed)",
        f"timed with {timed_params.sft.max_steps} steps a stage, {timed_params.pairs.train_n}"
        f" + {timed_params.pairs.valid_n} pairs",
        "not included: loading models, held-out and periodic evaluation, the prepare, base and evaluate stages",
    ]


def figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{seconds / 60:.1f} min"


def print_rows(rows: list[dict]) -> None:
    print(f"{'stage':<7}{'quant':>6}{'precision':>10}{'optimizer':>18}{'trainable':>10}{'steps':>6}{'s/step':>8}"
          f"{'tokens/s':>10}{'peak MB':>9}{'wall s':>8}")
    for row in rows:
        print(f"{row['stage']:<7}{row['quant']:>6}{row['precision']:>10}{row['optimizer']:>18}"
              f"{row['trainable_dtype'] or '-':>10}{figure(row['steps'], 0):>6}{figure(row['seconds_per_step'], 2):>8}"
              f"{figure(row['tokens_per_s'], 1):>10}{figure(row['peak_memory_mb'], 0):>9}{figure(row['wall_s'], 1):>8}"
              + (f"  FAILED {row['error']}" if row["error"] else ""))
    print("trainable: dtype of the trainable weights when training began; tokens/s: trained (sft, reward) or "
          "generated (pairs; ppo: its last rollout); peak MB: "
          + ("max GPU memory allocated in the run" if torch.cuda.is_available() else
             "the process's max RSS so far (CPU: it cannot be reset between runs)"))


def print_projection(report: dict, device: str) -> None:
    target = report["target"]
    estimate = report["scaling_factor"] is not None and report["scaling_factor"] != 1.0
    bound_gib = report["memory_bound_mb"] / 1024
    print(f"\nProjection: profile {report['profile']} ({report['model']}, {report['processes']} process(es)), "
          f"measured on {device}")
    print(f"{'stage':<7}{'units':>7}{'unit':>6}{'s/unit':>9}{'projected':>11}"
          + (f"{target + ' est.':>11}" if estimate else "") + f"{'peak MB':>9}{'reserved':>10}  fits {bound_gib:g} GiB")
    for stage in report["stages"]:
        fits = {None: "n/a", False: "yes", True: "NO"}[stage["over_memory_bound"]]
        print(f"{stage['stage']:<7}{stage['units']:>7,}{stage['unit']:>6}{figure(stage['seconds_per_unit'], 3):>9}"
              f"{duration(stage['projected_s']):>11}" + (f"{duration(stage['estimated_s']):>11}" if estimate else "")
              + f"{figure(stage['peak_allocated_mb'], 0):>9}{figure(stage['peak_reserved_mb'], 0):>10}  {fits}")
    print(f"{'total':<29}{duration(report['projected_s']):>11}"
          + (f"{duration(report['estimated_s']):>11}" if estimate else ""))
    print(f"scaling: {report['scaling']}")
    for stage in report["stages"]:
        print(f"{stage['stage']} units: {stage['basis']}")
    for line in report["assumptions"]:
        print(f"assumed: {line}")
    if not torch.cuda.is_available():
        print("memory: a CPU run has no per-GPU peak (peak MB is the process's RSS so far), so the bound is n/a")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m persona.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("medium", "tiny"), default="medium",
                        help="model shape: the architecture's own (rows: gpt2-medium) or tiny (CPU tests)")
    parser.add_argument("--steps", type=int, help="steps per timed run (rows: SFT steps, default 8; projection: "
                                                  "every stage, default 4; tiny: 2)")
    parser.add_argument("--out", type=Path, help="work folder (default: a fresh temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the report here as JSON")
    parser.add_argument("--tokenizer", type=Path, help="a saved SmolLM2 tokenizer (default: the bundled GGUF's)")
    parser.add_argument("--profile", help="project this profile (profiles/NAME.yaml, or a .yaml path) instead of "
                                          "running the rows")
    parser.add_argument("--target", choices=sorted(gpu_projection.FP16_TENSOR_TFLOPS),
                        help="GPU to estimate the projection for (default: the profile's, e.g. kaggle-2xt4: T4)")
    parser.add_argument("--rows", action="store_true", help="with --profile: run the rows too")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 2 and args.profile:
        parser.error("--steps must be at least 2 with --profile (the first step is warm-up, not timed)")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    profile = None
    if args.profile:
        try:
            profile = read_profile(args.profile)
        except (ConfigError, ValueError) as error:  # an unknown profile or architecture: nothing has run
            parser.error(str(error))
    start_logging()
    started = time.perf_counter()
    work = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    tiny_steps = 2 if args.size == "tiny" else None
    device = Machine.detect().describe()
    report = {"device": device, "size": args.size, "versions": library_versions(), "work_dir": str(work)}
    if args.rows or not args.profile:
        report["rows"], report["skipped"] = run_rows(args.size, args.steps or tiny_steps or 8, work / "rows",
                                                     tokenizer)
    if profile:
        report["projection"] = run_projection(*profile, args.size, args.steps or tiny_steps or 4,
                                              work / "projection", tokenizer, args.target)
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\nGPU check, size {args.size}, {device}, work dir {work}")
    print(", ".join(f"{name} {version}" for name, version in report["versions"].items()))
    rows = report.get("rows", []) + report.get("projection", {}).get("rows", [])
    if "rows" in report:
        print_rows(report["rows"])
        for reason in sorted({skip["why"] for skip in report["skipped"]}):
            names = ", ".join(f"{s['stage']} {s['quant']}/{s['precision']}" for s in report["skipped"]
                              if s["why"] == reason)
            print(f"skipped ({reason}): {names}")
    if "projection" in report:
        print("\nTimed at the profile's shapes:")
        print_rows(report["projection"]["rows"])
        print_projection(report["projection"], device)
    failed = [row for row in rows if row["error"]]
    print(f"total {report['total_wall_s']:.1f} s; {len(rows) - len(failed)} runs passed, {len(failed)} failed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
