"""TensorFlow Datasets in the ArrayRecord format, read and written without TensorFlow.

A TFDS source is one of:

- a TFDS dataset directory: it holds ``dataset_info.json``, ``features.json`` and the
  ``NAME-SPLIT.array_record-0000i-of-0000n`` shards; a local path or ``gs://...`` (read
  through tfds' own file layer, etils ``epath``: gcsfs when TensorFlow is absent). A
  directory whose version subdirectories (``1.0.0/``) hold one also counts: the newest is read;
- ``tfds:NAME[/CONFIG][:VERSION]``: a prepared catalog dataset under a data directory
  (``DataConfig.tfds_data_dir``; None = TFDS's default, ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``).

Splits are read with random access (``builder.as_data_source()``), never with ``tfds.load``
or ``as_dataset``, which need TensorFlow. Text features come back from TFDS as bytes; rows
here hold ``str`` (bytes that are not UTF-8 are left as bytes, so validation counts them).

:class:`DatasetWriter` writes such a directory: rows serialised by the features
(``FeaturesDict.serialize_example``), ArrayRecord shards written with ``group_size:1`` (one
record per chunk, the layout random access wants), metadata by
``tfds.folder_dataset.write_metadata`` with the split infos counted here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np

from srft_jax.faults import DataError, DestinationExistsError, MissingDataError, MissingExtraError

TFDS_SCHEME = "tfds:"
REMOTE_PREFIXES = ("gs://",)
INFO_FILE = "dataset_info.json"
# The flat layout written by `srft-jax data convert` (all text; see training.TrainingRow).
FLAT_FEATURES = ("id", "question", "demonstration", "ground_truth", "data_source")
_VERSION = re.compile(r"\d+\.\d+\.\d+")
_NAME = re.compile(r"[a-z0-9_]+")
_READ_CHUNK = 256


def _tfds():
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise MissingExtraError("TFDS data needs the tfds extra: pip install 'srft-jax[tfds]'") from e
    return tensorflow_datasets


def is_tfds_source(source: str) -> bool:
    """Whether ``source`` names TFDS data (decided without importing tensorflow_datasets)."""
    if source.startswith(TFDS_SCHEME) or source.startswith(REMOTE_PREFIXES):
        return True
    path = Path(os.path.expanduser(source))
    return path.is_dir() and _dataset_dir(path) is not None


def _dataset_dir(path):
    """``path`` if it holds dataset_info.json, else its newest version subdirectory that does."""
    if (path / INFO_FILE).exists():
        return path
    versions = sorted((p for p in path.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)),
                      key=lambda p: tuple(int(x) for x in p.name.split(".")))
    versions = [p for p in versions if (p / INFO_FILE).exists()]
    return versions[-1] if versions else None


def open_builder(source: str, data_dir: Optional[str] = None):
    """The (read-only) TFDS builder of a dataset directory or a ``tfds:`` catalog name."""
    tfds = _tfds()
    if source.startswith(TFDS_SCHEME):
        name = source[len(TFDS_SCHEME):]
        where = data_dir or "the default TFDS data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            builder = None
        if builder is None or not builder.info.splits:
            raise MissingDataError(f"no prepared TFDS dataset {name!r} under {where}; prepare it "
                                    "with file_format='array_record' (docs/data.md, GSM8K) or set "
                                    "data.tfds_data_dir")
        return builder
    from etils import epath

    path = epath.Path(os.path.expanduser(source))
    if not path.is_dir():
        raise MissingDataError(f"no such TFDS dataset directory: {source}")
    directory = _dataset_dir(path)
    if directory is None:
        raise MissingDataError(f"{source} is not a TFDS dataset directory (no {INFO_FILE})")
    return tfds.builder_from_directory(directory)


def split_names(source: str, data_dir: Optional[str] = None) -> list[str]:
    return list(open_builder(source, data_dir).info.splits.keys())


class TfdsRows:
    """The rows of one split with random access: ``rows[i]`` is a dict of Python values."""

    def __init__(self, data_source: Any, where: str):
        self._source = data_source
        self.where = where

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {self.where} ({len(self)} rows)")
        return to_python(self._source[index % len(self)])

    def take(self, indices: Iterable[int]) -> list[dict]:
        """Rows at ``indices``, read in one batch."""
        indices = [int(i) for i in indices]
        return [to_python(r) for r in self._source.__getitems__(indices)] if indices else []

    def iter_range(self, stop: Optional[int] = None) -> Iterator[dict]:
        """Rows 0..stop-1 in order, read a chunk at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        for start in range(0, stop, _READ_CHUNK):
            yield from self.take(range(start, min(start + _READ_CHUNK, stop)))

    def __iter__(self) -> Iterator[dict]:
        return self.iter_range()

    def __repr__(self) -> str:
        return self.where


