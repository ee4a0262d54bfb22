"""Command line: `python -m persona evaluate ...` (the evaluate stage, usable outside DVC)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from persona import stage
from persona.config import POLICIES, ConfigError
from persona.data import load_dialogues, read_dialogues, split_by_persona


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


def evaluate_command(args) -> None:
    from persona.evaluate import evaluate, write_outputs

    params = stage.start(args.params)
    cfg = params.evaluate
    overrides = {"n": args.n} if args.n else {}
    if args.policies:
        overrides["policies"] = [p.strip() for p in args.policies.split(",") if p.strip()]
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    dialogues = dialogues_for(args.data, args.split, params)
    adapters = {"sft": args.sft, "ppo": args.ppo}
    reward = Path(args.reward) if args.reward else None
    result, samples = evaluate(dialogues, cfg, args.base, adapters, params.model.max_length, params.seed, reward)
    out = args.out
    write_outputs(result, samples, out, out.with_suffix(".samples.jsonl"), out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}, {out.with_suffix('.samples.jsonl')}, {out.with_suffix('.md')} in {result['wall_s']} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m persona")
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("evaluate", help="evaluate policies on held-out personas")
    ev.add_argument("--data", default="data/prepared",
                    help="a prepared folder ({split}.jsonl), an SPC CSV file, or a folder of SPC CSVs")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test", "all"])
    ev.add_argument("--policies", help=f"comma-separated subset of {','.join(POLICIES)} (default: params)")
    ev.add_argument("--n", type=int, help="prompts for generation metrics (default: params)")
    ev.add_argument("--out", type=Path, default=Path("eval.json"), help="JSON path; .md and .samples.jsonl beside it")
    ev.add_argument("--params", default="params.yaml")
    ev.add_argument("--base", type=Path, default=Path("models/base"))
    ev.add_argument("--sft", type=Path, default=Path("models/sft"), help="SFT adapter folder")
    ev.add_argument("--ppo", type=Path, default=Path("models/ppo"), help="PPO adapter folder")
    ev.add_argument("--reward", default="",
                    help="reward model folder (models/reward) to score replies; must match --base")
    args = parser.parse_args(argv)
    try:
        evaluate_command(args)
    except stage.USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
