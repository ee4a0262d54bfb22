"""README's params table, generated from the comments of params.yaml: `python -m persona.params_doc`.

params.yaml documents each param once, by its comment: inline after the value, or on comment lines
right above the key (at the key's indentation; a blank line detaches them). This module reads those
comments back; `--check` fails when README.md's table is stale, and tests/test_params_doc.py checks
that every field of persona.config.Params is documented there.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- params:start -->", "<!-- params:end -->"
# The same line shape persona/profiles.py edits in place: `key: value  # doc`, 2-space nesting.
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)(?P<gap> *)(?P<comment>#.*)?$")
_COMMENT = re.compile(r"^(?P<indent> *)#(?P<text>.*)$")


def key_docs(text: str) -> list[tuple[str, str | None, str]]:
    """(dotted key, value as written, doc) for every key of params.yaml `text`, sections included
    (their value is None), in file order."""
    entries, path, above = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            above = []  # a comment block followed by a blank line is a note, not a key's doc
            continue
        comment = _COMMENT.match(line)
        if comment:
            above.append((len(comment["indent"]), comment["text"].strip()))
            continue
        match = _LINE.match(line)
        indent = len(match["indent"]) if match else 0
        if not match or indent % 2 or indent // 2 > len(path):
            raise ValueError(f"line {number}: expected `key: value  # doc` with 2-space nesting, got {line!r}")
        if any(column != indent for column, _ in above):
            # a comment under a key's line, deeper than the next key, reads as a continuation but would
            # silently document the next key: refuse it
            raise ValueError(f"line {number}: comments above {match['key']!r} must start at its indentation")
        path = path[:indent // 2] + [match["key"]]
        inline = (match["comment"] or "#")[1:].strip()
        doc = " ".join(part for part in [*(part for _, part in above), inline] if part)
        entries.append((".".join(path), match["value"].strip(), doc))
        above = []
    # a section is a key whose next line is its child; everything else is a leaf, lists included
    return [(key, None if following.startswith(f"{key}.") else value, doc)
            for (key, value, doc), (following, _, _) in zip(entries, [*entries[1:], ("", "", "")])]


def param_docs(text: str) -> list[tuple[str, str, str]]:
    """(dotted key, default value as written, doc) for every leaf of params.yaml `text`."""
    return [(key, value, doc) for key, value, doc in key_docs(text) if value is not None]


def readme_table(text: str) -> str:
    """The markdown table `| key | default | meaning |`, one row per leaf of params.yaml `text`."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, value, doc in param_docs(text):
        rows.append(f"| `{key}` | {_cell(_default(value))} | {_cell(doc)} |")
    return "\n".join(rows) + "\n"


def update_readme(readme_text: str, table: str) -> str:
    """`readme_text` with `table` between the params:start and params:end markers."""
    count = readme_text.count
    if count(START) != 1 or count(END) != 1 or readme_text.index(START) > readme_text.index(END):
        raise ValueError(f"README must hold {START} then {END}, once each")
    head, rest = readme_text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}{END}{tail}"


def _default(value: str) -> str:
    """Numbers and booleans as written; strings and lists as code."""
    return f"`{value}`" if isinstance(yaml.safe_load(value), (str, list, dict)) else value


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m persona.params_doc",
                                     description="Rewrite README.md's params table from params.yaml's comments.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the table is stale")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    old = args.readme.read_text()
    new = update_readme(old, readme_table(args.params.read_text()))
    if args.check:
        if new != old:
            print(f"{args.readme}: params table is stale; run python -m persona.params_doc", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new)
        print(f"{args.readme}: params table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
