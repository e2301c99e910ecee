"""Evaluation benchmarks, normalised to :class:`EvalItem` (id, question, answer, options).

Sources (``load_benchmark(name)`` without ``path`` reads the Hugging Face id; the paper's
counts in brackets):

| name         | kind | Hugging Face id (config, split)                     | items  |
|--------------|------|-----------------------------------------------------|--------|
| aime24       | math | HuggingFaceH4/aime_2024 (-, train)                  | 30     |
| amc          | math | AI-MO/aimo-validation-amc (-, train): AMC12 2022-23 | 83     |
| math500      | math | HuggingFaceH4/MATH-500 (-, test)                    | 500    |
| minerva      | math | math-ai/minervamath (-, test)                       | 272    |
| olympiad     | math | Hothan/OlympiadBench (OE_TO_maths_en_COMP, train)   | 674    |
| arc_c        | mc   | allenai/ai2_arc (ARC-Challenge, test)               | 1172   |
| gpqa_diamond | mc   | Idavidrein/gpqa (gpqa_diamond, train; gated)        | 198    |
| mmlu_pro     | mc   | TIGER-Lab/MMLU-Pro (-, test)                        | 12032  |
| openr1       | math | (local only) any file in the training layout        | -      |
| gsm8k        | math | TFDS catalog tfds:gsm8k (test; prepared, see below) | 1319   |

Local files (``path=``: .jsonl, .json or .parquet, or a directory of them) may use either
the hub layout of that benchmark or the normalised schema:

    math: {"id": str (optional), "question": str, "answer": str}
    mc:   {"id": str (optional), "question": str, "options": [str, ...],
           "answer": "B" (letter of the correct option) or the correct option's text}

Accepted aliases: question <- question | problem | Question; math answer <- answer |
final_answer (list joined by ", ") | ground_truth | reward_model.ground_truth; id <- id |
unique_id | question_id | Record ID; options <- options | choices (list, or ARC's {"text",
"label"}) | GPQA's "Correct Answer" + "Incorrect Answer 1..3"; correct option <- answer |
answerKey (letter or ARC label) | answer_index | "Correct Answer". Rows without an id get
"{name}-{row}". Bad rows are skipped and counted; a source with no usable row raises.

GSM8K answers are a worked rationale ending in ``#### N``: the answer is N
(:mod:`srft_jax.data.gsm8k`). Without ``path`` it is read from the prepared TFDS catalog
dataset (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); ``path`` may also be a TFDS dataset
directory (e.g. ``DIR/gsm8k``, holding ``1.0.0/``), from which the benchmark's split is read.

Multiple-choice options are shuffled with a fixed seed, as in the paper: item ``id``'s
order comes from ``random.Random(f"{seed}:{name}:{id}")``, so it does not depend on the
order or number of rows. ``answer`` is the correct letter after shuffling.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
from typing import Any, Optional

from srft_jax.data import gsm8k, tfds_io
from srft_jax.data.prompts import strip_user_template
from srft_jax.data.sources import BadRecord, as_text, iter_records

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One benchmark question. ``options`` is None for math; for mc, ``answer`` is a letter."""

    id: str
    question: str
    answer: str
    options: Optional[tuple[str, ...]]
    kind: str  # "math" | "mc"

    def __post_init__(self):
        if self.kind not in ("math", "mc"):
            raise ValueError(f"kind must be 'math' or 'mc', got {self.kind!r}")
        if (self.kind == "mc") != (self.options is not None):
            raise ValueError("options must be given exactly for kind='mc'")


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    kind: str
    hf_id: Optional[str]
    hf_name: Optional[str]
    split: str
    tfds_name: Optional[str] = None  # read from the TFDS catalog instead of the hub


BENCHMARKS = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("aime24", "math", "HuggingFaceH4/aime_2024", None, "train"),
        BenchmarkSpec("amc", "math", "AI-MO/aimo-validation-amc", None, "train"),
        BenchmarkSpec("math500", "math", "HuggingFaceH4/MATH-500", None, "test"),
        BenchmarkSpec("minerva", "math", "math-ai/minervamath", None, "test"),
        BenchmarkSpec("olympiad", "math", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
        BenchmarkSpec("arc_c", "mc", "allenai/ai2_arc", "ARC-Challenge", "test"),
        BenchmarkSpec("gpqa_diamond", "mc", "Idavidrein/gpqa", "gpqa_diamond", "train"),
        BenchmarkSpec("mmlu_pro", "mc", "TIGER-Lab/MMLU-Pro", None, "test"),
        BenchmarkSpec("openr1", "math", None, None, "test"),
        BenchmarkSpec("gsm8k", "math", None, None, "test", tfds_name="gsm8k"),
    )
}
MATH_BENCHMARKS = tuple(n for n, s in BENCHMARKS.items() if s.kind == "math" and s.hf_id)
MC_BENCHMARKS = tuple(n for n, s in BENCHMARKS.items() if s.kind == "mc")


