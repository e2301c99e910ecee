"""The mini Table 2's world: a pretraining distribution, harder training problems with
demonstrations, and in- and out-of-distribution held-out sets (benchmarks/mini_table2.py).

Every problem is an expression over single-digit operands whose running value, evaluated
left to right, stays in 0..9 (every number is one token of the synthetic tokenizer), solved
step by step in the paper's format (``srft_jax.data.synthetic.render_problem``)::

    What is 3 + 5 - 2 ?   ->   3 + 5 = 8 . 8 - 2 = 6 . </think> \\boxed{6}

The sets (``SETS``; "step" = one ``a op b = c .`` line of the demonstration):

  pretrain      what the base model is SFT-trained on: one-step problems (``+``, ``-`` and
                ``*``, in both phrasings) and a small share (``hard_fraction``) of
                two-step ``+``/``-`` problems in the "What is" phrasing.
  train         two-step ``+``/``-`` problems ("What is a + b - c ?") with demonstrations:
                the fine-tuning data of every method.
  val           the same kind, validation split (the learning-rate search reads only this).
  id            the same kind, test split: the in-distribution held-out set.
  ood_operands  three-step ``+``/``-`` problems (4 operands), test split: more operands.
  ood_operator  two-step problems that start with ``*`` (``a * b + c``, ``a * b - c``,
                ``a * b * c``; left to right equals the usual precedence): another operator,
                known to the base in one-step form only.
  ood_phrasing  the ``id`` problems phrased ``a + b - c = ?``: another phrasing, known to
                the base in one-step form only.

Multi-step problems have operands 1..9: with a 0 the answer of a shortcut (one step, an
operand dropped) would often be right, and RL would learn the shortcut instead of the skill.
One-step problems use 0..9. Splits are a hash of the expression (``expression_split``):
``test`` (15%), ``val`` (15%), ``train`` (70%), so a held-out expression is never seen in
training or pretraining, whatever its phrasing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from typing import Iterator, Sequence

from srft_jax.data.synthetic import make_row, render_problem, running_values

MAX_VALUE = 9
WHAT = "What is {expression} ?"
EQUALS = "{expression} = ?"
SETS = ("pretrain", "train", "val", "id", "ood_operands", "ood_operator", "ood_phrasing")
EVAL_SETS = ("id", "ood_operands", "ood_operator", "ood_phrasing")
DATA_SOURCE = "mini_world"

Problem = tuple[tuple[int, ...], tuple[str, ...]]


def expression_split(operands: Sequence[int], ops: Sequence[str]) -> str:
    """'test' (15%), 'val' (15%) or 'train' (70%), from a hash of the expression."""
    text = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])])
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    return "test" if bucket < 15 else "val" if bucket < 30 else "train"


def problems(op_patterns: Sequence[tuple[str, ...]], split: str | None = None,
             min_operand: int = 1) -> list[Problem]:
    """Every problem with one of ``op_patterns`` and operands in ``min_operand``..9 whose
    running values stay in 0..9 (and, when ``split`` is given, whose expression falls in
    that split), in a fixed order."""
    out = []
    for ops in op_patterns:
        for operands in itertools.product(range(min_operand, MAX_VALUE + 1), repeat=len(ops) + 1):
            if all(0 <= v <= MAX_VALUE for v in running_values(operands, ops)):
                if split is None or expression_split(operands, ops) == split:
                    out.append((operands, tuple(ops)))
    return out


def _patterns(n_ops: int, alphabet: str = "+-") -> list[tuple[str, ...]]:
    return list(itertools.product(alphabet, repeat=n_ops))


def set_problems(name: str) -> list[tuple[Problem, str]]:
    """(problem, question template) pairs of a held-out or training set, in a fixed order
    (every distinct problem once; `pretrain` is a mixture, see `pretrain_rows`)."""
    two_step = _patterns(2)
    if name == "train":
        return [(p, WHAT) for p in problems(two_step, "train")]
    if name == "val":
        return [(p, WHAT) for p in problems(two_step, "val")]
    if name == "id":
        return [(p, WHAT) for p in problems(two_step, "test")]
    if name == "ood_phrasing":
        return [(p, EQUALS) for p in problems(two_step, "test")]
    if name == "ood_operands":
        return [(p, WHAT) for p in problems(_patterns(3), "test")]
    if name == "ood_operator":
        return [(p, WHAT) for p in problems([("*", "+"), ("*", "-"), ("*", "*")])]
    raise ValueError(f"unknown set {name!r}; choose one of {SETS}")


def pretrain_rows(n: int, seed: int, hard_fraction: float) -> list[dict]:
    """``n`` pretraining rows: a share ``hard_fraction`` of two-step "What is" problems
    (train split), the rest one-step ``+``, ``-``, ``*`` problems in both phrasings (every
    split: one-step problems are the base's common knowledge, no held-out set has them)."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    rng = random.Random(f"pretrain:{seed}")
    easy = [(p, t) for p in problems(_patterns(1, "+-*"), min_operand=0) for t in (WHAT, EQUALS)]
    hard = [(p, WHAT) for p in problems(_patterns(2), "train")]
    easy_stream, hard_stream = _cycle(easy, rng), _cycle(hard, rng)
    chosen = [next(hard_stream) if rng.random() < hard_fraction else next(easy_stream) for _ in range(n)]
    return [_row(problem, template, "pretrain", i) for i, (problem, template) in enumerate(chosen)]


def set_rows(name: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of a set (each problem once); ``limit`` keeps a seeded random subset of that size."""
    pairs = set_problems(name)
    if limit is not None and limit < len(pairs):
        pairs = random.Random(f"{name}:{seed}").sample(pairs, limit)
    return [_row(problem, template, name, i) for i, (problem, template) in enumerate(pairs)]


def _row(problem: Problem, template: str, split: str, index: int) -> dict:
    question, demo, answer = render_problem(*problem, question_template=template)
    return make_row(question, demo, answer, split, index, system_prompt="", data_source=DATA_SOURCE)


def _cycle(pool: list, rng: random.Random) -> Iterator:
    while True:
        order = list(pool)
        rng.shuffle(order)
        yield from order


def write_rows(path: str, rows: Sequence[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_world(directory: str, n_pretrain: int, hard_fraction: float, eval_limit: int,
                seed: int = 0) -> dict[str, str]:
    """Writes every set and returns their paths.

    Layout: ``pretrain/train.jsonl`` and ``finetune/train.jsonl`` (training directories the
    loader reads with ``data.split=train``), ``eval/<set>.jsonl`` for ``val`` and the
    ``EVAL_SETS`` (at most ``eval_limit`` problems each, a seeded subset).
    """
    paths = {
        "pretrain": write_rows(os.path.join(directory, "pretrain", "train.jsonl"),
                               pretrain_rows(n_pretrain, seed, hard_fraction)),
        "train": write_rows(os.path.join(directory, "finetune", "train.jsonl"), set_rows("train")),
    }
    for name in ("val",) + EVAL_SETS:
        paths[name] = write_rows(os.path.join(directory, "eval", f"{name}.jsonl"),
                                 set_rows(name, eval_limit, seed))
    return paths
