"""Load and clean fine-tuning records from JSONL / JSON / CSV / CoNLL files or Python lists.

A record is one training example in one of six formats, detected from its keys or forced
with `format=`:

    format              required keys              optional
    "alpaca"            instruction, output        input
    "prompt_completion" prompt, completion
    "chat"              messages  ([{role, content}, ...], at least one assistant turn)
    "tagging"           tokens, tags  (equal-length lists of words and BIO / IOB2 tags:
                                       "O", "B-TYPE" or "I-TYPE"; see `trainer.tagging`)
    "classification"    text, label                (label: str, int, float or bool -> str)
    "text"              text                       (every token is in the loss)

CSV / TSV cells carry `messages`, `tokens` and `tags` as JSON lists. A CoNLL file (.conll,
.iob, .bio) holds tagging records only: one "token ... tag" line per word (the token is the
first column, the tag the last, columns split by spaces or tabs), a blank line after each
sentence; "-DOCSTART-" lines are skipped, and so is a line starting with "#" whose last
column is not a tag (a comment; "# O" is the token "#"). A sentence is one record, numbered
by its first line. Tags are kept as written: an "I-X" that does not continue an X entity
(IOB1 style) is not rewritten to "B-X"; the metrics read it as starting an entity.

Cleaning never rewrites a record's text: a prompt is the user's bytes (a chat-rendered
prompt ends in "assistant\n", and dropping that newline changes what the model sees). It
only drops records, and counts them in a `CleaningReport`: malformed ones (bad JSON, wrong
types, missing required columns, text that is not UTF-8, a number too long to read, a line
nested too deeply, a NaN/Infinity label; kept with their line numbers), empty ones (a
required field blank or whitespace only) and duplicates of an earlier record (equal once
whitespace at the ends of each string is ignored). Classification labels are class names,
compared without surrounding whitespace. Every file kind treats a bad record the same way:
it costs that record, never the whole file. A dataset that turns out unusable, or a file
that mixes two record formats, raises instead of silently training on nothing or on half of
it.

Tokenization (`data_tokenize`), splitting and mixing (`data_mix`) and batching
(`data_batch`) live in their own modules.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .data_files import TAG, checked, loads, read_file, unreadable

# Required and optional keys of each format, in detection priority: a more specific format
# first, because a classification record ({text, label}) also looks like a "text" record.
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "tagging": (("tokens", "tags"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "classification": (("text", "label"), ()),
    "text": (("text",), ()),
}
_MAX_REASONS_IN_ERROR = 5


@dataclass(frozen=True)
class Record:
    """One cleaned example.

    data:   the record's fields exactly as read, except: alpaca's missing `input` filled with
            "", a classification label turned into a string without surrounding whitespace.
            Extra columns are kept so that a custom prompt template may use them.
    format: one of `FORMATS`.
    where:  where it came from, for error messages: "train.jsonl:12" or "records[3]".
    """

    data: dict[str, Any]
    format: str
    where: str


@dataclass
class CleaningReport:
    """What cleaning dropped from one source, and why.

    `unit` is "line" for files (1-based line numbers) and "item" for Python lists and JSON
    arrays (0-based indices). `malformed` holds (line, reason) pairs.
    """

    source: str
    format: str = "?"
    unit: str = "line"
    total: int = 0
    kept: int = 0
    blank_lines: int = 0
    empty_at: list[int] = field(default_factory=list)
    duplicate_at: list[int] = field(default_factory=list)
    malformed: list[tuple[int, str]] = field(default_factory=list)

    @property
    def empty(self) -> int:
        return len(self.empty_at)

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_at)

    @property
    def dropped(self) -> int:
        return self.empty + self.duplicates + len(self.malformed)

    def __str__(self) -> str:
        text = (f"{self.source} ({self.format}): kept {self.kept} of {self.total} records; "
                f"dropped {self.empty} empty, {self.duplicates} duplicate, "
                f"{len(self.malformed)} malformed")
        if self.malformed:
            text += "\n" + "\n".join(f"  {self.unit} {n}: {why}" for n, why in self.malformed)
        return text


def load_records(source: str | os.PathLike | Sequence[dict], format: str | None = None,
                 *, verbose: bool = False) -> tuple[list[Record], CleaningReport]:
    """Load, validate and clean the records of a file or a list of dicts.

    source:  a path ending in .jsonl/.ndjson (one JSON object per line), .json (a JSON array
             of objects), .csv or .tsv (a header row naming the columns; `messages`, `tokens`
             and `tags` cells hold JSON), .conll/.iob/.bio (token and tag columns, a blank
             line between sentences), or a list of dicts.
    format:  force a format from `FORMATS`; None detects it from the keys.
    verbose: print the report.
    Returns the surviving records in source order and the report.
    Raises FileNotFoundError (missing file), ValueError (unknown extension or format, a
    required column absent from every record, every record malformed, nothing left).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown record format {format!r}; known formats: {', '.join(FORMATS)}")
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        unit, rows = read_file(name)
    else:
        name, unit = "records", "item"
        rows = [(i, *checked(row)) for i, row in enumerate(source)]

    report = CleaningReport(source=name, unit=unit)
    parsed: list[tuple[int, dict]] = []
    for number, row, parse_error in rows:
        if row is None and parse_error is None:
            report.blank_lines += 1
            continue
        report.total += 1
        if parse_error is not None:
            report.malformed.append((number, parse_error))
        elif not isinstance(row, dict):
            report.malformed.append((number, f"expected an object, got {type(row).__name__}"))
        else:
            parsed.append((number, row))
    if report.total == 0:
        raise ValueError(f"{name} contains no records")

    report.format = format or _detect_format(name, [row for _, row in parsed])
    if format is None:
        _refuse_mixed_formats(name, unit, report.format, parsed)
    _check_columns_exist(name, report.format, [row for _, row in parsed])

    records, seen = [], set()
    for number, row in parsed:
        where = f"{name}:{number}" if unit == "line" else f"{name}[{number}]"
        try:
            data, is_empty = _normalize(row, report.format)
        except _Malformed as exc:
            report.malformed.append((number, str(exc)))
            continue
        if is_empty:
            report.empty_at.append(number)
            continue
        key = json.dumps(_stripped(data), sort_keys=True, ensure_ascii=False, default=str)
        if key in seen:
            report.duplicate_at.append(number)
            continue
        seen.add(key)
        records.append(Record(data=data, format=report.format, where=where))
    report.malformed.sort()
    report.kept = len(records)

    if verbose:
        print(report)
    if not records:
        if len(report.malformed) == report.total:
            shown = "; ".join(f"{unit} {n}: {why}" for n, why in
                              report.malformed[:_MAX_REASONS_IN_ERROR])
            raise ValueError(f"every record in {name} is malformed ({shown})")
        raise ValueError(f"no usable records left in {name} after cleaning: {report}")
    return records, report


