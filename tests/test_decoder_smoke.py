"""Shape/dtype behaviour of the decoder that does not need a reference model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax.models.config import ModelConfig
from srft_jax.models.decoder import Decoder, positions_from_mask


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_remat_does_not_change_values_or_grads(remat):
    cfg = ModelConfig.tiny()
    ref = Decoder(cfg, rngs=nnx.Rngs(0))
    model = Decoder(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 7)))

    def loss(m):
        return jnp.mean(m(tokens) ** 2)

    g_ref = nnx.grad(loss)(ref)
    g = nnx.grad(loss)(model)
    np.testing.assert_allclose(loss(model), loss(ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_left_padding_equals_unpadded():
    cfg = ModelConfig.tiny()
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 6)))
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
    mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_allclose(model(padded, mask=mask)[:, 3:], model(tokens), atol=1e-5)
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 0, 1, 2, 3, 4, 5]]


def test_bfloat16_runs_and_returns_float32_logits():
    cfg = ModelConfig.tiny(param_dtype="bfloat16", dtype="bfloat16")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    out = model(jnp.zeros((2, 5), jnp.int32))
    assert out.dtype == jnp.float32 and out.shape == (2, 5, cfg.vocab_size)
    assert model.blocks.attn.q_proj.kernel[...].dtype == jnp.bfloat16


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.num_heads"):
        ModelConfig.tiny(num_heads=3, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="model.arch"):
        ModelConfig.tiny(arch="gpt2")
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "gpt2"})
