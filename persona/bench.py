"""Benchmarks that print figures measured in one run, as ratios against a baseline.

    python -m persona.bench sft [--steps 6] [--batch-size 4] [--model models/base]

`sft`: LoRA training throughput of the whole-conversation layout against the per-turn
layout on the same dialogues: tokens/s (compute speed) and responses trained/s (what the
layout buys: the per-turn layout re-encodes the whole history for every reply).
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch

from persona.config import load_params
from persona.data import load_dialogues, read_dialogues
from persona.models import load_causal_lm, lora_config, resolve_compute
from persona.likelihood import collate, masked_nll
from persona.sft import build_dataset


def time_layout(model, dataset, pad_id: int, steps: int, batch_size: int, seed: int) -> dict:
    """Train `steps` LoRA steps (after one warm-up) on random batches; throughput figures."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    tokens = responses = 0
    started = 0.0
    for step in range(steps + 1):
        if step == 1:
            started, tokens, responses = time.perf_counter(), 0, 0
        rows = [dataset[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        ids, attention, mask = collate(rows, pad_id)
        nll, count = masked_nll(model, ids, attention, mask)
        (nll.sum() / count.sum().clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(attention.sum())
        responses += sum(r["responses"] for r in rows)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": tokens / seconds, "responses_per_s": responses / seconds, "seconds": seconds}


def bench_sft(model_path: Path, steps: int, batch_size: int) -> None:
    from peft import get_peft_model

    params = load_params()
    prepared = Path("data/prepared/train.jsonl")
    dialogues = read_dialogues(prepared) if prepared.exists() else load_dialogues("sample", "", "skip")[0]
    compute = resolve_compute("none", "auto", "bench")
    model, tokenizer = load_causal_lm(model_path, compute)
    model = get_peft_model(model, lora_config(params.lora))
    torch.manual_seed(params.seed)
    results = {}
    for layout in ("turn", "conversation"):
        dataset = build_dataset(dialogues, tokenizer, layout, params.model.max_length)
        results[layout] = time_layout(model, dataset, tokenizer.pad_token_id, steps, batch_size, params.seed)
        results[layout]["sequences"] = len(dataset)
    print(f"SFT throughput, {model_path}, {len(dialogues)} dialogues, batch {batch_size}, {steps} timed steps, "
          f"{compute.device}/{compute.precision}")
    print(f"{'layout':<14}{'sequences':>10}{'tokens/s':>11}{'responses/s':>13}")
    for layout, figures in results.items():
        print(f"{layout:<14}{figures['sequences']:>10}{figures['tokens_per_s']:>11.1f}"
              f"{figures['responses_per_s']:>13.2f}")
    base, whole = results["turn"], results["conversation"]
    print(f"conversation / turn: tokens/s x{whole['tokens_per_s'] / base['tokens_per_s']:.2f}, "
          f"responses/s x{whole['responses_per_s'] / base['responses_per_s']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m persona.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["sft"])
    parser.add_argument("--model", type=Path, default=Path("models/base"), help="a saved base model (base stage)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (args.model / "config.json").exists():
        parser.error(f"--model {args.model}: no saved model there; run `dvc repro base` first")
    bench_sft(args.model, args.steps, args.batch_size)


if __name__ == "__main__":
    main()
