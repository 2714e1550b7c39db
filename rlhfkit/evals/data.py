"""Loading eval data from a file, a local ``datasets`` directory or a hub name.

Every suite's loader takes ``source``: a path to a file (.json, .jsonl, .csv, .txt), a
directory saved with ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a
hub name ``owner/name[:config]`` (needs the user to be online). Rows come back as dicts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rlhfkit.errors import UserError


def read_rows(source: str | Path, split: str | None = None) -> list[dict]:
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return _datasets_dir(path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            return rows
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if isinstance(data, dict) and split and split in data:
                data = data[split]
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of records")
            return data
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        raise UserError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl, .csv, .tsv)")
    if "/" in str(source) and not str(source).startswith((".", "/", "~")):
        return _hub(str(source), split)
    raise UserError(f"{source}: no such file or directory (and not a hub name owner/name)")


def _datasets_dir(path: Path, split: str | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure is a bad directory for the user
        raise UserError(f"{path}: not a saved `datasets` directory ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split if split in ds else next(iter(ds))
        ds = ds[name]
    return [dict(r) for r in ds]


def _hub(name: str, split: str | None) -> list[dict]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{name}: cannot load from the hub ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split if split in ds else next(iter(ds))]
    return [dict(r) for r in ds]


def need(row: dict, keys: tuple[str, ...], where: str, i: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserError(f"{where}: record {i + 1} lacks field(s) {', '.join(missing)} (has {', '.join(map(str, row))})")
