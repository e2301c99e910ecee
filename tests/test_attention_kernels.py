"""The sequence attention implementations (`models/attention_kernels.py`) against a NumPy masked
softmax written here, forward and gradients, on padded GQA batches (left-padded prompt +
right-padded response): xla; splash (the TPU kernel run in Pallas interpret mode on CPU), alone
and through `shard_map` on the forced 8-device CPU mesh; the cuDNN call's arguments (run through
XLA: no GPU here); and how `model.attention` resolves to one of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax.models import Decoder, ModelConfig
from srft_jax.models import attention_kernels as ak
from srft_jax.models.decoder import positions_from_mask


def _batch(b, t, n, kh, h, seed=0):
    """Random q [B,T,N,H], k, v [B,T,K,H] and a mask with left-padded prompts (row 0 fully
    padded on the left for 5 slots), right-padded responses, a hole, and an unpadded row."""
    rs = np.random.RandomState(seed)
    q = rs.randn(b, t, n, h).astype(np.float32)
    k = rs.randn(b, t, kh, h).astype(np.float32)
    v = rs.randn(b, t, kh, h).astype(np.float32)
    mask = np.ones((b, t), bool)
    for row in range(b - 1):
        left, right = rs.randint(1, t // 3), rs.randint(0, t // 3)
        mask[row, :left] = False
        if right:
            mask[row, t - right:] = False
    mask[0, :5] = False
    mask[0, t // 2] = False  # a hole inside the prompt
    return q, k, v, mask


def _reference(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(H)) v over the keys s <= t with mask[s]; a query with no
    visible key gets the mean of the values (query head n reads key/value head n // G)."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    kk = np.repeat(k, g, axis=2).astype(np.float64)
    vv = np.repeat(v, g, axis=2).astype(np.float64)
    s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
    visible = np.tril(np.ones((t, t), bool))[None] & mask[:, None, :]  # [B, T, S]
    s = np.where(visible[:, None], s, -np.inf)
    empty = ~visible.any(-1)  # [B, T]
    s = np.where(empty[:, None, :, None], 0.0, s)  # equal scores: the mean of the values
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, vv)


def _run(impl, q, k, v, mask):
    with ak.splash_interpret():
        fn = jax.jit(lambda q, k, v, m: ak.sequence_attention(q, k, v, m, impl))
        return np.asarray(fn(q, k, v, mask))


def _grads(impl, q, k, v, mask, cotangent):
    def loss(q, k, v):
        return jnp.sum(ak.sequence_attention(q, k, v, mask, impl) * cotangent)

    with ak.splash_interpret():
        return [np.asarray(x) for x in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]


# (B, T, N, K, H): T below one block, across several 128-blocks, and a multiple of 128.
SHAPES = [(3, 37, 4, 2, 16), (2, 300, 6, 2, 8), (2, 256, 2, 1, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_sequence_attention_matches_reference(impl, shape):
    q, k, v, mask = _batch(*shape)
    np.testing.assert_allclose(_run(impl, q, k, v, mask), _reference(q, k, v, mask), atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_splash_gradients_equal_xla(shape):
    q, k, v, mask = _batch(*shape, seed=1)
    cot = np.random.RandomState(2).randn(*q.shape).astype(np.float32)
    for a, b in zip(_grads("splash", q, k, v, mask, cot), _grads("xla", q, k, v, mask, cot)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_xla_gradients_match_dense_reference():
    """The xla path trains through jax.nn.softmax; its gradients against a dense jnp version
    of the reference (masked scores set to -inf, empty rows to equal scores)."""
    q, k, v, mask = _batch(2, 40, 4, 2, 8, seed=3)
    cot = np.random.RandomState(4).randn(*q.shape).astype(np.float32)

    def dense(q, k, v):
        t, h, g = q.shape[1], q.shape[3], q.shape[2] // k.shape[2]
        kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("BTNH,BSNH->BNTS", q, kk) / np.sqrt(h)
        visible = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]
        empty = ~visible.any(-1)
        s = jnp.where(visible[:, None], s, -jnp.inf)
        s = jnp.where(empty[:, None, :, None], 0.0, s)
        return jnp.sum(jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(s, -1), vv) * cot)

    ours = _grads("xla", q, k, v, mask, cot)
    ref = jax.grad(dense, argnums=(0, 1, 2))(*(jnp.asarray(x) for x in (q, k, v)))
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes,n,kh,b", [
    ((2, 2, 2), 4, 2, 4),  # batch over data x fsdp, query and key/value heads over tensor
    ((1, 2, 4), 8, 2, 2),  # 2 KV heads on a tensor axis of 4: each shard slices its one head
    ((1, 4, 2), 6, 3, 4),  # 3 KV heads on a tensor axis of 2: each shard gathers its heads
    ((2, 1, 4), 4, 4, 3),  # 3 rows on a batch axis of 2: the batch is replicated
])
def test_splash_through_shard_map_on_the_cpu_mesh(axes, n, kh, b):
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*axes))
    q, k, v, mask = _batch(b, 45, n, kh, 8, seed=5)
    cot = np.random.RandomState(6).randn(*q.shape).astype(np.float32)
    with jax.set_mesh(mesh):
        out = _run("splash", q, k, v, mask)
        grads = _grads("splash", q, k, v, mask, cot)
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=2e-5)
    for a, ref in zip(grads, _grads("xla", q, k, v, mask, cot)):
        np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)


def test_cudnn_arguments_give_the_same_function():
    """No GPU here: the cuDNN call, with `implementation="xla"` swapped in, against the
    reference (the kernel itself is untested)."""
    q, k, v, mask = _batch(3, 33, 4, 2, 8, seed=7)
    out = jax.jit(lambda *a: ak._cudnn(*a, implementation="xla"))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask), atol=2e-5)


def test_splash_blocks_cover_any_length():
    assert ak.splash_block(1) == (128, 128)
    assert ak.splash_block(300) == (384, 128)
    assert ak.splash_block(513) == (640, 128)
    assert ak.splash_block(1000) == (1024, 512)
    assert ak.splash_block(4096) == (4096, 512)
    assert ak.splash_block(640 + 128) == (768, 256)


# ---- selection ------------------------------------------------------------------------------------
def test_resolve_auto_and_explicit():
    nv = "NVIDIA H100 80GB HBM3"
    assert ak.resolve("auto", "bfloat16", "tpu", "TPU v5 lite") == "splash"
    assert ak.resolve("auto", "float32", "tpu", "TPU v5p") == "splash"
    assert ak.resolve("auto", "bfloat16", "gpu", nv) == "cudnn"
    assert ak.resolve("auto", "float32", "gpu", nv) == "xla"  # cuDNN has no float32 kernel
    assert ak.resolve("auto", "bfloat16", "gpu", "AMD Instinct MI300X") == "xla"
    assert ak.resolve("auto", "bfloat16", "cpu", "cpu") == "xla"
    assert ak.resolve("xla", "bfloat16", "tpu", "TPU v5p") == "xla"
    assert ak.resolve("splash", "bfloat16", "tpu", "TPU v5p") == "splash"
    assert ak.resolve("cudnn", "float16", "gpu", nv) == "cudnn"


@pytest.mark.parametrize("name,dtype,platform,kind,words", [
    ("splash", "bfloat16", "cpu", "cpu", "model.attention=splash needs TPU devices"),
    ("splash", "bfloat16", "gpu", "NVIDIA H100", "model.attention=splash needs TPU devices"),
    ("cudnn", "bfloat16", "tpu", "TPU v5p", "model.attention=cudnn needs NVIDIA GPU devices"),
    ("cudnn", "bfloat16", "cpu", "cpu", "model.attention=cudnn needs NVIDIA GPU devices"),
    ("cudnn", "float32", "gpu", "NVIDIA H100", "model.attention=cudnn needs model.dtype bfloat16"),
    ("flash", "bfloat16", "cpu", "cpu", "model.attention='flash'"),
])
def test_resolve_refuses_what_cannot_run(name, dtype, platform, kind, words):
    with pytest.raises(ValueError) as e:
        ak.resolve(name, dtype, platform, kind)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_devices_in_use_follow_the_mesh():
    assert ak.devices_in_use()[0] == "cpu"
    with jax.set_mesh(mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=2, tensor=4))):
        assert ak.devices_in_use()[0] == "cpu"
        assert ak.resolve("auto", "bfloat16") == "xla"
        with pytest.raises(ValueError, match="devices in use are cpu"):
            ak.resolve("splash", "bfloat16")


def test_model_config_field():
    from srft_jax.config import ConfigError, load_config, resolve_config_path

    assert ModelConfig.tiny().attention == "auto"
    with pytest.raises(ValueError, match=r"model.attention='flash'; choose one of"):
        ModelConfig.tiny(attention="flash")
    assert load_config(resolve_config_path("demo"), ["model.attention=splash"]).model.attention == "splash"
    with pytest.raises(ConfigError, match=r"command line.*model.attention='flash'"):
        load_config(resolve_config_path("demo"), ["model.attention=flash"])


def test_decoder_refuses_splash_on_cpu_in_one_line():
    """A RunError: the CLI prints its one line (see test_faults_errors)."""
    from srft_jax.faults import RunError

    model = Decoder(ModelConfig.tiny(attention="splash"), rngs=nnx.Rngs(0))
    with pytest.raises(RunError) as e:
        model(jnp.ones((1, 4), jnp.int32))
    assert str(e.value).startswith("model.attention=splash needs TPU devices") and "\n" not in str(e.value)


def test_decoder_splash_equals_xla_on_the_mesh():
    """The tiny model's logits and parameter gradients with attention=splash (interpret mode,
    through shard_map on a data x fsdp x tensor mesh) equal those with attention=xla, at every
    position; and the prefill (a cache of exactly T slots) attends the same way."""
    cfg = ModelConfig.tiny(num_heads=4, num_kv_heads=2)
    q, _, _, mask = _batch(4, 29, 1, 1, 2, seed=8)
    tokens = jnp.asarray(np.random.RandomState(9).randint(0, cfg.vocab_size, mask.shape), jnp.int32)
    mask = jnp.asarray(mask)
    results = {}
    for impl in ("xla", "splash"):
        model = Decoder(cfg.replace(attention=impl), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens, mask)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask), logits

        def prefill(state):
            m = nnx.merge(graphdef, state)
            hidden, cache = m.hidden_states(tokens, mask, positions_from_mask(mask),
                                            m.init_cache(*tokens.shape))
            return hidden, cache.k

        with ak.splash_interpret(), jax.set_mesh(mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2))):
            (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
            results[impl] = (logits, jax.tree.leaves(grads), *jax.jit(prefill)(state))
    xla, splash = results["xla"], results["splash"]
    np.testing.assert_allclose(np.asarray(splash[0]), np.asarray(xla[0]), atol=2e-5)
    for a, b in zip(splash[1], xla[1]):  # float32 sums in another order: scaled to the gradient
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    np.testing.assert_allclose(np.asarray(splash[2]), np.asarray(xla[2]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(splash[3]), np.asarray(xla[3]), atol=2e-5)  # layer 1's keys
