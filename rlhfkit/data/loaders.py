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

Schemas (recognised per record, in this order; null or "" counts as absent when telling them apart)
------------------------------------------------------------------------------------------------------
A *prompt* is a string (one user turn), a list of chat messages ending with a user turn, or HH
text (a string starting with ``Human:``; a final empty ``Assistant:`` turn is dropped, and the
responses that continue it — ``" I think…"`` — are stripped, as every HH turn is). Messages
are ``{"role", "content"}`` (or ShareGPT ``{"from", "value"}``); roles ``system`` (first turn only),
``user`` (alias ``human``), ``assistant`` (aliases ``gpt``, ``bot``, ``model``); every content a
non-empty string, at least one user turn.

demonstration
  1. ``{instruction, instances: [{input, output}, …]}`` (self-instruct seeds) -> one Demonstration
     per instance; prompt = instruction + ("\\n\\n" + input, if input is not empty)
  2. ``{messages: [… , {"role": "assistant", …}]}`` -> the last (assistant) turn is the response
  3. ``{prompt | messages, response}``
  4. ``{instruction, input?, output}`` (Alpaca) -> prompt as in 1.
  5. ``{chosen}`` or ``{text}``: an HH transcript (or a message list); the last assistant turn is
     the response (of a preference pair, the chosen conversation is the demonstration)
ranking
  1. ``{prompt | messages, responses: [best, …, worst], ranks?}`` — ``ranks[i]`` is the rank of
     ``responses[i]``, lower is better, equal = tied; responses are re-ordered best first and ranks
     renumbered 0, 1, 2 … (dense). All tied (no pair) is invalid.
  2. ``{prompt | messages, chosen, rejected}`` -> K = 2
  3. ``{chosen, rejected}`` as two full conversations (HH transcripts, or message lists) sharing a
     prompt -> messages = the shared conversation, responses = the two final assistant turns.
     In HH text an empty final ``Assistant:`` turn is a real (empty) answer. Where the two
     transcripts diverge before their last turn (5 pairs in hh-rlhf harmless) the prompt is the
     longest shared run of turns ending with a user turn and each response is the rest of its
     transcript (see ``hh.shared_prefix``); if they share no such prefix the record is invalid.
prompt
  1. ``{prompt | messages}`` (a trailing assistant turn of ``messages`` is dropped)
  2. ``{instruction, input?}``, or self-instruct ``{instruction, instances}`` (one per instance)
  3. ``{chosen, rejected}``: the shared prompt of the pair, as for rankings
  4. ``{chosen}`` or ``{text}``: HH text; all turns but the last assistant turn
text
  ``.txt`` files, or records with a non-empty ``text`` string.

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
from typing import Any, Literal

from rlhfkit.data.hh import HHFormatError, parse_hh, shared_prefix, split_last_response
from rlhfkit.data.records import ROLES, Demonstration, Message, Prompt, Ranking
from rlhfkit.errors import UserError

Kind = Literal["demonstration", "ranking", "prompt", "text"]
KINDS = ("demonstration", "ranking", "prompt", "text")
FIELDS = ("prompt", "messages", "response", "responses", "ranks", "chosen", "rejected",
          "instruction", "input", "output", "instances", "text")  # fmt: skip
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
_PLURAL = {"demonstration": "demonstrations", "ranking": "rankings", "prompt": "prompts", "text": "documents"}
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class InvalidRecord(ValueError):
    """One record does not fit its kind; the message (without location) says which field and why."""


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
        raise UserError(f"{source}: no valid {kind} record; skipped {len(result.skipped):,} ({_reasons(result.skipped)})")
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
    return InvalidRecord(f"expected a JSON object, got {_describe(obj)}")


def _jsonl_rows(path: Path, disp: str) -> Rows:
    with _open_binary(path) as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield f"{disp}:{n}", InvalidRecord(f"not UTF-8 text ({e.reason} at column {e.start + 1})")
                continue
            yield from _jsonl_line(line, f"{disp}:{n}")


