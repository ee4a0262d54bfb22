"""README's results tables, written from committed metrics: `python -m persona results` (`--check` compares).

One table per run: the default run's `metrics/`, then every `results/<run>/` folder (a profile's run, its
metrics copied there by scripts/profile_run.sh). Each gives the policies' headline evaluation metrics with their
95% CIs (dialogue-clustered) and n, the aligned policy's paired differences against SFT and base, and the reward
model's held-out accuracies: every figure a reader sees in README comes from a file in git, so the README cannot
drift from the metrics (tests/test_results.py regenerates it).
"""
from __future__ import annotations

import json
from pathlib import Path

from persona.paths import DEFAULT

BEGIN, END = "<!-- results: begin (python -m persona results writes this part) -->", "<!-- results: end -->"
RESULTS_DIR = Path("results")
# (key, label) of the evaluation rows; ci: the metric carries `_ci_low` / `_ci_high`
ROWS = (("persona_gain", "persona likelihood gain (nats/token)"), ("persona_hits1", "persona Hits@1/5"),
        ("grounded_not_copied", "**grounded and not copied**"), ("fact_copy_rate", "replies copying a fact"),
        ("facts_copied_mean", "facts copied per reply"), ("grounding_top1", "MiniLM persona top-1"),
        ("repeated_sentence_rate", "replies repeating a sentence"), ("reward_score", "reward score"),
        ("gold_perplexity", "gold-reply perplexity"), ("reply_hits1", "reply Hits@1/20"), ("f1", "F1"),
        ("length_words", "reply length (words)"), ("reward_length_correlation", "reward-length correlation"),
        ("multiturn_grounding_top1", "5-turn MiniLM persona top-1"))
PAIRED_ROWS = (("persona_gain", "persona likelihood gain"), ("persona_hits1", "persona Hits@1/5"),
               ("grounded_not_copied", "grounded and not copied"), ("fact_copy_rate", "replies copying a fact"),
               ("repeated_sentence_rate", "replies repeating a sentence"), ("reward_score", "reward score"),
               ("gold_perplexity", "gold-reply NLL (nats/token)"), ("f1", "F1"),
               ("multiturn_grounding_top1", "5-turn MiniLM persona top-1 (per conversation)"))


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _cell(block: dict, key: str) -> str:
    if key not in block or block[key] is None:
        return "-"
    text = _number(block[key])
    if f"{key}_ci_low" in block:
        text += f" [{_number(block[f'{key}_ci_low'])}, {_number(block[f'{key}_ci_high'])}]"
    return text


def _signed(value: float) -> str:
    return f"{value:+.3f}" if value else "0.000"


def _difference(entry: dict | None) -> str:
    if not entry or entry.get("diff") is None:
        return "-"
    low, high = entry["ci_low"], entry["ci_high"]
    mark = " *" if low > 0 or high < 0 else ""
    return f"{_signed(entry['diff'])} [{_signed(low)}, {_signed(high)}]{mark} (n={entry['n']})"


def run_section(name: str, folder: Path, shown: Path) -> str:
    """The markdown of one run's folder of metrics (eval.json, reward.json, align.json), named `shown`."""
    evaluation = json.loads((folder / "eval.json").read_text())
    reward = json.loads((folder / "reward.json").read_text())
    align = json.loads((folder / "align.json").read_text())
    policies = evaluation["config"]["policies"]
    aligned = [p for p in policies if p not in ("base", "sft")]
    scored, generated = evaluation["sft"].get("persona_gain_n"), evaluation["n_prompts"]
    which = f"the first {scored}" if scored <= generated else f"{scored}, these and {scored - generated} more"
    lines = [f"**{name}** (`{shown.as_posix()}/`): {generated} test prompts from "
             f"{evaluation['n_prompt_dialogues']} dialogues; persona likelihood and Hits@1/5 on {which} "
             f"({evaluation['n_likelihood_dialogues']} dialogues); "
             f"reply Hits@1/20 on {evaluation['n_hits_dialogues']} dialogues' prompts; 95% CIs resample dialogues.",
             "", "| metric | " + " | ".join(policies) + " | gold |", "|---" * (len(policies) + 2) + "|"]
    for key, label in ROWS:
        cells = [_cell(evaluation[p], key) for p in policies] + [_cell(evaluation["gold"], key)]
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for policy in aligned:
        lines += ["", f"Paired on the same prompts, {policy} minus SFT and minus base (`*`: the CI excludes 0):", "",
                  f"| metric | {policy} - sft | {policy} - base |", "|---|---|---|"]
        for key, label in PAIRED_ROWS:
            cells = [_difference(evaluation["paired"].get(f"{policy}_vs_{other}", {}).get(key))
                     for other in ("sft", "base")]
            if any(c != "-" for c in cells):  # runs evaluated before a metric was paired lack it
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Reward (" + reward.get("kind", "model") + f") on {reward['n_pairs']} held-out pairs: accuracy "
              f"{_number(reward['accuracy'])}; the same reply under its own vs another persona "
              f"{_cell(reward, 'persona_only_accuracy')} (n={reward['n_swap']}); mismatch pairs "
              f"{_cell(reward, 'accuracy_mismatch')} (n={reward['n_mismatch']}); "
              + (f"contradiction pairs {_cell(reward, 'accuracy_contradiction')} (n={reward['n_contradiction']}); "
                 if reward.get("n_contradiction") else "")
              + f"length-matched {_number(reward['accuracy_length_matched'])} (n={reward['n_length_matched']})."]
    gain, algorithm = align.get("reward_gain"), align["algorithm"]
    if gain is not None:
        lines.append(f"Align ({algorithm}): held-out reward, SFT {_number(align.get('sft_reward'))} -> "
                     f"{algorithm} {_number(align.get(algorithm + '_reward'))}, paired gain {_signed(gain)} "
                     f"[{_signed(align['reward_gain_ci_low'])}, {_signed(align['reward_gain_ci_high'])}] "
                     f"(n={align.get('eval_prompts')}).")
    if align.get("valid_persona_accuracy") is not None:  # mdpo: its own held-out pairs
        key = "valid_persona_accuracy"
        lines.append(f"Held-out pairs (one valid reply, its own vs another persona) ranked right: SFT "
                     f"{_number(align[key + '_sft'])} -> {algorithm} {_number(align[key])}, paired gain "
                     f"{_signed(align[key + '_gain'])} [{_signed(align[key + '_gain_ci_low'])}, "
                     f"{_signed(align[key + '_gain_ci_high'])}] (n={align['valid_pairs']}).")
    return "\n".join(lines)


