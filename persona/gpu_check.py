"""One-shot GPU check: every training path of the pipeline, a few steps each, on a gpt2-medium-sized model.

    python -m persona.gpu_check [--size medium|tiny] [--steps N] [--out DIR] [--json PATH] [--tokenizer DIR]

A GPU session is short and cannot be debugged interactively, so this runs, in minutes and
without network: QLoRA SFT (nf4) in fp16 and bf16, plain LoRA SFT in bf16, preference pairs,
the reward model and a few PPO steps, through the very functions the DVC stages call. The model
is GPT-2 medium's shape with random weights (throughput and memory do not depend on the
weights), its vocabulary that of the bundled SmolLM2 tokenizer. It prints one row per run: tokens/s,
peak memory and the quant/precision/optimizer the machine chose. A run that fails prints its
error and the others go on; the exit status is 1 if any failed. `--size tiny` runs the same
on a CPU in about a minute (the test does).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from persona import align, data, pairs, reward, sft
from persona.chat_format import ensure_chat_template
from persona.config import Params
from persona.hardware import Machine, library_versions, peak_memory_mb
from persona.models import BASE_INFO, bundled_gguf
from persona.paths import Paths
from persona.runner import start_logging

log = logging.getLogger(__name__)

SHAPES = {"medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},  # gpt2-medium
          "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 4}}
NO_EVAL = 10_000  # eval/save period past the last step: the check times training, not periodic evaluation


def load_tokenizer(folder: Path | None):
    """The SmolLM2 tokenizer: a saved copy (3 MB, what scripts/gpu_wheels.sh carries) or the bundled GGUF."""
    from transformers import AutoTokenizer
    if folder is not None:
        return AutoTokenizer.from_pretrained(folder)
    gguf_folder, filename = bundled_gguf("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(gguf_folder, gguf_file=filename)


def build_base(size: str, tokenizer, out_dir: Path) -> Path:
    """A random-weight GPT-2 saved like the `base` stage's output; a GGUF model refuses save_pretrained."""
    from transformers import AutoModelForCausalLM, GPT2Config
    added_template = ensure_chat_template(tokenizer)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[size])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"name": f"random-gpt2-{size}", "source": "GPT2Config, random weights", "architecture": "gpt2",
            "parameters": sum(p.numel() for p in model.parameters()), "project_chat_template": added_template}
    (out_dir / BASE_INFO).write_text(json.dumps(info, indent=2))
    log.info("random GPT-2 %s: %s parameters in %s", size, f"{info['parameters']:,}", out_dir)
    return out_dir


def check_params(size: str, steps: int, machine: Machine) -> Params:
    """Params() (= params.yaml defaults) cut to a few steps; reward and PPO use the best precision here."""
    tiny = size == "tiny"
    quant, precision = ("nf4", "bf16" if machine.bf16 else "fp16") if machine.gpus else ("none", "fp32")
    params = Params()
    short = {"eval_steps": NO_EVAL, "save_steps": NO_EVAL, "logging_steps": 1, "gradient_checkpointing": True}
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, max_length=128 if tiny else 512),
        lora=dataclasses.replace(params.lora, target_modules=["c_attn"]),
        sft=dataclasses.replace(params.sft, max_steps=steps, batch_size=2 if tiny else 8,
                                max_eval_sequences=4 if tiny else 16, **short),
        pairs=dataclasses.replace(params.pairs, train_n=8 if tiny else 16, valid_n=4 if tiny else 8,
                                  max_new_tokens=6 if tiny else 16, max_history_turns=2 if tiny else 4),
        reward=dataclasses.replace(params.reward, quant=quant, precision=precision, max_steps=2 if tiny else 4,
                                   batch_size=4 if tiny else 8, max_eval_sequences=4, score_batch_size=8,
                                   lora_top_layers=1 if tiny else 8, **short),
        ppo=dataclasses.replace(params.ppo, quant=quant, precision=precision, max_steps=2 if tiny else 3,
                                rollout_batch_size=4 if tiny else 8, minibatch_size=2 if tiny else 4,
                                max_new_tokens=6 if tiny else 32, eval_n=4 if tiny else 8, batch_size=8,
                                max_history_turns=2 if tiny else 4, save_steps=NO_EVAL),
    )
    params.validate(Path("."))  # the cut-down values must still be valid params
    return params


def sft_runs(machine: Machine) -> tuple[list[tuple[str, str]], list[str]]:
    """(quant, precision) pairs this machine can run, and a line for each path it cannot."""
    if not machine.gpus:
        return [("none", "fp32"), ("nf4", "fp32")], [("fp16, bf16: skipped, no CUDA GPU (on CPU only fp32 is "
                                                      "usable: bf16 matmuls run far slower there)")]
    if not machine.bf16:
        return [("nf4", "fp16")], ["nf4/bf16, none/bf16: skipped, this GPU has no native bf16"]
    return [("nf4", "fp16"), ("nf4", "bf16"), ("none", "bf16")], []


def empty_row(stage: str, quant: str = "-", precision: str = "-", error: str | None = None) -> dict:
    return {"stage": stage, "quant": quant, "precision": precision, "optimizer": "-", "steps": None,
            "tokens_per_s": None, "peak_memory_mb": None, "wall_s": None, "error": error, "metrics": {}}