def _jsonl_line(line: str, loc: str) -> Rows:
    if not line.strip():
        return
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        yield loc, InvalidRecord(f"not valid JSON ({e.msg} at column {e.colno})")
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
            raise UserError(f"{disp}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        raise UserError(f"{disp}: expected a JSON list of objects (or JSON Lines), got {_describe(json.loads(text))}")
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
                raise UserError(f"{disp}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
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
        raise UserError(f"{source}: not a local file or directory, and loading it from the hub failed: {_first_line(e)}") from None
    return _dataset_rows(ds, f"{source}[{split}]")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# one row -> records


def parse_record(row: dict[str, Any], kind: Kind, *, fields: dict[str, str] | None = None) -> list[Any]:
    """The records of one row (most rows give one; a self-instruct task gives one per instance).

    Raises ``InvalidRecord`` (message without location) when the row fits no schema of ``kind``.
    """
    r = _Row(row, fields or {})
    if kind == "demonstration":
        out = _demonstrations(r)
    elif kind == "ranking":
        out = [_ranking(r)]
    elif kind == "prompt":
        out = _prompts(r)
    elif kind == "text":
        if not r.present("text"):
            raise r.unknown("text")
        return [r.text("text")]
    else:
        raise InvalidRecord(f"unknown record kind {kind!r}")
    meta = r.meta()
    for rec in out:
        rec.meta = {**meta, **rec.meta}
    return out


class _Row:
    """A raw row seen through the field mapping; remembers which columns were used."""

    def __init__(self, raw: dict[str, Any], fields: dict[str, str]):
        self.raw, self.fields, self.used = raw, fields, set()
        for ours, col in fields.items():
            if self._lookup(col)[0] is False:
                raise InvalidRecord(f"missing field {col!r} (mapped to {ours!r})")

    def _lookup(self, col: str) -> tuple[bool, Any]:
        if col in self.raw:
            return True, self.raw[col]
        node: Any = self.raw
        for part in col.split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def name(self, key: str) -> str:
        return self.fields.get(key, key)

    def _find(self, key: str) -> tuple[bool, Any]:
        if key not in self.fields and key in self.fields.values():
            return False, None  # the user's column of that name was mapped to another of our fields
        return self._lookup(self.name(key))

    def has(self, key: str) -> bool:
        """Present and not null or "" (datasets fill absent columns with None, CSV with "")."""
        found, value = self._find(key)
        return found and value is not None and value != ""

    def present(self, key: str) -> bool:
        return self._find(key)[0]

    def get(self, key: str) -> Any:
        found, value = self._find(key)
        if not found:
            raise InvalidRecord(f"missing field {self.name(key)!r}")
        self.used.add(self.name(key).split(".")[0])
        return value

    def text(self, key: str, *, allow_empty: bool = False, value: Any = None, label: str | None = None) -> str:
        v = self.get(key) if label is None else value
        label = label or self.name(key)
        if not isinstance(v, str) or (not allow_empty and not v.strip()):
            expected = "a string" if allow_empty else "a non-empty string"
            raise InvalidRecord(f"field {label!r}: expected {expected}, got {_describe(v)}")
        return v

    def list(self, key: str, value: Any = None, label: str | None = None) -> list[Any]:
        v = self.get(key) if label is None else value
        label = label or self.name(key)
        if isinstance(v, str) and v.lstrip().startswith("["):  # a list in a CSV cell
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise InvalidRecord(f"field {label!r}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(v, list) or not v:
            raise InvalidRecord(f"field {label!r}: expected a non-empty list, got {_describe(v)}")
        return v

    def unknown(self, expected: str) -> InvalidRecord:
        found = ", ".join(k for k, v in self.raw.items() if v is not None) or "nothing"
        return InvalidRecord(f"cannot tell the record type: expected fields {expected} (found: {found})")

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.raw.items() if k not in self.used and isinstance(v, (str, int, float, bool))}


# -- prompts and messages


def _messages(r: _Row, key: str) -> list[Message]:
    """A validated message list (roles, non-empty contents, system only first)."""
    label = r.name(key)
    items = r.list(key)
    out: list[Message] = []
    for i, m in enumerate(items):
        where = f"{label}[{i}]"
        if not isinstance(m, dict):
            raise InvalidRecord(f"field {where!r}: expected a message object {{role, content}}, got {_describe(m)}")
        rk, ck = ("role", "content") if "role" in m or "from" not in m else ("from", "value")
        if rk not in m:
            raise InvalidRecord(f"field {where!r}: missing 'role'")
        role = m[rk]
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise InvalidRecord(f"field '{where}.{rk}': expected one of {', '.join(ROLES)}, got {_describe(m[rk])}")
        if role == "system" and i > 0:
            raise InvalidRecord(f"field '{where}.{rk}': a system turn may only come first")
        content = m.get(ck)
        if not isinstance(content, str) or not content.strip():
            raise InvalidRecord(f"field '{where}.{ck}': expected a non-empty string, got {_describe(content)}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise InvalidRecord(f"field {label!r}: expected at least one user turn")
    return out


def _ends_with_user(msgs: list[Message], label: str) -> list[Message]:
    if msgs[-1]["role"] != "user":
        raise InvalidRecord(f"field {label!r}: expected the prompt to end with a user turn, got {msgs[-1]['role']!r}")
    return msgs


def _hh(r: _Row, key: str, *, allow_empty_last: bool) -> list[Message]:
    text = r.text(key, allow_empty=False)
    try:
        return parse_hh(text, allow_empty_last=allow_empty_last)
    except HHFormatError as e:
        raise InvalidRecord(f"field {r.name(key)!r}: {e}") from None


def _is_hh(v: Any) -> bool:
    return isinstance(v, str) and v.lstrip().startswith("Human:")


def _prompt(r: _Row, key: str, *, drop_answer: bool = False) -> list[Message]:
    """A prompt field: a string, HH text, or messages (ending with a user turn)."""
    label = r.name(key)
    v = r.get(key)
    if isinstance(v, str) and not _is_hh(v):
        return [{"role": "user", "content": r.text(key)}]
    if isinstance(v, str):
        msgs = _hh(r, key, allow_empty_last=True)
        if msgs[-1]["role"] == "assistant" and (drop_answer or not msgs[-1]["content"]):
            msgs = msgs[:-1]
        return _ends_with_user(msgs, label)
    if not isinstance(v, list):
        raise InvalidRecord(f"field {label!r}: expected a string or a list of messages, got {_describe(v)}")
    msgs = _messages(r, key)
    if drop_answer and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return _ends_with_user(msgs, label)


def _hh_strip(r: _Row, prompt_key: str, response: str) -> str:
    """After an HH prompt ("…\n\nAssistant:") a response is a continuation (" I think…"): strip it,
    as ``parse_hh`` strips every turn."""
    return response.strip() if _is_hh(r.get(prompt_key)) else response


def _prompt_key(r: _Row) -> str:
    return "prompt" if r.has("prompt") or not r.has("messages") else "messages"


def _instruction_prompt(instruction: str, inp: Any, label: str) -> list[Message]:
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise InvalidRecord(f"field {label!r}: expected a string, got {_describe(inp)}")
    text = instruction.strip() + ("\n\n" + inp.strip() if inp.strip() else "")
    return [{"role": "user", "content": text}]


def _instances(r: _Row) -> list[tuple[list[Message], Any, int]]:
    """Self-instruct: (prompt, output value, index) per instance."""
    instruction = r.text("instruction")
    label = r.name("instances")
    out = []
    for i, inst in enumerate(r.list("instances")):
        if not isinstance(inst, dict):
            raise InvalidRecord(f"field '{label}[{i}]': expected an object {{input, output}}, got {_describe(inst)}")
        out.append((_instruction_prompt(instruction, inst.get("input"), f"{label}[{i}].input"), inst.get("output"), i))
    return out


def _conversation(r: _Row, key: str, *, allow_empty_last: bool) -> list[Message]:
    """A full conversation given as HH text or as a message list."""
    v = r.get(key)
    if isinstance(v, list) or (isinstance(v, str) and v.lstrip().startswith("[")):
        return _messages(r, key)
    return _hh(r, key, allow_empty_last=allow_empty_last)


def _split_conversation(r: _Row, key: str, *, allow_empty_last: bool) -> tuple[list[Message], str]:
    """(prompt, response) of a full conversation; in HH text, everything after the last user turn."""
    msgs = _conversation(r, key, allow_empty_last=allow_empty_last)
    if isinstance(r.get(key), str) and _is_hh(r.get(key)):
        try:
            return split_last_response(msgs)
        except HHFormatError as e:
            raise InvalidRecord(f"field {r.name(key)!r}: {e}") from None
    return _last_answer(msgs, r.name(key))


def _last_answer(msgs: list[Message], label: str) -> tuple[list[Message], str]:
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise InvalidRecord(f"field {label!r}: expected the conversation to end with an assistant turn (the response)")
    return _ends_with_user(msgs[:-1], label), msgs[-1]["content"]


# -- kinds

_DEMO_SCHEMAS = "instruction+instances, messages, prompt+response, instruction+output, chosen (HH text) or text (HH text)"
_RANK_SCHEMAS = "prompt+responses, prompt+chosen+rejected, or chosen+rejected (HH text)"
_PROMPT_SCHEMAS = "prompt, messages, instruction, chosen (HH text) or text (HH text)"


def _demonstrations(r: _Row) -> list[Demonstration]:
    for has in (r.has, r.present):  # non-null fields first; then a null one gets its own message
        if has("instances"):
            demos = []
            for prompt, output, i in _instances(r):
                out = r.text("output", value=output, label=f"{r.name('instances')}[{i}].output")
                demos.append(Demonstration(messages=prompt, response=out, meta={"instance": i}))
            return demos
        if has("messages") and not r.has("response"):
            msgs = _messages(r, "messages")
            if msgs[-1]["role"] == "user" and r.present("response"):
                r.text("response")  # the response is there but null: say so
            msgs, resp = _last_answer(msgs, r.name("messages"))
            return [Demonstration(messages=msgs, response=resp)]
        if (has("prompt") or has("messages")) and has("response"):
            key = _prompt_key(r)
            return [Demonstration(messages=_prompt(r, key), response=_hh_strip(r, key, r.text("response")))]
        if has("instruction") and has("output"):
            prompt = _instruction_prompt(r.text("instruction"), r.get("input") if r.has("input") else "", r.name("input"))
            return [Demonstration(messages=prompt, response=r.text("output"))]
        for key in ("chosen", "text"):
            if has(key):
                msgs, resp = _split_conversation(r, key, allow_empty_last=False)
                if key == "chosen" and r.present("rejected"):
                    r.get("rejected")  # the other half of the pair: not kept in meta
                return [Demonstration(messages=msgs, response=resp)]
    raise r.unknown(_DEMO_SCHEMAS)


def _ranking(r: _Row) -> Ranking:
    for has in (r.has, r.present):
        if has("responses"):
            msgs = _prompt(r, _prompt_key(r))
            label = r.name("responses")
            items = r.list("responses")
            responses = [_hh_strip(r, _prompt_key(r), r.text("", value=v, label=f"{label}[{i}]")) for i, v in enumerate(items)]
            if len(responses) < 2:
                raise InvalidRecord(f"field {label!r}: expected at least 2 responses, got {len(responses)}")
            ranks = _ranks(r, len(responses)) if r.has("ranks") else list(range(len(responses)))
            order = sorted(range(len(responses)), key=lambda i: ranks[i])
            dense = {v: i for i, v in enumerate(sorted(set(ranks)))}
            return Ranking(messages=msgs, responses=[responses[i] for i in order], ranks=[dense[ranks[i]] for i in order])
        if has("chosen") and has("rejected"):
            if has("prompt") or has("messages"):
                msgs = _prompt(r, _prompt_key(r))
                key = _prompt_key(r)
                return Ranking.from_pair(msgs, _hh_strip(r, key, _answer(r, "chosen")), _hh_strip(r, key, _answer(r, "rejected")))
            a = _conversation(r, "chosen", allow_empty_last=True)
            b = _conversation(r, "rejected", allow_empty_last=True)
            try:
                msgs, chosen, rejected = shared_prefix(a, b)
            except HHFormatError as e:
                raise InvalidRecord(f"fields {r.name('chosen')!r}/{r.name('rejected')!r}: {e}") from None
            _ends_with_user(msgs, r.name("chosen"))
            return Ranking.from_pair(msgs, chosen, rejected)
    raise r.unknown(_RANK_SCHEMAS)


def _answer(r: _Row, key: str) -> str:
    """An explicit response: a string, or (TRL conversational) one assistant message."""
    v = r.get(key)
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant":
        return r.text(key, value=v[0].get("content"), label=f"{r.name(key)}[0].content")
    return r.text(key)


def _ranks(r: _Row, k: int) -> list[int]:
    label = r.name("ranks")
    ranks = r.list("ranks")
    if len(ranks) != k or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranks):
        raise InvalidRecord(f"field {label!r}: expected {k} integers (one rank per response), got {ranks!r}"[:300])
    if len(set(ranks)) == 1:
        raise InvalidRecord(f"field {label!r}: all responses are tied, so there is no pair to learn from")
    return ranks


def _prompts(r: _Row) -> list[Prompt]:
    for has in (r.has, r.present):
        if has("prompt") or has("messages"):
            return [Prompt(messages=_prompt(r, _prompt_key(r), drop_answer=True))]
        if has("instruction"):
            if r.has("instances"):
                return [Prompt(messages=p, meta={"instance": i}) for p, _, i in _instances(r)]
            inp = r.get("input") if r.has("input") else ""
            return [Prompt(messages=_instruction_prompt(r.text("instruction"), inp, r.name("input")))]
        if has("chosen") and has("rejected"):
            return [Prompt(messages=_ranking(r).messages)]
        for key in ("chosen", "text"):
            if has(key):
                msgs = _conversation(r, key, allow_empty_last=True)
                if msgs[-1]["role"] == "assistant":
                    msgs = _split_conversation(r, key, allow_empty_last=True)[0]
                return [Prompt(messages=_ends_with_user(msgs, r.name(key)))]
    raise r.unknown(_PROMPT_SCHEMAS)


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        if not v.strip():
            return "an empty string" if not v else "a blank string"
        return f"{v[:30]!r}" + ("…" if len(v) > 30 else "")
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, list):
        return "an empty list" if not v else "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__
