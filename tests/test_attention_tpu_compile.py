"""The splash path compiled by the TPU compiler from this CPU-only machine (needs libtpu, the
`tpu` extra; skipped without it): `model.attention=auto` resolves from the mesh's TPU devices,
and the splash kernel's forward+backward -- alone, and inside the decoder's layer scan with
remat -- compiles for a v5e:2x2 slice inside `shard_map`, with fewer temporaries than the xla
path (`memory_analysis()`). Nothing runs on a TPU. benchmarks/attention_tpu_compile.py reports
the same at real sizes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax.models import ModelConfig, abstract_model
from srft_jax.models import attention_kernels as ak

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock


@pytest.fixture(scope="module")
def tpu():
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                            chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                            num_slices=1, wrap=(False, False, False))
    except Exception as e:  # noqa: BLE001 - any libtpu start-up failure means: cannot check here
        pytest.skip(f"no TPU compiler here: {str(e).splitlines()[0]}")
    return topo.devices


def test_auto_resolves_from_the_mesh_devices(tpu):
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=1, tensor=2), devices=tpu)
    with jax.set_mesh(mesh):
        assert ak.devices_in_use()[0] == "tpu"  # while jax.devices() are CPUs
        assert ak.resolve("auto", "bfloat16") == "splash"
        assert ak.resolve("splash", "float32") == "splash"
        with pytest.raises(ValueError, match="model.attention=cudnn needs NVIDIA GPU devices, but the devices in use are tpu"):
            ak.resolve("cudnn", "bfloat16")
    assert jax.devices()[0].platform == "cpu"


def _compile(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, compiled.memory_analysis()


@pytest.mark.slow
def test_splash_compiles_for_tpu_with_fewer_temporaries(tpu):
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=1, tensor=2), devices=tpu)
    b, t, n, kh, h = 4, 4000, 4, 2, 128  # T not a multiple of the block: padded to 4096
    sh = lambda logical, shape: jax.ShapeDtypeStruct(
        shape, jnp.bool_ if len(shape) == 2 else jnp.bfloat16,
        sharding=mesh_lib.named_sharding(mesh, logical, shape))
    args = (sh(("batch", None, "heads", None), (b, t, n, h)),
            sh(("batch", None, "kv_heads", None), (b, t, kh, h)),
            sh(("batch", None, "kv_heads", None), (b, t, kh, h)), sh(("batch", None), (b, t)))
    temps = {}
    for impl in ("splash", "xla"):
        def loss(q, k, v, mask, impl=impl):
            return jnp.sum(ak.sequence_attention(q, k, v, mask, impl).astype(jnp.float32))

        with jax.set_mesh(mesh):
            compiled, mem = _compile(jax.grad(loss, argnums=(0, 1, 2)), *args)
        temps[impl] = mem.temp_size_in_bytes
        assert ("tpu_custom_call" in compiled.as_text()) == (impl == "splash")
    # xla holds [B/2, N/2, T, T] float32 scores per chip (128 MB) and more for the backward;
    # (small temporaries may live in on-chip memory and are not counted: hence the long T).
    assert temps["xla"] > 1.28e8 and temps["splash"] < temps["xla"] / 10, temps


@pytest.mark.slow
def test_decoder_train_forward_backward_with_splash_compiles_for_tpu(tpu):
    """The decoder's gradient (layer scan, remat full, bf16) with model.attention=auto on a
    data x tensor mesh of v5e chips runs the splash kernel (a Mosaic custom call)."""
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=1, tensor=2), devices=tpu)
    cfg = ModelConfig.tiny(hidden_size=512, num_heads=4, num_kv_heads=2, dtype="bfloat16",
                           remat="full", attention="auto")
    graphdef, state = nnx.split(abstract_model(cfg))
    params = nnx.to_pure_dict(state)
    from srft_jax.train_step import param_shardings

    p_sh = param_shardings(params, mesh)
    b_sh = mesh_lib.batch_sharding(mesh, 2, (4, 300))

    def loss(params, tokens, mask):
        st = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(st, params)
        hidden, _ = nnx.merge(graphdef, st).hidden_states(tokens, mask)
        return jnp.sum(hidden.astype(jnp.float32) ** 2)

    args = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_sh),
            jax.ShapeDtypeStruct((4, 300), jnp.int32, sharding=b_sh),
            jax.ShapeDtypeStruct((4, 300), jnp.bool_, sharding=b_sh))
    with jax.set_mesh(mesh):
        compiled, mem = _compile(jax.grad(loss), *args)
    assert "tpu_custom_call" in compiled.as_text()
    assert mem.argument_size_in_bytes > 0