def label_set(records: Iterable[Record]) -> list[str]:
    """Sorted distinct labels of classification records (the classes for metrics)."""
    return sorted({r.data["label"] for r in records if r.format == "classification"})


def tag_set(records: Iterable[Record]) -> list[str]:
    """Tag ids' order: "O", then the sorted distinct other tags of tagging records.

    "O" is always there, at id 0, even if no record uses it: the model needs an "outside"
    class. [] when there is no tagging record.
    """
    tags = {tag for r in records if r.format == "tagging" for tag in r.data["tags"]}
    return ["O", *sorted(tags - {"O"})] if tags else []


# --------------------------------------------------------------------------- formats

def _detect_format(name: str, rows: list[dict]) -> str:
    """The most specific format whose required keys at least half of the rows carry.

    Half, not all, so that one record missing its label does not demote a classification
    file to plain text, while one stray `label` key does not promote a text file.
    """
    if not rows:
        return "?"  # every row is malformed; load_records reports that
    counts = {fmt: sum(all(k in row for k in req) for row in rows)
              for fmt, (req, _) in FORMATS.items()}
    for fmt, count in counts.items():
        if 2 * count >= len(rows) and count > 0:
            return fmt
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        seen = sorted({k for row in rows for k in row})
        expected = "; ".join(f"{fmt}: {', '.join(req)}" for fmt, (req, _) in FORMATS.items())
        raise ValueError(f"cannot detect the record format of {name}: its keys are {seen}; "
                         f"expected keys ({expected}); or pass format=")
    return best


def _refuse_mixed_formats(name: str, unit: str, fmt: str, rows: list[tuple[int, dict]]) -> None:
    """Raise when some rows lack `fmt`'s keys but are complete records of another format.

    Cleaning would drop them as malformed: half of a file that mixes two schemas would vanish
    behind a count. A format whose keys are a subset of `fmt`'s (a text row in a
    classification file) is a record missing a column, not another schema.
    """
    if fmt == "?":
        return
    required = set(FORMATS[fmt][0])
    others: dict[str, list[int]] = {}
    for number, row in rows:
        if required <= row.keys():
            continue
        for other, (keys, _) in FORMATS.items():
            if other != fmt and not set(keys) <= required and set(keys) <= row.keys():
                others.setdefault(other, []).append(number)
                break
    if others:
        first = {fmt: next(n for n, row in rows if required <= row.keys())}
        counts = {fmt: sum(required <= row.keys() for _, row in rows)}
        for other, numbers in others.items():
            first[other], counts[other] = numbers[0], len(numbers)
        what = ", ".join(f"{counts[f]} {f} (first at {unit} {first[f]})" for f in counts)
        raise ValueError(f"{name} mixes record formats: {what}; put each format in its own "
                         f"file, or force one format (--data-format / format=) to keep only "
                         f"its records and drop the others as malformed")


