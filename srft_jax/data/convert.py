"""Convert a training source to a TFDS dataset directory of validated raw text rows.

    summaries = convert_to_tfds("data/openr1", "data/openr1_tfds")

Every row goes through the training validation (:func:`srft_jax.data.training.
parse_training_row`); bad rows are skipped and counted by reason. Good rows are written
in the flat layout (:data:`srft_jax.data.tfds_io.FLAT_FEATURES`), as text, not tokens, so
one converted dataset serves every tokenizer and prompt template:

    id             "{split}-{row}" (the id training from the source gives the row), or
                   the row's own id (flat layout)
    question       the bare question (a leading "This is the problem:" removed)
    demonstration  the demonstration after the prompt's <think> ("" for none)
    ground_truth   the answer the reward verifies against
    data_source    the row's data source ("unknown" when absent)

Rows keep their source order, so training from the converted directory gives the same
examples, in the same order, with the same ids, as training from the source.
Splits: a file gives one split (``split``, default "train"); a directory gives one per
split name its files start with (train.jsonl, test-00000-of-00001.parquet, ...; "train"
when none does); a hub id or a TFDS source gives its own splits. ``split`` keeps one.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

from srft_jax.data import sources, tfds_io
from srft_jax.data.prompts import PAPER_TEMPLATE
from srft_jax.data.training import RowError, parse_training_row
from srft_jax.faults import DataError, MissingDataError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    """What happened to the rows of one split: written, or skipped by reason."""

    split: str
    rows_read: int
    written: int
    skipped: dict[str, int]

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.split}: read {self.rows_read} rows, wrote {self.written}; "
                f"bad rows {sum(self.skipped.values())} ({reasons})")


def source_splits(source: str, hf_name: Optional[str] = None,
                  tfds_data_dir: Optional[str] = None) -> list[str]:
    """The splits of ``source`` (see the module docstring)."""
    if tfds_io.is_tfds_source(source):
        return tfds_io.split_names(source, tfds_data_dir)
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return ["train"]
    if path.is_dir():
        return sources.local_split_names(path) or ["train"]
    if source.startswith((".", "/", "~")) or source.endswith(sources.SUFFIXES):
        raise MissingDataError(f"no such file or directory: {source}")
    import datasets

    return list(datasets.get_dataset_split_names(source, hf_name))


class _Tally:
    def __init__(self):
        self.rows_read = 0
        self.skipped: collections.Counter = collections.Counter()


def _flat_rows(records: Iterator, split: str, tally: _Tally, require_demo: bool) -> Iterator[dict]:
    """The good rows of ``records`` in the flat layout; bad rows are counted in ``tally``."""
    for index, record in enumerate(records):
        tally.rows_read += 1
        try:
            row = parse_training_row(record, PAPER_TEMPLATE, require_demo)
        except RowError as bad:
            tally.skipped[bad.reason] += 1
            continue
        yield {"id": row.id or f"{split}-{index}", "question": row.question,
               "demonstration": row.demo or "", "ground_truth": row.ground_truth,
               "data_source": row.data_source}


def convert_to_tfds(source: str, dest: str, split: Optional[str] = None, *,
                    require_demo: bool = True, hf_name: Optional[str] = None,
                    tfds_data_dir: Optional[str] = None, progress: bool = True,
                    shard_bytes: int = 256 * 2**20) -> list[SplitSummary]:
    """Write every split of ``source`` (or only ``split``) to the TFDS directory ``dest``.

    ``require_demo=False`` keeps rows without a demonstration (for the no-demonstration
    baselines). Raises ValueError naming the split when a split has no usable row, and
    FileExistsError when ``dest`` holds files already.
    """
    from tqdm.auto import tqdm

    if split is not None:
        splits = [split]
        path = Path(os.path.expanduser(source))
        if path.is_dir() and not tfds_io.is_tfds_source(source):
            sources.resolve_files(path, split)  # a missing split fails before anything is written
    else:
        splits = source_splits(source, hf_name, tfds_data_dir)
    writer = tfds_io.DatasetWriter(dest, shard_bytes=shard_bytes)
    summaries = []
    for name in splits:
        tally = _Tally()
        records = tqdm(sources.iter_records(source, name, hf_name, tfds_data_dir),
                       desc=f"convert {name}", unit=" rows", disable=not progress)
        written = writer.write_split(name, _flat_rows(records, name, tally, require_demo))
        summary = SplitSummary(name, tally.rows_read, written, dict(tally.skipped))
        if not written:
            raise DataError(f"no usable rows in split {name!r} of {source} ({summary.summary()}); "
                             f"{dest} is incomplete")
        logger.info("%s", summary.summary())
        summaries.append(summary)
    reasons = "; ".join(s.summary() for s in summaries)
    writer.finish(description=f"Converted by `srft-jax data convert` from {source}. {reasons}")
    return summaries
