"""SPC parsing, the malformed-row policy, sampling and the persona-disjoint split."""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from persona import data
from persona.config import ConfigError
from persona.data import (
    COLUMNS,
    MALFORMED_KINDS,
    Dialogue,
    Malformed,
    MalformedRowError,
    load_dialogues,
    parse_row,
    persona_key,
    read_dialogues,
    sample_fraction,
    split_by_persona,
)
from persona.paths import DEFAULT, Paths
from persona.runner import USER_ERRORS
from tests.conftest import REPO, params_with

HUB_ID = "google/Synthetic-Persona-Chat"
SPC_VALID = Path(__file__).resolve().parents[2] / "shared/data/synthetic-persona-chat/valid.csv"

P1 = ["I am a nurse.", "I have two beagles.", "I drink too much coffee."]
P2 = ["I drive a truck.", "I love audiobooks."]
GOOD_CONVERSATION = ("User 1: Hi, I just got off a night shift.\n"
                     "User 2: Long night? I drive trucks, so I know the feeling.\n"
                     "User 1: Very long. Coffee is my best friend.\n"
                     "User 2: Audiobooks are mine.")

# One row per malformed kind that parse_row reports.
MALFORMED_ROWS = {
    "no_persona": (P1, [], GOOD_CONVERSATION),
    "empty_conversation": (P1, P2, "\n  \n"),
    "unprefixed_turn": (P1, P2, "User 1: Here is my recipe.\nMix the flour and the eggs.\nUser 2: Yum."),
    "placeholder": (P1, P2, "User 1: Hi, I'm [user 1's name].\nUser 2: Nice to meet you."),
    "one_speaker": (P1, P2, "User 1: Hello?\nUser 1: Is anyone there?"),
}
# One CSV record per malformed kind that the CSV reader reports, `{fact}` starting its first field.
MALFORMED_CSV = {
    "csv_syntax": '"{fact}" I said,I drive a truck.,User 1: Hi.\r\n',  # text after a closing quote
    "field_count": '"{fact}\nI am a nurse.","User 1: Hi.\nUser 2: Hello."\r\n',  # user 2 personas missing
}


def row(p1: list[str], p2: list[str], conversation: str) -> dict:
    return {COLUMNS[0]: "\n".join(p1), COLUMNS[1]: "\n".join(p2), COLUMNS[2]: conversation}


def csv_record(r: dict) -> str:
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=list(COLUMNS)).writerow(r)
    return buffer.getvalue()


def malformed_record(kind: str, fact: str = "I am a nurse.") -> str:
    """CSV text of one record of malformed `kind`, its first persona fact `fact`."""
    if kind in MALFORMED_CSV:
        return MALFORMED_CSV[kind].format(fact=fact)
    p1, p2, conversation = MALFORMED_ROWS[kind]
    return csv_record(row([fact] + p1, p2, conversation))


def write_records(path: Path, records: list[str], header: str = ",".join(COLUMNS) + "\r\n") -> Path:
    path.write_text(header + "".join(records), encoding="utf-8", newline="")
    return path


