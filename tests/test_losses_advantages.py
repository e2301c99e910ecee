"""group_advantages / compute_advantages against a NumPy reference (SRFT Eq. 6-7, LUFFY variant)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srft_jax.losses import SRFTLossConfig, compute_advantages, group_advantages

pytestmark = pytest.mark.compat


def np_group_advantages(rewards, group, use_std=True, eps=1e-6, stats=None):
    """Loop reference. Statistics over the members in `stats`; std with ddof=1; a zero std
    (all equal or fewer than two members) divides by 1; no member in `stats` -> 0."""
    rewards = np.asarray(rewards, np.float64)
    n = len(rewards)
    stats = np.ones(n, bool) if stats is None else np.asarray(stats, bool)
    out = np.zeros(n)
    for i in range(n):
        members = [rewards[j] for j in range(n) if group[j] == group[i] and stats[j]]
        if not members:
            continue
        mean = float(np.mean(members))
        std = float(np.std(members, ddof=1)) if len(members) >= 2 else 0.0
        centered = rewards[i] - mean
        if use_std:
            out[i] = centered / ((std if std > 0 else 1.0) + eps)
        else:
            out[i] = centered
    return out


def random_case(seed, n_groups=5, size=8):
    rng = np.random.default_rng(seed)
    group = np.repeat(rng.permutation(100)[:n_groups], size)  # arbitrary ids
    rewards = rng.integers(0, 2, size=n_groups * size).astype(np.float32)
    rewards[:size] = 1.0  # one group all correct
    rewards[size : 2 * size] = 0.0  # one group all wrong
    perm = rng.permutation(len(group))
    return rewards[perm], group[perm]


@pytest.mark.parametrize("use_std", [True, False])
def test_matches_reference(use_std):
    rewards, group = random_case(0)
    adv = group_advantages(jnp.asarray(rewards), jnp.asarray(group), use_std=use_std, eps=1e-6)
    ref = np_group_advantages(rewards, group, use_std=use_std)
    assert adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-7)


def test_equal_rewards_give_exactly_zero():
    rewards = jnp.array([0.7, 0.7, 0.7, 1.0, 0.0, 0.3, 0.3], jnp.float32)
    group = jnp.array([4, 4, 4, 9, 9, 2, 2])
    adv = np.asarray(group_advantages(rewards, group))
    assert np.all(adv[[0, 1, 2, 5, 6]] == 0.0)
    assert adv[3] > 0 > adv[4]


def test_reward_scale_with_std():
    """Rewards 1 and 0: mean 0.5, std (ddof=1) 1/sqrt(2), so A = +-sqrt(2)/2 with eps = 0."""
    adv = group_advantages(jnp.array([1.0, 0.0]), jnp.array([0, 0]), eps=0.0)
    np.testing.assert_allclose(adv, [0.5 * np.sqrt(2), -0.5 * np.sqrt(2)], rtol=1e-6)


def test_onpolicy_statistics_luffy_variant():
    # Group 0: rollouts 0,0,1 and a correct demo; group 1: rollouts all 0 and a correct demo.
    rewards = jnp.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    group = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])
    is_demo = np.array([False, False, False, True, False, False, False, True])
    adv = group_advantages(rewards, group, stats_mask=jnp.asarray(~is_demo))
    ref = np_group_advantages(np.asarray(rewards), np.asarray(group), stats=~is_demo)
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-7)
    # Rollouts of group 1 are all equal: they get 0, the demo gets r - mean = 1 (not 1/eps).
    np.testing.assert_allclose(adv[4:], [0.0, 0.0, 0.0, 1.0 / (1.0 + 1e-6)], rtol=1e-6)


def test_group_without_statistics_members_gets_zero():
    adv = group_advantages(jnp.array([1.0, 0.0, 1.0]), jnp.array([0, 0, 1]), stats_mask=jnp.array([True, True, False]))
    assert float(adv[2]) == 0.0


def test_permutation_invariance_and_jit():
    rewards, group = random_case(1)
    perm = np.random.default_rng(2).permutation(len(rewards))
    fn = jax.jit(group_advantages, static_argnames=("use_std",))
    a = np.asarray(fn(jnp.asarray(rewards), jnp.asarray(group)))
    b = np.asarray(fn(jnp.asarray(rewards[perm]), jnp.asarray(group[perm])))
    np.testing.assert_allclose(b, a[perm], rtol=1e-6)


def _batch(rewards, group, is_demo, lengths, r=6):
    mask = (np.arange(r)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    return {
        "reward": jnp.asarray(rewards, jnp.float32),
        "group": jnp.asarray(group, jnp.int32),
        "is_demo": jnp.asarray(is_demo),
        "response_mask": jnp.asarray(mask),
    }


@pytest.mark.parametrize("preset,overrides", [("paper", {}), ("official", {}), ("grpo", {}), ("paper", {"adv_eps": 0.1})])
def test_compute_advantages_follows_config(preset, overrides):
    rewards = [1, 0, 0, 1, 1, 0, 1, 1, 0, 1]
    group = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    is_demo = [False, False, False, True, False, False, False, True, False, False]
    lengths = [3, 6, 2, 5, 4, 1, 6, 6, 0, 0]  # the last two are padding sequences
    cfg = SRFTLossConfig(preset=preset, **overrides)
    adv = compute_advantages(_batch(rewards, group, is_demo, lengths), cfg)
    valid = np.asarray(lengths) > 0
    stats = valid & ~np.asarray(is_demo) if cfg.adv_stats == "onpolicy" else valid
    ref = np_group_advantages(rewards, group, use_std=cfg.use_std, eps=cfg.adv_eps, stats=stats)
    ref[~valid] = 0.0
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-7)


def test_compute_advantages_accepts_attribute_batches():
    class Batch:
        pass

    d = _batch([1, 0, 1], [0, 0, 0], [True, False, False], [2, 2, 2])
    obj = Batch()
    for k, v in d.items():
        setattr(obj, k, v)
    np.testing.assert_array_equal(compute_advantages(obj, SRFTLossConfig()), compute_advantages(d, SRFTLossConfig()))
