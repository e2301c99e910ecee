"""LoRA adapter dropout (`model.lora.dropout`, issue 21), PEFT's semantics: in the update's
forward pass an adapted projection computes `x W + b + scale * (dropout(x) A) B` (inverted
dropout: kept with probability 1 - p, scaled by 1 / (1 - p)); sampling, the old-policy
log-probs and evaluation never drop; the update's draws depend only on the seed, the update
count and the micro-batch. Resume exactness with dropout is tests/test_lora_loop.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax.batch import to_micro_batches
from srft_jax.losses import SRFTLossConfig
from srft_jax.models.config import ModelConfig
from srft_jax.models.decoder import Decoder, Projection
from srft_jax.models.lora import split_params
from srft_jax.models.weights import create_sharded_model
from srft_jax.train_step import make_logprob_fn, make_optimizer, make_train_step, OptimizerConfig
from test_lora import _randomise_b, _tokens
from test_train_step import make_batch

pytestmark = pytest.mark.compat

CFG = ModelConfig.tiny()
P = 0.25


def _identity_projection(d, p):
    """A projection whose base is 0 and whose adapter is the identity (A = B = I, scale 1): its
    output is exactly what reaches the adapter, dropout(x)."""
    cfg = CFG.replace(lora_rank=d, lora_alpha=float(d), lora_dropout=p)
    proj = Projection((d,), (d,), cfg, bias=False, rngs=nnx.Rngs(params=0, lora=1), lora=True)
    proj.kernel[...] = jnp.zeros((d, d))
    proj.lora_a[...] = jnp.eye(d)
    proj.lora_b[...] = jnp.eye(d)
    return proj


def _delta(proj, x, key):
    return np.asarray(proj.adapt(x, jnp.zeros(x.shape[:-1] + (proj.kernel.shape[-1],)), key))


def test_dropout_keeps_with_probability_1_minus_p_and_scales_by_its_inverse():
    d, n = 64, 4096
    proj = _identity_projection(d, P)
    x = jnp.ones((1, n, d))
    out = _delta(proj, x, jax.random.key(0))
    values = np.unique(out)
    np.testing.assert_allclose(values, [0.0, 1.0 / (1.0 - P)], rtol=1e-6)
    dropped = float(np.mean(out == 0.0))
    sigma = np.sqrt(P * (1 - P) / out.size)  # binomial spread of the dropped fraction
    assert abs(dropped - P) < 6 * sigma, (dropped, P, sigma)
    # The same key draws the same mask; another key another one.
    np.testing.assert_array_equal(out, _delta(proj, x, jax.random.key(0)))
    assert not np.array_equal(out, _delta(proj, x, jax.random.key(1)))


def test_dropout_is_on_the_adapter_input_only_as_peft_computes_it():
    """Random W, b, A, B: with the mask recovered through an identity adapter of the same key,
    the output is x W + b + scale * ((mask * x / (1 - p)) A) B in NumPy."""
    d, o, r = 16, 24, 4
    rng = np.random.default_rng(0)
    cfg = CFG.replace(lora_rank=r, lora_alpha=8.0, lora_dropout=P)
    proj = Projection((d,), (o,), cfg, bias=True, rngs=nnx.Rngs(params=0, lora=1), lora=True)
    w, b, a, bb = (rng.normal(size=s).astype(np.float32) for s in ((d, o), (o,), (d, r), (r, o)))
    proj.kernel[...], proj.bias[...] = jnp.asarray(w), jnp.asarray(b)
    proj.lora_a[...], proj.lora_b[...] = jnp.asarray(a), jnp.asarray(bb)
    x = rng.normal(size=(2, 5, d)).astype(np.float32)
    key = jax.random.key(3)
    y = jnp.einsum("BTD,DO->BTO", x, proj.kernel[...]) + proj.bias[...]
    got = np.asarray(proj.adapt(jnp.asarray(x), y, key))
    kept = _delta(_identity_projection(d, P), jnp.ones((2, 5, d)), key) != 0  # the same draws
    want = x @ w + b + (8.0 / r) * (((kept * x) / (1 - P)) @ a) @ bb
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < kept.mean() < 1
    # Without a key nothing is dropped.
    np.testing.assert_allclose(np.asarray(proj.adapt(jnp.asarray(x), y)), x @ w + b + (8.0 / r) * (x @ a) @ bb,
                               rtol=1e-5, atol=1e-5)


def test_model_without_a_key_equals_the_model_without_dropout_bitwise():
    plain = _randomise_b(Decoder(CFG.replace(lora_rank=4, lora_alpha=8.0), rngs=nnx.Rngs(0)))
    dropping = _randomise_b(Decoder(CFG.replace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.5), rngs=nnx.Rngs(0)))
    tokens = _tokens()
    np.testing.assert_array_equal(np.asarray(dropping(tokens)), np.asarray(plain(tokens)))
    assert not np.allclose(np.asarray(dropping(tokens, dropout_key=jax.random.key(0))), np.asarray(plain(tokens)))
    # A key without dropout configured changes nothing; with B = 0 dropout cannot change the output.
    np.testing.assert_array_equal(np.asarray(plain(tokens, dropout_key=jax.random.key(0))), np.asarray(plain(tokens)))
    fresh = Decoder(CFG.replace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.5), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(fresh(tokens, dropout_key=jax.random.key(0))), np.asarray(fresh(tokens)))


def _setup(dropout, seed=0):
    model = _randomise_b(create_sharded_model(CFG.replace(lora_rank=4, lora_alpha=8.0, lora_dropout=dropout), seed=0))
    graphdef, state = nnx.split(model)
    adapters, frozen = split_params(nnx.to_pure_dict(state))
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.0))
    step = jax.jit(make_train_step(graphdef, tx, SRFTLossConfig(), chunk_size=8, seed=seed))
    return graphdef, adapters, frozen, tx, step


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_update_draws_depend_on_seed_update_count_and_nothing_else():
    batch = to_micro_batches(make_batch(), 8)
    _, adapters, frozen, tx, step = _setup(0.5)
    opt0 = tx.init(adapters)
    first = step(adapters, opt0, batch, frozen)
    again = step(adapters, opt0, batch, frozen)  # the same inputs: the same draws
    for a, b in zip(_leaves(first), _leaves(again)):
        np.testing.assert_array_equal(a, b)
    # The same parameters at update count 1 draw other masks: another loss.
    opt1 = jax.tree.map(lambda x: x + 1 if x.ndim == 0 and x.dtype == jnp.int32 else x, opt0)
    assert float(step(adapters, opt1, batch, frozen)[2]["loss"]) != float(first[2]["loss"])
    # Another seed draws other masks; no dropout is another loss again.
    *_, step_seed1 = _setup(0.5, seed=1)
    assert float(step_seed1(adapters, opt0, batch, frozen)[2]["loss"]) != float(first[2]["loss"])
    *_, step_plain = _setup(0.0)
    plain = step_plain(adapters, opt0, batch, frozen)
    assert float(plain[2]["loss"]) != float(first[2]["loss"])
    assert float(first[2]["train/skipped"]) == 0.0


def test_dropout_zero_update_is_the_update_of_before():
    """rate 0 draws nothing: the step equals one built without a seed, bit for bit."""
    batch = to_micro_batches(make_batch(), 8)
    graphdef, adapters, frozen, tx, step = _setup(0.0, seed=5)
    other = jax.jit(make_train_step(graphdef, tx, SRFTLossConfig(), chunk_size=8))
    for a, b in zip(_leaves(step(adapters, tx.init(adapters), batch, frozen)),
                    _leaves(other(adapters, tx.init(adapters), batch, frozen))):
        np.testing.assert_array_equal(a, b)


def test_old_policy_log_probs_never_drop():
    batch = to_micro_batches(make_batch(), 8)
    graphdef, adapters, frozen, _, _ = _setup(0.5)
    plain_graphdef, *_ = _setup(0.0)
    got = jax.jit(make_logprob_fn(graphdef, 8))(adapters, batch, frozen)
    want = jax.jit(make_logprob_fn(plain_graphdef, 8))(adapters, batch, frozen)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