def timed(stage: str, quant: str, precision: str, run, *args, **kwargs) -> dict:
    """`run(*args, **kwargs)` as one row; a failure becomes the row's error, so the runs after it still happen."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = empty_row(stage, quant, precision)
    started = time.perf_counter()
    try:
        metrics = run(*args, **kwargs)
    except Exception as error:  # reported on the row; the other runs go on
        log.exception("%s %s/%s failed", stage, quant, precision)
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return row
    finally:
        row["wall_s"] = round(time.perf_counter() - started, 1)
    row.update({key: metrics[key] for key in ("quant", "precision", "optimizer", "steps") if key in metrics},
               metrics=metrics, peak_memory_mb=metrics.get("peak_memory_mb"),
               tokens_per_s=metrics.get("tokens_per_s", metrics.get("rollout_tokens_per_s")))
    return row


def run_pairs(params: Params, paths: Paths) -> dict:
    """Preference pairs sampled from the SFT policy; load_policies keeps the model in fp32."""
    metrics = pairs.run(params, paths)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {**metrics, "quant": "none", "precision": "fp32", "tokens_per_s": metrics["generation_tokens_per_s"],
            "peak_memory_mb": round(peak_memory_mb(device), 1)}


def run_all(size: str, steps: int, work: Path, tokenizer_dir: Path | None) -> tuple[list[dict], list[str]]:
    """(one row per run, a line per path this machine skips)."""
    machine = Machine.detect()
    params = check_params(size, steps, machine)
    paths = Paths.under(work, curves=None)  # no dvclive: the check runs without dvc installed
    build_base(size, load_tokenizer(tokenizer_dir), paths.base)
    data.run(params, paths)
    runs, skipped = sft_runs(machine)
    rows, adapter = [], None
    for quant, precision in runs:
        name = f"sft-{quant}-{precision}"
        run_params = dataclasses.replace(params, sft=dataclasses.replace(params.sft, quant=quant, precision=precision))
        run_paths = dataclasses.replace(paths, sft=work / name, checkpoints=work / f"{name}-checkpoints")
        rows.append(timed("sft", quant, precision, sft.run, run_params, run_paths))
        if adapter is None and rows[-1]["error"] is None:
            adapter = run_paths.sft
    if adapter is None:
        rows += [empty_row(stage, error="skipped: no SFT run succeeded") for stage in ("pairs", "reward", "ppo")]
        return rows, skipped
    paths = dataclasses.replace(paths, sft=adapter)
    rows.append(timed("pairs", "none", "fp32", run_pairs, params, paths))
    rows.append(timed("reward", params.reward.quant, params.reward.precision, reward.run, params, paths))
    if rows[-1]["error"]:
        rows.append(empty_row("ppo", error="skipped: the reward run failed"))
        return rows, skipped
    rows.append(timed("ppo", params.ppo.quant, params.ppo.precision, align.run, params, paths))
    return rows, skipped


def figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict]) -> None:
    print(f"{'stage':<7}{'quant':>6}{'precision':>10}{'optimizer':>18}{'steps':>6}{'tokens/s':>10}"
          f"{'peak MB':>10}{'wall s':>8}")
    for row in rows:
        print(f"{row['stage']:<7}{row['quant']:>6}{row['precision']:>10}{row['optimizer']:>18}"
              f"{figure(row['steps'], 0):>6}{figure(row['tokens_per_s'], 1):>10}"
              f"{figure(row['peak_memory_mb'], 0):>10}{figure(row['wall_s'], 1):>8}"
              + (f"  FAILED {row['error']}" if row["error"] else ""))
    print("tokens/s: trained (sft, reward) or generated (pairs; ppo: its last rollout); peak MB: "
          + ("max GPU memory allocated in the run" if torch.cuda.is_available() else
             "the process's max RSS so far (CPU: it cannot be reset between runs)"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m persona.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="medium", help="model shape (tiny: CPU tests)")
    parser.add_argument("--steps", type=int, help="SFT steps per run (default 8; tiny: 2)")
    parser.add_argument("--out", type=Path, help="work folder (default: a fresh temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")
    parser.add_argument("--tokenizer", type=Path, help="a saved SmolLM2 tokenizer (default: the bundled GGUF's)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    start_logging()
    started = time.perf_counter()
    work = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps if args.steps is not None else 2 if args.size == "tiny" else 8
    rows, skipped = run_all(args.size, steps, work, args.tokenizer)
    report = {"device": Machine.detect().describe(), "size": args.size, "versions": library_versions(),
              "total_wall_s": round(time.perf_counter() - started, 1), "work_dir": str(work), "skipped": skipped,
              "rows": rows}
    print(f"\nGPU check, random GPT-2 {args.size}, {report['device']}, work dir {work}")
    print(", ".join(f"{name} {version}" for name, version in report["versions"].items()))
    print_table(rows)
    for line in skipped:
        print(line)
    failed = [row for row in rows if row["error"]]
    print(f"total {report['total_wall_s']:.1f} s; {len(rows) - len(failed)} runs passed, {len(failed)} failed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
