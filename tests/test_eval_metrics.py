"""pass@k against its closed form and brute-force enumeration; avg@k and maj@k by hand."""

import itertools
import math

import pytest

from srft_jax.eval_metrics import (
    avg_at_k,
    maj_at_k,
    majority_vote,
    mean_pass_at_k,
    pass_at_k,
    pass_k_values,
    summarise,
)


def brute_force_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_cases():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 5) == 1.0  # k = n with a correct sample
    assert pass_at_k(7, 1, 7) == 1.0
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_matches_binomial_closed_form_large_n():
    for n, c, k in [(200, 3, 10), (200, 50, 32), (1000, 1, 1), (64, 20, 8)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_mean_pass_at_k_over_items():
    rewards = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    # item 1: 1 - C(3,2)/C(4,2) = 0.5; item 2: 0; item 3: 1
    assert mean_pass_at_k(rewards, 2) == pytest.approx(0.5)
    assert mean_pass_at_k(rewards, 1) == pytest.approx((0.25 + 0 + 1) / 3)


def test_avg_at_k():
    rewards = [[1, 0, 1, 1], [0, 0, 1, 0]]
    assert avg_at_k(rewards) == pytest.approx((0.75 + 0.25) / 2)
    assert avg_at_k(rewards, k=2) == pytest.approx((0.5 + 0.0) / 2)
    assert avg_at_k([[1], [0], [1]]) == pytest.approx(2 / 3)  # pass@1 with one sample
    with pytest.raises(ValueError):
        avg_at_k(rewards, k=5)


def test_majority_vote_and_maj_at_k():
    # "2" wins 2:1 (whitespace does not split the vote); None does not vote
    assert majority_vote([" 2", "3", "2 ", None], [1, 0, 1, 0]) == ("2", 1.0)
    # ties go to the first answer seen
    assert majority_vote(["3", "2"], [0, 1]) == ("3", 0.0)
    assert majority_vote([None, "", None], [0, 0, 0]) == (None, 0.0)
    # majority wrong although some samples are right
    assert majority_vote(["5", "5", "7"], [0, 0, 1]) == ("5", 0.0)
    answers = [["2", "2", "3", "3", "3"], ["a", "b", "b", "c", "c"]]
    rewards = [[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]]
    assert maj_at_k(answers, rewards) == pytest.approx(0.5)  # "3" wrong; "b" right (first tie)
    assert maj_at_k(answers, rewards, k=2) == pytest.approx(0.5)  # "2" right; "a" wrong
    assert maj_at_k(answers, rewards, k=3) == pytest.approx(1.0)  # "2" right; "b" right


def test_pass_k_values_and_summarise():
    assert pass_k_values(1) == (1,)
    assert pass_k_values(4) == (1, 2, 4)
    assert pass_k_values(32) == (1, 2, 4, 8, 16, 32)
    assert pass_k_values(6) == (1, 2, 4, 6)
    out = summarise([[1, 0, 1, 1], [0, 0, 1, 0]], [["4", "3", "4", "4"], ["5", "5", "7", None]])
    assert out == pytest.approx({"accuracy": 0.5, "avg@4": 0.5, "pass@1": 0.5,
                                 "pass@2": (1 + 0.5) / 2, "pass@4": 1.0, "maj@4": 0.5})
    with pytest.raises(ValueError):
        summarise([[1, 0], [1]], [["1", "2"], ["1"]])
