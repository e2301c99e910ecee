"""The mixed batch: rollouts and demonstrations of the same prompts in one set of arrays.

Dims: B sequences, P prompt width (left-padded), R response width (right-padded), M micro-
batches, b sequences per micro-batch (B = M * b for the train step's layout).

Rows are grouped by prompt: the rollouts of prompt i, then its demonstration(s), so that a
contiguous slice of whole groups is a valid mini-batch. Padding rows (mask 0, group -1) fill
the batch up to a multiple of the micro-batch size; every loss term ignores them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from srft_jax.losses import SRFTLossConfig, compute_advantages
from srft_jax.shapes import left_pad, right_pad


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MixedBatch:
    """design.md section 3, plus `prompt_mask` (pad ids may be real token ids)."""

    prompt_tokens: np.ndarray    # int32[B, P] left-padded
    prompt_mask: np.ndarray      # float32[B, P]
    response_tokens: np.ndarray  # int32[B, R] right-padded
    response_mask: np.ndarray    # float32[B, R]
    is_demo: np.ndarray          # bool[B]
    group: np.ndarray            # int32[B], -1 for padding rows
    reward: np.ndarray           # float32[B]
    advantage: np.ndarray        # float32[B]
    old_logprobs: np.ndarray     # float32[B, R] (zeros for demos)

    @property
    def size(self) -> int:
        return self.prompt_tokens.shape[-2]

    def map(self, fn) -> "MixedBatch":
        return jax.tree.map(fn, self)


def build_mixed_batch(
    prompt_ids: Sequence[Sequence[int]],
    rollout_ids: Sequence[Sequence[Sequence[int]]],
    rollout_rewards: Sequence[Sequence[float]],
    demo_ids: Sequence[Optional[Sequence[int]]],
    demo_rewards: Sequence[float],
    *,
    prompt_width: int,
    response_width: int,
    pad_id: int,
    loss_config: SRFTLossConfig,
    rows_multiple: int = 1,
    rollout_old_logprobs: Optional[Sequence[Sequence[np.ndarray]]] = None,
) -> MixedBatch:
    """Joins per-prompt rollouts and demonstrations into one batch with group advantages.

    prompt_ids[i]: prompt tokens of prompt i; rollout_ids[i][g]: response tokens of its g-th
    rollout (any count, 0 for SFT); demo_ids[i]: its demonstration (None = no demonstration);
    rewards are per sequence. Advantages come from `compute_advantages` over each augmented
    group with the loss config's switches. The row count is padded up to `rows_multiple`.
    """
    prompts, responses, is_demo, group, reward, old_lp = [], [], [], [], [], []
    for i, prompt in enumerate(prompt_ids):
        for g, resp in enumerate(rollout_ids[i]):
            prompts.append(prompt)
            responses.append(resp)
            is_demo.append(False)
            group.append(i)
            reward.append(rollout_rewards[i][g])
            old_lp.append(None if rollout_old_logprobs is None else rollout_old_logprobs[i][g])
        if demo_ids[i] is not None:
            prompts.append(prompt)
            responses.append(demo_ids[i])
            is_demo.append(True)
            group.append(i)
            reward.append(demo_rewards[i])
            old_lp.append(None)
    n_real = len(prompts)
    if n_real == 0:
        raise ValueError("the batch has no sequences (no rollouts and no demonstrations)")
    n_rows = -(-n_real // rows_multiple) * rows_multiple
    pad_rows = n_rows - n_real
    prompts += [[]] * pad_rows
    responses += [[]] * pad_rows
    p_tok, p_mask = left_pad(prompts, prompt_width, pad_id)
    r_tok, r_mask = right_pad(responses, response_width, pad_id)
    old = np.zeros((n_rows, response_width), np.float32)
    for row, lp in enumerate(old_lp):
        if lp is not None:
            n = len(responses[row])
            old[row, :n] = np.asarray(lp, np.float32)[:n]
    batch = MixedBatch(
        prompt_tokens=p_tok, prompt_mask=p_mask, response_tokens=r_tok, response_mask=r_mask,
        is_demo=np.asarray(is_demo + [False] * pad_rows, bool),
        group=np.asarray(group + [-1] * pad_rows, np.int32),
        reward=np.asarray(reward + [0.0] * pad_rows, np.float32),
        advantage=np.zeros(n_rows, np.float32),
        old_logprobs=old,
    )
    adv = np.array(compute_advantages(batch, loss_config), np.float32)
    adv[n_real:] = 0.0
    batch.advantage = adv
    return batch


def to_micro_batches(batch: MixedBatch, micro_batch_size: int) -> MixedBatch:
    """Reshapes every array from [B, ...] to [B // b, b, ...] for the train step's scan."""
    n = batch.size
    if n % micro_batch_size:
        raise ValueError(f"{n} rows are not a multiple of micro_batch_size={micro_batch_size}")
    return batch.map(lambda a: a.reshape((n // micro_batch_size, micro_batch_size) + a.shape[1:]))
