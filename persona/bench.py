"""Benchmarks that print figures measured in one run, as ratios against a baseline.

    python -m persona.bench sft [--steps 6] [--batch-size 4] [--model models/base]
    python -m persona.bench generate [--prompts 32] [--batch-size 8] [--model models/base]
    python -m persona.bench ppo [--steps 3] [--batch-size 8] [--model models/base]
    python -m persona.bench rollout [--steps 3] [--batch-size ppo.rollout_batch_size] [--model models/base]
    python -m persona.bench evaluate [--prompts 32] [--batch-size 16] [--model models/base]

`sft`: LoRA training throughput of the whole-conversation layout against the per-turn
layout on the same dialogues: tokens/s (compute speed) and responses trained/s (what the
layout buys: the per-turn layout re-encodes the whole history for every reply).
`generate`: the evaluator's batched, KV-cached generation against one prompt at a time,
same prompts, same greedy decoding (so both produce the same replies).
`ppo`: PPO experience making (sample replies, then policy and reference log-probs) with the
reference as a separate merged copy of the SFT model (the baseline), as a frozen adapter on the
policy's own weights (`ppo.reference: sft`), and as the adapter disabled (`ppo.reference: base`);
each variant runs in a fresh process so its peak memory is its own.
`rollout`: PPO rollout tokens/s through the trained module (`ppo.sampler: policy`), from its merged copy
(`ppo.sampler: merged`) and from plain `generate` of the merged weights, on the same batches and seeds,
with the copy's sampler-vs-scorer log-prob gap.
`evaluate`: evaluation's two costs per policy, in prompts/s, on cpu-spc's SPC test split (the project
sample when the shared SPC is absent): likelihood (persona Hits@1/5 + reply Hits@1/20) by
persona/scoring.py against the previous path (persona/likelihood.py: logits at every position, the
true persona scored twice), same scores; and generation (evaluate's sampling, 48 new tokens).
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
from tqdm import tqdm

from persona.chat_format import build_dataset, select_prompts
from persona.config import load_params
from persona.data import load_dialogues, read_dialogues
from persona.generation import Decoding, generate_replies
from persona.hardware import peak_memory_mb, resolve_compute
from persona.likelihood import collate, masked_nll
from persona.models import load_for_training, lora_config
from persona.paths import DEFAULT
from persona.seeds import derive_seed


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


def plain_generate(model, tokenizer, chats: list[list[dict]], decoding: Decoding) -> list[list[int]]:
    """The baseline: one left-padded batch straight into `model.generate`; each reply's tokens up to end-of-turn."""
    from persona.chat_format import render

    encoded = [tokenizer(render(tokenizer, chat, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for chat in chats]
    width = max(map(len, encoded))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    torch.manual_seed(decoding.seed)
    device = next(model.parameters()).device
    output = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), do_sample=True,
                            temperature=decoding.temperature, top_p=1.0, top_k=0,
                            max_new_tokens=decoding.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    replies = []
    for row in output[:, width:].tolist():
        replies.append(row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return replies


def bench_rollout(model_path: Path, steps: int, batch_size: int) -> None:
    """PPO rollout tokens/s, three ways on the same batches and seeds, rounds interleaved so that a busy machine
    slows every path alike: through the trained module (`ppo.sampler: policy`, the path before the merged copy),
    from the merged copy (`ppo.sampler: merged`, its refresh included), and plain `generate` of the merged
    weights (the ceiling)."""
    import dataclasses

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona.ppo.experience import SAMPLER_GAP_BOUNDS
    from persona.ppo.policy import load_policy
    from persona.ppo.rollout import (
        episodes,
        exact_decoding,
        pack,
        response_logits,
        rollout,
        sampler_logprobs,
        token_logprobs,
    )
    from persona.ppo.sampler import MergedSampler

    params = load_params()
    cfg = dataclasses.replace(params.ppo, batch_size=batch_size)
    compute = resolve_compute(cfg.quant, cfg.precision, "bench")
    policy, tokenizer = load_policy(model_path, DEFAULT.sft, cfg, compute)
    policy.eval()
    sampler = MergedSampler(policy, compute.dtype)
    plain = AutoModelForCausalLM.from_pretrained(model_path, dtype=compute.dtype)
    plain = PeftModel.from_pretrained(plain, str(DEFAULT.sft)).merge_and_unload().eval().to(compute.device)
    pool = episodes(read_dialogues(DEFAULT.prepared / "train.jsonl"), 1, cfg.max_history_turns)
    autocast = torch.autocast(torch.device(compute.device).type, dtype=compute.dtype,
                              enabled=compute.precision != "fp32")
    paths = {"trained module (sampler: policy)": lambda batch, decoding: rollout(policy, tokenizer, batch, 1, decoding),
             "merged copy (sampler: merged)": lambda batch, decoding: rollout(sampler.refresh(), tokenizer, batch, 1,
                                                                              decoding),
             "plain generate, merged weights": lambda batch, decoding: plain_generate(
                 plain, tokenizer, [e.prompt.chat() for e in batch], decoding)}
    tokens, seconds, replies = {name: 0 for name in paths}, {name: 0.0 for name in paths}, {name: [] for name in paths}
    for step in tqdm(range(steps + 1), desc="rollout rounds"):
        batch = pool[step * batch_size:(step + 1) * batch_size]
        decoding = exact_decoding(cfg, derive_seed(params.seed, "bench-rollout", step))
        for name, generate_batch in paths.items():
            started = time.perf_counter()
            with torch.no_grad(), autocast:
                out = generate_batch(batch, decoding)
            if step:  # round 0 warms up
                seconds[name] += time.perf_counter() - started
                ids = [s.reply.token_ids for s in out] if name != "plain generate, merged weights" else out
                tokens[name] += sum(map(len, ids))
                replies[name] += ids
    with torch.no_grad(), autocast:  # the copy's sampler check, as PPO runs it on its first rollout
        samples = rollout(sampler.refresh(), tokenizer, pool[:batch_size], 1, exact_decoding(cfg, params.seed), True)
        packed = pack(tokenizer, samples).to(compute.device)
        scored = token_logprobs(response_logits(policy, packed, cfg.temperature)[0], packed)
    gap = ((sampler_logprobs(samples, packed) - scored).abs() * packed.response_mask).max().item()
    print(f"PPO rollouts, {model_path} + models/sft, batch {batch_size}, {cfg.max_new_tokens} new tokens max, "
          f"temperature {cfg.temperature}, {steps} timed rounds, {compute.device}/{compute.quant}/{compute.precision}")
    print(f"{'path':<34}{'tokens':>8}{'tokens/s':>10}")
    speed = {name: tokens[name] / seconds[name] for name in paths}
    for name in paths:
        print(f"{name:<34}{tokens[name]:>8}{speed[name]:>10.1f}")
    old, new, ceiling = speed.values()
    same = sum(a == b for a, b in zip(*list(replies.values())[:2]))
    print(f"merged / trained module: x{new / old:.2f}; merged / plain generate: {new / ceiling:.0%}; "
          f"identical replies, merged vs trained module: {same}/{len(replies[next(iter(paths))])}; "
          f"sampler vs scorer log-prob gap: max {gap:.2g} nats (bound {SAMPLER_GAP_BOUNDS[compute.precision]:g})")


def bench_evaluate(model_path: Path, prompts: int, batch_size: int) -> None:
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona import likelihood, scoring
    from persona.config import Params, from_dict, resolve_path
    from persona.data import persona_key, split_by_persona
    from persona.evaluate import distractor_personas
    from persona.profiles import PROFILES_DIR, profile_values

    params = from_dict(Params, profile_values("cpu-spc"), "")
    source = resolve_path(PROFILES_DIR.parent, params.data.source)
    data = str(source) if source.exists() else "sample"
    dialogues = load_dialogues(data, params.data.hub_id, "skip")[0]
    test = split_by_persona(dialogues, params.data.valid_fraction, params.data.test_fraction, params.seed)[0]["test"]
    cfg = dataclasses.replace(params.evaluate, batch_size=batch_size)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    items = select_prompts(test, prompts, cfg.max_history_turns, params.seed)
    rng = random.Random(params.seed)
    pool = {persona_key(p): p for d in test for p in d.personas}
    personas = [distractor_personas(p.facts, pool, cfg.persona_candidates, rng) for p in items]
    texts = [t for d in test for _, t in d.turns]
    replies = [[p.gold] + rng.sample([t for t in texts if t != p.gold], cfg.reply_candidates - 1) for p in items]
    pad = tokenizer.pad_token_id

    def previous() -> list[float]:
        persona = likelihood.reply_logprobs(model, tokenizer, [p.chat(f, p.gold) for p, fs in zip(items, personas)
                                                               for f in fs], batch_size)
        hits = [likelihood.candidate_logprobs(model, tokenizer, p.chat(), r, batch_size)
                for p, r in zip(items, replies)]
        return persona + [s for row in hits for s in row]

    def batched() -> list[float]:  # tokenising included: evaluate does it once, for every policy
        hits = [scoring.candidate_logprobs(model, scoring.candidate_set(tokenizer, p.chat(), r), pad, batch_size)
                for p, r in zip(items, replies)]
        swapped = iter(scoring.mean_logprobs(model, scoring.chat_rows(
            tokenizer, [p.chat(f, p.gold) for p, fs in zip(items, personas) for f in fs[1:]]), pad, batch_size))
        persona = [score for row in hits for score in [row[0]] + [next(swapped) for _ in range(len(personas[0]) - 1)]]
        return persona + [s for row in hits for s in row]

    timed = {}
    for label, path in (("previous", previous), ("batched", batched)):
        started = time.perf_counter()
        timed[label] = (path(), time.perf_counter() - started)
    decoding = Decoding(max_new_tokens=48, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                        batch_size=batch_size, seed=params.seed)
    started = time.perf_counter()
    generate_replies(model, tokenizer, [p.chat() for p in items], decoding)
    generation = time.perf_counter() - started
    (old, old_s), (new, new_s) = timed.values()
    gap = max(abs(a - b) for a, b in zip(old, new))
    print(f"Evaluation, {model_path}, {len(items)} prompts of {data} (test split: {len(test)} dialogues), "
          f"batch {batch_size}, {torch.get_num_threads()} threads")
    print(f"{'part':<40}{'prompts/s':>10}")
    print(f"{'likelihood, previous path':<40}{len(items) / old_s:>10.3f}")
    print(f"{'likelihood, batched (persona/scoring.py)':<40}{len(items) / new_s:>10.3f}")
    print(f"{'generation (48 new tokens, sampled)':<40}{len(items) / generation:>10.3f}")
    print(f"likelihood batched / previous: x{old_s / new_s:.2f}; largest score difference {gap:.1e} nats/token")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m persona.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["sft", "generate", "ppo", "rollout", "evaluate"])
    parser.add_argument("--model", type=Path, default=DEFAULT.base, help="a saved base model (base stage)")
    parser.add_argument("--steps", type=int, help="sft: timed training steps per layout (6); ppo: timed batches (3)")
    parser.add_argument("--prompts", type=int, default=32, help="generate, evaluate: prompts")
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
    elif args.which == "rollout":
        bench_rollout(args.model, args.steps or 3, args.batch_size or load_params().ppo.rollout_batch_size)
    elif args.which == "evaluate":
        bench_evaluate(args.model, args.prompts, args.batch_size or 16)
    else:
        bench_generate(args.model, args.prompts, args.batch_size or 8)


if __name__ == "__main__":
    main()