def criteria(evaluation: dict, policy: str) -> dict[str, bool | None]:
    """Issue 15's bar for an aligned policy against SFT, on one run's test split (None: not measured)."""
    mine, sft, gold = evaluation[policy], evaluation["sft"], evaluation["gold"]
    paired = evaluation["paired"].get(f"{policy}_vs_sft", {})

    def beats(key: str) -> bool | None:
        entry = paired.get(key)
        return None if not entry or entry.get("ci_low") is None else entry["ci_low"] > 0

    def at_most(value, bound) -> bool | None:  # metrics carry 4 decimals: compare there, not at float noise
        return None if value is None or bound is None else value <= round(bound, 4)

    correlation = mine.get("reward_length_correlation")
    return {"beats SFT on persona Hits@1 (CI)": beats("persona_hits1"),
            "beats SFT on likelihood gain (CI)": beats("persona_gain"),
            "copies <= gold + 0.05": at_most(mine.get("fact_copy_rate"), gold.get("fact_copy_rate", 0) + 0.05),
            "perplexity <= 1.05 x SFT": at_most(mine.get("gold_perplexity"), 1.05 * sft["gold_perplexity"]),
            "length-reward r in [-0.3, 0.3]": None if correlation is None else abs(correlation) <= 0.3,
            "repeats <= gold + 0.02": at_most(mine.get("repeated_sentence_rate"),
                                              gold.get("repeated_sentence_rate", 0) + 0.02)}


def comparison(root: Path) -> str:
    """One row per run's aligned policy: its reward gain over SFT on the valid split (the align stage's held-out
    prompts: what a choice between algorithms may look at), then on the test split persona use against SFT
    (paired), recitation, quality, cost, and how many of issue 15's criteria it meets."""
    lines = ["| run | algorithm | reward | valid: reward gain - SFT | likelihood gain - SFT | persona Hits@1 - SFT "
             "| grounded, not copied - SFT | copies a fact (gold) | perplexity / SFT | repeats (gold) "
             "| align wall, peak | criteria met |",
             "|---" * 12 + "|"]
    for name, folder in runs(root):
        evaluation = json.loads((root / folder / "eval.json").read_text())
        align = json.loads((root / folder / "align.json").read_text())
        kind = json.loads((root / folder / "reward.json").read_text()).get("kind", "model")
        for policy in [p for p in evaluation["config"]["policies"] if p not in ("base", "sft")]:
            paired = evaluation["paired"].get(f"{policy}_vs_sft", {})
            mine, gold = evaluation[policy], evaluation["gold"]
            met = criteria(evaluation, policy)
            valid = {"diff": align.get("reward_gain"), "ci_low": align.get("reward_gain_ci_low"),
                     "ci_high": align.get("reward_gain_ci_high"), "n": align.get("eval_prompts")}
            lines.append(" | ".join([
                f"| {name}", policy, kind, _difference(valid), *(_difference(paired.get(k)) for k in
                                              ("persona_gain", "persona_hits1", "grounded_not_copied")),
                f"{_number(mine.get('fact_copy_rate'))} ({_number(gold.get('fact_copy_rate'))})",
                _number(mine["gold_perplexity"] / evaluation["sft"]["gold_perplexity"]),
                f"{_number(mine.get('repeated_sentence_rate'))} ({_number(gold.get('repeated_sentence_rate'))})",
                f"{align.get('wall_s', 0) / 60:.0f} min, {align.get('peak_memory_mb', 0) / 1024:.1f} GB",
                f"{sum(v is True for v in met.values())}/{len(met)}: "
                + ", ".join(k for k, v in met.items() if v is not True) + (" missed" if not all(met.values()) else "")
            ]) + " |")
    return "\n".join(lines)


def runs(root: Path) -> list[tuple[str, Path]]:
    """(name, folder relative to `root`) of every run with metrics: the default run first."""
    found = [("default run", DEFAULT.metrics)]
    if (root / RESULTS_DIR).is_dir():
        found += [(folder.name, folder.relative_to(root)) for folder in sorted((root / RESULTS_DIR).iterdir())
                  if (folder / "eval.json").exists()]
    return found


def section(root: Path) -> str:
    tables = [run_section(name, root / folder, folder) for name, folder in runs(root)]
    return "\n\n".join([*tables, "Every run's aligned policy against issue 15's bar (paired differences with "
                         "dialogue-clustered 95% CIs, `*` excludes 0; criteria not met are named):", "",
                         comparison(root)])


def rewritten(readme: str, body: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    return head + BEGIN + "\n" + body + "\n" + END + rest.split(END, 1)[1]


def write(readme: Path, check: bool = False) -> bool:
    """Rewrite README's results part from the metrics; with `check`, only compare. True if it was up to date."""
    root = readme.resolve().parent
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no results markers ({BEGIN} ... {END})")
    new = rewritten(text, section(root))
    if not check and new != text:
        readme.write_text(new)
    return new == text
