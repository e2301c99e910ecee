"""Evaluation metrics over sampled responses: avg@k, unbiased pass@k, majority vote (maj@k).

Pure Python/NumPy (no JAX), so the evaluation report and tests import it alone.

Per item, ``n`` responses were sampled and scored 0/1; ``c`` of them are correct.
- avg@k: mean reward of the first ``k`` samples, averaged over items. With ``k = n`` this
  is the paper's "avg@32" (AIME24, AMC) and, with one sample, its "pass@1".
- pass@k: the probability that at least one of ``k`` samples drawn without replacement from
  the ``n`` is correct, estimated without bias by ``1 - C(n-c, k) / C(n, k)`` (Chen et al.,
  2021, "Evaluating Large Language Models Trained on Code"), averaged over items. Computed
  as the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms a binomial
  coefficient and so stays exact-ish for n in the thousands.
- maj@k: the extracted final answers of the first ``k`` samples vote (answers compared as
  strings after whitespace normalisation; a sample with no answer does not vote); the
  item scores the reward of a sample carrying the winning answer. Ties go to the answer
  that appeared first. An item with no votes scores 0.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item with ``n`` samples of which ``c`` are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _as_rows(rewards_per_item: Sequence[Sequence[float]]) -> list[np.ndarray]:
    rows = [np.asarray(r, dtype=np.float64) for r in rewards_per_item]
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"item {i} has no samples (shape {r.shape})")
    return rows


def mean_pass_at_k(rewards_per_item: Sequence[Sequence[float]], k: int) -> float:
    """pass@k averaged over items; a sample counts as correct when its reward is > 0.5."""
    rows = _as_rows(rewards_per_item)
    if not rows:
        return float("nan")
    return float(np.mean([pass_at_k(r.size, int(np.sum(r > 0.5)), k) for r in rows]))


def avg_at_k(rewards_per_item: Sequence[Sequence[float]], k: Optional[int] = None) -> float:
    """Mean reward of the first ``k`` samples of every item (all samples when None)."""
    rows = _as_rows(rewards_per_item)
    if not rows:
        return float("nan")
    if k is not None:
        short = [r.size for r in rows if r.size < k]
        if k < 1 or short:
            raise ValueError(f"avg@{k} needs k >= 1 and k samples per item (an item has "
                             f"{min(short) if short else '?'})")
        rows = [r[:k] for r in rows]
    return float(np.mean([r.mean() for r in rows]))


def normalise_vote(answer: Optional[str]) -> Optional[str]:
    """The string an answer votes with: whitespace collapsed; empty -> no vote."""
    if answer is None:
        return None
    vote = " ".join(answer.split())
    return vote or None


def majority_vote(answers: Sequence[Optional[str]], rewards: Sequence[float]) -> tuple[Optional[str], float]:
    """The winning answer of one item and the reward of a sample carrying it."""
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    counts: dict[str, int] = {}
    first_reward: dict[str, float] = {}
    for answer, reward in zip(answers, rewards):
        vote = normalise_vote(answer)
        if vote is None:
            continue
        counts[vote] = counts.get(vote, 0) + 1
        first_reward.setdefault(vote, float(reward))
    if not counts:
        return None, 0.0
    best = max(counts.values())
    winner = next(v for v, c in counts.items() if c == best)  # dicts keep first-seen order
    return winner, first_reward[winner]


def maj_at_k(answers_per_item: Sequence[Sequence[Optional[str]]],
             rewards_per_item: Sequence[Sequence[float]], k: Optional[int] = None) -> float:
    """Majority-vote accuracy over the first ``k`` samples of each item (all when None)."""
    if len(answers_per_item) != len(rewards_per_item):
        raise ValueError(f"{len(answers_per_item)} items of answers, {len(rewards_per_item)} of rewards")
    if not answers_per_item:
        return float("nan")
    scores = []
    for answers, rewards in zip(answers_per_item, rewards_per_item):
        if k is not None:
            if len(answers) < k:
                raise ValueError(f"maj@{k} needs {k} samples per item, an item has {len(answers)}")
            answers, rewards = answers[:k], rewards[:k]
        scores.append(majority_vote(answers, rewards)[1])
    return float(np.mean(scores))


def pass_k_values(n: int) -> tuple[int, ...]:
    """The k reported for ``n`` samples: powers of two below ``n``, then ``n``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = [1 << i for i in range(int(math.log2(n)) + 1) if (1 << i) < n]
    return tuple(ks + [n])


def summarise(rewards_per_item: Sequence[Sequence[float]],
              answers_per_item: Sequence[Sequence[Optional[str]]]) -> dict[str, float]:
    """accuracy (= avg@n), avg@n, pass@k for ``pass_k_values(n)`` and maj@n of one benchmark.

    Every item must have the same number of samples ``n``. Values are fractions in [0, 1].
    """
    rows = _as_rows(rewards_per_item)
    if not rows:
        raise ValueError("no items to summarise")
    sizes = {r.size for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"items have different sample counts {sorted(sizes)}")
    n = sizes.pop()
    out = {"accuracy": avg_at_k(rows), f"avg@{n}": avg_at_k(rows)}
    for k in pass_k_values(n):
        out[f"pass@{k}"] = mean_pass_at_k(rows, k)
    out[f"maj@{n}"] = maj_at_k(answers_per_item, [list(r) for r in rows])
    return out
