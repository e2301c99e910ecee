"""A tiny arithmetic task and tokenizer, so the whole SRFT pipeline runs on a CPU offline.

Problems are 2-3 single-digit operands joined by + and - whose running value never goes
negative, e.g. ``What is 3 + 5 - 2 ?``. The demonstration works step by step in the
paper's format, continuing the prompt's ``<think>``::

    3 + 5 = 8 . 8 - 2 = 6 . </think> \\boxed{6}

Rows are written in the OpenR1-Math-46k-8192 layout, so the real-data loader reads them.
``render_problem`` also renders ``*`` and other question phrasings, for the harder world of
``srft_jax.data.mini_world``.
The held-out split is disjoint from the training split by construction: every problem is
assigned to "train" or "test" by a hash of its text. ``max_value`` bounds every running
value (9: each number is one token, the demo's task); training rows draw 2 and 3 operands
equally often; the written held-out file lists each held-out problem once.

The tokenizer is a WordPiece model over a ~60-token vocabulary: words, operators, digits
("14" = ``1 ##4``), ``\\boxed{``, ``}``, and the special tokens ``<|endoftext|>`` (pad),
``<unk>``, ``<|im_start|>``, ``<|im_end|>`` (eos / end of turn), ``<think>``, ``</think>``.
Decoding joins tokens with spaces, e.g. ``3 + 5 = 8 . </think> \\boxed{ 14 }``, which
Math-Verify reads back.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from pathlib import Path
from typing import Any, Optional

from srft_jax.data.prompts import SYNTHETIC_SYSTEM_PROMPT, USER_TEMPLATE

DATA_SOURCE = "synthetic_arith"
SPLITS = ("train", "test")

PAD, UNK, IM_START, IM_END = "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END)
MARKUP_TOKENS = (THINK_OPEN, THINK_CLOSE)
WORDS = (
    "system", "user", "assistant",
    "This", "is", "the", "problem", "What", "Think", "step", "by", "then", "put",
    "answer", "in",
    ":", "?", ".", ",", "=", "+", "-", "*", "\\boxed{", "{", "}",
)
DIGITS = tuple(str(d) for d in range(10)) + tuple(f"##{d}" for d in range(10))

# Qwen-style chat template: <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ``\boxed{`` is one token; punctuation and operators are split off; then whitespace.
_PRE_TOKENIZER_PATTERN = r"\\boxed\{|[{}?.,:=+\-*]"


def make_synthetic_tokenizer(save_dir: Optional[str] = None) -> Any:
    """A ``transformers`` fast tokenizer for the task (saved to ``save_dir`` if given).

    The saved directory reloads with ``AutoTokenizer.from_pretrained(save_dir)``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list = list(SPECIAL_TOKENS) + list(MARKUP_TOKENS) + list(WORDS) + list(DIGITS)
    vocab = {token: i for i, token in enumerate(vocab_list)}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=64))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_TOKENIZER_PATTERN), behavior="isolated"),
        pre_tokenizers.WhitespaceSplit(),
    ])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


def _all_problems(min_operands: int, max_operands: int, max_operand: int,
                  max_value: Optional[int] = None):
    """Every (operands, operators) whose running value stays in ``0..max_value``
    (no upper bound when ``max_value`` is None), in a fixed order."""
    for n in range(min_operands, max_operands + 1):
        for operands in itertools.product(range(max_operand + 1), repeat=n):
            for ops in itertools.product("+-", repeat=n - 1):
                value = operands[0]
                ok = True
                for op, x in zip(ops, operands[1:]):
                    value = value + x if op == "+" else value - x
                    if value < 0 or (max_value is not None and value > max_value):
                        ok = False
                        break
                if ok:
                    yield operands, ops


