"""Group-normalised advantages (SRFT Eq. 6-7; LUFFY's on-policy-statistics variant).

Dims: N sequences in the batch (rollouts and demonstrations together), B = N, R response width.

A group is the set of sequences sharing a `group` id (one prompt: its rollouts plus its
demonstration). `stats_mask` selects the members whose rewards give the group's mean and
standard deviation; every member, in the statistics or not, gets an advantage against them.
The computation compares all pairs of group ids (`[N,N]`), so ids may be any integers and
no number of groups has to be known in advance; N is the number of sequences in one batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from srft_jax.losses.config import SRFTLossConfig


def group_advantages(
    rewards: jax.Array,
    group: jax.Array,
    use_std: bool = True,
    eps: float = 1e-6,
    stats_mask: jax.Array | None = None,
) -> jax.Array:
    """Per-sequence advantage `A = (r - mean_S) / (std_S + eps)` (or `r - mean_S`).

    Args:
      rewards: `float[N]` outcome rewards.
      group: `int[N]` group (prompt) id of each sequence.
      use_std: divide by the group's standard deviation (ddof=1) plus `eps`.
      eps: the eps of Eq. 7.
      stats_mask: `bool[N]` members S that give the statistics; None = all. LUFFY's variant
        passes `~is_demo` (rollouts only); padding sequences should be left out here.
    Returns:
      `float32[N]` advantages (stop-gradient). Conventions:
      - members of a group whose S-rewards are all equal and who share that reward get
        exactly 0 (in particular a group whose rewards are all equal);
      - where std_S is 0 (all of S equal, or |S| < 2) the division uses 1 instead of 0, so a
        demonstration that outscores uniform rollouts gets `r - mean_S`, not `/eps` (LUFFY);
      - members of a group with no member in S get 0.
    """
    r = jnp.asarray(rewards, jnp.float32)
    g = jnp.asarray(group)
    s = jnp.ones(r.shape, bool) if stats_mask is None else jnp.asarray(stats_mask, bool)
    in_s = (g[:, None] == g[None, :]) & s[None, :]  # [N, N]: row i's group members in S
    count = jnp.sum(in_s, axis=1)
    has_stats = count > 0
    r_row = jnp.broadcast_to(r[None, :], in_s.shape)
    hi = jnp.max(jnp.where(in_s, r_row, -jnp.inf), axis=1)
    lo = jnp.min(jnp.where(in_s, r_row, jnp.inf), axis=1)
    mean = jnp.sum(jnp.where(in_s, r_row, 0.0), axis=1) / jnp.maximum(count, 1)
    # Equal rewards give an exact mean (summing 0.7 three times and dividing does not).
    mean = jnp.where(hi == lo, hi, mean)
    mean = jnp.where(has_stats, mean, 0.0)
    centered = r - mean
    if use_std:
        sq = jnp.where(in_s, (r_row - mean[:, None]) ** 2, 0.0)
        var = jnp.sum(sq, axis=1) / jnp.maximum(count - 1, 1)
        std = jnp.where(count >= 2, jnp.sqrt(var), 0.0)
        std = jnp.where(std > 0, std, 1.0)
        adv = centered / (std + eps)
    else:
        adv = centered
    return jax.lax.stop_gradient(jnp.where(has_stats, adv, 0.0))


def compute_advantages(batch, config: SRFTLossConfig) -> jax.Array:
    """`group_advantages` for a mixed batch with the switches of `config`.

    Reads `reward[B]`, `group[B]`, `is_demo[B]` and `response_mask[B,R]` from `batch` (a dict
    or an object with those attributes). Sequences without response tokens are padding:
    they join no statistics and get advantage 0. `config.adv_stats='onpolicy'` also leaves
    the demonstrations out of the statistics (they still get an advantage).
    """
    reward = batch_field(batch, "reward")
    group = batch_field(batch, "group")
    is_demo = jnp.asarray(batch_field(batch, "is_demo"), bool)
    valid = jnp.sum(jnp.asarray(batch_field(batch, "response_mask"), jnp.float32), axis=-1) > 0
    stats = valid & ~is_demo if config.adv_stats == "onpolicy" else valid
    adv = group_advantages(reward, group, use_std=config.use_std, eps=config.adv_eps, stats_mask=stats)
    return jnp.where(valid, adv, 0.0)


def batch_field(batch, name: str):
    """`batch[name]` for a mapping, `batch.name` otherwise (fails loudly if absent)."""
    if isinstance(batch, Mapping):
        return batch[name]
    return getattr(batch, name)
