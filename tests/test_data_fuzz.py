"""Property-based tests of the SPC CSV reader: whatever a file holds, the reader does not crash, every row is
parsed or reported with its line, and a bad row never costs a well-formed row beside it."""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona.data import COLUMNS, MalformedRowError, load_dialogues

HUB_ID = "google/Synthetic-Persona-Chat"
EXTRA = "notes"
LINE_ENDS = ("\n", "\r\n", "\r")
LINE_END = re.compile(r"\r\n|\r|\n")
# Persona facts and turns are split with str.splitlines, so a fact or turn can't contain anything it breaks on.
SPLITLINES = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# derandomize: CI must see the same examples every run; deadline: a long row takes longer than the default.
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

PLAIN = st.text(st.characters(exclude_categories=("Cs",), exclude_characters=SPLITLINES), max_size=30)
# The first character is no space (facts and turns are stripped) and no comma: after a stray quote, a quoted
# cell starting with a comma lets the quote close there, and if the merged record then has as many fields as
# the header it is valid CSV, which no reader can tell from the rows it swallowed. SPC's cells start with a word.
FIRST = st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), exclude_characters=",")
FACT = st.builds(lambda first, rest: (first + rest).rstrip(), FIRST, PLAIN)
TURN = st.builds(lambda first, rest: (first + rest).replace("[", "(").rstrip(), FIRST, PLAIN)  # no placeholder
# Over the csv module's default field limit (128 KiB), with characters csv cares about.
LONG_FACT = st.builds(lambda first, char, size: first + char * size, FIRST, st.sampled_from('a,"é\x00'),
                      st.integers(131_000, 135_000))
RAW = st.one_of(st.text(st.sampled_from('ab ,"\r\n\x00é'), max_size=40),
                st.text(st.characters(exclude_categories=("Cs",)), max_size=40))


@dataclass
class Row:
    text: str  # CSV text, its line end included
    expected: tuple | None = None  # (personas, turns) a well-formed row must come back as


def csv_line(values: list[str], end: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)  # "\r\n" ends, so that a cell with a lone "\r" is quoted too
    return buffer.getvalue().removesuffix("\r\n") + end


@st.composite
def well_formed(draw, columns: tuple[str, ...]) -> tuple[dict, tuple]:
    personas = tuple(draw(st.lists(FACT, min_size=1, max_size=4)) for _ in range(2))
    if draw(st.integers(0, 7)) == 7:
        personas[0].append(draw(LONG_FACT))
    first = draw(st.integers(0, 1))
    turns = [((first + i) % 2, text) for i, text in enumerate(draw(st.lists(TURN, min_size=2, max_size=6)))]
    inner = draw(st.sampled_from(LINE_ENDS))  # line ends inside cells vary too
    values = {COLUMNS[0]: inner.join(personas[0]), COLUMNS[1]: inner.join(personas[1]),
              COLUMNS[2]: inner.join(f"User {speaker + 1}: {text}" for speaker, text in turns)}
    if EXTRA in columns:
        values[EXTRA] = draw(FACT)
    return values, (personas, turns)


@st.composite
def spc_row(draw, columns: tuple[str, ...]) -> Row:
    values, expected = draw(well_formed(columns))
    cells = [values[column] for column in columns]
    end = draw(st.sampled_from(LINE_ENDS))
    good = csv_line(cells, end)
    kind = draw(st.sampled_from(["good", "good", "good", "missing_fields", "extra_field", "empty_persona",
                                 "inserted_quote", "open_quote", "inserted_nul", "raw"]))
    if kind == "good":
        return Row(good, expected)
    if kind == "missing_fields":
        keep = sorted(draw(st.lists(st.integers(0, len(cells) - 1), min_size=1, max_size=len(cells) - 1,
                                    unique=True)))
        return Row(csv_line([cells[i] for i in keep], end))
    if kind == "extra_field":
        return Row(csv_line(cells + [draw(FACT)], end))
    if kind == "empty_persona":
        for column in draw(st.lists(st.sampled_from(COLUMNS[:2]), min_size=1, unique=True)):
            values[column] = draw(st.sampled_from(["", " ", "\n", " \r\n\t", "\r"]))
        return Row(csv_line([values[column] for column in columns], end))
    if kind in ("inserted_quote", "inserted_nul"):
        at = draw(st.integers(0, len(good) - len(end)))
        return Row(good[:at] + ('"' if kind == "inserted_quote" else "\x00") + good[at:])
    if kind == "open_quote":  # a quote that never closes
        return Row(f'"{draw(FACT).replace(chr(34), "")}{end}')
    # Not starting with a line end: that would be a blank line, and blank lines are no rows.
    return Row(draw(RAW.map(lambda text: text.lstrip("\r\n")).filter(bool)) + end)


