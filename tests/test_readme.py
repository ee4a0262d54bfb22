"""README's module table names exactly the modules in the tree, so a newcomer's map stays true."""
from __future__ import annotations

import re

from tests.conftest import REPO


def module_rows() -> dict[str, str]:
    """First cell -> second cell of README's `| module | owns |` table."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| module | owns |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


def test_every_module_has_a_row_and_every_row_a_module():
    rows = module_rows()
    files = {p.relative_to(REPO).as_posix() for p in (REPO / "persona").glob("*.py") if p.name != "__init__.py"}
    packages = {p.parent.relative_to(REPO).as_posix() + "/" for p in (REPO / "persona").glob("*/__init__.py")}
    assert set(rows) == files | packages
    for package in packages:  # a package's row names each of its modules
        named = set(re.findall(r"`(\w+\.py)`", rows[package]))
        assert named == {p.name for p in (REPO / package).glob("*.py") if p.name != "__init__.py"}, package
