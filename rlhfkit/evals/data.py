"""Loading eval data from a file, a local ``datasets`` directory or a Hugging Face hub dataset.

Every suite's loader takes ``source``: a path to a file (.json, .jsonl, .csv, .tsv), a
directory saved with ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a hub
name ``owner/name[:config]``, or a ``HubDataset`` (the suites' defaults, see
``rlhfkit.evals.runner.HUB_DEFAULTS``). Rows come back as plain dicts; ``ClassLabel`` columns
(CrowS-Pairs' ``bias_type`` on the hub is an integer) come back as their label names.

A hub dataset that cannot be loaded raises ``HubUnavailable`` (a ``UserError``) with one line
saying why -- never a traceback from ``datasets`` or ``huggingface_hub`` -- so that the runner
can say which option to pass instead.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import UserError

PARQUET_EXPORT = "refs/convert/parquet"  # the hub's automatic Parquet copy of every public dataset


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face hub: ``repo`` (owner/name), its ``config`` and ``split``,
    and ``select``: the rows of interest, picked from the loaded split (e.g. RealToxicityPrompts'
    challenging prompts out of all 99k), as a function ``datasets.Dataset -> datasets.Dataset``."""

    repo: str
    config: str | None = None
    split: str | None = None
    select: Callable | None = None

    @classmethod
    def parse(cls, name: str) -> HubDataset:
        """``owner/name[:config]`` as users type it."""
        repo, _, config = name.partition(":")
        return cls(repo, config or None)

    def __str__(self) -> str:
        return self.repo + (f":{self.config}" if self.config else "")


class HubUnavailable(UserError):
    """A hub dataset could not be loaded; ``offline`` when the hub itself could not be reached."""

    def __init__(self, source: HubDataset, reason: str, offline: bool) -> None:
        self.source, self.reason, self.offline = source, reason, offline
        super().__init__(f"hub dataset {source}: cannot load it ({reason})")


def looks_like_hub_name(source: str) -> bool:
    """'owner/name[:config]' that is not a path (paths start with '.', '/' or '~', or exist)."""
    s = str(source)
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def read_rows(source: str | Path | HubDataset, split: str | None = None, limit: int | None = None) -> list[dict]:
    """The records of ``source`` (its ``split`` where it has several), the first ``limit`` of them."""
    if isinstance(source, HubDataset):
        return _hub(source, source.split or split, limit)
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return _datasets_dir(path, split, limit)
    if path.is_file():
        return _read_file(path, split)[:limit]
    if looks_like_hub_name(str(source)):
        return _hub(HubDataset.parse(str(source)), split, limit)
    raise UserError(f"{source}: no such file or directory (and not a hub name owner/name)")


def _read_file(path: Path, split: str | None) -> list[dict]:
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


def _datasets_dir(path: Path, split: str | None, limit: int | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure is a bad directory for the user
        raise UserError(f"{path}: not a saved `datasets` directory ({_first_line(e)})") from None
    return _rows(_pick_split(ds, split, str(path)), limit)


def hub_load(repo: str, config: str | None, revision: str | None = None):
    """``datasets.load_dataset`` of a hub repo, every split: the one place that goes online."""
    import datasets

    return datasets.load_dataset(repo, config, revision=revision)


def _hub(source: HubDataset, split: str | None, limit: int | None) -> list[dict]:
    try:
        with _quiet_hub_logs():
            try:
                ds = hub_load(source.repo, source.config)
            except RuntimeError as e:
                if "scripts are no longer supported" not in str(e):
                    raise
                # datasets >= 4 runs no loading scripts; such repos (CrowS-Pairs) are read from the
                # Parquet export the hub makes of them (github.com/huggingface/datasets/issues/8012)
                ds = hub_load(source.repo, source.config, revision=PARQUET_EXPORT)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming what to pass instead
        raise HubUnavailable(source, _first_line(e), offline=_is_offline(e)) from None
    ds = _pick_split(ds, split, str(source))
    if source.select is not None:
        ds = source.select(ds)
    return _rows(ds, limit)


def _is_offline(e: BaseException) -> bool:
    """True for the ways ``datasets`` reports an unreachable hub: ConnectionError (which also
    covers huggingface_hub's OfflineModeIsEnabled under HF_HUB_OFFLINE=1) and httpx's transport
    errors where a download breaks half-way."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__module__.startswith("httpx") and c.__name__ == "TransportError" for c in type(e).__mro__)


@contextlib.contextmanager
def _quiet_hub_logs():
    """Without a network huggingface_hub logs a warning per retry (5 of them, ~20 s) before the
    error that we turn into one line; keep those off the user's screen while we load."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()  # (configures the library's logger first, if not yet done)
    hub_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def _pick_split(ds, split: str | None, where: str):
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split and split in ds:
        return ds[split]
    if split and len(ds) > 1:
        raise UserError(f"{where}: no split {split!r} (has {', '.join(ds)})")
    return ds[next(iter(ds))]


def _rows(ds, limit: int | None = None) -> list[dict]:
    """A ``datasets.Dataset`` as dicts, ``ClassLabel`` integers replaced by their names."""
    import datasets

    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    labels = {k: f for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    rows = ds.to_list()
    for r in rows:
        for k, f in labels.items():
            r[k] = f.int2str(r[k]) if r[k] is not None and r[k] >= 0 else None
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def need(row: dict, keys: tuple[str, ...], where: str, i: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserError(f"{where}: record {i + 1} lacks field(s) {', '.join(missing)} (has {', '.join(map(str, row))})")