class _BadRow(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    return None


def _clean(value: Any, field: str) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # AMC answers are stored as floats (142.0)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text, problem = as_text(value)
    if problem == "undecodable_text":
        raise _BadRow("undecodable_text")
    if problem is not None:
        raise _BadRow(f"bad_{field}_type")
    text = text.strip()
    if not text:
        raise _BadRow(f"empty_{field}")
    return text


def _item_id(row: dict, name: str, index: int) -> str:
    value = _first(row, ("id", "unique_id", "question_id", "Record ID"))
    if value is None:
        return f"{name}-{index}"
    return _clean(value, "id")


def _question(row: dict) -> str:
    value = _first(row, ("question", "problem", "Question"))
    if value is None and isinstance(row.get("prompt"), list):  # training layout
        users = [m for m in row["prompt"] if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            value = strip_user_template(_clean(users[-1].get("content"), "question"))
    if value is None:
        raise _BadRow("missing_question")
    return _clean(value, "question")


def _math_answer(row: dict) -> str:
    value = _first(row, ("answer", "final_answer", "ground_truth"))
    if value is None and isinstance(row.get("reward_model"), dict):
        value = row["reward_model"].get("ground_truth")
    if value is None:
        raise _BadRow("missing_answer")
    if isinstance(value, (list, tuple)):  # OlympiadBench: ["$\\frac{1}{2}$", ...]
        if not value:
            raise _BadRow("empty_answer")
        parts = [_clean(v, "answer") for v in value]
        parts = [p[1:-1].strip() if len(p) > 1 and p[0] == p[-1] == "$" else p for p in parts]
        return ", ".join(parts)
    return _clean(value, "answer")


def _mc_options_and_correct(row: dict) -> tuple[list[str], int]:
    """Options in source order and the index of the correct one."""
    if "Correct Answer" in row:  # GPQA
        wrong = [row.get(f"Incorrect Answer {k}") for k in (1, 2, 3)]
        if any(w is None for w in wrong):
            raise _BadRow("missing_options")
        options = [_clean(row["Correct Answer"], "option")] + [_clean(w, "option") for w in wrong]
        return options, 0
    choices = _first(row, ("options", "choices"))
    labels: Optional[list[str]] = None
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": ["A", ...] or ["1", ...]}
        labels = [str(x).strip() for x in choices.get("label") or []]
        choices = choices.get("text")
    if not isinstance(choices, (list, tuple)):
        raise _BadRow("missing_options")
    options = [_clean(c, "option") for c in choices]
    if len(options) < 2 or len(options) > len(LETTERS):
        raise _BadRow("bad_option_count")
    if labels is not None and len(labels) != len(options):
        raise _BadRow("bad_option_labels")
    index = _first(row, ("answer_index",))
    if isinstance(index, int) and not isinstance(index, bool):
        if not 0 <= index < len(options):
            raise _BadRow("bad_answer")
        return options, index
    key = _first(row, ("answerKey", "answer"))
    if key is None:
        raise _BadRow("missing_answer")
    key = _clean(key, "answer")
    if labels is not None and key in labels:
        return options, labels.index(key)
    letter = key.strip("()").strip().upper()
    if len(letter) == 1 and letter in LETTERS[: len(options)]:
        return options, LETTERS.index(letter)
    if key in options:
        return options, options.index(key)
    raise _BadRow("bad_answer")


def shuffle_options(options: list[str], correct: int, seed: int, name: str,
                    item_id: str) -> tuple[tuple[str, ...], str]:
    """Options in the fixed shuffled order of this item, and the correct letter."""
    order = list(range(len(options)))
    random.Random(f"{seed}:{name}:{item_id}").shuffle(order)
    return tuple(options[i] for i in order), LETTERS[order.index(correct)]


def normalise_row(row: Any, name: str, index: int, seed: int = 0) -> EvalItem:
    """One source row as an :class:`EvalItem`; raises ``_BadRow`` for unusable rows."""
    if isinstance(row, BadRecord):
        raise _BadRow(row.reason)
    if not isinstance(row, dict):
        raise _BadRow("not_an_object")
    spec = BENCHMARKS[name]
    item_id = _item_id(row, name, index)
    question = _question(row)
    if spec.kind == "math":
        answer = _math_answer(row)
        if name == "gsm8k":  # "rationale ... #### N" (a bare N is accepted as it is)
            answer = (gsm8k.split_answer(answer) or (None, answer))[1]
        return EvalItem(item_id, question, answer, None, "math")
    options, correct = _mc_options_and_correct(row)
    shuffled, letter = shuffle_options(options, correct, seed, name, item_id)
    return EvalItem(item_id, question, letter, shuffled, "mc")


def load_benchmark(name: str, path: Optional[str] = None, seed: int = 0,
                   max_items: Optional[int] = None) -> list[EvalItem]:
    """Items of benchmark ``name`` from ``path`` (local) or its Hugging Face id."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    if path is None and spec.tfds_name is not None:
        path = tfds_io.TFDS_SCHEME + spec.tfds_name
    if path is None:
        if spec.hf_id is None:
            raise ValueError(f"benchmark {name!r} has no hub source: pass path=")
        records = iter_records(spec.hf_id, spec.split, spec.hf_name)
    else:
        records = iter_records(path, spec.split if tfds_io.is_tfds_source(path) else None)
    items: list[EvalItem] = []
    skipped: collections.Counter = collections.Counter()
    rows = 0
    for index, row in enumerate(records):
        if max_items is not None and len(items) >= max_items:
            break
        rows += 1
        try:
            items.append(normalise_row(row, name, index, seed))
        except _BadRow as bad:
            skipped[bad.reason] += 1
    source = path or spec.hf_id
    if not items:
        raise ValueError(f"no usable {name} items in {source!r} ({rows} rows; bad rows "
                         f"by reason: {dict(skipped) or 'none'})")
    if skipped:
        logger.warning("%s from %s: kept %d of %d rows; bad rows by reason: %s",
                       name, source, len(items), rows, dict(skipped))
    return items


def format_question(item: EvalItem) -> str:
    """The question text a model sees: options appended as "A. ..." lines for mc."""
    if item.options is None:
        return item.question
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(item.options)]
    return item.question + "\n\n" + "\n".join(lines)
