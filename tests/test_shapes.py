"""Shapes and padding: buckets, row counts, left/right padding."""

import numpy as np
import pytest

from srft_jax.shapes import (bucket_length, default_buckets, left_pad, next_pow2, padded_count,
                             right_pad, round_up, widen_left)


def test_bucket_length():
    assert bucket_length(1, (16, 32)) == 16
    assert bucket_length(16, (16, 32)) == 16
    assert bucket_length(17, (16, 32)) == 32
    with pytest.raises(ValueError, match="length 33"):
        bucket_length(33, (16, 32))
    with pytest.raises(ValueError, match="largest data.prompt_buckets entry 32"):
        bucket_length(33, (16, 32), "data.prompt_buckets")


def test_default_buckets():
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(64) == (16, 32, 64)
    assert default_buckets(8) == (8,)


def test_row_counts():
    assert [round_up(n, 4) for n in (0, 1, 4, 5)] == [0, 4, 4, 8]
    assert [next_pow2(n) for n in (0, 1, 2, 3, 5, 8)] == [1, 1, 2, 4, 8, 8]
    assert padded_count(3, 1, 8) == 8
    assert padded_count(3, 2, 8) == 4
    assert padded_count(1, 32, 8) == 1
    assert padded_count(5, 4, 1) == 8


def test_padding():
    tokens, mask = left_pad([[1, 2], [3], []], 3, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 1, 2], [0, 0, 3], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    tokens, mask = right_pad([[1, 2], [3]], 3, pad_id=9)
    np.testing.assert_array_equal(tokens, [[1, 2, 9], [3, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="does not fit width 1"):
        left_pad([[1, 2]], 1, 0)
    tokens, mask = widen_left(np.asarray([[5, 6]]), np.asarray([[0, 1]]), 4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 5, 6]])
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1]])
