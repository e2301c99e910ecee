"""The jitted train step: exact loss, sharding invariance, micro-batching, NaN skipping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax.batch import build_mixed_batch, to_micro_batches
from srft_jax.losses import SRFTLossConfig, srft_loss, token_logprobs_and_entropy
from srft_jax.models.config import ModelConfig
from srft_jax.models.weights import create_sharded_model
from srft_jax.train_step import (
    OptimizerConfig,
    batch_shardings,
    jit_train_step,
    make_optimizer,
    make_train_step,
    opt_state_shardings,
    param_shardings,
)

pytestmark = pytest.mark.compat

CFG = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
P, R = 12, 10


def make_batch(loss_cfg=SRFTLossConfig(), n_prompts=4, rollouts=3, rows_multiple=16, seed=0):
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(1, 64, rng.randint(3, P + 1))) for _ in range(n_prompts)]
    rolls = [[list(rng.randint(1, 64, rng.randint(1, R + 1))) for _ in range(rollouts)] for _ in prompts]
    rewards = [[float(rng.rand() > 0.5) for _ in range(rollouts)] for _ in prompts]
    demos = [list(rng.randint(1, 64, rng.randint(1, R + 1))) for _ in prompts]
    old = [[rng.uniform(-5, -0.1, len(r)) for r in rs] for rs in rolls]
    return build_mixed_batch(prompts, rolls, rewards, demos, [1.0] * n_prompts, prompt_width=P,
                             response_width=R, pad_id=0, loss_config=loss_cfg,
                             rows_multiple=rows_multiple, rollout_old_logprobs=old)


def sgd():
    """Clipped SGD with momentum: the update is linear in the gradient, so comparing parameters
    compares gradients. (Adam's first step is lr * g / (|g| + eps): an element whose gradient is
    ~0 moves by up to lr on reduction-order rounding alone, whatever the implementation.)"""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))


def setup(mesh, loss_cfg=SRFTLossConfig(), micro=8, tx=None):
    model = create_sharded_model(CFG, mesh, seed=0)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tx = tx or make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.01, grad_clip=1.0))
    p_sh = param_shardings(params, mesh)
    o_sh = opt_state_shardings(tx, params, p_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    batch = to_micro_batches(make_batch(loss_cfg), micro)
    b_sh = batch_shardings(mesh, batch)
    step = jit_train_step(make_train_step(graphdef, tx, loss_cfg, chunk_size=4), p_sh, o_sh, b_sh, mesh)
    return graphdef, params, opt_state, jax.device_put(batch, b_sh), step


def one_device_mesh():
    return mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=1), devices=jax.devices()[:1])


def run_two_steps(mesh):
    with jax.set_mesh(mesh):
        _, params, opt_state, batch, step = setup(mesh, tx=sgd())
        start = jax.device_get(params)
        losses = []
        for _ in range(2):
            params, opt_state, m = step(params, opt_state, batch)
            losses.append(float(m["loss"]))
        moved = max(float(np.max(np.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(start)))
        assert moved > 1e-2  # the comparison below is not between two initialisations
        return losses, jax.device_get(params), params


def test_sharded_steps_equal_single_device():
    ref_losses, ref_params, _ = run_two_steps(one_device_mesh())
    assert len(jax.devices()) == 8
    for mcfg in (mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2),):
        losses, params, live = run_two_steps(mesh_lib.make_mesh(mcfg))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        q = live["blocks"]["attn"]["q_proj"]["kernel"]
        assert len(q.sharding.device_set) > 1 and q.addressable_shards[0].data.size < q.size


def test_step_loss_equals_srft_loss_on_the_batch():
    """The step adds nothing: its loss is srft_loss of the plain model's log-probs."""
    loss_cfg = SRFTLossConfig()
    mesh = one_device_mesh()
    with jax.set_mesh(mesh):
        graphdef, params, opt_state, batch, step = setup(mesh, loss_cfg, micro=4)
        flat = jax.tree.map(lambda a: np.asarray(a).reshape((-1,) + a.shape[2:]), batch)
        model = nnx.merge(graphdef, params)
        tokens = np.concatenate([flat.prompt_tokens, flat.response_tokens], 1)
        mask = np.concatenate([flat.prompt_mask, flat.response_mask], 1)
        logits = model(jnp.asarray(tokens), mask=jnp.asarray(mask))
        lp, ent = token_logprobs_and_entropy(logits[:, P - 1:-1], jnp.asarray(flat.response_tokens))
        ref, ref_metrics = srft_loss(lp, ent, flat, loss_cfg)
        _, _, m = step(params, opt_state, batch)
    np.testing.assert_allclose(float(m["loss"]), float(ref), rtol=1e-5)
    for k in ("loss/sft", "loss/rl", "demo/entropy", "rollout/w_rl"):
        np.testing.assert_allclose(float(m[k]), float(ref_metrics[k]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["paper", "grpo"])
def test_micro_batching_does_not_change_the_update(preset):
    loss_cfg = SRFTLossConfig(preset=preset)
    mesh = one_device_mesh()
    with jax.set_mesh(mesh):
        out = []
        for micro in (16, 4):
            _, params, opt_state, batch, step = setup(mesh, loss_cfg, micro=micro, tx=sgd())
            params, _, m = step(params, opt_state, batch)
            out.append((float(m["loss"]), jax.device_get(params)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_skips_the_update():
    mesh = one_device_mesh()
    with jax.set_mesh(mesh):
        _, params, opt_state, batch, step = setup(mesh)
        before = jax.device_get(params)
        opt_before = jax.device_get(opt_state)
        adv = np.asarray(batch.advantage).copy()
        adv[0, 0] = np.nan
        bad = dataclasses.replace(batch, advantage=jax.device_put(adv, batch.advantage.sharding))
        params, opt_state, m = step(params, opt_state, bad)
        assert float(m["train/skipped"]) == 1.0
        for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(before)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(jax.device_get(opt_state)), jax.tree.leaves(opt_before)):
            np.testing.assert_array_equal(a, b)
        params, opt_state, m = step(params, opt_state, batch)
        assert float(m["train/skipped"]) == 0.0 and np.isfinite(float(m["loss"]))


def test_schedule_spans_every_update_of_the_run():
    from srft_jax.train_step import make_schedule

    cosine = make_schedule(OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=2), steps=10,
                           updates_per_step=2)
    assert [float(cosine(i)) for i in (0, 2, 4)] == [0.0, 0.5, 1.0]  # warmup: 2 steps = 4 updates
    assert float(cosine(12)) == pytest.approx(0.5)  # half-way through the 16 decay updates
    assert float(cosine(19)) > 0 and float(cosine(20)) == 0.0  # 0 after the last of 20 updates
    constant = make_schedule(OptimizerConfig(lr=1e-6), steps=500, updates_per_step=2)
    assert float(constant(0)) == float(constant(999)) == pytest.approx(1e-6)
