"""Command line: `python -m persona {profile,evaluate,chat,web,export,results}`.

profile: apply a ready parameter set (profiles/) to params.yaml. evaluate: the evaluate stage,
usable outside DVC. chat: a terminal chat with any policy the pipeline produced. web: the
Gradio demo. export: merge an adapter into a plain checkpoint. results: README's results tables, written
from the committed metrics.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from persona import runner
from persona.config import POLICIES, ConfigError
from persona.data import load_dialogues, read_dialogues, split_by_persona
from persona.paths import DEFAULT, TRAINING_STAGES
from persona.web import MAX_MESSAGE_CHARS, QUEUE_SIZE, serve


def dialogues_for(data: str, split: str, params) -> list:
    """A prepared folder's split file, or an SPC CSV file/folder split persona-disjointly like `prepare`."""
    folder = Path(data)
    if (folder / f"{split}.jsonl").is_file():
        return read_dialogues(folder / f"{split}.jsonl")
    if not folder.exists():
        raise ConfigError(f"--data: {data} does not exist")
    dialogues, _ = load_dialogues(str(folder.resolve()), params.data.hub_id, "skip")
    if split == "all":
        return dialogues
    splits, _ = split_by_persona(dialogues, params.data.valid_fraction, params.data.test_fraction, params.seed)
    return splits[split]


def profile_command(args) -> None:
    from persona.hardware import Machine
    from persona.launch import check_machine
    from persona.profiles import apply_profile, available

    runner.start_logging()
    if not args.name:
        print("profiles:", ", ".join(available()))
        return
    params, changes = apply_profile(args.name, Path(args.params))
    print(f"{args.params}: profile {args.name}, {len(changes)} values changed")
    for change in changes:
        print(f"  {change}")
    machine = Machine.detect()
    for stage in TRAINING_STAGES:  # say now, not when `dvc repro` reaches the stage
        try:
            check_machine(params, stage, machine)
        except ConfigError as error:
            print(f"warning: this machine ({machine.describe()}) cannot run it as is: {error}")


def evaluate_command(args) -> None:
    from persona.evaluate import evaluate, write_outputs

    params = runner.start(args.params)
    overrides = {"n": args.n} if args.n else {}
    if args.policies:
        overrides["policies"] = [p.strip() for p in args.policies.split(",") if p.strip()]
    params = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, **overrides))
    params.validate(Path(args.params).resolve().parent)
    cfg = dataclasses.replace(params.evaluate, policies=params.evaluated_policies())
    dialogues = dialogues_for(args.data, args.split, params)
    adapters = {"sft": args.sft, params.align.algorithm: args.policy}
    reward = Path(args.reward) if args.reward else None
    result, samples, _ = evaluate(dialogues, cfg, args.base, adapters, params.model.max_length, params.seed, reward)
    out = args.out
    runner.write_metrics(out, result)
    write_outputs(result, samples, out.with_suffix(".samples.jsonl"), out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}, {out.with_suffix('.samples.jsonl')}, {out.with_suffix('.md')} in {result['wall_s']} s")


def results_command(args) -> None:
    from persona.results import runs, write

    current = write(args.readme, args.check)
    folders = ", ".join(str(folder) for _, folder in runs(args.readme.resolve().parent))
    if args.check and not current:
        print(f"{args.readme}: results out of date with {folders}; run python -m persona results", file=sys.stderr)
        raise SystemExit(1)
    print(f"{args.readme}: results {'up to date' if current else 'written'} from {folders}")


def decoding_from(args):
    from persona.generation import Decoding
    return Decoding(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, batch_size=1, seed=args.seed)


def chat_command(args) -> None:
    from persona.chat import ChatSession, load_chat_models, parse_persona, run_terminal

    runner.start_logging()
    facts = parse_persona(args.persona, Path(args.persona_file) if args.persona_file else None)
    adapters = {"policy": Path(args.adapter)} if args.adapter else {}
    model, tokenizer = load_chat_models(args.base, adapters)
    run_terminal(ChatSession(model, tokenizer, facts, decoding_from(args)))