def problem_split(question: str, test_percent: int = 10) -> str:
    """"test" for a stable ``test_percent`` % of questions (hash of the text), else "train"."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 100 < test_percent else "train"


OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
QUESTION_TEMPLATE = "What is {expression} ?"


def running_values(operands: tuple[int, ...], ops: tuple[str, ...]) -> list[int]:
    """The values after each operand, evaluated left to right (``+``, ``-``, ``*``)."""
    values = [operands[0]]
    for op, x in zip(ops, operands[1:]):
        values.append(OPERATIONS[op](values[-1], x))
    return values


def render_problem(operands: tuple[int, ...], ops: tuple[str, ...],
                   question_template: str = QUESTION_TEMPLATE) -> tuple[str, str, int]:
    """(question, demonstration, answer) for one problem, evaluated left to right; the
    question is ``question_template`` with ``{expression}`` (e.g. ``3 + 5 - 2``) filled in."""
    expression = str(operands[0]) + "".join(f" {op} {x}" for op, x in zip(ops, operands[1:]))
    values = running_values(operands, ops)
    steps = [f"{a} {op} {x} = {b} ." for a, op, x, b in zip(values, ops, operands[1:], values[1:])]
    demo = " ".join(steps) + f" {THINK_CLOSE} \\boxed{{{values[-1]}}}"
    return question_template.format(expression=expression), demo, values[-1]


def make_row(question: str, demo: str, answer: int, split: str, index: int,
             system_prompt: str, data_source: str = DATA_SOURCE) -> dict:
    """One row in the OpenR1-Math-46k-8192 layout."""
    return {
        "data_source": data_source,
        "prompt": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": USER_TEMPLATE.format(question=question)},
        ],
        "target": [{"role": "assistant", "content": demo}],
        "ability": "math",
        "reward_model": {"ground_truth": str(answer), "style": "rule"},
        "extra_info": {"index": index, "split": split},
    }


def generate_problems(
    n: int,
    seed: int,
    split: str = "train",
    min_operands: int = 2,
    max_operands: int = 3,
    max_operand: int = 9,
    max_value: Optional[int] = None,
    test_percent: int = 10,
    system_prompt: str = SYNTHETIC_SYSTEM_PROMPT,
    balance_operands: bool = True,
    distinct: bool = False,
) -> list[dict]:
    """``n`` rows of ``split`` in the OpenR1 layout, drawn reproducibly from ``seed``.

    With ``balance_operands`` every operand count in min..max is drawn equally often (there
    are ~10x more 3-operand than 2-operand problems, so uniform draws over problems would
    leave a model few 2-operand examples to learn their layout from); otherwise problems are
    drawn uniformly. Within a count (or the whole split) draws are without replacement while
    distinct problems remain, then cycle through fresh shuffles. ``distinct`` returns each
    problem at most once (at most the split's size, fewer than ``n`` if it is smaller):
    a held-out set without repeats.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_operands <= max_operands:
        raise ValueError(f"need 1 <= min_operands <= max_operands, got {min_operands}, {max_operands}")
    if not 0 <= test_percent <= 100:
        raise ValueError(f"test_percent must be in [0, 100], got {test_percent}")
    pools: dict[int, list[tuple[str, str, int]]] = {}
    for operands, ops in _all_problems(min_operands, max_operands, max_operand, max_value):
        question, demo, answer = render_problem(operands, ops)
        if problem_split(question, test_percent) == split:
            pools.setdefault(len(operands) if balance_operands else 0, []).append((question, demo, answer))
    if n and not pools:
        raise ValueError(f"the {split!r} split is empty for these settings")
    rng = random.Random(f"{seed}:{split}")
    if distinct:
        lanes = []
        for _, pool in sorted(pools.items()):
            lane = list(pool)
            rng.shuffle(lane)
            lanes.append(lane)
        # One count after the other while each lasts (a single lane without balancing).
        chosen = [p for group in itertools.zip_longest(*lanes) for p in group if p is not None][:n]
    else:
        streams = {count: _cycle_shuffled(pool, rng) for count, pool in sorted(pools.items())}
        counts = sorted(streams)
        chosen = [next(streams[rng.choice(counts)]) for _ in range(n)]
    return [make_row(q, d, a, split, i, system_prompt) for i, (q, d, a) in enumerate(chosen)]


def _cycle_shuffled(pool: list, rng: random.Random):
    """Endless draws from ``pool``: a fresh shuffle each pass."""
    while True:
        order = list(pool)
        rng.shuffle(order)
        yield from order


def write_synthetic_dataset(directory: str, n_train: int, n_test: int, seed: int,
                            **problem_kwargs) -> dict[str, str]:
    """Write ``train.jsonl`` and ``test.jsonl`` (OpenR1 layout) and return their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        path = Path(directory) / f"{split}.jsonl"
        # The held-out split lists distinct problems (no repeats inflating or deflating accuracy).
        rows = generate_problems(n, seed, split=split, distinct=split == "test", **problem_kwargs)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        paths[split] = str(path)
    return paths
