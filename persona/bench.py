"""Benchmarks that print figures measured in one run, as ratios against a baseline.

    python -m persona.bench sft [--steps 6] [--batch-size 4] [--model models/base]
    python -m persona.bench generate [--prompts 32] [--batch-size 8] [--model models/base]
    python -m persona.bench ppo [--steps 3] [--batch-size 8] [--model models/base]

`sft`: LoRA training throughput of the whole-conversation layout against the per-turn
layout on the same dialogues: tokens/s (compute speed) and responses trained/s (what the
layout buys: the per-turn layout re-encodes the whole history for every reply).
`generate`: the evaluator's batched, KV-cached generation against one prompt at a time,
same prompts, same greedy decoding (so both produce the same replies).
`ppo`: PPO experience making (sample replies, then policy and reference log-probs) with the
reference as a separate merged copy of the SFT model (the baseline), as a frozen adapter on the
policy's own weights (`ppo.reference: sft`), and as the adapter disabled (`ppo.reference: base`);
each variant runs in a fresh process so its peak memory is its own.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from persona.chat_format import build_dataset, select_prompts
from persona.config import load_params
from persona.data import load_dialogues, read_dialogues
from persona.generation import Decoding, generate_replies
from persona.hardware import peak_memory_mb, resolve_compute
from persona.likelihood import collate, masked_nll
from persona.models import load_for_training, lora_config
from persona.paths import DEFAULT


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
    prepared = DEFAULT.prepared / "train.jsonl"
    dialogues = read_dialogues(prepared) if prepared.exists() else load_dialogues("sample", "", "skip")[0]
    compute = resolve_compute("none", "auto", "bench")
    model, tokenizer = load_for_training(model_path, compute)
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


def bench_generate(model_path: Path, prompts: int, batch_size: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dialogues = load_dialogues("sample", "", "skip")[0]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    chats = [p.chat() for p in select_prompts(dialogues, prompts, 6, seed=0)]
    results = {}
    for label, size in (("one-by-one", 1), (f"batched x{batch_size}", batch_size)):
        decoding = Decoding(max_new_tokens=32, temperature=0, batch_size=size)
        started = time.perf_counter()
        replies = generate_replies(model, tokenizer, chats, decoding)
        seconds = time.perf_counter() - started
        tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
        results[label] = (tokens / seconds, len(chats) / seconds, replies)
    print(f"Generation, {model_path}, {len(chats)} prompts, greedy, 32 new tokens max, cpu")
    print(f"{'mode':<14}{'tokens/s':>10}{'replies/s':>11}")
    for label, (tokens_per_s, replies_per_s, _) in results.items():
        print(f"{label:<14}{tokens_per_s:>10.1f}{replies_per_s:>11.2f}")
    (one, _, one_replies), (batched, _, batched_replies) = results.values()
    same = sum(a == b for a, b in zip(one_replies, batched_replies))
    print(f"batched / one-by-one: tokens/s x{batched / one:.2f}; identical replies {same}/{len(chats)}")


def ppo_experience(variant: str, model_path: Path, steps: int, batch_size: int, results) -> None:
    """One variant, in its own process: make `steps` batches of PPO experience (after a warm-up)."""
    import dataclasses

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona.models import policy as switch_to
    from persona.ppo.policy import load_policy, reference_name
    from persona.ppo.rollout import episodes, exact_decoding, pack, response_logits, rollout, token_logprobs

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel it lives without
    params = load_params()
    cfg = dataclasses.replace(params.ppo, reference="sft" if variant == "adapter" else "base")
    compute = resolve_compute("none", "auto", "bench")
    policy, tokenizer = load_policy(model_path, DEFAULT.sft, cfg, compute)
    if variant != "copy":
        anchor = lambda: switch_to(policy, reference_name(cfg.reference))  # noqa: E731
    else:
        copy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        copy = PeftModel.from_pretrained(copy, str(DEFAULT.sft)).merge_and_unload().eval().to(compute.device)
        anchor = lambda: nullcontext(copy)  # noqa: E731
    pool = episodes(read_dialogues(DEFAULT.prepared / "train.jsonl"), 1, cfg.max_history_turns)
    decoding = exact_decoding(dataclasses.replace(cfg, batch_size=batch_size), params.seed)
    tokens, started = 0, 0.0
    for step in range(steps + 1):
        if step == 1:
            tokens, started = 0, time.perf_counter()
        samples = rollout(policy, tokenizer, pool[step * batch_size:(step + 1) * batch_size], 1, decoding)
        packed = pack(tokenizer, samples).to(compute.device)
        with torch.no_grad():
            token_logprobs(response_logits(policy, packed, cfg.temperature)[0], packed)
            with anchor() as ref:
                token_logprobs(response_logits(ref, packed, cfg.temperature)[0], packed)
        tokens += int(packed.response_mask.sum())
    results.put((variant, tokens / (time.perf_counter() - started), peak_memory_mb(compute.device)))


def bench_ppo(model_path: Path, steps: int, batch_size: int) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    figures = {}
    for variant in ("copy", "adapter", "disabled"):
        child = context.Process(target=ppo_experience, args=(variant, model_path, steps, batch_size, results))
        child.start()
        name, tokens_per_s, peak = results.get()
        child.join()
        figures[name] = (tokens_per_s, peak)
    print(f"PPO experience making, {model_path} + models/sft, batch {batch_size}, {steps} timed steps")
    print(f"{'reference':<30}{'rollout tokens/s':>18}{'peak memory MB':>16}")
    labels = {"copy": "separate merged copy", "adapter": "frozen SFT adapter (sft)",
              "disabled": "adapters disabled (base)"}
    for name, (tokens_per_s, peak) in figures.items():
        print(f"{labels[name]:<30}{tokens_per_s:>18.1f}{peak:>16.0f}")
    copy_speed, copy_peak = figures["copy"]
    for name in ("adapter", "disabled"):
        speed, peak = figures[name]
        print(f"{name} / copy: tokens/s x{speed / copy_speed:.2f}, peak memory x{peak / copy_peak:.2f} "
              f"({peak - copy_peak:+.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m persona.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["sft", "generate", "ppo"])
    parser.add_argument("--model", type=Path, default=DEFAULT.base, help="a saved base model (base stage)")
    parser.add_argument("--steps", type=int, help="sft: timed training steps per layout (6); ppo: timed batches (3)")
    parser.add_argument("--prompts", type=int, default=32, help="generate: prompts")
    parser.add_argument("--batch-size", type=int, help="default: 4 for sft, 8 for generate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not (args.model / "config.json").exists():
        parser.error(f"--model {args.model}: no saved model there; run `dvc repro base` first")
    if args.which == "sft":
        bench_sft(args.model, args.steps or 6, args.batch_size or 4)
    elif args.which == "ppo":
        bench_ppo(args.model, args.steps or 3, args.batch_size or 8)
    else:
        bench_generate(args.model, args.prompts, args.batch_size or 8)


if __name__ == "__main__":
    main()