def write_csv(path: Path, rows: list[dict], fieldnames=COLUMNS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
    return path


def physical_lines(record: str) -> int:
    """Lines a CSV record occupies on disk: newlines inside quoted cells add lines."""
    return len(re.findall(r"\r\n|\r|\n", record))


def line_of(path: Path, marker: str) -> int:
    """1-based line of the first occurrence of `marker` in the file."""
    text = path.read_text(encoding="utf-8")
    return text[: text.index(marker)].count("\n") + 1


def make_dialogue(index: int, p1: list[str], p2: list[str]) -> Dialogue:
    return Dialogue(f"d{index:03d}", (p1, p2), [(0, f"hello {index}"), (1, f"hi {index}")], f"test:{index}")


# --- parsing ---------------------------------------------------------------------------------------


def test_well_formed_row(tmp_path):
    """A clean row becomes a Dialogue with both personas and alternating turns, User 1 = speaker 0."""
    path = write_csv(tmp_path / "spc.csv", [row(P1, P2, GOOD_CONVERSATION)])
    dialogues, report = load_dialogues(str(path), HUB_ID, "fail", tmp_path)
    assert report.rows == 1 and report.malformed == []
    assert report.counts() == dict.fromkeys(MALFORMED_KINDS, 0)
    (dialogue,) = dialogues
    assert dialogue.personas == (P1, P2)
    assert dialogue.turns == [
        (0, "Hi, I just got off a night shift."),
        (1, "Long night? I drive trucks, so I know the feeling."),
        (0, "Very long. Coffee is my best friend."),
        (1, "Audiobooks are mine."),
    ]
    assert dialogue.origin == f"{path.name}:2"  # relative to the source, never the clone's folder


def test_persona_facts_are_stripped_and_blank_lines_ignored():
    """Facts are one per line, trimmed, with empty lines dropped."""
    parsed = parse_row({COLUMNS[0]: "  I am a nurse. \n\n I like tea.\n", COLUMNS[1]: "I drive.",
                        COLUMNS[2]: GOOD_CONVERSATION}, "x:2", 0)
    assert isinstance(parsed, Dialogue)
    assert parsed.personas == (["I am a nurse.", "I like tea."], ["I drive."])


def test_consecutive_same_speaker_lines_merge():
    """Two lines in a row by one speaker become a single turn, joined by a space."""
    conversation = "User 1: Hi.\nUser 1: How are you?\nUser 2: Fine.\nuser 2: And you?\nUser 1: Good."
    parsed = parse_row(row(P1, P2, conversation), "x:2", 0)
    assert isinstance(parsed, Dialogue)
    assert parsed.turns == [(0, "Hi. How are you?"), (1, "Fine. And you?"), (0, "Good.")]


@pytest.mark.parametrize("kind", MALFORMED_ROWS)
def test_parse_row_detects_each_kind(kind):
    """parse_row reports each malformed kind instead of raising or returning a Dialogue."""
    parsed = parse_row(row(*MALFORMED_ROWS[kind]), "x.csv:7", 3)
    assert isinstance(parsed, Malformed)
    assert parsed.kind == kind
    assert parsed.origin == "x.csv:7"


def test_malformed_kinds_covered():
    """The tables above have one record for every kind the module knows."""
    assert set(MALFORMED_ROWS) | set(MALFORMED_CSV) == set(MALFORMED_KINDS)
    assert not set(MALFORMED_ROWS) & set(MALFORMED_CSV)


def test_skip_counts_every_kind(tmp_path):
    """Under `skip`, each malformed row is counted by kind and only good rows are returned."""
    records = [csv_record(row(P1, P2, GOOD_CONVERSATION))] + [malformed_record(k) for k in MALFORMED_KINDS]
    records.append(csv_record(row(P2, P1, GOOD_CONVERSATION)))
    path = write_records(tmp_path / "spc.csv", records)
    dialogues, report = load_dialogues(path.name, HUB_ID, "skip", tmp_path)  # relative to base_dir
    assert report.rows == len(records)
    assert report.counts() == dict.fromkeys(MALFORMED_KINDS, 1)
    assert [m.kind for m in report.malformed] == list(MALFORMED_KINDS)
    assert [d.personas for d in dialogues] == [(P1, P2), (P2, P1)]
    assert len({d.id for d in dialogues}) == 2


def test_skip_reports_origins_with_line_numbers(tmp_path):
    """Each skipped row's origin is file:line of its first physical line (multi-line cells counted)."""
    records = [csv_record(row(P1, P2, GOOD_CONVERSATION))] + [malformed_record(k) for k in MALFORMED_KINDS]
    path = write_records(tmp_path / "spc.csv", records)
    _, report = load_dialogues(str(path), HUB_ID, "skip", tmp_path)
    expected, line = [], 2
    for record in records:
        expected.append(f"{path.name}:{line}")
        line += physical_lines(record)
    assert [m.origin for m in report.malformed] == expected[1:]


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_fail_names_file_and_line(tmp_path, kind):
    """Under `fail`, the first malformed row raises with its file and line (header = line 1)."""
    good = csv_record(row(P1, P2, GOOD_CONVERSATION))
    path = write_records(tmp_path / "spc_fail.csv", [good, good, malformed_record(kind, "BADROW marker fact."), good])
    expected = 1 + 2 * physical_lines(good) + 1
    assert expected == line_of(path, "BADROW")  # the arithmetic agrees with the file on disk
    with pytest.raises(MalformedRowError) as info:
        load_dialogues(str(path), HUB_ID, "fail", tmp_path)
    message = str(info.value)
    assert f"spc_fail.csv:{expected}:" in message
    assert kind in message


def test_fail_line_after_blank_line(tmp_path):
    """A blank line before a row must not shift the reported line number."""
    path = tmp_path / "blank.csv"
    write_csv(path, [])
    bad = row(["BADROW fact."], P2, "User 1: only me")
    with path.open("a", newline="", encoding="utf-8") as handle:
        handle.write("\r\n")
        csv.DictWriter(handle, fieldnames=list(COLUMNS)).writerow(bad)
    with pytest.raises(MalformedRowError) as info:
        load_dialogues(str(path), HUB_ID, "fail", tmp_path)
    assert f"blank.csv:{line_of(path, 'BADROW')}:" in str(info.value)


def test_missing_column_names_file(tmp_path):
    """A CSV without the conversation column is rejected naming the file, whatever the policy."""
    path = write_csv(tmp_path / "two_columns.csv", [{COLUMNS[0]: "a", COLUMNS[1]: "b"}], fieldnames=COLUMNS[:2])
    for policy in ("skip", "fail"):
        with pytest.raises(MalformedRowError, match="two_columns.csv"):
            load_dialogues(str(path), HUB_ID, policy, tmp_path)


def test_all_rows_malformed_is_an_error(tmp_path):
    """Skipping every row leaves nothing to train on, which is an error, not an empty dataset."""
    path = write_csv(tmp_path / "bad.csv", [row(*MALFORMED_ROWS["placeholder"])])
    with pytest.raises(MalformedRowError, match="no usable conversations"):
        load_dialogues(str(path), HUB_ID, "skip", tmp_path)


def test_dialogue_json_round_trip():
    """to_json/from_json restore an equal Dialogue, turns as (int, str) tuples."""
    dialogue = parse_row(row(P1, P2, GOOD_CONVERSATION), "spc.csv:2", 5)
    restored = Dialogue.from_json(dialogue.to_json())
    assert restored == dialogue
    assert isinstance(restored.personas, tuple) and all(isinstance(t, tuple) for t in restored.turns)
    assert json.loads(dialogue.to_json())["origin"] == "spc.csv:2"


# --- prepare ---------------------------------------------------------------------------------------


def test_prepare_writes_splits_and_metrics(tmp_path):
    """prepare writes train/valid/test/malformed jsonl and reports counts consistent with them."""
    source = tmp_path / "spc"
    source.mkdir()
    shutil.copy(REPO / DEFAULT.sample / "conversations.csv", source / "a_sample.csv")
    write_records(source / "b_bad.csv", [malformed_record(k) for k in MALFORMED_KINDS])
    out = tmp_path / "prepared"
    params = params_with(seed=42, data={"source": "spc", "fraction": 1.0})
    metrics = data.run(params, Paths(params=tmp_path / "params.yaml", prepared=out))

    sample, _ = load_dialogues("sample", HUB_ID, "fail")
    assert metrics["rows"] == len(sample) + len(MALFORMED_KINDS)
    assert metrics["parsed"] == metrics["sampled"] == len(sample)
    assert metrics["malformed"] == len(MALFORMED_KINDS)
    for kind in MALFORMED_KINDS:
        assert metrics[f"malformed_{kind}"] == 1
    assert metrics["extra_columns"] == 0

    splits = {name: read_dialogues(out / f"{name}.jsonl") for name in ("train", "valid", "test")}
    for name, items in splits.items():
        assert metrics[f"{name}_dialogues"] == len(items) > 0
        assert metrics[f"{name}_turns"] == sum(len(d.turns) for d in items)
    assert sum(len(v) for v in splits.values()) + metrics["dropped_persona_overlap"] == len(sample)

    malformed = [json.loads(line) for line in (out / "malformed.jsonl").read_text().splitlines()]
    assert [m["kind"] for m in malformed] == list(MALFORMED_KINDS)
    assert all(m["origin"].startswith("b_bad.csv:") and m["detail"] for m in malformed)


def test_prepare_fraction_samples(tmp_path):
    """A fraction < 1 shrinks what is split to round(n * fraction)."""
    metrics = data.run(params_with(seed=7, data={"fraction": 0.33}), Paths(prepared=tmp_path / "out"))
    assert metrics["sampled"] == round(metrics["parsed"] * 0.33) < metrics["parsed"]
    total = sum(metrics[f"{n}_dialogues"] for n in ("train", "valid", "test"))
    assert total + metrics["dropped_persona_overlap"] == metrics["sampled"]


def test_prepare_gives_the_same_bytes_in_any_clone_folder(tmp_path):
    """Origins are relative to the data source: a clone elsewhere (another machine, Colab) hashes the same."""
    outputs = []
    for clone in (tmp_path / "a", tmp_path / "somewhere" / "much" / "deeper"):
        shutil.copytree(REPO / DEFAULT.sample, clone / DEFAULT.sample)
        shutil.copy(REPO / DEFAULT.params, clone / DEFAULT.params)
        paths = Paths.under(clone, params=clone / DEFAULT.params)
        data.run(params_with(data={"fraction": 1.0}), paths)
        files = sorted(paths.prepared.iterdir())
        outputs.append({f.name: f.read_bytes() for f in files})
        assert not any(str(tmp_path).encode() in content for content in outputs[-1].values())
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"train.jsonl", "valid.jsonl", "test.jsonl", "malformed.jsonl"}
    first = json.loads(outputs[0]["train.jsonl"].splitlines()[0])
    assert first["origin"].startswith("conversations.csv:")


