"""LoRA adapters (issue 21): the adapted model starts equal to its base, only adapters train,
merging by hand gives the same model and the same rollouts, the config is validated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax.batch import to_micro_batches
from srft_jax.config import ConfigError, load_config, resolve_config_path
from srft_jax.losses import SRFTLossConfig
from srft_jax.models.config import ModelConfig
from srft_jax.models.decoder import Decoder
from srft_jax.models.lora import (LoraConfig, fold_adapters, join_params, merged_model, split_params,
                                  with_adapters)
from srft_jax.models.weights import create_sharded_model
from srft_jax.train_step import make_optimizer, make_train_step, OptimizerConfig
from test_train_step import make_batch

CFG = ModelConfig.tiny()
LORA = CFG.replace(lora_rank=4, lora_alpha=8.0)


def _tokens(b=2, t=12, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, CFG.vocab_size, (b, t)), jnp.int32)


def _randomise_b(model, seed=1):
    """Non-zero B (as after training) so that the adapters change the model."""
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(keys), x.shape) if str(p[-1].key) == "lora_b" else x,
        adapters)
    nnx.update(model, adapters)
    return model


def test_adapters_are_lora_params_on_the_targets_only():
    cfg = CFG.replace(lora_rank=3, lora_targets=("q_proj", "down_proj"))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), adapters)
    d, n, h, f, l = CFG.hidden_size, CFG.num_heads, CFG.head_dim, CFG.intermediate_size, CFG.num_layers
    assert shapes == {"blocks": {
        "attn": {"q_proj": {"lora_a": ((l, d, 3), jnp.float32), "lora_b": ((l, 3, n, h), jnp.float32)}},
        "mlp": {"down_proj": {"lora_a": ((l, f, 3), jnp.float32), "lora_b": ((l, 3, d), jnp.float32)}}}}
    assert all(float(jnp.abs(proj["lora_b"]).max()) == 0 for group in adapters["blocks"].values()
               for proj in group.values())  # B = 0
    assert all(float(jnp.abs(proj["lora_a"]).max()) > 0 for group in adapters["blocks"].values()
               for proj in group.values())


def test_step_zero_logits_equal_the_base_model_bitwise():
    base = Decoder(CFG, rngs=nnx.Rngs(0))
    adapted = Decoder(LORA, rngs=nnx.Rngs(0))  # same seed: the same base parameters
    tokens = _tokens()
    np.testing.assert_array_equal(np.asarray(adapted(tokens)), np.asarray(base(tokens)))
    attached = with_adapters(base, LORA, seed=5)
    np.testing.assert_array_equal(np.asarray(attached(tokens)), np.asarray(base(tokens)))
    # The adapters do change the model once B is not zero.
    assert not np.allclose(np.asarray(_randomise_b(attached)(tokens)), np.asarray(base(tokens)))


def test_merged_by_hand_equals_the_adapted_model():
    model = _randomise_b(Decoder(LORA, rngs=nnx.Rngs(0)))
    tokens = _tokens()
    merged = merged_model(model)
    assert not nnx.state(merged, nnx.LoRAParam)  # no adapters left
    # By hand: W + (alpha / r) A B per projection and layer, in NumPy.
    params = nnx.to_pure_dict(nnx.state(model))
    q = params["blocks"]["attn"]["q_proj"]
    a, b, w = (np.asarray(q[k], np.float64) for k in ("lora_a", "lora_b", "kernel"))
    by_hand = w + (LORA.lora_alpha / LORA.lora_rank) * np.einsum("ldr,lrnh->ldnh", a, b)
    got = np.asarray(nnx.to_pure_dict(nnx.state(merged))["blocks"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(model(tokens)), rtol=1e-4, atol=1e-4)


def test_split_and_join_are_inverse():
    params = nnx.to_pure_dict(nnx.state(Decoder(LORA, rngs=nnx.Rngs(0))))
    adapters, base = split_params(params)
    assert {k for k in adapters["blocks"]["attn"]["q_proj"]} == {"lora_a", "lora_b"}
    assert "lora_a" not in base["blocks"]["attn"]["q_proj"]
    joined = join_params(adapters, base)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    assert all(x is y for x, y in zip(jax.tree.leaves(joined), jax.tree.leaves(params)))


def _one_update(base_dtype="float32"):
    cfg = LORA.replace(param_dtype=base_dtype)
    model = create_sharded_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    adapters, frozen = split_params(nnx.to_pure_dict(state))
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.0))
    opt_state = tx.init(adapters)
    step = jax.jit(make_train_step(graphdef, tx, SRFTLossConfig(), chunk_size=8))
    batch = to_micro_batches(make_batch(), 8)
    new_adapters, new_opt, metrics = step(adapters, opt_state, batch, frozen)
    return adapters, frozen, opt_state, new_adapters, new_opt, metrics


def test_an_update_changes_only_adapters_and_optimises_only_them():
    adapters, frozen, opt_state, new_adapters, new_opt, metrics = _one_update("bfloat16")
    assert float(metrics["train/skipped"]) == 0.0
    # Gradients (and so moments and updates) exist for the adapters alone: the optimiser state's
    # per-parameter leaves are exactly the adapters' shapes, float32 though the base is bfloat16.
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(adapters))
    moments = [x for x in jax.tree.leaves(new_opt) if x.ndim]
    assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)  # mu and nu
    assert all(x.dtype == jnp.float32 for x in moments + jax.tree.leaves(new_adapters))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen) if x.ndim > 1)
    # B moved off zero (the step's gradient reached it); the base was an input only.
    b_before = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if str(p[-1].key) == "lora_b"]
    b_after = [x for p, x in jax.tree_util.tree_leaves_with_path(new_adapters) if str(p[-1].key) == "lora_b"]
    assert all(float(jnp.abs(a).max()) == 0 for a in b_before)
    assert all(float(jnp.abs(a).max()) > 0 for a in b_after)


def test_gradient_of_the_loss_wrt_the_full_model_is_zero_only_where_frozen_is_read():
    """The step's gradient is that of the full-model loss restricted to the adapters."""
    from srft_jax.losses import loss_normalizers, srft_loss
    from srft_jax.train_step import response_logprobs

    model = _randomise_b(create_sharded_model(LORA, seed=0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    adapters, frozen = split_params(params)
    batch = to_micro_batches(make_batch(), 8)
    flat = batch.map(lambda a: a.reshape((-1,) + a.shape[2:]))
    norm = loss_normalizers(flat, SRFTLossConfig())

    def full_loss(p):
        lp, ent = response_logprobs(nnx.merge(graphdef, p), flat, 8)
        return srft_loss(lp, ent, flat, SRFTLossConfig(), normalizers=norm)[0]

    g_full = jax.grad(full_loss)(params)
    g_adapters, _ = split_params(g_full)
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.0, grad_clip=0.0, b1=0.0, b2=0.0))
    step = jax.jit(make_train_step(graphdef, tx, SRFTLossConfig(), chunk_size=8))
    new, _, metrics = step(adapters, tx.init(adapters), batch, frozen)
    # With b1 = b2 = 0, Adam's update is -lr * g / (|g| + eps): its sign is -sign(g).
    for (p, g), old, upd in zip(jax.tree_util.tree_leaves_with_path(g_adapters), jax.tree.leaves(adapters),
                                jax.tree.leaves(new)):
        big = np.abs(np.asarray(g)) > 1e-6
        np.testing.assert_array_equal(np.sign(np.asarray(upd - old))[big], -np.sign(np.asarray(g))[big])
    np.testing.assert_allclose(float(metrics["train/grad_norm"]),
                               float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(g_adapters)))),
                               rtol=1e-4)


