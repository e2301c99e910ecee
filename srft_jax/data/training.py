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

Dims: P = prompt tokens, R = demonstration tokens (including the end token).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Optional

from srft_jax.data.config import DataConfig
from srft_jax.data.prompts import (
    LUFFY_SYSTEM_PROMPT,
    THINK_PREFIX,
    USER_TEMPLATE,
    render_prompt_text,
    strip_user_template,
)
from srft_jax.data.sources import BadRecord, as_text, iter_records
from srft_jax.faults import DataError, MissingDataError

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
# Buckets
# --------------------------------------------------------------------------------------


def bucket_length(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (buckets ascending); ValueError naming n if none fits."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets, default=None)} "
                     f"(buckets={tuple(buckets)})")


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_len``, then ``max_len`` itself."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = []
    b = smallest
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


# --------------------------------------------------------------------------------------
# Row validation
# --------------------------------------------------------------------------------------


class _BadRow(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class _Row:
    question: str
    demo: Optional[str]
    ground_truth: str
    data_source: str


def _text(value: Any, field: str) -> str:
    text, problem = as_text(value)
    if problem == "undecodable_text":
        raise _BadRow("undecodable_text")
    if problem is not None:
        raise _BadRow(f"bad_{field}_type")
    return text


def _chat_list(value: Any, field: str) -> list:
    if isinstance(value, dict):  # a single message
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, dict) for m in value):
        raise _BadRow(f"bad_{field}_type")
    return list(value)


def _user_question(prompt: Any, user_template: str) -> str:
    messages = _chat_list(prompt, "prompt")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise _BadRow("no_user_turn")
    question = strip_user_template(_text(users[-1].get("content"), "prompt"), user_template)
    if not question:
        raise _BadRow("empty_question")
    return question


def _demonstration(target: Any) -> str:
    messages = _chat_list(target, "target")
    replies = [m for m in messages if m.get("role", "assistant") == "assistant"]
    if not replies:
        raise _BadRow("empty_demo")
    demo = _text(replies[0].get("content"), "target").strip()
    if demo.startswith(THINK_OPEN):
        demo = demo[len(THINK_OPEN):].lstrip()
    if not demo:
        raise _BadRow("empty_demo")
    return demo


