"""Deterministic, resumable batches of prompts.

Epoch e visits the examples in the permutation drawn from ``numpy.random.default_rng
([seed, e])`` (or in the given order when ``shuffle=False``), ``batch_size`` at a time; the
tail of an epoch that cannot fill a batch is dropped, so every batch holds distinct
examples. The position (epoch, index within the epoch) is the whole state: saving
``state_dict()`` with a checkpoint and calling ``load_state_dict`` on a fresh iterator
over the same examples gives the same next batch.

A sequence of examples is used as it is, not copied, so a lazy one
(:class:`srft_jax.data.training.LazyExamples`) builds only the examples of each batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from srft_jax.data.training import Example
from srft_jax.faults import DataError


class PromptIterator:
    """Yields lists of ``batch_size`` examples forever, epoch after epoch."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int,
                 shuffle: bool = True, size_key: str = "train.prompts_per_step"):
        """size_key: the config key that set ``batch_size``, named in errors."""
        if batch_size < 1:
            raise ValueError(f"{size_key} must be >= 1, got {batch_size}")
        if len(examples) < batch_size:
            raise DataError(
                f"{size_key}={batch_size} is more than the {len(examples)} usable training "
                f"examples; lower {size_key} or use more data")
        self.examples = examples if isinstance(examples, Sequence) else list(examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next_batch(self) -> list[Example]:
        if self.position + self.batch_size > len(self.examples):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.examples[i] for i in idx]

    def __iter__(self):
        return self

    def __next__(self) -> list[Example]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Plain ints: the position plus what must match on resume."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.examples),
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the examples, seed, batch size and shuffle must match."""
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                          ("num_examples", len(self.examples)), ("shuffle", int(self.shuffle))):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"iterator state {key}={int(state[key])} does not match this iterator's "
                    f"{key}={mine}: resuming would not reproduce the batch order"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.examples):
            raise ValueError(f"invalid iterator position epoch={epoch} position={position}")
        self.epoch = epoch
        self.position = position
        self._order = self._epoch_order(epoch)
