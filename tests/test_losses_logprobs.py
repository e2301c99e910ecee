"""Plain and chunked per-token log-prob / entropy against a float64 NumPy reference and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srft_jax.losses import chunked_token_logprobs_and_entropy, token_logprobs_and_entropy

pytestmark = pytest.mark.compat

RTOL = 1e-5


def np_logprobs_entropy(logits, targets):
    """float64 reference: log-softmax gather and -sum p log p."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    ent = -(np.exp(logp) * logp).sum(-1)
    return lp, ent


def rel_err(a, b):
    """Norm-wise relative error max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def make_inputs(key, b, t, d, v, scale=1.0, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    hidden = jax.random.normal(k1, (b, t, d), jnp.float32)
    unembed = scale * jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)
    bias = 0.5 * jax.random.normal(k3, (v,), jnp.float32)
    targets = jax.random.randint(k4, (b, t), 0, v)
    return hidden.astype(dtype), unembed.astype(dtype), bias, targets


def test_plain_matches_numpy():
    key = jax.random.PRNGKey(0)
    logits = 4.0 * jax.random.normal(key, (3, 7, 33))
    targets = jax.random.randint(jax.random.PRNGKey(1), (3, 7), 0, 33)
    lp, ent = token_logprobs_and_entropy(logits, targets)
    ref_lp, ref_ent = np_logprobs_entropy(logits, targets)
    assert lp.dtype == ent.dtype == jnp.float32
    np.testing.assert_allclose(lp, ref_lp, rtol=RTOL)
    np.testing.assert_allclose(ent, ref_ent, rtol=RTOL)


def test_plain_upcasts_bf16_logits():
    logits = (3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 5, 17))).astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 17)
    lp, ent = token_logprobs_and_entropy(logits, targets)
    ref_lp, ref_ent = np_logprobs_entropy(np.asarray(logits.astype(jnp.float32)), targets)
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, ref_lp, rtol=RTOL)
    np.testing.assert_allclose(ent, ref_ent, rtol=RTOL)


def test_plain_masked_vocab_entries_are_finite():
    logits = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 9)).at[..., 7:].set(-jnp.inf)
    targets = jnp.array([[0, 1, 2, 3]])
    lp, ent = token_logprobs_and_entropy(logits, targets)
    g = jax.grad(lambda x: jnp.sum(sum(token_logprobs_and_entropy(x, targets))))(logits)
    ref_lp, ref_ent = np_logprobs_entropy(np.asarray(logits[..., :7]), targets)
    np.testing.assert_allclose(lp, ref_lp, rtol=RTOL)
    np.testing.assert_allclose(ent, ref_ent, rtol=RTOL)
    assert np.all(np.isfinite(g))


def values_and_grads(fn, hidden, unembed, bias, g_lp, g_ent):
    """(lp, ent) and the gradient of sum(lp * g_lp + ent * g_ent) w.r.t. (hidden, unembed, bias)."""

    def scalar(hidden, unembed, bias):
        lp, ent = fn(hidden, unembed, bias)
        return jnp.sum(lp * g_lp + ent * g_ent), (lp, ent)

    grads, (lp, ent) = jax.jit(jax.grad(scalar, argnums=(0, 1, 2), has_aux=True))(hidden, unembed, bias)
    return lp, ent, grads


@pytest.mark.parametrize(
    "b,t,d,v,chunk,blocks",
    [
        (2, 37, 16, 50, 8, 5),  # T not a multiple of the chunk, V/K = 10
        (2, 37, 16, 50, 8, 8),  # 8 does not divide 50: uses 5 blocks
        (1, 5, 8, 30, 64, 1),  # chunk longer than T, one block
    ],
)
def test_chunked_matches_plain_values_and_grads(b, t, d, v, chunk, blocks):
    hidden, unembed, bias, targets = make_inputs(jax.random.PRNGKey(b * 100 + t), b, t, d, v, scale=6.0)
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    g_lp, g_ent = jax.random.normal(k1, (b, t)), jax.random.normal(k2, (b, t))

    def plain(hidden, unembed, bias):
        return token_logprobs_and_entropy(jnp.einsum("BTD,DV->BTV", hidden, unembed) + bias, targets)

    def chunked(hidden, unembed, bias):
        return chunked_token_logprobs_and_entropy(
            hidden, unembed, targets, chunk_size=chunk, bias=bias, vocab_blocks=blocks
        )

    lp_p, ent_p, grads_p = values_and_grads(plain, hidden, unembed, bias, g_lp, g_ent)
    lp_c, ent_c, grads_c = values_and_grads(chunked, hidden, unembed, bias, g_lp, g_ent)
    ref_lp, ref_ent = np_logprobs_entropy(np.einsum("btd,dv->btv", hidden, unembed) + bias, targets)
    assert lp_c.shape == ent_c.shape == (b, t)
    assert rel_err(lp_c, lp_p) <= RTOL and rel_err(ent_c, ent_p) <= RTOL
    assert rel_err(lp_c, ref_lp) <= RTOL and rel_err(ent_c, ref_ent) <= RTOL
    for gp, gc in zip(grads_p, grads_c):
        assert gc.shape == gp.shape and gc.dtype == gp.dtype
        assert rel_err(gc, gp) <= RTOL


def test_chunked_without_bias_and_bf16_inputs():
    hidden, unembed, _, targets = make_inputs(jax.random.PRNGKey(3), 2, 21, 16, 40, scale=6.0, dtype=jnp.bfloat16)

    def plain(hidden, unembed):
        logits = jnp.einsum("BTD,DV->BTV", hidden, unembed, preferred_element_type=jnp.float32)
        return token_logprobs_and_entropy(logits, targets)

    def chunked(hidden, unembed):
        return chunked_token_logprobs_and_entropy(hidden, unembed, targets, chunk_size=8, vocab_blocks=4)

    def run(fn):
        def scalar(h, w):
            lp, ent = fn(h, w)
            return jnp.sum(lp) + 0.3 * jnp.sum(ent), (lp, ent)

        return jax.jit(jax.grad(scalar, argnums=(0, 1), has_aux=True))(hidden, unembed)

    grads_p, (lp_p, ent_p) = run(plain)
    grads_c, (lp_c, ent_c) = run(chunked)
    assert lp_c.dtype == jnp.float32
    # bf16 products are exact in float32, so the values agree to float32 accuracy.
    assert rel_err(lp_c, lp_p) <= RTOL and rel_err(ent_c, ent_p) <= RTOL
    for a, c in zip(grads_p, grads_c):
        assert c.dtype == jnp.bfloat16
        # Both are float32 sums rounded once to bf16: they differ by at most one bf16 ulp.
        np.testing.assert_allclose(np.asarray(c, np.float32), np.asarray(a, np.float32), rtol=2.0**-7, atol=0)


def test_chunked_peaked_distribution_entropy_is_accurate():
    """Online entropy log s - u/s keeps precision when one token dominates."""
    d, v = 8, 64
    hidden = jnp.ones((1, 3, d))
    unembed = jnp.zeros((d, v)).at[:, 5].set(4.0)  # logit 32 for token 5, 0 elsewhere
    targets = jnp.array([[5, 0, 5]])
    lp, ent = chunked_token_logprobs_and_entropy(hidden, unembed, targets, chunk_size=2, vocab_blocks=4)
    ref_lp, ref_ent = np_logprobs_entropy(np.einsum("btd,dv->btv", hidden, unembed), targets)
    # lp = 32 - lse with lse - 32 ~ 1e-12: float32 resolves it to one ulp of 32 (3.8e-6).
    np.testing.assert_allclose(lp, ref_lp, rtol=RTOL, atol=np.spacing(np.float32(32)))
    # Entropy ~2.6e-11: computed as log s - u/s it is off by at most the float32 rounding of
    # log s (~1e-12), where lse - E[z] would lose ~1e-6 to cancellation at logit scale 32.
    np.testing.assert_allclose(ent, ref_ent, rtol=0, atol=2e-12)
    assert np.all(np.asarray(ent) > 0)


def test_chunked_sharded_matches_unsharded():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    hidden, unembed, _, targets = make_inputs(jax.random.PRNGKey(5), 4, 24, 16, 64, scale=6.0)

    def loss(h, w):
        lp, ent = chunked_token_logprobs_and_entropy(h, w, targets, chunk_size=8, vocab_blocks=2)
        return jnp.sum(lp) - 0.5 * jnp.sum(ent)

    ref = jax.value_and_grad(loss, argnums=(0, 1))(hidden, unembed)
    h_s = jax.device_put(hidden, NamedSharding(mesh, P("data", None, None)))
    w_s = jax.device_put(unembed, NamedSharding(mesh, P(None, "tensor")))
    out = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h_s, w_s)
    np.testing.assert_allclose(out[0], ref[0], rtol=RTOL)
    for a, c in zip(ref[1], out[1]):
        assert rel_err(c, a) <= RTOL


def test_chunked_rejects_bad_shapes():
    hidden, unembed, _, targets = make_inputs(jax.random.PRNGKey(0), 1, 4, 8, 16)
    with pytest.raises(ValueError, match="unembed"):
        chunked_token_logprobs_and_entropy(hidden, unembed.T, targets)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logprobs_and_entropy(hidden, unembed, targets[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs_and_entropy(hidden, unembed, targets, chunk_size=0)
