"""Training examples in the OpenR1-Math-46k-8192 layout: prompt, demonstration, answer.

Row layout (one JSON object / parquet row)::

    prompt:       [{"role": "system", "content": ...}, {"role": "user", "content": Q}]
    target:       [{"role": "assistant", "content": DEMO}]   # the DeepSeek-R1 trace
    reward_model: {"ground_truth": "...", "style": "rule"}
    data_source:  "..."                                       # optional

Q is the last user turn (a leading "This is the problem:" is removed, then the paper's
template is applied again). The row's own system turn is ignored: the configured system
prompt (LUFFY's by default) is used. DEMO is tokenised as the assistant continuation of
the prompt: a leading ``<think>`` is removed (the prompt already ends with it) and the
end-of-turn token is appended.

Two more row layouts go through the same validation (:func:`parse_training_row`): the
flat layout a converted TFDS dataset holds (``question``, ``demonstration`` without the
leading ``<think>``, ``ground_truth``, ``data_source``, ``id``) and GSM8K's (``question``,
``answer`` = rationale + ``#### N``; :mod:`srft_jax.data.gsm8k`).

A TFDS source is scanned once (every row validated and tokenised, for the counts and the
length filters) and returned as :class:`LazyExamples`, which holds only the kept rows'
positions and rebuilds an Example from its row when it is accessed.

Dims: P = prompt tokens, R = demonstration tokens (including the end token).
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import itertools
import logging
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from srft_jax.data import gsm8k, tfds_io
from srft_jax.data.config import DataConfig
from srft_jax.data.prompts import PAPER_TEMPLATE, PromptTemplate
from srft_jax.data.sources import BadRecord, as_text, iter_records
from srft_jax.faults import DataError, MissingDataError
from srft_jax.shapes import bucket_length, default_buckets

logger = logging.getLogger(__name__)

THINK_OPEN = "<think>"
_CHUNK_ROWS = 256


@dataclasses.dataclass(frozen=True)
class Example:
    """One training prompt with its demonstration.

    prompt_ids: templated prompt ending with the assistant's ``<think>`` start, [P].
    demo_ids: demonstration continuation (no leading ``<think>``), ending with the end
      token, [R]; empty only when loaded with ``require_demo=False`` and the row had none.
    """

    id: str
    question: str
    prompt_ids: tuple[int, ...]
    demo_ids: tuple[int, ...]
    ground_truth: str
    data_source: str


@dataclasses.dataclass(frozen=True)
class LoadStats:
    """What happened to every row read.

    skipped: bad rows by reason (missing fields, wrong types, empty answer, ...).
    prompt_too_long / demo_too_long: well-formed rows dropped for length.
    *_bucket_counts: kept examples per padded-length bucket.
    """

    source: str
    rows_read: int
    kept: int
    skipped: dict[str, int]
    prompt_too_long: int
    demo_too_long: int
    prompt_bucket_counts: dict[int, int]
    response_bucket_counts: dict[int, int]

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.source}: read {self.rows_read} rows, kept {self.kept}; "
            f"bad rows {self.num_skipped} ({reasons}); dropped for length: "
            f"prompt {self.prompt_too_long}, demonstration {self.demo_too_long}; "
            f"prompt buckets {dict(sorted(self.prompt_bucket_counts.items()))}, "
            f"response buckets {dict(sorted(self.response_bucket_counts.items()))}"
        )


# --------------------------------------------------------------------------------------
# Row validation
# --------------------------------------------------------------------------------------


class RowError(Exception):
    """A row that cannot be used; ``reason`` is a short stable key for counting."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TrainingRow:
    """The validated text fields of one row (before templating and tokenising).

    demo: the demonstration after the prompt's ``<think>``; None when the row has none.
    id: the row's own id (flat layout only); None = "{split}-{row index}".
    """

    question: str
    demo: Optional[str]
    ground_truth: str
    data_source: str
    id: Optional[str] = None


def _text(value: Any, field: str) -> str:
    text, problem = as_text(value)
    if problem == "undecodable_text":
        raise RowError("undecodable_text")
    if problem is not None:
        raise RowError(f"bad_{field}_type")
    return text


def _chat_list(value: Any, field: str) -> list:
    if isinstance(value, dict):  # a single message
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, dict) for m in value):
        raise RowError(f"bad_{field}_type")
    return list(value)