# --- sampling --------------------------------------------------------------------------------------


def test_sample_fraction():
    """sample_fraction keeps round(n*f) distinct dialogues in original order, the same ones per seed."""
    dialogues = [make_dialogue(i, [f"fact {i}"], [f"other {i}"]) for i in range(40)]
    kept = sample_fraction(dialogues, 0.37, seed=1)
    assert len(kept) == 15  # round(14.8), not truncated to 14
    assert len({d.id for d in kept}) == 15
    positions = [dialogues.index(d) for d in kept]
    assert positions == sorted(positions)
    assert [d.id for d in sample_fraction(dialogues, 0.37, seed=1)] == [d.id for d in kept]
    others = {tuple(d.id for d in sample_fraction(dialogues, 0.37, seed=s)) for s in range(2, 7)}
    assert others - {tuple(d.id for d in kept)}, "different seeds always chose the same dialogues"
    assert sample_fraction(dialogues, 1.0, seed=1) == dialogues
    assert len(sample_fraction(dialogues, 0.001, seed=1)) == 1  # never empty


# --- persona-disjoint split ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sample", "spc_valid"])
def corpus(request) -> list[Dialogue]:
    if request.param == "sample":
        dialogues, _ = load_dialogues("sample", HUB_ID, "skip")
    else:
        if not SPC_VALID.is_file():
            pytest.skip(f"{SPC_VALID} not present")
        dialogues, _ = load_dialogues(str(SPC_VALID), HUB_ID, "skip")
    return dialogues


