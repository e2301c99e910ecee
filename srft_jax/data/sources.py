"""Raw rows from local files, TFDS datasets or the Hugging Face hub, one dict at a time.

A source is a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory of such files,
TFDS data (a TFDS dataset directory, local or ``gs://``, or ``tfds:NAME[/CONFIG][:VERSION]``;
see :mod:`srft_jax.data.tfds_io`), or (when no such path exists) a Hugging Face dataset id
read with ``datasets``. Rows that cannot even be read as a JSON object (bad JSON, bytes
that are not UTF-8, a non-object line) come back as :class:`BadRecord` with a reason, so
callers can count and skip them; problems with the file itself (missing, unreadable
parquet) raise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from srft_jax.data import tfds_io
from srft_jax.faults import DataError, MissingDataError, UsageError

SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A row that could not be read; ``reason`` is a short stable key for counting."""

    reason: str
    where: str


Record = Union[dict, BadRecord]


def resolve_files(path: Path, split: Optional[str]) -> list[Path]:
    """Data files of a local source: the file itself, or a directory's files (recursive).

    In a directory, files whose name starts with ``split`` (``train.jsonl``,
    ``train-00000-of-00001.parquet``) are used. When none does, all data files are used,
    unless some are named after another split (then asking for a missing split is an
    error, not a silent fall-back to, say, the training files).
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingDataError(f"no such file or directory: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise MissingDataError(f"no {'/'.join(SUFFIXES)} files under {path}")
    if split:
        matching = [p for p in files if p.name.startswith(split)]
        if matching:
            return matching
        named = sorted({s for p in files for s in SPLIT_NAMES if p.name.startswith(s)})
        if named:
            raise MissingDataError(f"no {split!r} files under {path} (it has {named})")
    return files


def looks_local(source: str) -> bool:
    """A source that can only be a local path (not a hub id): it starts with `.`, `/` or `~`
    or ends with a data-file suffix."""
    return source.startswith((".", "/", "~")) or source.endswith(SUFFIXES)


def check_local_source(source: str, key: str) -> None:
    """Fails with one line starting with `key` when `source` is a local path that does not
    exist or a directory without data files; hub ids and TFDS sources are checked when read."""
    if not source:
        raise UsageError(f"{key} is empty: give a data file, a directory or a HF dataset id")
    if tfds_io.is_tfds_source(source):
        return
    path = Path(os.path.expanduser(source))
    if path.exists():
        if path.is_dir() and not any(p.is_file() and p.suffix in SUFFIXES for p in path.rglob("*")):
            raise MissingDataError(f"{key}={source!r}: no {'/'.join(SUFFIXES)} files in this directory")
        return
    if looks_local(source):
        raise MissingDataError(f"{key}={source!r}: no such file or directory")


def local_split_names(path: Path) -> list[str]:
    """Splits of a local directory: the split name (SPLIT_NAMES) each data file's name starts
    with, the longest one when several match; ``[]`` when no file is named after a split."""
    names = set()
    for file in resolve_files(path, None):
        matches = [s for s in SPLIT_NAMES if file.name.startswith(s)]
        if matches:
            names.add(max(matches, key=len))
    return sorted(names)


def _iter_jsonl_lines(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield BadRecord("undecodable_text", where)
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                yield BadRecord("invalid_json", where)
                continue
            if not isinstance(row, dict):
                yield BadRecord("not_an_object", where)
                continue
            yield row


def _iter_json(path: Path) -> Iterator[Record]:
    """A ``.json`` file holding a list of objects, or JSON lines under a .json name."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _iter_jsonl_lines(path)
        return
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a valid JSON array ({exc})") from None
    for i, row in enumerate(rows):
        yield row if isinstance(row, dict) else BadRecord("not_an_object", f"{path}[{i}]")


def _iter_parquet(path: Path, batch_rows: int = 512) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        while True:
            batch = next(batches, None)
            if batch is None:
                return
            rows = batch.to_pylist()
            yield from rows
    except (pa.ArrowException, OSError) as exc:  # a truncated or non-parquet file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: not a readable parquet file ({first})") from None


def _iter_file(path: Path) -> Iterator[Record]:
    if path.suffix == ".parquet":
        return _iter_parquet(path)
    if path.suffix == ".json":
        return _iter_json(path)
    return _iter_jsonl_lines(path)


def iter_records(
    source: str, split: Optional[str] = "train", hf_name: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
) -> Iterator[Record]:
    """Rows of ``source`` in a fixed order (files sorted by path, rows in file order, TFDS
    rows in stored order). ``tfds_data_dir`` is where ``tfds:NAME`` datasets are prepared."""
    if not source:
        raise ValueError("source is empty: give a data file, a directory or a HF dataset id")
    if tfds_io.is_tfds_source(source):
        yield from tfds_io.open_split(source, split, tfds_data_dir)
        return
    path = Path(os.path.expanduser(source))
    if path.exists():
        for file in resolve_files(path, split):
            yield from _iter_file(file)
        return
    if looks_local(source):
        raise MissingDataError(f"no such file or directory: {source}")
    yield from _iter_hub(source, split, hf_name)


def _iter_hub(dataset_id: str, split: Optional[str], hf_name: Optional[str]) -> Iterator[dict]:
    import datasets

    ds = datasets.load_dataset(dataset_id, hf_name, split=split or "train")
    for row in ds:
        yield dict(row)


def as_text(value: Any) -> tuple[Optional[str], Optional[str]]:
    """``(text, None)`` for clean UTF-8 text, else ``(None, reason)``.

    reason is "wrong_type" (not text) or "undecodable_text" (bytes that are not UTF-8, or
    a string holding lone surrogates such as ``"\\ud800"`` from JSON). Bytes (parquet
    binary columns) that decode are accepted.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "undecodable_text"
    if not isinstance(value, str):
        return None, "wrong_type"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, "undecodable_text"
    return value, None
