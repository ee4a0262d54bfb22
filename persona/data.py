"""Synthetic-Persona-Chat (SPC): parsing, the malformed-row policy, and a persona-disjoint split.

SPC rows are `user 1 personas`, `user 2 personas` (facts, one per line) and
`Best Generated Conversation` (one `User 1:` / `User 2:` turn per line). A third of the real
rows carry generation artefacts (`[user 1's name]` placeholders, recipe lines without a
speaker prefix); they are counted by kind and either skipped or fatal, as params say, and each
skipped row is written out with its file and line so nothing disappears silently. So are CSV records
the reader cannot trust: a syntax error (a stray quote) or a field count other than the header's.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from persona.config import ConfigError, Params, resolve_path
from persona.files import write_text_atomic
from persona.paths import DEFAULT, Paths

log = logging.getLogger(__name__)

COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")
# The first two come from the CSV reader, the rest from parse_row.
MALFORMED_KINDS = ("csv_syntax", "field_count", "no_persona", "empty_conversation", "unprefixed_turn", "placeholder",
                   "one_speaker")
_TURN = re.compile(r"^\s*User\s*([12])\s*:\s*(.*)$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\[[^\]]*\]")
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass
class Dialogue:
    """One conversation: persona facts of both speakers and the turns, speaker 0 = `User 1`."""
    id: str
    personas: tuple[list[str], list[str]]
    turns: list[tuple[int, str]]  # (speaker, text)
    origin: str = ""  # file:line relative to the data source, or hub id:split:index

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "personas": list(self.personas),
                           "turns": [list(t) for t in self.turns], "origin": self.origin})

    @classmethod
    def from_json(cls, line: str) -> Dialogue:
        row = json.loads(line)
        return cls(row["id"], tuple(row["personas"]), [tuple(t) for t in row["turns"]], row.get("origin", ""))


@dataclass
class Malformed:
    origin: str
    kind: str
    detail: str


class MalformedRowError(ValueError):
    """Raised under `data.on_malformed: fail`; names the file and line of the row."""


@dataclass
class ParseReport:
    rows: int = 0
    malformed: list[Malformed] = field(default_factory=list)
    extra_columns: set[str] = field(default_factory=set)  # columns besides COLUMNS, ignored

    def counts(self) -> dict[str, int]:
        found = Counter(m.kind for m in self.malformed)
        return {kind: found.get(kind, 0) for kind in MALFORMED_KINDS}


def parse_row(row: dict, origin: str, index: int) -> Dialogue | Malformed:
    """Parse one SPC row; returns the first problem found instead of raising."""
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise MalformedRowError(f"{origin}: missing SPC column(s) {missing}; found {sorted(row)}")
    personas = tuple(_facts(row[c]) for c in COLUMNS[:2])
    if not personas[0] or not personas[1]:
        return Malformed(origin, "no_persona", f"user {1 if not personas[0] else 2} has no persona facts")
    lines = [line for line in (row[COLUMNS[2]] or "").splitlines() if line.strip()]
    if not lines:
        return Malformed(origin, "empty_conversation", "no turns")
    turns: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        match = _TURN.match(line)
        if not match:
            return Malformed(origin, "unprefixed_turn", f"turn line {number} has no 'User 1:'/'User 2:' prefix: "
                                                        f"{line.strip()[:60]!r}")
        speaker, text = int(match.group(1)) - 1, match.group(2).strip()
        placeholder = _PLACEHOLDER.search(text)
        if placeholder:
            return Malformed(origin, "placeholder", f"turn line {number} has placeholder {placeholder.group(0)!r}")
        if not text:
            continue
        if turns and turns[-1][0] == speaker:  # SPC sometimes splits one turn over two lines
            turns[-1] = (speaker, f"{turns[-1][1]} {text}")
        else:
            turns.append((speaker, text))
    if len({s for s, _ in turns}) < 2:
        return Malformed(origin, "one_speaker", "only one speaker talks")
    digest = hashlib.sha1(json.dumps([personas, turns]).encode()).hexdigest()[:10]
    return Dialogue(f"{index:06d}-{digest}", personas, turns, origin)


def _facts(cell: str | None) -> list[str]:
    return [line.strip() for line in (cell or "").splitlines() if line.strip()]


def read_csv_rows(path: Path, source: Path) -> Iterator[tuple[str, dict | Malformed]]:
    """Yield (origin, row) with origin = 'file:line' of the row's first physical line, the file named
    relative to the `source` folder: outputs must not depend on where the repo was cloned.

    A record that is not valid CSV (`csv_syntax`: quoting is strict, so a stray quote fails where it stops
    making sense instead of swallowing the file up to the next quote) or has another number of fields than
    the header (`field_count`: padding or truncating it would guess which value belongs to which column)
    comes back as a Malformed. Reading then resumes at the line after its first: a stray quote can merge
    the rows after it into one bad record, and those rows are taken back. Anything else that starts inside
    a reported record is a piece of it, and is neither returned nor reported again.
    """
    name = path.relative_to(source).as_posix() if path != source else path.name
    lines = read_utf8_lines(path)
    # The default limit (128 KiB a field) guards against a runaway quoted field reading unbounded input;
    # the whole file is in memory already, so its length bounds every field and a long one is no error.
    # The setting is process-wide; raising it only makes other csv readers accept longer fields.
    csv.field_size_limit(max(csv.field_size_limit(), sum(map(len, lines))))
    position, header = read_record(lines, 0)
    if isinstance(header, csv.Error):
        raise MalformedRowError(f"{path}:1: the header is not valid CSV ({header})")
    if not set(COLUMNS) <= set(header):
        raise MalformedRowError(f"{path}:1: expected SPC columns {list(COLUMNS)}, found {header}")
    reported_until = 0  # index of the line after the last record reported as malformed
    while position < len(lines):
        end, values = read_record(lines, position)
        origin = f"{name}:{position + 1}"
        if values == []:  # a blank line
            position = end
            continue
        inside_reported = position < reported_until
        if isinstance(values, list) and len(values) == len(header):
            row = dict(zip(header, values))
            if not inside_reported or isinstance(parse_row(row, origin, 0), Dialogue):
                yield origin, row
                position = end
                continue
        elif not inside_reported:
            span = f" (lines {position + 1}-{end})" if end > position + 1 else ""
            if isinstance(values, csv.Error):
                yield origin, Malformed(origin, "csv_syntax", f"CSV syntax error: {values}{span}")
            else:
                yield origin, Malformed(origin, "field_count", f"{len(values)} fields, the header has "
                                                               f"{len(header)}{span}")
            reported_until = end
        position += 1


def read_record(lines: list[str], start: int) -> tuple[int, list[str] | csv.Error]:
    """The CSV record that begins at `lines[start]`: the index of the line after it, and its values
    ([] for a blank line or the end of the file) or the csv.Error that stopped it."""
    reader = csv.reader((lines[i] for i in range(start, len(lines))), strict=True)
    try:
        values = next(reader, [])
    except csv.Error as error:
        values = error
    return start + reader.line_num, values


def read_utf8_lines(path: Path) -> list[str]:
    """The file's physical lines, line ends kept; a leading byte-order mark (Excel writes one) dropped.

    The bytes are decoded at once, not streamed, so a decoding error's offset is the file's own.
    """
    content = path.read_bytes()
    try:
        text = content.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = len(_LINE_END.findall(content[: error.start])) + 1
        raise MalformedRowError(f"{path}: not UTF-8 at byte {error.start} (line {line}): {error.reason} "
                                f"{content[error.start:error.end]!r}; save the file as UTF-8") from None
    # newline="": split on \r\n, \r and \n only, as csv does (str.splitlines also splits on \x0b, \x85,
    # \u2028 and more, which are plain characters to csv and would shift every line number after them).
    return io.StringIO(text, newline="").readlines()


def spc_csv_files(source: Path) -> list[Path]:
    """A CSV file, or every CSV in a folder (SPC ships train/valid/test files)."""
    if source.is_file():
        return [source]
    files = sorted(source.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"data.source: no .csv files in {source}")
    return files


def hub_rows(hub_id: str):
    """Yield rows of the hub dataset; needs network or a warm `datasets` cache."""
    import datasets
    try:
        splits = datasets.load_dataset(hub_id)
    except Exception as error:  # offline machines fail in many ways; say what to do instead
        raise ConfigError(f"data.source: could not load {hub_id!r} from the hub ({type(error).__name__}: {error}). "
                          "Offline, set data.source to 'sample' or to a folder of SPC CSV files.") from error
    for split, rows in splits.items():
        for index, row in enumerate(rows):
            yield f"{hub_id}:{split}:{index}", row


def load_dialogues(source: str, hub_id: str, on_malformed: str, base_dir: Path = Path(".")
                   ) -> tuple[list[Dialogue], ParseReport]:
    """Parse every row of the source; malformed rows are skipped and reported, or fatal.

    `base_dir`: the folder relative paths (and the bundled sample) resolve against.
    """
    if source == "hub":
        rows, where = hub_rows(hub_id), ""
    else:
        folder = base_dir / DEFAULT.sample if source == "sample" else resolve_path(base_dir, source)
        rows = (item for path in spc_csv_files(folder) for item in read_csv_rows(path, folder))
        where = f"{folder if folder.is_dir() else folder.parent}/"
    report, dialogues = ParseReport(), []
    for index, (origin, row) in enumerate(rows):
        report.rows += 1
        if isinstance(row, Malformed):
            parsed = row
        else:
            report.extra_columns.update(key for key in row if key not in COLUMNS)
            parsed = parse_row(row, origin, index)
        if isinstance(parsed, Malformed):
            if on_malformed == "fail":
                raise MalformedRowError(f"{where}{parsed.origin}: malformed row ({parsed.kind}): {parsed.detail}. "
                                        "Set data.on_malformed: skip to skip such rows.")
            report.malformed.append(parsed)
        else:
            dialogues.append(parsed)
    if report.extra_columns:
        log.warning("ignoring %d column(s) that are not SPC's: %s", len(report.extra_columns),
                    sorted(report.extra_columns))
    if not dialogues:
        raise MalformedRowError(f"data.source {source!r}: no usable conversations in {report.rows} rows "
                                f"(malformed: {report.counts()})")
    return dialogues, report


def persona_key(facts: list[str]) -> str:
    return "\n".join(sorted(re.sub(r"\W+", " ", f).strip().lower() for f in facts))


def split_by_persona(dialogues: list[Dialogue], valid_fraction: float, test_fraction: float, seed: int
                     ) -> tuple[dict[str, list[Dialogue]], int]:
    """Split so that no persona (set of facts) of a valid/test dialogue occurs in training.

    SPC reuses personas across conversations, chaining most dialogues into one linked graph,
    so connected groups cannot be dealt out whole. Dialogues are visited in seeded order: one
    whose persona is already placed follows it; a fresh one opens in the split furthest below
    its share. A dialogue whose two personas already sit in different splits is dropped, and
    the count is returned so the loss is reported, not hidden.
    """
    shares = {"test": test_fraction, "valid": valid_fraction, "train": 1 - valid_fraction - test_fraction}
    order = list(dialogues)
    random.Random(seed).shuffle(order)
    home: dict[str, str] = {}
    splits: dict[str, list[Dialogue]] = {name: [] for name in shares}
    dropped = 0
    for seen, dialogue in enumerate(order, 1):
        keys = [persona_key(p) for p in dialogue.personas]
        homes = {home[k] for k in keys if k in home}
        if len(homes) > 1:
            dropped += 1
            continue
        split = homes.pop() if homes else max(shares, key=lambda s: shares[s] * seen - len(splits[s]))
        home.update(dict.fromkeys(keys, split))
        splits[split].append(dialogue)
    for name in ("valid", "test"):
        if not splits[name]:
            sizes = ", ".join(f"{split} {len(items)}" for split, items in splits.items())
            raise ConfigError(f"data.{name}_fraction: the {name} split is empty ({len(dialogues)} dialogues: "
                              f"{sizes}, {dropped} dropped for persona overlap); raise data.{name}_fraction "
                              "or use more data")
    return {name: splits[name] for name in ("train", "valid", "test")}, dropped


def sample_fraction(dialogues: list[Dialogue], fraction: float, seed: int) -> list[Dialogue]:
    if fraction >= 1:
        return dialogues
    keep = max(1, round(len(dialogues) * fraction))
    chosen = sorted(random.Random(seed).sample(range(len(dialogues)), keep))
    return [dialogues[i] for i in chosen]


def run(params: Params, paths: Paths = DEFAULT) -> dict:
    """The `prepare` stage: parse, sample, split, write jsonl; returns the metrics it reports."""
    data, out_dir = params.data, paths.prepared
    dialogues, report = load_dialogues(data.source, data.hub_id, data.on_malformed, paths.params.resolve().parent)
    kept = sample_fraction(dialogues, data.fraction, params.seed)
    splits, dropped = split_by_persona(kept, data.valid_fraction, data.test_fraction, params.seed)
    for name, items in splits.items():
        write_dialogues(out_dir / f"{name}.jsonl", items)
    write_text_atomic(out_dir / "malformed.jsonl", "".join(f"{json.dumps(asdict(m))}\n" for m in report.malformed))
    counts = report.counts()
    if report.malformed:
        log.warning("skipped %d malformed rows of %d: %s (listed in %s)", len(report.malformed), report.rows,
                    {k: v for k, v in counts.items() if v}, out_dir / "malformed.jsonl")
    metrics = {"rows": report.rows, "parsed": len(dialogues), "malformed": len(report.malformed),
               **{f"malformed_{k}": v for k, v in counts.items()}, "sampled": len(kept),
               "dropped_persona_overlap": dropped, "extra_columns": len(report.extra_columns)}
    for name, items in splits.items():
        metrics[f"{name}_dialogues"] = len(items)
        metrics[f"{name}_examples"] = 2 * len(items)  # one per speaker
        metrics[f"{name}_turns"] = sum(len(d.turns) for d in items)
    return metrics


def write_dialogues(path: Path, dialogues: list[Dialogue]) -> None:
    write_text_atomic(path, "".join(dialogue.to_json() + "\n" for dialogue in dialogues))


def read_dialogues(path: Path) -> list[Dialogue]:
    with path.open() as handle:
        return [Dialogue.from_json(line) for line in handle if line.strip()]
