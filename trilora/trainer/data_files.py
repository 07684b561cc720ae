"""Reading fine-tuning data files into rows, one bad record costing only that record.

Every kind (JSONL, a JSON array, CSV / TSV, CoNLL columns) is read as bytes and decoded with
`surrogateescape`, so an undecodable byte turns into a lone surrogate that `unreadable` finds
in its record alone (JSONL decodes line by line; a BOM is accepted everywhere); an integer too
long for Python and a line nested too deeply cost their record too. `data.load_records`
validates and cleans the rows.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
               ".conll": "conll", ".iob": "conll", ".bio": "conll"}


def read_file(path: str) -> tuple[str, list[tuple[int, Any, str | None]]]:
    """("line" or "item", rows of (line or index, parsed row or None, parse error or None)).

    A row of (n, None, None) is a blank line.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    kind = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(f"unsupported data file extension for {path}; "
                         f"expected one of {', '.join(sorted(EXTENSIONS))}")
    if kind == "jsonl":
        with open(path, "rb") as f:
            return "line", list(_parse_jsonl(f))
    with open(path, "rb") as f:
        raw = f.read()
    # Undecodable bytes become lone surrogates, so that they cost the record that holds them
    # (found by `_unreadable`), as in JSONL, instead of refusing the whole file.
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if kind == "json":
        try:
            items = loads(text)
        except RecursionError:
            raise ValueError(f"{path} is nested too deeply to parse; "
                             "a .json file must hold one array of records") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); "
                             "a .json file must hold one array of records") from None
        if not isinstance(items, list):
            raise ValueError(f"{path} must hold a JSON array of records, "
                             f"got {type(items).__name__}")
        return "item", [(i, *checked(item)) for i, item in enumerate(items)]
    if kind == "conll":
        return "line", list(_parse_conll(io.StringIO(text)))  # universal newlines
    lines = io.StringIO(text, newline="")
    return "line", list(_parse_csv(lines, delimiter="\t" if kind == "tsv" else ","))


def _parse_jsonl(lines: Iterable[bytes]) -> Iterator[tuple[int, Any, str | None]]:
    for number, raw in enumerate(lines, start=1):
        # Decode line by line so that one bad byte costs one record, not the whole file.
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            yield number, None, "not valid UTF-8"
            continue
        if not line:
            yield number, None, None
            continue
        try:
            row = loads(line)
        except json.JSONDecodeError as exc:
            yield number, None, f"invalid JSON ({exc.msg} at column {exc.colno})"
        except RecursionError:
            yield number, None, "nested too deeply to parse"
        else:
            yield number, *checked(row)


class _LongNumber(str):
    """An integer literal with more digits than Python converts (sys.get_int_max_str_digits)."""


def _parse_int(literal: str) -> int | _LongNumber:
    limit = sys.get_int_max_str_digits()
    if limit and len(literal.lstrip("-")) > limit:
        return _LongNumber(literal)
    return int(literal)


def loads(text: str) -> Any:
    return json.loads(text, parse_int=_parse_int)


def unreadable(value: Any) -> str | None:
    """Why a parsed row cannot be used as text, or None: a string with undecodable bytes (or
    a lone surrogate escape), or an integer too long to read. Iterative: rows may be deep."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _LongNumber):
            return f"a number with {len(item.lstrip('-'))} digits (more than Python reads)"
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "not valid UTF-8"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def checked(row: Any) -> tuple[Any, str | None]:
    """(row, None), or (None, reason) for a row `_unreadable` refuses."""
    reason = unreadable(row)
    return (None, reason) if reason else (row, None)


# Sentinels DictReader puts in a row with too many / too few cells (no real column has them).
_EXTRA, _MISSING = "\0extra", "\0missing"


def _parse_csv(f, delimiter: str) -> Iterator[tuple[int, Any, str | None]]:
    reader = csv.DictReader(f, delimiter=delimiter, restkey=_EXTRA, restval=_MISSING)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, None, f"unreadable CSV row ({exc})"
            continue
        number = reader.line_num  # the row's last physical line: quoted cells may span lines
        if all(v in ("", None) or (isinstance(v, str) and not v.strip()) for v in row.values()):
            yield number, None, None
        elif _EXTRA in row or _MISSING in row.values():
            yield number, None, f"expected {len(reader.fieldnames)} columns, got a different count"
        else:
            yield number, *checked(row)


TAG = re.compile(r"O|[BI]-\S+")  # a BIO / IOB2 tag: O, B-TYPE or I-TYPE
_COLUMN_SEPARATOR = re.compile(r"[ \t]+")  # not str.split(): a no-break space is token text


def _parse_conll(lines: Iterable[str]) -> Iterator[tuple[int, Any, str | None]]:
    """One row {"tokens", "tags"} per sentence, numbered by the sentence's first line.

    A line with one column costs its sentence (the reason names the line); the sentence's
    other lines are consumed with it, so they do not come back as a sentence of their own.
    """
    first, tokens, tags, error = 0, [], [], None

    def sentence():
        if error is not None:
            return first, None, error
        return first, *checked({"tokens": tokens, "tags": tags})

    for number, line in enumerate(lines, start=1):
        columns = _COLUMN_SEPARATOR.split(line.strip(" \t\r\n"))
        is_docstart = columns[0] == "-DOCSTART-"
        if not columns[0] or is_docstart:  # a blank line or a document marker ends a sentence
            if first:
                yield sentence()
            first, tokens, tags, error = 0, [], [], None
            continue
        if columns[0].startswith("#") and not TAG.fullmatch(columns[-1]):
            continue  # a comment ("# sent_id = 3"), unlike the token "#" tagged "O"
        first = first or number
        if len(columns) == 1 and error is None:
            error = (f"line {number} has one column ({columns[0][:40]!r}); "
                     "expected a token and a tag")
        tokens.append(columns[0])
        tags.append(columns[-1])
    if first:
        yield sentence()