def keys_of(items: list[Dialogue]) -> set[str]:
    return {persona_key(p) for d in items for p in d.personas}


def test_split_is_persona_disjoint(corpus):
    """No persona of a valid/test dialogue occurs in train, and valid and test share none either."""
    splits, _ = split_by_persona(corpus, 0.1, 0.1, seed=42)
    train, valid, test = (keys_of(splits[n]) for n in ("train", "valid", "test"))
    assert splits["valid"] and splits["test"] and splits["train"]
    assert not train & valid
    assert not train & test
    assert not valid & test


def test_split_accounts_for_every_dialogue(corpus):
    """Every dialogue lands in exactly one split or is counted as dropped."""
    splits, dropped = split_by_persona(corpus, 0.1, 0.1, seed=42)
    placed = Counter(d.id for items in splits.values() for d in items)
    assert all(count == 1 for count in placed.values())
    assert set(placed) <= {d.id for d in corpus}
    assert sum(placed.values()) + dropped == len(corpus)
    assert dropped < len(corpus) // 4  # the split keeps most of the data


def test_split_is_seeded(corpus):
    """The same seed gives the same split; a different seed a different one."""
    def ids(seed):
        splits, dropped = split_by_persona(corpus, 0.1, 0.1, seed=seed)
        return {name: [d.id for d in items] for name, items in splits.items()}, dropped

    assert ids(42) == ids(42)
    assert ids(42)[0] != ids(43)[0]