def _check_columns_exist(name: str, fmt: str, rows: list[dict]) -> None:
    """A required column missing from every record is a wrong file or format, not bad rows."""
    if fmt == "?" or not rows:
        return
    for key in FORMATS[fmt][0]:
        if not any(key in row for row in rows):
            seen = sorted({k for row in rows for k in row})
            raise ValueError(f"required column {key!r} of format {fmt!r} is missing from every "
                             f"record of {name} (columns found: {seen})")


class _Malformed(ValueError):
    """A record that cannot be used as it stands; the message becomes the report's reason."""


def _normalize(row: dict, fmt: str) -> tuple[dict[str, Any], bool]:
    """Cleaned copy of `row` and whether a required field is blank. Raises _Malformed."""
    required, optional = FORMATS[fmt]
    for key in required:
        if key not in row:
            raise _Malformed(f"missing required column {key!r}")
    if fmt == "tagging":  # extra columns are kept as they are
        data = {**row, **_normalize_tagging(row["tokens"], row["tags"])}
        return data, not data["tokens"]
    data: dict[str, Any] = {}
    for key, value in row.items():
        if key == "messages":
            data[key] = _normalize_messages(value)
        elif key == "label" and fmt == "classification":
            if isinstance(value, float) and not math.isfinite(value):
                raise _Malformed(f"label is {value!r}, not a class")
            if isinstance(value, (bool, int, float)):
                value = str(value)
            if not isinstance(value, str):
                raise _Malformed(f"column 'label' must be a string or number, "
                                 f"got {type(value).__name__}")
            data[key] = value.strip()
        elif key in required or key in optional:
            if value is None and key in optional:
                value = ""
            if not isinstance(value, str):
                raise _Malformed(f"column {key!r} must be a string, got {type(value).__name__}")
            data[key] = value
        else:
            data[key] = value
    for key in optional:
        data.setdefault(key, "")

    if fmt == "chat":
        assistant = [m["content"] for m in data["messages"] if m["role"] == "assistant"]
        if data["messages"] and not assistant:
            raise _Malformed("chat record has no assistant turn")
        return data, not any(text.strip() for text in assistant)
    return data, any(not data[key].strip() for key in required)


def _stripped(value: Any) -> Any:
    """`value` with whitespace at the ends of every string removed: the duplicate key."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {k: _stripped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stripped(v) for v in value]
    return value


def _json_cell(key: str, value: Any) -> Any:
    """A CSV cell's JSON text parsed (other values as they are), as strictly as a JSONL line."""
    if not isinstance(value, str):
        return value
    try:
        value = loads(value)
    except json.JSONDecodeError as exc:
        raise _Malformed(f"column {key!r} is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise _Malformed(f"column {key!r} is nested too deeply to parse") from None
    reason = unreadable(value)  # "\udc80" escapes and overlong numbers inside the JSON text
    if reason:
        raise _Malformed(f"column {key!r}: {reason}")
    return value


def _normalize_tagging(tokens: Any, tags: Any) -> dict[str, list[str]]:
    """tokens: non-blank strings; tags: as many BIO / IOB2 tags. Neither is rewritten."""
    tokens, tags = _json_cell("tokens", tokens), _json_cell("tags", tags)
    for key, value in (("tokens", tokens), ("tags", tags)):
        if not isinstance(value, list):
            raise _Malformed(f"column {key!r} must be a list of strings, "
                             f"got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _Malformed(f"{key}[{i}] must be a string, got {type(item).__name__}")
    if len(tokens) != len(tags):
        raise _Malformed(f"tokens and tags differ in length ({len(tokens)} vs {len(tags)})")
    for i, (token, tag) in enumerate(zip(tokens, tags)):
        if not token.strip():
            raise _Malformed(f"tokens[{i}] is blank: a token is a word")
        if not TAG.fullmatch(tag):
            raise _Malformed(f"tags[{i}] is {tag!r}, not a BIO tag (O, B-TYPE or I-TYPE)")
    return {"tokens": tokens, "tags": tags}


def _normalize_messages(value: Any) -> list[dict[str, str]]:
    value = _json_cell("messages", value)  # CSV cells carry the message list as JSON text
    if not isinstance(value, list):
        raise _Malformed(f"column 'messages' must be a list, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _Malformed(f"messages[{i}] must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _Malformed(f"messages[{i}] needs string 'role' and 'content'")
        messages.append({**message, "role": role.strip(), "content": content})
    return messages