def _clean_question(text: str, template: PromptTemplate) -> str:
    question = template.question_of(text)
    if not question:
        raise RowError("empty_question")
    return question


def _clean_demo(text: str) -> str:
    demo = text.strip()
    if demo.startswith(THINK_OPEN):
        demo = demo[len(THINK_OPEN):].lstrip()
    if not demo:
        raise RowError("empty_demo")
    return demo


def _clean_answer(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    answer = _text(value, "ground_truth").strip()
    if not answer:
        raise RowError("empty_answer")
    return answer


def _user_question(prompt: Any, template: PromptTemplate) -> str:
    messages = _chat_list(prompt, "prompt")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise RowError("no_user_turn")
    return _clean_question(_text(users[-1].get("content"), "prompt"), template)


def _demonstration(target: Any) -> str:
    messages = _chat_list(target, "target")
    replies = [m for m in messages if m.get("role", "assistant") == "assistant"]
    if not replies:
        raise RowError("empty_demo")
    return _clean_demo(_text(replies[0].get("content"), "target"))


def _ground_truth(reward_model: Any) -> str:
    if not isinstance(reward_model, dict):
        raise RowError("bad_reward_model_type")
    if "ground_truth" not in reward_model or reward_model["ground_truth"] is None:
        raise RowError("missing_ground_truth")
    return _clean_answer(reward_model["ground_truth"])


def _data_source(value: Any, default: str = "unknown") -> str:
    return default if value is None or value == "" else _text(value, "data_source")


def _chat_row(row: dict, template: PromptTemplate, require_demo: bool) -> TrainingRow:
    """The OpenR1 layout: prompt / target chat lists, reward_model.ground_truth."""
    if row.get("prompt") is None:
        raise RowError("missing_prompt")
    question = _user_question(row["prompt"], template)
    if row.get("reward_model") is None:
        raise RowError("missing_ground_truth")
    ground_truth = _ground_truth(row["reward_model"])
    demo = None
    if row.get("target") is None:
        if require_demo:
            raise RowError("missing_target")
    else:
        demo = _demonstration(row["target"])
    return TrainingRow(question, demo, ground_truth, _data_source(row.get("data_source")))


def _flat_row(row: dict, template: PromptTemplate, require_demo: bool) -> TrainingRow:
    """The flat layout (a converted TFDS dataset): question, demonstration, ground_truth,
    data_source, id; or GSM8K's question + answer ("rationale ... #### N")."""
    question = _clean_question(_text(row["question"], "question"), template)
    data_source = "unknown"
    if row.get("ground_truth") is None and row.get("answer") is not None:
        parsed = gsm8k.split_answer(_text(row["answer"], "answer"))
        if parsed is None:
            raise RowError("no_final_answer")
        demo_text, answer, data_source = gsm8k.demonstration(*parsed), parsed[1], "gsm8k"
    else:
        demo_text, answer = row.get("demonstration"), row.get("ground_truth")
    if answer is None:
        raise RowError("missing_ground_truth")
    ground_truth = _clean_answer(answer)
    demo = None
    if demo_text is None or demo_text == "":  # a TFDS text feature cannot be None
        if require_demo:
            raise RowError("missing_demonstration")
    else:
        demo = _clean_demo(_text(demo_text, "demonstration"))
    row_id = row.get("id")
    row_id = None if row_id is None or row_id == "" else _text(row_id, "id")
    return TrainingRow(question, demo, ground_truth,
                       _data_source(row.get("data_source"), data_source), row_id)


def parse_training_row(
    row: Any, template: PromptTemplate = PAPER_TEMPLATE, require_demo: bool = True
) -> TrainingRow:
    """Validated fields of one row in any accepted layout; raises ``RowError(reason)``.

    A row with a ``question`` and no ``prompt`` is in the flat layout (see `_flat_row`),
    anything else in the OpenR1 chat layout.
    """
    if isinstance(row, BadRecord):
        raise RowError(row.reason)
    if not isinstance(row, dict):
        raise RowError("not_an_object")
    if row.get("prompt") is None and "question" in row:
        return _flat_row(row, template, require_demo)
    return _chat_row(row, template, require_demo)


# --------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------


def _end_token_id(tokenizer: Any, end_token: Optional[str]) -> tuple[int, str]:
    token = end_token if end_token is not None else tokenizer.eos_token
    if token is None:
        raise ValueError("the tokenizer has no eos_token; set end_token explicitly")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (tokenizer.unk_token_id is not None
                            and token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"end token {token!r} is not in the tokenizer's vocabulary")
    return int(token_id), token


@dataclasses.dataclass(frozen=True)
class _Encoder:
    """Templates and tokenises validated rows: the same for every source, eager or lazy."""

    tokenizer: Any
    split: str
    template: PromptTemplate
    end_id: int
    end_text: str
    max_prompt_len: int
    max_response_len: int

    def encode(self, chunk: list[tuple[int, TrainingRow]]) -> list[Union[Example, str]]:
        """Per (row index, row): its Example, or why it is dropped ("empty_demo" once the
        end token is stripped, "prompt_too_long", "demo_too_long")."""
        demos = {i: _strip_end(r.demo, self.end_text) for i, r in chunk if r.demo is not None}
        out: dict[int, Union[Example, str]] = {i: "empty_demo" for i, d in demos.items() if not d}
        todo = [(i, r) for i, r in chunk if i not in out]
        if not todo:
            return [out[i] for i, _ in chunk]
        prompts = [self.template.text(self.tokenizer, r.question) for _, r in todo]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        demo_keys = [i for i, r in todo if r.demo is not None]
        demo_ids = {}
        if demo_keys:
            encoded = self.tokenizer([demos[i] for i in demo_keys], add_special_tokens=False)
            demo_ids = dict(zip(demo_keys, encoded["input_ids"]))
        for (index, row), p_ids in zip(todo, prompt_ids):
            d_ids = (list(demo_ids[index]) + [self.end_id]) if row.demo is not None else []
            if len(p_ids) > self.max_prompt_len:
                out[index] = "prompt_too_long"
            elif len(d_ids) > self.max_response_len:
                out[index] = "demo_too_long"
            else:
                out[index] = Example(
                    id=row.id or f"{self.split}-{index}",
                    question=row.question,
                    prompt_ids=tuple(int(t) for t in p_ids),
                    demo_ids=tuple(int(t) for t in d_ids),
                    ground_truth=row.ground_truth,
                    data_source=row.data_source,
                )
        return [out[i] for i, _ in chunk]


class _Tally:
    """Counts what happens to the rows of one load (for :class:`LoadStats`)."""

    def __init__(self, prompt_buckets: tuple[int, ...], response_buckets: tuple[int, ...]):
        self.prompt_buckets, self.response_buckets = prompt_buckets, response_buckets
        self.rows_read = 0
        self.skipped: collections.Counter = collections.Counter()
        self.too_long: collections.Counter = collections.Counter()
        self.prompt_hist: collections.Counter = collections.Counter()
        self.response_hist: collections.Counter = collections.Counter()

    def keep(self, result: Union[Example, str]) -> bool:
        if isinstance(result, Example):
            self.prompt_hist[bucket_length(len(result.prompt_ids), self.prompt_buckets)] += 1
            if result.demo_ids:
                self.response_hist[bucket_length(len(result.demo_ids), self.response_buckets)] += 1
            return True
        (self.skipped if result == "empty_demo" else self.too_long)[result] += 1
        return False

    def stats(self, source: str, kept: int) -> LoadStats:
        return LoadStats(
            source=str(source),
            rows_read=self.rows_read,
            kept=kept,
            skipped=dict(self.skipped),
            prompt_too_long=self.too_long["prompt_too_long"],
            demo_too_long=self.too_long["demo_too_long"],
            prompt_bucket_counts=dict(self.prompt_hist),
            response_bucket_counts=dict(self.response_hist),
        )


def _scan(records: Iterable[tuple[int, Any]], encoder: _Encoder, tally: _Tally,
          require_demo: bool) -> Iterator[tuple[int, Example]]:
    """(row index, Example) of every kept row, tokenising ``_CHUNK_ROWS`` rows at a time."""
    chunk: list[tuple[int, TrainingRow]] = []

    def flush():
        for (index, _), result in zip(chunk, encoder.encode(chunk)):
            if tally.keep(result):
                yield index, result

    for index, record in records:
        tally.rows_read += 1
        try:
            chunk.append((index, parse_training_row(record, encoder.template, require_demo)))
        except RowError as bad:
            tally.skipped[bad.reason] += 1
            continue
        if len(chunk) >= _CHUNK_ROWS:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


class LazyExamples(collections.abc.Sequence):
    """Examples of a random-access row source (a TFDS split), built when accessed.

    Only the positions of the kept rows are held in memory (one int64 per example);
    ``examples[i]`` reads row ``positions[i]`` and validates, templates and tokenises it
    exactly as the eager loader does, so it equals the eager loader's ``i``-th Example.
    ``examples[i]`` costs one random read and one tokenizer call; a slice is a list of the
    Examples it selects, built once (a caller that slices a chunk reads each row once).
    """

    def __init__(self, rows: Sequence, positions: np.ndarray, encoder: _Encoder,
                 require_demo: bool):
        self.rows = rows
        self.positions = np.asarray(positions, np.int64)
        self._encoder = encoder
        self._require_demo = require_demo

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        position = int(self.positions[i])
        try:
            row = parse_training_row(self.rows[position], self._encoder.template,
                                     self._require_demo)
            (example,) = self._encoder.encode([(position, row)])
        except RowError as bad:
            example = bad.reason
        if not isinstance(example, Example):
            raise RuntimeError(f"row {position} of {self.rows} changed since it was scanned "
                               f"({example})")
        return example


def load_training_examples(
    source: str,
    tokenizer: Any,
    max_prompt_len: int,
    max_response_len: int,
    *,
    split: str = "train",
    template: PromptTemplate = PAPER_TEMPLATE,
    end_token: Optional[str] = None,
    prompt_buckets: tuple[int, ...] = (),
    response_buckets: tuple[int, ...] = (),
    max_rows: Optional[int] = None,
    require_demo: bool = True,
    hf_name: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
) -> tuple[Sequence[Example], LoadStats]:
    """Read, validate, template and tokenise training rows.

    Bad rows are skipped and counted by reason; prompts longer than ``max_prompt_len``
    and demonstrations (with their end token) longer than ``max_response_len`` are dropped
    and counted. Raises ValueError when no row is usable (every row bad or too long).

    A TFDS source (see :mod:`srft_jax.data.tfds_io`) gives :class:`LazyExamples`:
    the rows are scanned once for the counts above, then read again when accessed. Other
    sources give a list.
    """
    end_id, end_text = _end_token_id(tokenizer, end_token)
    encoder = _Encoder(tokenizer, split, template, end_id,
                       end_text, max_prompt_len, max_response_len)
    tally = _Tally(tuple(prompt_buckets) or default_buckets(max_prompt_len),
                   tuple(response_buckets) or default_buckets(max_response_len))
    examples: Sequence[Example]
    try:
        if tfds_io.is_tfds_source(source):
            rows = tfds_io.open_split(source, split, tfds_data_dir)
            count = len(rows) if max_rows is None else min(len(rows), max_rows)
            kept = [i for i, _ in _scan(enumerate(rows.iter_range(count)), encoder, tally, require_demo)]
            examples = LazyExamples(rows, np.asarray(kept, np.int64), encoder, require_demo)
        else:
            records = itertools.islice(enumerate(iter_records(source, split, hf_name)), max_rows)
            examples = [e for _, e in _scan(records, encoder, tally, require_demo)]
    except FileNotFoundError as e:
        raise MissingDataError(f"training data: {e}") from None
    stats = tally.stats(source, len(examples))
    if not examples:
        if stats.rows_read == 0:
            raise DataError(f"no rows in training source {source!r}")
        raise DataError(f"no usable training rows in {source!r}: {stats.summary()}")
    log = logger.warning if stats.num_skipped else logger.info
    log("training data %s", stats.summary())
    return examples, stats


def _strip_end(demo: str, end_text: str) -> str:
    """Remove a trailing end token already written into the demonstration text."""
    text = demo.rstrip()
    if end_text and text.endswith(end_text):
        text = text[: -len(end_text)].rstrip()
    return text


def load_training_examples_from_config(
    config: DataConfig, tokenizer: Any
) -> tuple[Sequence[Example], LoadStats]:
    """:func:`load_training_examples` with every option taken from ``config``."""
    return load_training_examples(
        config.source,
        tokenizer,
        config.max_prompt_len,
        config.max_response_len,
        split=config.split,
        template=config.template,
        end_token=config.end_token,
        prompt_buckets=config.prompt_buckets,
        response_buckets=config.response_buckets,
        max_rows=config.max_rows,
        require_demo=config.require_demo,
        tfds_data_dir=config.tfds_data_dir,
    )