def test_split_shares_roughly_match(corpus):
    """valid and test get about their share of what was kept (within a generous margin)."""
    splits, dropped = split_by_persona(corpus, 0.1, 0.1, seed=42)
    kept = len(corpus) - dropped
    for name in ("valid", "test"):
        assert 0.03 * kept <= len(splits[name]) <= 0.2 * kept


def test_split_shared_persona_stays_together():
    """Dialogues sharing a persona go to the same split, even when chained through a third persona."""
    a, b, c = ["I am A."], ["I am B."], ["I am C."]
    chain = [make_dialogue(0, a, b), make_dialogue(1, b, c), make_dialogue(2, c, a)]
    loners = [make_dialogue(10 + i, [f"solo {i}"], [f"partner {i}"]) for i in range(30)]
    splits, dropped = split_by_persona(chain + loners, 0.2, 0.2, seed=3)
    assert dropped == 0
    where = {d.id: name for name, items in splits.items() for d in items}
    assert where["d000"] == where["d001"] == where["d002"]


@pytest.mark.parametrize(("name", "dialogues", "valid_fraction", "test_fraction"),
                         [("valid", 1, 0.1, 0.1), ("test", 10, 0.49, 0.01)])
def test_split_rejects_an_empty_split(name, dialogues, valid_fraction, test_fraction):
    """Too little data for a valid or test split is an error naming the param, not a silently empty split."""
    items = [make_dialogue(i, [f"solo {i}"], [f"partner {i}"]) for i in range(dialogues)]
    expected = rf"^data\.{name}_fraction: the {name} split is empty \({dialogues} dialogues"
    with pytest.raises(ConfigError, match=expected):
        split_by_persona(items, valid_fraction, test_fraction, seed=0)
    assert issubclass(ConfigError, USER_ERRORS)  # the stage prints it as one line


# --- what the CSV reader accepts and reports -------------------------------------------------------


def test_byte_order_mark_is_accepted(tmp_path):
    """Excel's 'CSV UTF-8' starts with a byte-order mark; the header is still recognised, lines unchanged."""
    path = tmp_path / "bom.csv"
    text = ",".join(COLUMNS) + "\r\n" + csv_record(row(P1, P2, GOOD_CONVERSATION))
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    (dialogue,), _ = load_dialogues(str(path), HUB_ID, "fail", tmp_path)
    assert dialogue.personas == (P1, P2)
    assert dialogue.origin == "bom.csv:2"


def test_non_utf8_names_file_byte_and_line(tmp_path):
    """A Latin-1 byte far into the file: one line with the file's own byte offset (not a buffer's) and line."""
    good = csv_record(row(P1, P2, GOOD_CONVERSATION))
    head = (",".join(COLUMNS) + "\r\n" + good * 200).encode()  # past any read buffer
    path = tmp_path / "latin1.csv"
    path.write_bytes(head + csv_record(row(["I live in Malm\xf6."], P2, GOOD_CONVERSATION)).encode("latin-1"))
    offset = len(head) + len("I live in Malm")
    for policy in ("skip", "fail"):
        with pytest.raises(MalformedRowError) as info:
            load_dialogues(str(path), HUB_ID, policy, tmp_path)
        message = str(info.value)
        assert f"latin1.csv: not UTF-8 at byte {offset} (line {1 + 200 * physical_lines(good) + 1})" in message
        assert "\n" not in message