def test_fold_adapters_per_layer_equals_stacked():
    params = nnx.to_pure_dict(nnx.state(_randomise_b(Decoder(LORA, rngs=nnx.Rngs(0)))))
    stacked = fold_adapters(params["blocks"], 2.0, stacked=True)
    layer0 = fold_adapters(jax.tree.map(lambda x: x[0], params["blocks"]), 2.0, stacked=False)
    np.testing.assert_array_equal(np.asarray(stacked["mlp"]["up_proj"]["kernel"][0]),
                                  np.asarray(layer0["mlp"]["up_proj"]["kernel"]))


@pytest.mark.parametrize("lora_merge", [True, False])
def test_rollouts_equal_those_of_the_model_merged_by_hand(lora_merge):
    from srft_jax.sampler import Sampler, SamplerConfig

    model = _randomise_b(Decoder(LORA, rngs=nnx.Rngs(0)))
    merged = merged_model(model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, CFG.vocab_size, (3, 6)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    mask[0, :2] = False
    cfg = SamplerConfig(max_new_tokens=10, response_buckets=(16,), prompt_buckets=(8,), lora_merge=lora_merge)
    sampler = Sampler(cfg, stop_ids=[0], pad_id=0)
    got = sampler.generate(model, prompts, mask, num_samples=2, seed=3)
    want = Sampler(cfg, stop_ids=[0], pad_id=0).generate(merged, prompts, mask, num_samples=2, seed=3)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.raw_logprobs, want.raw_logprobs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=-1", "model.lora.rank must be >= 0"),
    ("model.lora.alpha=0", "model.lora.alpha must be > 0"),
    ("model.lora.dropout=1.0", "model.lora.dropout must be in [0, 1), got 1.0"),
    ("model.lora.dropout=-0.1", "model.lora.dropout must be in [0, 1), got -0.1"),
    ("model.lora.targets=[q_proj,wq]", "model.lora.targets: 'wq' matches no projection"),
    ("model.lora.targets=['(']", "model.lora.targets: '(' is not a regular expression"),
])
def test_bad_lora_config_is_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(resolve_config_path("demo"), [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_targets_regex_and_list():
    assert LoraConfig(rank=2).projections() == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                "up_proj", "down_proj")
    assert LoraConfig(rank=2, targets=("[qkvo]_proj",)).projections() == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert LoraConfig(rank=2, targets=("up_proj", "q_proj")).projections() == ("q_proj", "up_proj")
    cfg = load_config(resolve_config_path("demo"), ["model.lora.rank=8", "model.lora.targets=[gate_proj,up_proj]"])
    assert cfg.model.lora.model_fields() == {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
                                             "lora_targets": ("gate_proj", "up_proj")}
