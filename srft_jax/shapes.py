"""Shapes and padding: the few rules that keep the number of compiled programs small.

Dims: B rows, P prompt width (left-padded: real tokens at the end), R response width
(right-padded: real tokens at the start), G samples per prompt.

Every padded width is a *bucket*: the smallest entry of an ascending tuple that fits the
longest row, so a training run compiles one program per bucket pair instead of one per
length. Row counts are rounded the same way (`padded_count`). Data, the sampler, the mixed
batch and evaluation all pad through these functions.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def bucket_length(n: int, buckets: Sequence[int], field: Optional[str] = None) -> int:
    """The smallest bucket >= n (buckets ascending). Fails naming `field` (the config key
    that holds the buckets) when none fits."""
    for b in buckets:
        if b >= n:
            return int(b)
    where = f"the largest {field} entry" if field else "the largest bucket"
    raise ValueError(f"length {n} exceeds {where} {max(buckets, default=None)} "
                     f"(buckets={tuple(buckets)}); add a larger bucket")


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_len`, then `max_len` itself."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = []
    b = smallest
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n."""
    return -(-n // multiple) * multiple


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def padded_count(num_prompts: int, num_samples: int, shards: int) -> int:
    """B: a power of two >= `num_prompts`, rounded up so that B * G rows divide evenly over
    `shards` batch devices (otherwise the sampler would replicate the rows on every shard)."""
    return round_up(next_pow2(num_prompts), shards // math.gcd(shards, num_samples))


def left_pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (int32 tokens [B,width], float32 mask [B,width]), real tokens at the end."""
    tokens = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for i, s in enumerate(seqs):
        if len(s) > width:
            raise ValueError(f"sequence of length {len(s)} does not fit width {width}")
        if len(s):
            tokens[i, width - len(s):] = s
            mask[i, width - len(s):] = 1
    return tokens, mask


def right_pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (int32 tokens [B,width], float32 mask [B,width]), real tokens first."""
    tokens = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for i, s in enumerate(seqs):
        if len(s) > width:
            raise ValueError(f"sequence of length {len(s)} does not fit width {width}")
        tokens[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return tokens, mask


def widen_left(tokens: np.ndarray, mask: np.ndarray, width: int, pad_id: int):
    """Left-padded arrays [B,P0] -> [B,width] (more padding on the left; width >= P0)."""
    extra = width - tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot narrow prompts of width {tokens.shape[1]} to {width}")
    tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id)
    return tokens, np.pad(mask, ((0, 0), (extra, 0)))