def test_rows_with_too_few_or_too_many_fields_are_reported(tmp_path):
    """A short row is not padded and a long one not truncated: both are reported with their line."""
    good = csv_record(row(P1, P2, GOOD_CONVERSATION))
    short = '"I am a nurse.","User 1: Hi.\nUser 2: Hello."\r\n'
    long = csv_record(row(P1, P2, GOOD_CONVERSATION)).replace("\r\n", ",surplus\r\n")
    assert long.endswith('",surplus\r\n')
    path = write_records(tmp_path / "fields.csv", [short, good, long, good])
    dialogues, report = load_dialogues(str(path), HUB_ID, "skip", tmp_path)
    second_good = 2 + physical_lines(short) + physical_lines(good) + physical_lines(long)
    assert [d.origin for d in dialogues] == [f"fields.csv:{2 + physical_lines(short)}", f"fields.csv:{second_good}"]
    long_line = second_good - physical_lines(long)
    assert [(m.origin, m.kind, m.detail) for m in report.malformed] == [
        ("fields.csv:2", "field_count", "2 fields, the header has 3 (lines 2-3)"),
        (f"fields.csv:{long_line}", "field_count", f"4 fields, the header has 3 (lines {long_line}-{second_good - 1})"),
    ]


def test_stray_quote_keeps_the_rows_after_it(tmp_path):
    """An unbalanced quote opening a field is reported at its line; the well-formed rows after it still parse
    (the lenient csv dialect read on to the next quote and merged the next row into the bad one)."""
    good = csv_record(row(P1, P2, GOOD_CONVERSATION))
    path = write_records(tmp_path / "stray.csv", [good, '"I am a nurse.,I drive a truck.,User 1: Hi.\r\n', good, good])
    dialogues, report = load_dialogues(str(path), HUB_ID, "skip", tmp_path)
    bad_line = 2 + physical_lines(good)
    assert [d.origin for d in dialogues] == [f"stray.csv:{line}" for line in
                                             (2, bad_line + 1, bad_line + 1 + physical_lines(good))]
    assert all(d.personas == (P1, P2) for d in dialogues)
    assert [(m.origin, m.kind) for m in report.malformed] == [(f"stray.csv:{bad_line}", "csv_syntax")]


@pytest.mark.parametrize("first_fact", [", and I knit.", "\nI am a nurse."])
def test_stray_quote_closing_validly_in_the_next_row_keeps_that_row(tmp_path, first_fact):
    """Found by the fuzzer: a stray quote closes at the next row's opening quote, and a comma or line end after
    it leaves valid CSV, a record of 1 field; the row it ran into is read again from its own first line."""
    good = csv_record(row([first_fact, "I have two beagles."], P2, GOOD_CONVERSATION))
    assert good.startswith(f'"{first_fact[0]}')
    path = write_records(tmp_path / "stray.csv", ['"I wrote this line myself.\r\n', good])
    dialogues, report = load_dialogues(str(path), HUB_ID, "skip", tmp_path)
    assert [(d.origin, d.personas) for d in dialogues] == [("stray.csv:3", ([first_fact.strip(), P1[1]], P2))]
    assert [(m.origin, m.kind) for m in report.malformed] == [("stray.csv:2", "field_count")]


@pytest.mark.parametrize("content", ["", "\r\n"])
def test_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content, newline="")
    with pytest.raises(MalformedRowError, match=r"empty\.csv:1: expected SPC columns .*, found \[\]"):
        load_dialogues(str(path), HUB_ID, "skip", tmp_path)