def _ground_truth(reward_model: Any) -> str:
    if not isinstance(reward_model, dict):
        raise _BadRow("bad_reward_model_type")
    if "ground_truth" not in reward_model or reward_model["ground_truth"] is None:
        raise _BadRow("missing_ground_truth")
    value = reward_model["ground_truth"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    answer = _text(value, "ground_truth").strip()
    if not answer:
        raise _BadRow("empty_answer")
    return answer


def parse_training_row(
    row: Any, user_template: str = USER_TEMPLATE, require_demo: bool = True
) -> _Row:
    """Validated fields of one row; raises ``_BadRow(reason)``."""
    if isinstance(row, BadRecord):
        raise _BadRow(row.reason)
    if not isinstance(row, dict):
        raise _BadRow("not_an_object")
    if row.get("prompt") is None:
        raise _BadRow("missing_prompt")
    question = _user_question(row["prompt"], user_template)
    if row.get("reward_model") is None:
        raise _BadRow("missing_ground_truth")
    ground_truth = _ground_truth(row["reward_model"])
    demo = None
    if row.get("target") is None:
        if require_demo:
            raise _BadRow("missing_target")
    else:
        demo = _demonstration(row["target"])
    source = row.get("data_source")
    data_source = "unknown" if source is None else _text(source, "data_source")
    return _Row(question, demo, ground_truth, data_source)


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


def load_training_examples(
    source: str,
    tokenizer: Any,
    max_prompt_len: int,
    max_response_len: int,
    *,
    split: str = "train",
    system_prompt: str = LUFFY_SYSTEM_PROMPT,
    user_template: str = USER_TEMPLATE,
    think_prefix: str = THINK_PREFIX,
    end_token: Optional[str] = None,
    prompt_buckets: tuple[int, ...] = (),
    response_buckets: tuple[int, ...] = (),
    max_rows: Optional[int] = None,
    require_demo: bool = True,
    hf_name: Optional[str] = None,
) -> tuple[list[Example], LoadStats]:
    """Read, validate, template and tokenise training rows.

    Bad rows are skipped and counted by reason; prompts longer than ``max_prompt_len``
    and demonstrations (with their end token) longer than ``max_response_len`` are dropped
    and counted. Raises ValueError when no row is usable (every row bad or too long).
    """
    end_id, end_text = _end_token_id(tokenizer, end_token)
    prompt_buckets = tuple(prompt_buckets) or default_buckets(max_prompt_len)
    response_buckets = tuple(response_buckets) or default_buckets(max_response_len)
    skipped: collections.Counter = collections.Counter()
    prompt_hist: collections.Counter = collections.Counter()
    response_hist: collections.Counter = collections.Counter()
    too_long = {"prompt": 0, "demo": 0}
    examples: list[Example] = []
    rows_read = 0

    def flush(chunk: list[tuple[int, _Row]]) -> None:
        demos = {}
        for index, row in chunk:
            if row.demo is not None:
                demos[index] = _strip_end(row.demo, end_text)
                if not demos[index]:
                    skipped["empty_demo"] += 1
        chunk = [(i, r) for i, r in chunk if r.demo is None or demos[i]]
        if not chunk:
            return
        prompts = [render_prompt_text(tokenizer, r.question, system_prompt, user_template,
                                      think_prefix) for _, r in chunk]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        demo_keys = [i for i, r in chunk if r.demo is not None]
        demo_ids = {}
        if demo_keys:
            encoded = tokenizer([demos[i] for i in demo_keys], add_special_tokens=False)
            demo_ids = dict(zip(demo_keys, encoded["input_ids"]))
        for (index, row), p_ids in zip(chunk, prompt_ids):
            d_ids = (list(demo_ids[index]) + [end_id]) if row.demo is not None else []
            if len(p_ids) > max_prompt_len:
                too_long["prompt"] += 1
                continue
            if len(d_ids) > max_response_len:
                too_long["demo"] += 1
                continue
            prompt_hist[bucket_length(len(p_ids), prompt_buckets)] += 1
            if d_ids:
                response_hist[bucket_length(len(d_ids), response_buckets)] += 1
            examples.append(Example(
                id=f"{split}-{index}",
                question=row.question,
                prompt_ids=tuple(int(t) for t in p_ids),
                demo_ids=tuple(int(t) for t in d_ids),
                ground_truth=row.ground_truth,
                data_source=row.data_source,
            ))

    chunk: list[tuple[int, _Row]] = []
    try:
        for index, record in enumerate(iter_records(source, split, hf_name)):
            if max_rows is not None and index >= max_rows:
                break
            rows_read += 1
            try:
                chunk.append((index, parse_training_row(record, user_template, require_demo)))
            except _BadRow as bad:
                skipped[bad.reason] += 1
                continue
            if len(chunk) >= _CHUNK_ROWS:
                flush(chunk)
                chunk = []
    except FileNotFoundError as e:
        raise MissingDataError(f"training data: {e}") from None
    if chunk:
        flush(chunk)

    stats = LoadStats(
        source=str(source),
        rows_read=rows_read,
        kept=len(examples),
        skipped=dict(skipped),
        prompt_too_long=too_long["prompt"],
        demo_too_long=too_long["demo"],
        prompt_bucket_counts=dict(prompt_hist),
        response_bucket_counts=dict(response_hist),
    )
    if not examples:
        if rows_read == 0:
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
) -> tuple[list[Example], LoadStats]:
    """:func:`load_training_examples` with every option taken from ``config``."""
    return load_training_examples(
        config.source,
        tokenizer,
        config.max_prompt_len,
        config.max_response_len,
        split=config.split,
        system_prompt=config.system_prompt,
        user_template=config.user_template,
        think_prefix=config.think_prefix,
        end_token=config.end_token,
        prompt_buckets=config.prompt_buckets,
        response_buckets=config.response_buckets,
        max_rows=config.max_rows,
        require_demo=config.require_demo,
    )

