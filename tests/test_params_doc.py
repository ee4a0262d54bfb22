"""Each param is documented once, by its comment in params.yaml; README's table is generated from it."""
from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import typing

import pytest

from persona.config import Params
from persona.params_doc import END, START, key_docs, main, param_docs, readme_table, update_readme
from tests.conftest import REPO

PARAMS = (REPO / "params.yaml").read_text()
README = (REPO / "README.md").read_text()
CONFIG = REPO / "persona" / "config.py"


def dataclass_leaves(cls, prefix: str = "") -> list[str]:
    """Dotted names of every non-dataclass field under dataclass `cls`."""
    hints, keys = typing.get_type_hints(cls), []
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            keys += dataclass_leaves(hint, f"{prefix}{item.name}.")
        else:
            keys.append(f"{prefix}{item.name}")
    return keys


def field_comments(source: str) -> list[int]:
    """Lines of comments after, or alone right above, a field of a @dataclass class in Python `source`."""
    on, above = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    on.update(range(stmt.lineno, stmt.end_lineno + 1))
                    above.add(stmt.lineno - 1)
    lines = source.splitlines()
    return [token.start[0] for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type == tokenize.COMMENT and (token.start[0] in on or token.start[0] in above
                                                   and not lines[token.start[0] - 1][:token.start[1]].strip())]


def test_every_field_is_a_documented_key_of_params_yaml():
    docs = {key: doc for key, _, doc in param_docs(PARAMS)}
    fields = dataclass_leaves(Params)
    assert sorted(docs) == sorted(fields), "params.yaml's leaves and persona.config.Params' fields differ"
    assert [key for key in fields if not docs[key]] == [], "params without a comment in params.yaml"


def test_every_section_is_documented():
    sections = [(key, doc) for key, value, doc in key_docs(PARAMS) if value is None]
    assert {key for key, _ in sections} >= {"data", "sft", "pairs.shares", "align", "ppo", "evaluate"}
    assert [key for key, doc in sections if not doc] == []


def test_readme_table_is_generated_from_params_yaml():
    assert README.count(START) == 1 and README.count(END) == 1
    current = README.split(START)[1].split(END)[0]
    assert current == "\n" + readme_table(PARAMS), "README.md is stale: run python -m persona.params_doc"
    assert main(["--check"]) == 0


def test_check_fails_on_a_stale_readme(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(README.replace("| `seed` | 42 |", "| `seed` | 7 |"))
    assert main(["--check", "--readme", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--readme", str(stale)]) == 0  # rewrites it
    assert stale.read_text() == README


def test_config_fields_carry_no_doc_comments():
    assert field_comments(CONFIG.read_text()) == [], "document params in params.yaml, not in persona/config.py"


def test_field_comments_finds_trailing_and_above_comments():
    source = ("from dataclasses import dataclass\n\n\n"
              "@dataclass\nclass A:\n"
              "    x: int = 1  # a doc\n"
              "    # another doc\n"
              "    y: int = 2\n"
              "    z: str = '#not a comment'\n\n"
              "    def f(self):\n"
              "        return 1  # code comment: fine\n\n\n"
              "class B:\n"
              "    w: int = 3  # not a dataclass: fine\n")
    assert field_comments(source) == [6, 7]


def test_param_docs_reads_inline_and_above_comments():
    text = ("# file header: a blank line detaches it\n\n"
            "seed: 42  # the seed\n"
            "data:  # a section\n"
            "  # a doc above,\n"
            "  # on two lines\n"
            "  name: x | y\n"
            "  nested:\n"
            "    deep: \"\"  # empty string\n"
            "  policies: [base, sft]   # a list | is a leaf\n"
            "undocumented: 1.0e-3\n")
    assert param_docs(text) == [
        ("seed", "42", "the seed"),
        ("data.name", "x | y", "a doc above, on two lines"),
        ("data.nested.deep", '""', "empty string"),
        ("data.policies", "[base, sft]", "a list | is a leaf"),
        ("undocumented", "1.0e-3", ""),
    ]
    assert [key for key, value, _ in key_docs(text) if value is None] == ["data", "data.nested"]
    assert readme_table(text).splitlines()[2:] == [
        "| `seed` | 42 | the seed |",
        "| `data.name` | `x \\| y` | a doc above, on two lines |",
        '| `data.nested.deep` | `""` | empty string |',
        "| `data.policies` | `[base, sft]` | a list \\| is a leaf |",
        "| `undocumented` | 1.0e-3 |  |",
    ]


def test_param_docs_refuses_a_comment_that_would_document_the_wrong_key():
    with pytest.raises(ValueError, match="comments above 'b'"):
        param_docs("a: 1    # doc of a\n        # continued?\nb: 2  # doc of b\n")


def test_update_readme_replaces_only_between_the_markers():
    readme = f"intro\n{START}\nold table\n{END}\noutro\n"
    assert update_readme(readme, "| new |\n") == f"intro\n{START}\n| new |\n{END}\noutro\n"
    with pytest.raises(ValueError):
        update_readme("no markers\n", "| new |\n")