def test_header_with_a_csv_syntax_error_names_the_file(tmp_path):
    path = write_records(tmp_path / "header.csv", [], header='"user 1 personas"x,user 2 personas\r\n')
    with pytest.raises(MalformedRowError, match=r"header\.csv:1: the header is not valid CSV"):
        load_dialogues(str(path), HUB_ID, "skip", tmp_path)


def test_a_field_longer_than_csv_default_limit_parses(tmp_path):
    """csv refuses fields over 128 KiB by default; a long but well-formed conversation is still a row."""
    long_turn = "a word " * 30_000
    path = write_csv(tmp_path / "long.csv", [row(P1, P2, f"User 1: {long_turn}\nUser 2: That was long.")])
    (dialogue,), _ = load_dialogues(str(path), HUB_ID, "fail", tmp_path)
    assert dialogue.turns == [(0, long_turn.strip()), (1, "That was long.")]


def test_line_numbers_count_only_csv_line_ends(tmp_path):
    """\\x0b, \\x0c, \\x85 and \\u2028 are line breaks to str.splitlines but plain text to csv: the next row's line
    is counted over \\r\\n, \\r and \\n alone, whichever the rows end with."""
    odd = csv_record(row(["I like \x0bform\x0cfeeds \x85 and \u2028 separators."], P2, GOOD_CONVERSATION))
    records = [odd.replace("\r\n", "\n"), odd.replace("\r\n", "\r"), odd]
    path = write_records(tmp_path / "ends.csv", records)
    dialogues, _ = load_dialogues(str(path), HUB_ID, "fail", tmp_path)
    assert [d.origin for d in dialogues] == [f"ends.csv:{2 + i * physical_lines(odd)}" for i in range(3)]


def test_extra_columns_are_counted_and_logged_once(tmp_path, caplog):
    """Columns besides SPC's are ignored but not silently: counted, and their names logged once for all files."""
    for name, extra in (("a.csv", ("mood", "notes")), ("b.csv", ("notes",))):
        rows = [{**row(P1, P2, GOOD_CONVERSATION), **{column: "x" for column in extra}}] * 3
        write_csv(tmp_path / name, rows, fieldnames=COLUMNS + extra)
    with caplog.at_level(logging.WARNING, logger="persona.data"):
        dialogues, report = load_dialogues(str(tmp_path), HUB_ID, "fail", tmp_path)
    assert len(dialogues) == 6 and report.extra_columns == {"mood", "notes"}
    mentions = [r.getMessage() for r in caplog.records if "notes" in r.getMessage()]
    assert mentions == ["ignoring 2 column(s) that are not SPC's: ['mood', 'notes']"]


def test_extra_columns_reach_the_metrics(tmp_path):
    source = tmp_path / "spc"
    source.mkdir()
    shutil.copy(REPO / DEFAULT.sample / "conversations.csv", source / "a_sample.csv")
    write_csv(source / "b_extra.csv", [{**row(P1, P2, GOOD_CONVERSATION), "mood": "calm"}],
              fieldnames=COLUMNS + ("mood",))
    params = params_with(seed=42, data={"source": "spc", "fraction": 1.0})
    metrics = data.run(params, Paths(params=tmp_path / "params.yaml", prepared=tmp_path / "out"))
    assert metrics["extra_columns"] == 1


def test_hub_rows_extra_keys_are_counted(monkeypatch):
    """Hub rows are dicts: keys besides SPC's columns count as extra columns too."""
    rows = [(f"{HUB_ID}:train:{i}", {**row(P1, P2, GOOD_CONVERSATION), "id": i}) for i in range(2)]
    monkeypatch.setattr(data, "hub_rows", lambda hub_id: iter(rows))
    dialogues, report = load_dialogues("hub", HUB_ID, "fail")
    assert len(dialogues) == 2 and report.extra_columns == {"id"}


def test_hub_unreachable_is_one_line_naming_the_key(monkeypatch):
    def offline(hub_id):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(USER_ERRORS, match=r"^data\.source: could not load .*ConnectionError: no network"):
        load_dialogues("hub", HUB_ID, "skip")
