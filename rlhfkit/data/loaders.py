"""Loaders: files, local ``datasets`` directories and hub datasets -> record objects.

    load_records(source, kind, *, fields=None, split="train", skip_invalid=False, limit=None)
        -> LoadResult(records, skipped)    # result.summary() is a one-line report

``kind`` is ``"demonstration"`` (SFT), ``"ranking"`` (reward model), ``"prompt"`` (PPO, eval) or
``"text"`` (pretraining: a list of ``str`` documents).

Sources (detected in this order)
--------------------------------
- a file, by suffix: ``.jsonl`` (one object a line; blank lines ignored), ``.json`` (a list of
  objects; a ``.json`` file holding JSON Lines — what ``Dataset.to_json`` writes — also works),
  ``.csv`` / ``.tsv`` (a header row; a cell of a list field such as ``messages``, ``responses`` or
  ``ranks`` is read as JSON), ``.parquet``, any of the text ones gzipped (``.jsonl.gz`` …), and
  ``.txt`` for kind ``text`` only: **the whole file is one document** (a corpus is one stream;
  pretraining chunks it — splitting on blank lines would put an end-of-text between paragraphs).
  A path that looks like a file (a data suffix, or starting with ``/ ./ ../ ~``) and does not
  exist is an error ("no such file").
- a directory saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks
  the split of a DatasetDict; a single saved Dataset is used as it is unless it knows it is another
  split);
- a directory of data files: split by the ``datasets`` naming rules (``train.jsonl``,
  ``data/test-00000-of-00001.parquet``, ``train/…``; files with no split name are all "train"),
  each file read as above (a ``.txt`` file is one document);
- anything else is a hub dataset name: ``datasets.load_dataset(name, split=split)``;
  ``name:config`` selects a configuration.

Where a problem is reported: ``file:LINE`` (1-based line of the record's start) for JSONL, JSON
and CSV; ``source[split] record I`` (0-based, as in ``ds[I]``) for datasets and parquet.

``fields`` maps our field names to the user's column names, e.g. ``{"prompt": "instruction",
"response": "output"}`` or ``{"chosen": "pos", "rejected": "neg"}``; a dotted name reaches into an
object (``{"prompt": "prompt.text"}`` for RealToxicityPrompts). Errors name the user's column.

Schemas: see ``rlhfkit.data.schemas`` (one row -> records, per kind).

Every record's ``meta`` holds ``location`` (as above) and the row's other scalar fields (ids,
categories, …). ``limit`` caps the number of records returned (reading stops there).

Errors are ``UserError`` with one line: ``data/train.jsonl:17: field 'chosen': expected a non-empty
string, got null``. With ``skip_invalid=True`` invalid records are skipped and listed in
``LoadResult.skipped`` as ``(location, reason)``; structural problems (a broken ``.json`` file, a
missing split) still raise. An empty source, or one with no valid record, is an error.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.data.jsonl import JSONLineError, json_error, loads_line, raw_lines
from rlhfkit.data.schemas import FIELDS, InvalidRecord, Kind, describe_value, parse_record
from rlhfkit.errors import UserError

KINDS = ("demonstration", "ranking", "prompt", "text")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
_PLURAL = {"demonstration": "demonstrations", "ranking": "rankings", "prompt": "prompts", "text": "documents"}


@dataclass
class LoadResult:
    records: list[Any]  # Demonstration / Ranking / Prompt objects, or str documents for kind "text"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    source: str = ""
    kind: str = ""
    limit: int | None = None

    def __len__(self) -> int:
        return len(self.records)

    def summary(self) -> str:
        """E.g. ``loaded 1,850 rankings from data/train.jsonl; skipped 3 (2 × missing field 'chosen', 1 × …)``."""
        n = len(self.records)
        what = _PLURAL[self.kind] if n != 1 else self.kind if self.kind != "text" else "document"
        out = f"loaded {n:,} {what} from {self.source}"
        if self.limit is not None and n >= self.limit:
            out += f" (limit {self.limit:,})"
        if self.skipped:
            out += f"; skipped {len(self.skipped):,} ({_reasons(self.skipped)})"
        return out


def _reasons(skipped: list[tuple[str, str]], top: int = 3) -> str:
    counts = Counter(reason for _, reason in skipped).most_common()
    parts = [f"{c:,} × {r}" for r, c in counts[:top]]
    if len(counts) > top:
        parts.append(f"{sum(c for _, c in counts[top:]):,} × other reasons")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# the entry point


def load_records(
    source: str,
    kind: Kind,
    *,
    fields: dict[str, str] | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    limit: int | None = None,
) -> LoadResult:
    """Load ``kind`` records from ``source`` (a file, a ``datasets`` directory, or a hub name)."""
    if kind not in KINDS:
        raise UserError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    fields = _check_fields(fields)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit: expected a positive integer, got {limit!r}")
    source = str(source)
    result = LoadResult(records=[], source=source, kind=kind, limit=limit)
    rows = 0
    for loc, row in _rows(source, kind, split):
        rows += 1
        try:
            if isinstance(row, InvalidRecord):
                raise row
            new = parse_record(row, kind, fields=fields)
        except InvalidRecord as e:
            if not skip_invalid:
                raise UserError(f"{loc}: {e}") from None
            result.skipped.append((loc, str(e)))
            continue
        for rec in new:
            if kind != "text":
                rec.meta["location"] = loc
        result.records.extend(new)
        if limit is not None and len(result.records) >= limit:
            del result.records[limit:]
            break
    if rows == 0:
        raise UserError(f"{source}: empty (no records)")
    if not result.records:
        raise UserError(
            f"{source}: no valid {kind} record; skipped {len(result.skipped):,} ({_reasons(result.skipped)})"
        )
    return result


def _check_fields(fields: dict[str, str] | None) -> dict[str, str]:
    fields = dict(fields or {})
    for ours, theirs in fields.items():
        if ours not in FIELDS:
            raise UserError(f"fields: unknown field {ours!r}; expected one of {', '.join(FIELDS)}")
        if not isinstance(theirs, str) or not theirs:
            raise UserError(f"fields: {ours!r} must map to a column name, got {theirs!r}")
    return fields


# ----------------------------------------------------------------------------------------------
# sources -> (location, row dict | InvalidRecord)

Rows = Iterator[tuple[str, "dict[str, Any] | InvalidRecord"]]


def _looks_like_file(source: str) -> bool:
    s = source.lower().removesuffix(".gz")
    return s.endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~", ".\\"))


def _rows(source: str, kind: str, split: str) -> Rows:
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return _file_rows(path, source, kind)
    if path.is_dir():
        return _dir_rows(path, source, kind, split)
    if _looks_like_file(source):
        raise UserError(f"{source}: no such file")
    return _hub_rows(source, split)


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _file_rows(path: Path, disp: str, kind: str) -> Rows:
    suffix = _suffix(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path, disp)
    if suffix == ".json":
        return _json_rows(path, disp)
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, disp, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _parquet_rows(path, disp)
    if suffix == ".txt":
        if kind != "text":
            raise UserError(f"{disp}: a .txt file is plain text, which only kind 'text' reads (not {kind!r})")
        return _txt_rows(path, disp)
    raise UserError(f"{disp}: unsupported file type {suffix or '(no suffix)'!r}; expected {', '.join(FILE_SUFFIXES)}")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _read_text(path: Path, disp: str) -> str:
    with _open_binary(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{disp}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_object(obj: Any) -> dict[str, Any] | InvalidRecord:
    if isinstance(obj, dict):
        return obj
    return InvalidRecord(f"expected a JSON object, got {describe_value(obj)}")


def _jsonl_rows(path: Path, disp: str) -> Rows:
    for n, raw in raw_lines(path):
        yield from _jsonl_line(raw, f"{disp}:{n}", first=n == 1)


def _jsonl_line(line: bytes | str, loc: str, first: bool = False) -> Rows:
    if not line.strip():
        return
    try:
        obj = loads_line(line, loc, first)
    except JSONLineError as e:
        yield loc, InvalidRecord(e.reason)
        return
    yield loc, _json_object(obj)


def _json_rows(path: Path, disp: str) -> Rows:
    text = _read_text(path, disp)
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return
    if text[start] == "{":  # one object, or JSON Lines in a .json file (what Dataset.to_json writes)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            for n, line in enumerate(text.split("\n"), start=1):
                yield from _jsonl_line(line, f"{disp}:{n}")
            return
        yield f"{disp}:{text.count(chr(10), 0, start) + 1}", obj
        return
    if text[start] != "[":
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{disp}:{e.lineno}: {json_error(e)}") from None
        raise UserError(
            f"{disp}: expected a JSON list of objects (or JSON Lines), got {describe_value(json.loads(text))}"
        )
    # walk the list element by element to know the line each record starts on
    dec = json.JSONDecoder()
    i, line, counted = start + 1, 1 + text.count("\n", 0, start), start

    def broken(pos: int, msg: str) -> UserError:
        ln = text.count("\n", 0, pos) + 1
        return UserError(f"{disp}:{ln}: not valid JSON ({msg} at column {pos - text.rfind(chr(10), 0, pos)})")

    i = _skip_ws(text, i)
    if i < len(text) and text[i] == "]":
        i += 1
    else:
        while True:
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise UserError(f"{disp}:{e.lineno}: {json_error(e)}") from None
            line += text.count("\n", counted, i)
            counted = i
            yield f"{disp}:{line}", _json_object(obj)
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
                continue
            if i < len(text) and text[i] == "]":
                i += 1
                break
            raise broken(i, "Expecting ',' delimiter")
    i = _skip_ws(text, i)
    if i < len(text):
        raise broken(i, "Extra data")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _csv_rows(path: Path, disp: str, delimiter: str) -> Rows:
    csv.field_size_limit(2**31 - 1)  # long conversations in one cell
    raw = _read_text(path, disp)
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        last = reader.line_num
        for cells in reader:
            loc, last = f"{disp}:{last + 1}", reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield loc, InvalidRecord(f"row has {len(cells)} fields, the header has {len(header)}")
                continue
            yield loc, dict(zip(header, cells))
    except csv.Error as e:
        raise UserError(f"{disp}:{reader.line_num}: not valid CSV ({e})") from None


def _parquet_rows(path: Path, disp: str) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 — any pyarrow failure is a bad file
        raise UserError(f"{disp}: not a readable parquet file ({_first_line(e)})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{disp} record {i}", row


def _txt_rows(path: Path, disp: str) -> Rows:
    text = _read_text(path, disp)
    if text.strip():
        yield disp, {"text": text}


def _dir_rows(path: Path, disp: str, kind: str, split: str) -> Rows:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _saved_rows(path, disp, split)
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except EmptyDatasetError:
        files = {}
    if not files:
        raise UserError(f"{disp}: directory holds no data files ({', '.join(FILE_SUFFIXES)}) and no saved dataset")
    if split not in files:
        raise UserError(f"{disp}: no split {split!r} (found: {', '.join(str(s) for s in files)})")
    return _files_rows(path, disp, kind, sorted(files[split]))


def _files_rows(path: Path, disp: str, kind: str, files: list[str]) -> Rows:
    for f in files:
        rel = os.path.relpath(f, path)
        yield from _file_rows(Path(f), os.path.join(disp, rel), kind)


def _saved_rows(path: Path, disp: str, split: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{disp}: not a readable saved dataset ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{disp}: no split {split!r} (found: {', '.join(ds)})")
        ds = ds[split]
    elif ds.split is not None and str(ds.split) != split:
        raise UserError(f"{disp}: holds only split {str(ds.split)!r}, not {split!r}")
    return _dataset_rows(ds, f"{disp}[{split}]")


def _dataset_rows(ds: Any, disp: str) -> Rows:
    for i, row in enumerate(ds):
        yield f"{disp} record {i}", row


def _hub_rows(source: str, split: str) -> Rows:
    import datasets

    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 — offline, unknown name, unknown split: one line for the user
        raise UserError(
            f"{source}: not a local file or directory, and loading it from the hub failed: {_first_line(e)}"
        ) from None
    return _dataset_rows(ds, f"{source}[{split}]")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