def web_command(args) -> None:
    if args.queue_size < 1 or args.max_message_chars < 1:
        raise ConfigError("--queue-size and --max-message-chars must be at least 1")
    runner.start_logging()
    adapters = {"sft": args.sft, "aligned": args.policy}
    serve(args.base, adapters, decoding_from(args), args.embedding_model, args.host, args.port,
          queue_size=args.queue_size, max_message_chars=args.max_message_chars)


def export_command(args) -> None:
    from persona.export import export_merged

    runner.start_logging()
    info = export_merged(args.base, Path(args.adapter), args.out)
    print(f"wrote {args.out} ({info['parameters']:,} parameters); GGUF: {info['gguf']}")


def add_decoding(parser) -> None:
    parser.add_argument("--base", type=Path, default=DEFAULT.base, help="the base stage's model")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 = no cut")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m persona")
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser("profile", help="apply a parameter profile (profiles/NAME.yaml) to params.yaml")
    profile.add_argument("name", nargs="?", help="kaggle-2xt4, gpu-24gb, a100-80gb, cpu-quick; none = list them")
    profile.add_argument("--params", default=str(DEFAULT.params))
    profile.set_defaults(run=profile_command)

    ev = commands.add_parser("evaluate", help="evaluate policies on held-out personas")
    ev.add_argument("--data", default=str(DEFAULT.prepared),
                    help="a prepared folder ({split}.jsonl), an SPC CSV file, or a folder of SPC CSVs")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test", "all"])
    ev.add_argument("--policies", help=f"comma-separated subset of {','.join(POLICIES)} (default: params)")
    ev.add_argument("--n", type=int, help="prompts for generation metrics (default: params)")
    ev.add_argument("--out", type=Path, default=Path("eval.json"), help="JSON path; .md and .samples.jsonl beside it")
    ev.add_argument("--params", default=str(DEFAULT.params))
    ev.add_argument("--base", type=Path, default=DEFAULT.base)
    ev.add_argument("--sft", type=Path, default=DEFAULT.sft, help="SFT adapter folder")
    ev.add_argument("--policy", type=Path, default=DEFAULT.policy,
                    help="the aligned adapter (align stage), evaluated under align.algorithm's name")
    ev.add_argument("--reward", default="",
                    help="reward model folder (models/reward) to score replies; must match --base")
    ev.set_defaults(run=evaluate_command)

    chat = commands.add_parser("chat", help="chat in the terminal with a persona")
    chat.add_argument("--adapter", default=str(DEFAULT.policy),
                      help="an sft or align stage output; '' = the base model")
    chat.add_argument("--persona", help='facts separated by "|", e.g. "I love hiking | I have two dogs"')
    chat.add_argument("--persona-file", help="a file with one fact per line")
    add_decoding(chat)
    chat.set_defaults(run=chat_command)

    web = commands.add_parser("web", help="the Gradio demo: models side by side with a persona score")
    web.add_argument("--sft", type=Path, default=DEFAULT.sft)
    web.add_argument("--policy", type=Path, default=DEFAULT.policy, help="the aligned adapter (align stage)")
    web.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the demo to your network")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--embedding-model", default="all-minilm-l6-v2", help="judge for the persona score")
    web.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                     help="messages that may wait for the model; more are refused with Gradio's 'queue full' error "
                     "(default: %(default)s)")
    web.add_argument("--max-message-chars", type=int, default=MAX_MESSAGE_CHARS,
                     help="longer messages get a message naming the limit, no reply (default: %(default)s)")
    add_decoding(web)
    web.set_defaults(run=web_command)

    export = commands.add_parser("export", help="merge an adapter into the base and save a plain checkpoint")
    export.add_argument("--adapter", default=str(DEFAULT.policy), help="an sft or align stage output")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--base", type=Path, default=DEFAULT.base)
    export.set_defaults(run=export_command)

    results = commands.add_parser("results", help="write README's results tables from metrics/ and results/*/")
    results.add_argument("--check", action="store_true", help="only check README is up to date (exit 1 if not)")
    results.add_argument("--readme", type=Path, default=Path("README.md"))
    results.set_defaults(run=results_command)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except runner.USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
