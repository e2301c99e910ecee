"""The decoder's attention core (`srft_jax.models.attention.attention`) against a NumPy softmax
attention written here, and the block property the sampler relies on: blocks that hold no key
visible to a query leave that query's result bit for bit unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srft_jax.models.attention import attention

pytestmark = pytest.mark.compat

B, T, N, K, H, S = 3, 2, 4, 2, 8, 20


def _inputs(seed=0):
    rs = np.random.RandomState(seed)
    q = rs.randn(B, T, N, H).astype(np.float32)
    k = rs.randn(B, K, H, S).astype(np.float32)  # keys are held transposed
    v = rs.randn(B, K, S, H).astype(np.float32)
    q_slot = np.asarray([[5, 6], [12, 13], [18, 19]], np.int32)
    mask = np.ones((B, S), bool)
    mask[0, :2] = False  # left padding of row 0
    mask[2, 7] = False  # a hole
    return q, k, v, q_slot, mask


def _reference(q, k, v, q_slot, mask):
    """softmax(q k^T / sqrt(H)) v over the visible slots, GQA (query head n reads head n // G)."""
    g = N // K
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for t in range(T):
            visible = (np.arange(S) <= q_slot[b, t]) & mask[b]
            for n in range(N):
                s = q[b, t, n].astype(np.float64) @ k[b, n // g] / np.sqrt(H)
                s = np.where(visible, s, -np.inf)
                p = np.exp(s - s.max())
                out[b, t, n] = (p / p.sum()) @ v[b, n // g]
    return out


def _split(x, sizes, axis=2):
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@pytest.mark.parametrize("sizes", [(20,), (8, 8, 4), (6, 6, 6, 2)])
def test_blocks_match_softmax_reference(sizes):
    q, k, v, q_slot, mask = _inputs()
    out = attention(jnp.asarray(q), _split(k, sizes, 3), _split(v, sizes), jnp.asarray(q_slot),
                    jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, q_slot, mask), atol=2e-6)


def test_unread_blocks_and_empty_queries():
    q, k, v, q_slot, _ = _inputs(1)
    sizes = (8, 8, 4)
    q_slot = np.minimum(q_slot, 7)  # every query sees block 0 only
    full = attention(jnp.asarray(q), _split(k, sizes, 3), _split(v, sizes), jnp.asarray(q_slot))
    for live in (1, jnp.int32(1), jnp.int32(2), jnp.int32(3)):
        part = attention(jnp.asarray(q), _split(k, sizes, 3), _split(v, sizes), jnp.asarray(q_slot),
                         live_blocks=live)
        np.testing.assert_array_equal(np.asarray(part), np.asarray(full))  # bit for bit
    # Blocks of garbage after the query's slot change nothing either (causal masking).
    k2, v2 = k.copy(), v.copy()
    k2[:, :, :, 8:] = 1e4
    v2[:, :, 8:] = -1e4
    other = attention(jnp.asarray(q), _split(k2, sizes, 3), _split(v2, sizes), jnp.asarray(q_slot))
    np.testing.assert_array_equal(np.asarray(other), np.asarray(full))
    # A query with no visible key (a left-padding position) gets the mean of the values, not NaN.
    mask = np.zeros((B, S), bool)
    empty = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_slot),
                      jnp.asarray(mask))
    mean = np.repeat(v.mean(2), N // K, axis=1)[:, None]  # [B, 1, N, H]
    np.testing.assert_allclose(np.asarray(empty), np.broadcast_to(mean, empty.shape), atol=1e-6)


def test_gradients_match_reference():
    """The forward pass trains through the same function (one block, a static loop)."""
    q, k, v, q_slot, mask = _inputs(2)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, jnp.asarray(q_slot), jnp.asarray(mask)) ** 2)

    def dense(q, k, v):
        g = N // K
        kk = jnp.repeat(k, g, axis=1)  # [B, N, H, S]
        vv = jnp.repeat(v, g, axis=1)
        s = jnp.einsum("BTNH,BNHS->BNTS", q, kk) / np.sqrt(H)
        visible = (jnp.arange(S)[None, None, :] <= q_slot[:, :, None]) & mask[:, None, :]
        s = jnp.where(visible[:, None], s, -jnp.inf)
        return jnp.sum(jnp.einsum("BNTS,BNSH->BTNH", jax.nn.softmax(s, -1), vv) ** 2)

    args = tuple(jnp.asarray(x) for x in (q, k, v))
    for a, b in zip(jax.grad(loss, argnums=(0, 1, 2))(*args), jax.grad(dense, argnums=(0, 1, 2))(*args)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
