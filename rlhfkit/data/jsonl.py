"""JSON Lines, read and written in one place: one record per line whatever its strings contain.

Why a helper: ``str.splitlines`` also breaks lines at U+2028, U+2029, U+0085, \\x0b, \\x0c and
\\x1c–\\x1e, and ``json.dumps(..., ensure_ascii=False)`` writes U+2028/U+2029/U+0085 raw, so one
model answer holding a paragraph separator once split a record in two and crashed ``make demo``.
Here lines are split at ``\\n`` only, and the writer escapes every character another reader might
take for a line break (``json.dumps`` already escapes the C0 controls), so a file stays one record
per line for any JSON Lines tool. Text must be valid Unicode: a lone surrogate (U+D800–U+DFFF,
which no UTF-8 file can hold) is refused with a clear error instead of failing half-way.

Every JSONL file of the project goes through here: the pipeline's samples and rankings, the
metrics log, resume, the report, the data loaders, the built-in task and the store's exports.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError

# characters that some line splitter breaks at and that json.dumps(ensure_ascii=False) leaves raw
_BREAKS = re.compile("[\u0085\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONLineError(UserError):
    """A line that is not one JSON value; ``reason`` is the message without the location."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def dumps_line(record: Any) -> str:
    """``record`` as one line of JSON (no newline at the end): readable text (``ensure_ascii=False``)
    with every line-break character escaped. Raises ``UserError`` for a lone surrogate."""
    text = json.dumps(record, ensure_ascii=False)
    bad = _SURROGATE.search(text)
    if bad:
        raise UserError(
            f"cannot write {text[max(0, bad.start() - 40) : bad.start()]!r}…: a lone surrogate "
            f"U+{ord(bad.group()):04X} is not valid Unicode text"
        )
    return _BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def loads_line(raw: bytes | str, where: str, first: bool = False) -> Any:
    """The JSON value of one line (``first``: a UTF-8 byte-order mark is allowed).
    Raises ``JSONLineError`` naming ``where`` (``file:line``) and the column."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig" if first else "utf-8")
        except UnicodeDecodeError as e:
            raise JSONLineError(where, f"not UTF-8 text ({e.reason} at column {e.start + 1})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise JSONLineError(where, json_error(e)) from None


def json_error(e: json.JSONDecodeError) -> str:
    """``not valid JSON (Expecting ',' delimiter at column 12)``; some of json's messages end in
    "at" ("Invalid control character at"): it is said once."""
    return f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"


def raw_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, bytes) of every line of ``path``, split at ``\\n`` only; ``.gz`` is
    read through gzip. Blank lines are included (callers skip them)."""
    path = Path(path)
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        yield from enumerate(f, start=1)


def iter_jsonl(path: str | Path) -> Iterator[Any]:
    """Each non-blank line's JSON value; the first bad line raises ``JSONLineError`` (file:line)."""
    for n, raw in raw_lines(path):
        if raw.strip():
            yield loads_line(raw, f"{path}:{n}", first=n == 1)


def read_jsonl(path: str | Path) -> list[Any]:
    return list(iter_jsonl(path))


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Write ``rows`` atomically (a temporary file renamed over ``path``): a crash never leaves
    half a file where a finished one is expected."""
    path = Path(path)
    text = "".join(dumps_line(r) + "\n" for r in rows)  # a bad record fails before anything is written
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append one record (the metrics log): the line is written whole with one ``write``."""
    line = dumps_line(row) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