def open_split(source: str, split: Optional[str], data_dir: Optional[str] = None) -> TfdsRows:
    """Random-access rows of ``split`` (None: the only split; an error if there are several)."""
    builder = open_builder(source, data_dir)
    names = list(builder.info.splits.keys())
    if split is None:
        if len(names) != 1:
            raise DataError(f"{source} has splits {names}: name one")
        split = names[0]
    if split not in names:
        raise DataError(f"no split {split!r} in TFDS dataset {source} (it has {names})")
    try:
        data_source = builder.as_data_source(split=split)
    except NotImplementedError:
        raise ValueError(f"{source} is stored as {builder.info.file_format.value}, which has no "
                         "random access: prepare it with file_format='array_record'") from None
    return TfdsRows(data_source, f"{source}[{split}]")


def to_python(value: Any) -> Any:
    """A decoded TFDS example as plain Python: bytes -> str (when UTF-8), arrays -> lists."""
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()] if value.ndim else to_python(value.item())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- writing --------------------------------------------------------------------------------
def flat_features():
    """The FeaturesDict of the flat layout: one Text feature per field of FLAT_FEATURES."""
    tfds = _tfds()
    return tfds.features.FeaturesDict({k: tfds.features.Text() for k in FLAT_FEATURES})


def dataset_name_for(dest: str) -> str:
    """A TFDS dataset name from a directory: its name (or its parent's, for ``1.0.0/``) in
    snake case."""
    path = Path(os.path.abspath(os.path.expanduser(dest)))
    base = path.parent.name if _VERSION.fullmatch(path.name) else path.name
    name = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_")
    return name if name and not name[0].isdigit() else f"data_{name}"


class DatasetWriter:
    """Writes a TFDS dataset directory split by split, then its metadata (:meth:`finish`).

    Args:
      dest: the directory (created; must not hold files already). Its name gives the
        dataset name unless ``name`` is given; a version-named directory (``1.0.0``) gives
        the version, else 1.0.0.
      features: a ``tfds.features.FeaturesDict`` (default: the flat layout).
      shard_bytes: a new shard starts once a shard holds this many serialised bytes.
    """

    def __init__(self, dest: str, features: Any = None, name: Optional[str] = None,
                 shard_bytes: int = 256 * 2**20):
        self.dest = os.path.expanduser(dest)
        if os.path.isdir(self.dest) and os.listdir(self.dest):
            raise DestinationExistsError(f"{dest} already exists and is not empty")
        os.makedirs(self.dest, exist_ok=True)
        self.features = features if features is not None else flat_features()
        self.name = name or dataset_name_for(self.dest)
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"dataset name {self.name!r} must be snake_case")
        self.shard_bytes = int(shard_bytes)
        self._split_infos: list = []

    def _template(self, split: str):
        return _tfds().core.ShardedFileTemplate(
            data_dir=self.dest, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=self.name, split=split, filetype_suffix="array_record")

    def write_split(self, split: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Serialise and write ``rows`` as split ``split``; returns the number written (a
        split without rows is not recorded)."""
        from array_record.python.array_record_module import ArrayRecordWriter

        if not _NAME.fullmatch(split) or split in {i.name for i in self._split_infos}:
            raise ValueError(f"split name {split!r} must be new and snake_case")
        temp, lengths, shard_sizes = [], [], []
        writer, complete = None, False
        try:
            for row in rows:
                record = self.features.serialize_example(dict(row))
                if writer is None or shard_sizes[-1] >= self.shard_bytes:
                    if writer is not None:
                        writer.close()
                    temp.append(os.path.join(self.dest, f".{split}-{len(temp):05d}.tmp"))
                    writer = ArrayRecordWriter(temp[-1], "group_size:1")
                    lengths.append(0)
                    shard_sizes.append(0)
                writer.write(record)
                lengths[-1] += 1
                shard_sizes[-1] += len(record)
            complete = True
        finally:
            if writer is not None:
                writer.close()
            if not complete:  # leave no half-written split behind
                for path in temp:
                    if os.path.exists(path):
                        os.remove(path)
        if not lengths:
            return 0  # nothing written, no split recorded
        template = self._template(split)
        for src, dst in zip(temp, template.sharded_filepaths(num_shards=len(temp))):
            os.replace(src, os.fspath(dst))
        self._split_infos.append(_tfds().core.SplitInfo(
            name=split, shard_lengths=lengths, num_bytes=sum(shard_sizes),
            filename_template=template))
        return sum(lengths)

    def finish(self, description: str = "") -> None:
        """Write dataset_info.json and features.json for the splits written."""
        if not self._split_infos:
            raise ValueError(f"no split was written to {self.dest}")
        _tfds().folder_dataset.write_metadata(
            data_dir=self.dest, features=self.features, split_infos=self._split_infos,
            check_data=False, description=description)