@st.composite
def spc_files(draw) -> tuple[tuple[str, ...], str, list[Row]]:
    columns = tuple(draw(st.permutations(COLUMNS + ((EXTRA,) if draw(st.booleans()) else ()))))
    header = csv_line(list(columns), draw(st.sampled_from(LINE_ENDS)))
    return columns, header, draw(st.lists(spc_row(columns), max_size=8))


def line_count(text: str) -> int:
    return len(LINE_END.findall(text))


def line_of(origin: str, name: str) -> int:
    match = re.fullmatch(rf"{re.escape(name)}:(\d+)", origin)
    assert match, f"origin {origin!r} does not name the file and a line"
    return int(match.group(1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(spc=spc_files())
def test_every_row_is_parsed_or_reported_with_its_line(folder, spc):
    columns, header, rows = spc
    path = folder / "spc.csv"
    path.write_text(header + "".join(row.text for row in rows), encoding="utf-8", newline="")
    spans, line = [], 1 + line_count(header)
    for row in rows:
        spans.append(range(line, line + line_count(row.text)))
        line += line_count(row.text)
    bad_lines = {n for row, span in zip(rows, spans) if row.expected is None for n in span}
    good = [(row, span) for row, span in zip(rows, spans) if row.expected is not None]
    try:
        dialogues, report = load_dialogues(str(path), HUB_ID, "skip", folder)
    except MalformedRowError as error:
        assert not good, f"{len(good)} well-formed rows, yet: {error}"
        assert "no usable conversations" in str(error)
        return

    by_line = {line_of(d.origin, path.name): d for d in dialogues}
    for row, span in good:
        assert span[0] in by_line, f"the well-formed row at line {span[0]} was lost"
        dialogue = by_line.pop(span[0])
        assert (dialogue.personas, dialogue.turns) == row.expected
    # A quote or NUL inserted in a row can leave valid CSV; such a row may parse, but only from its own lines.
    assert set(by_line) <= bad_lines
    reported = [line_of(m.origin, path.name) for m in report.malformed]
    assert set(reported) <= bad_lines, "a report blames a line of a well-formed row or of the header"
    assert report.rows == len(dialogues) + len(report.malformed)
    assert report.extra_columns == ({EXTRA} if EXTRA in columns else set())
    # Nothing disappears silently: a bad row is reported at its line, lies inside the lines of a CSV record
    # reported before it, or was merged by a stray quote into the record of the bad row before it, which
    # was reported or parsed.
    covered = set()
    for malformed, first in zip(report.malformed, reported):
        span = re.search(r"\(lines (\d+)-(\d+)\)$", malformed.detail)
        covered.update(range(first, int(span.group(2)) + 1) if span else [first])
    returned = set(reported) | {line_of(d.origin, path.name) for d in dialogues}
    for row, span in zip(rows, spans):
        if row.expected is None and span[0] not in covered:
            before = [line for line in returned if line <= span[0]]
            assert before and max(before) in bad_lines, f"the bad row at line {span[0]} was not reported"
    if report.malformed:  # `fail` stops at the first of the rows `skip` reports
        with pytest.raises(MalformedRowError, match=rf"/{re.escape(report.malformed[0].origin)}: malformed row"):
            load_dialogues(str(path), HUB_ID, "fail", folder)


@FUZZ
@given(content=st.binary(max_size=200))
def test_any_bytes_give_rows_or_one_line_error(folder, content):
    """Arbitrary bytes after a valid header: parsed, or one line naming the file (and the byte, if not UTF-8)."""
    path = folder / "bytes.csv"
    head = csv_line(list(COLUMNS), "\r\n").encode()
    path.write_bytes(head + content)
    try:
        load_dialogues(str(path), HUB_ID, "skip", folder)
    except MalformedRowError as error:
        message = str(error)
        assert "\n" not in message and "bytes.csv" in message
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as decoding:
            assert f"bytes.csv: not UTF-8 at byte {len(head) + decoding.start} " in message
