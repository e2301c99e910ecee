"""Multi-host training on one machine: two processes x 4 CPU devices joined by
`jax.distributed` (gloo collectives) give the same SRFT losses, parameters and checkpoint as one
process with 8 devices; plus the pure helpers of `srft_jax.distributed`.

Each process reads only its shard of the prompts (`host_shard`), builds its part of the mixed
batch and hands it to `to_global`; the one-process reference builds the same global batch by
concatenating every shard's part.

The worker is this file run as a script:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python tests/test_distributed.py --worker PROCESS_ID --port PORT --out DIR
(port 0 with 8 devices: the one-process reference).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
PROMPTS_PER_STEP = 8      # global, per train step
ROLLOUTS = 3              # + 1 demonstration = groups of 4 rows
MICRO_BATCH = 8           # global rows per micro-batch (one per device)
STEPS = 2
PROMPT_W, RESP_W = 6, 8
TIMEOUT_S = 600  # only ever waited out when something is broken; then the processes get SIGKILL
# Identical in every process (both sides of the comparison); halves the CPU compile time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ---- the shared computation (workers and reference) -----------------------------------------
def make_examples(num_prompts: int, seed: int = 0) -> list[dict]:
    """Deterministic prompts with rollouts, rewards, old log-probs and a demonstration each."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(num_prompts):
        prompt = rng.randint(3, 256, size=rng.randint(2, PROMPT_W + 1)).tolist()
        rollouts = [rng.randint(3, 256, size=rng.randint(1, RESP_W + 1)).tolist() for _ in range(ROLLOUTS)]
        out.append(dict(
            id=i, prompt=prompt, rollouts=rollouts,
            rewards=[float(r) for r in rng.randint(0, 2, size=ROLLOUTS)],
            old_lp=[-rng.rand(len(r)).astype(np.float32) for r in rollouts],
            demo=rng.randint(3, 256, size=rng.randint(1, RESP_W + 1)).tolist()))
    return out


def local_micro_batches(examples: list[dict], shard, step: int):
    """This shard's part [M, b_s, ...] of step `step`'s mixed batch (numpy)."""
    from srft_jax.batch import build_mixed_batch, to_micro_batches
    from srft_jax.distributed import host_shard, offset_groups
    from srft_jax.losses import SRFTLossConfig

    mine = host_shard(examples, shard.index, shard.count)
    per_step = shard.local_size(PROMPTS_PER_STEP, "prompts_per_step")
    prompts = mine[step * per_step:(step + 1) * per_step]
    b_local = shard.local_size(MICRO_BATCH, "micro_batch_size")
    batch = build_mixed_batch(
        [e["prompt"] for e in prompts], [e["rollouts"] for e in prompts], [e["rewards"] for e in prompts],
        [e["demo"] for e in prompts], [1.0] * len(prompts), prompt_width=PROMPT_W, response_width=RESP_W,
        pad_id=0, loss_config=SRFTLossConfig(), rows_multiple=b_local,
        rollout_old_logprobs=[e["old_lp"] for e in prompts])
    batch.group = offset_groups(batch.group, shard.index * per_step)
    return to_micro_batches(batch, b_local)


def initial_params(mesh):
    """(graphdef, params) of the tiny decoder: deterministic host values (the same in every
    process), placed straight into their shards. Cheaper to build than a jitted random init,
    and the comparison does not depend on how the initial values were drawn."""
    import jax
    from flax import nnx

    from srft_jax.models import ModelConfig, abstract_model
    from srft_jax.train_step import param_shardings

    graphdef, state = nnx.split(abstract_model(ModelConfig.tiny()))
    abstract = nnx.to_pure_dict(state)
    shardings = param_shardings(abstract, mesh)
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.RandomState(1)
    host = [(0.05 * rng.standard_normal(x.shape)).astype(x.dtype) for x in leaves]
    arrays = [jax.make_array_from_callback(h.shape, sh, lambda idx, h=h: h[idx])
              for h, sh in zip(host, jax.tree.leaves(shardings))]
    return graphdef, jax.tree.unflatten(treedef, arrays)


def _optimizer():
    """Clipped SGD with momentum. Not AdamW: Adam divides each gradient by its own running
    magnitude, so for a parameter whose gradient is ~0 the last-bit differences of a different
    cross-device reduction order become O(lr) differences in that one parameter. The test
    compares the distributed computation, so it uses an update that is linear in the gradient
    (the global-norm clip still reduces over all devices of both processes)."""
    import optax

    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))


def train_two_steps(mesh, batches, run_dir=None):
    """The jitted SRFT update applied to each batch; optionally an orbax checkpoint at the end.
    Returns (losses, params)."""
    import jax

    from srft_jax.losses import SRFTLossConfig
    from srft_jax.train_step import (batch_shardings, jit_train_step, make_train_step, opt_state_shardings,
                                     param_shardings)

    with jax.set_mesh(mesh):
        graphdef, params = initial_params(mesh)
        tx = _optimizer()
        p_sh = param_shardings(params, mesh)
        o_sh = opt_state_shardings(tx, params, p_sh, mesh)
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        step = jit_train_step(make_train_step(graphdef, tx, SRFTLossConfig(), chunk_size=RESP_W),
                              p_sh, o_sh, batch_shardings(mesh, batches[0]), mesh)
        losses = []
        for b in batches:
            params, opt_state, metrics = step(params, opt_state, b)
            losses.append(float(metrics["loss"]))
        if run_dir is not None:
            from srft_jax.checkpoint import Checkpointer

            ckpt = Checkpointer(run_dir, async_save=False)
            ckpt.save(STEPS, params, opt_state, {"step": STEPS})
            ckpt.close()
    return losses, params


def flat_params(params) -> dict[str, np.ndarray]:
    """name -> the full value (gathered from every process when sharded across processes)."""
    import jax
    from jax.experimental import multihost_utils

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(k.key) for k in path)
        full = leaf if leaf.is_fully_addressable else multihost_utils.process_allgather(leaf, tiled=True)
        out[name] = np.asarray(full, np.float32)
    return out


def worker(process_id: int, port: int, out_dir: str) -> None:
    """One of the two distributed processes (port > 0), or the one-process reference (port 0)."""
    import jax

    from srft_jax import distributed
    from srft_jax.distributed import DataShard
    from srft_jax.mesh import MeshConfig, make_mesh, replicated

    examples = make_examples(PROMPTS_PER_STEP * STEPS)
    result = {}
    if port:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        cfg = distributed.initialize(MeshConfig(fsdp=-1, coordinator_address=f"127.0.0.1:{port}",
                                                num_processes=NUM_PROCESSES, process_id=process_id))
        assert cfg.distributed and jax.process_count() == NUM_PROCESSES
        # Programs loaded from the persistent compilation cache (conftest's, inherited) hang in
        # gloo collectives with jaxlib 0.12: CPU processes under jax.distributed compile afresh.
        assert os.environ.get("JAX_COMPILATION_CACHE_DIR") and not jax.config.jax_enable_compilation_cache
        assert jax.local_device_count() == DEVICES_PER_PROCESS and jax.device_count() == 8
        mesh = make_mesh(cfg)
        shard = distributed.data_shard(mesh)
        local = [local_micro_batches(examples, shard, s) for s in range(STEPS)]
        batches = [distributed.to_global(b, mesh, axis=1, shard=shard) for b in local]
        # The rows this process fed come back unchanged.
        back = distributed.to_local(batches[0], axis=1)
        np.testing.assert_array_equal(back.response_tokens, local[0].response_tokens)
        back = distributed.to_local(batches[0], axis=1, shard=shard)
        np.testing.assert_array_equal(back.group, local[0].group)
        # A replicated array gives this shard's block of rows too (the sampler's outputs may be).
        with jax.set_mesh(mesh):
            whole = jax.jit(lambda: jax.numpy.arange(8), out_shardings=replicated(mesh))()
        np.testing.assert_array_equal(distributed.to_local(whole, shard=shard),
                                      np.arange(4 * shard.index, 4 * shard.index + 4))
        run_dir = os.path.join(out_dir, "run")
        result.update(
            shard=np.asarray([shard.index, shard.count]),
            widest=distributed.process_max(10 + process_id),
            reward_mean=distributed.process_mean(float(process_id + 1), 1.0),
            widths=np.asarray(distributed.process_max([process_id, 10 - process_id])),
            sum64=distributed.process_sum([1 / 3 + process_id]),  # float64 travels exactly
            shard_total=distributed.shard_sum([1.0, 2.0], mesh),
            leader=distributed.is_shard_leader(mesh),
            prompts=np.asarray([e["id"] for e in distributed.host_shard(examples, shard.index, shard.count)]))
        name = f"process{process_id}"
    else:
        assert jax.process_count() == 1 and jax.device_count() == 8
        mesh = make_mesh(MeshConfig(fsdp=-1))
        assert distributed.data_shard(mesh) == DataShard(0, 1)
        batches = []
        for s in range(STEPS):
            parts = [local_micro_batches(examples, DataShard(k, NUM_PROCESSES), s) for k in range(NUM_PROCESSES)]
            whole = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *parts)
            batches.append(distributed.to_global(whole, mesh, axis=1))
        run_dir = None
        name = "reference"
    losses, params = train_two_steps(mesh, batches, run_dir=run_dir)
    _, init = initial_params(mesh)
    np.savez(os.path.join(out_dir, f"{name}.npz"), losses=np.asarray(losses), **result,
             **{f"param:{k}": v for k, v in flat_params(params).items()},
             **{f"init:{k}": v for k, v in flat_params(init).items()})


# ---- tests -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_dir: str) -> None:
    """Starts the two distributed processes and the reference at once; always reaps them."""
    port = _free_port()
    jobs = [(pid, port, DEVICES_PER_PROCESS) for pid in range(NUM_PROCESSES)] + [(0, 0, 8)]
    procs = []
    try:
        for pid, p, devices in jobs:
            env = dict(os.environ)
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
            env["JAX_PLATFORMS"] = "cpu"
            env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", str(pid), "--port", str(p),
                 "--out", out_dir], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
        deadline = time.monotonic() + TIMEOUT_S
        logs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"workers did not finish within {TIMEOUT_S} s") from None
            logs.append(out)
        names = [f"process {pid}" for pid in range(NUM_PROCESSES)] + ["reference"]
        for name, p, log in zip(names, procs, logs):
            assert p.returncode == 0, f"{name} failed (exit {p.returncode}):\n{log[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_match_one_process(tmp_path):
    import jax
    from flax import nnx

    from srft_jax.checkpoint import Checkpointer
    from srft_jax.mesh import MeshConfig, make_mesh
    from srft_jax.models import ModelConfig, abstract_model
    from srft_jax.train_step import param_shardings

    _run_workers(str(tmp_path))
    results = [np.load(tmp_path / f"process{p}.npz") for p in range(NUM_PROCESSES)]
    ref = np.load(tmp_path / "reference.npz")

    # Which prompts each process read: disjoint halves of the data, together all of it.
    assert [tuple(r["shard"]) for r in results] == [(0, 2), (1, 2)]
    seen = [set(r["prompts"].tolist()) for r in results]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(PROMPTS_PER_STEP * STEPS))
    assert all(int(r["widest"]) == 11 for r in results)
    assert all(float(r["reward_mean"]) == 1.5 for r in results)
    assert all(tuple(r["widths"]) == (1, 10) for r in results)
    assert all(float(r["sum64"][0]) == (1 / 3) + (1 / 3 + 1) for r in results)
    assert all(tuple(r["shard_total"]) == (2.0, 4.0) and bool(r["leader"]) for r in results)

    names = [k for k in ref.files if k.startswith("param:")]
    assert len(names) > 10
    for r in results:
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        for name in names:
            np.testing.assert_allclose(r[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The parameters moved, so this is not a comparison of two initialisations.
    moved = max(float(np.abs(ref[n] - ref["init:" + n[6:]]).max()) for n in names)
    assert moved > 1e-2, moved

    # The checkpoint that both processes wrote together (each its own shards) restores here,
    # on one process with 8 devices, to the reference's parameters.
    mesh = make_mesh(MeshConfig(fsdp=-1))
    with jax.set_mesh(mesh):
        abstract = nnx.to_pure_dict(nnx.state(abstract_model(ModelConfig.tiny())))
        like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, param_shardings(abstract, mesh))
        ckpt = Checkpointer(str(tmp_path / "run"), async_save=False)
        assert ckpt.latest_step() == STEPS
        got = flat_params(ckpt.restore_params(STEPS, like))
        ckpt.close()
    for name in names:
        np.testing.assert_allclose(got[name[6:]], results[0][name], rtol=0, atol=0, err_msg=name)


def test_resolve_distributed_from_environment():
    import pytest

    from srft_jax.distributed import resolve_distributed
    from srft_jax.mesh import MeshConfig

    assert resolve_distributed(MeshConfig(), {}) == MeshConfig()
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    cfg = resolve_distributed(MeshConfig(), env)
    assert (cfg.distributed, cfg.coordinator_address, cfg.num_processes, cfg.process_id) == (
        True, "10.0.0.1:1234", 4, 3)
    # Flags (config values) win over the environment.
    cfg = resolve_distributed(MeshConfig(coordinator_address="h:1", num_processes=2, process_id=0), env)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("h:1", 2, 0)
    # Auto-detection (TPU VM, SLURM) leaves everything unset.
    assert resolve_distributed(MeshConfig(distributed=True), {}).coordinator_address is None
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        resolve_distributed(MeshConfig(), {**env, "JAX_NUM_PROCESSES": "four"})
    with pytest.raises(ValueError, match="mesh.num_processes"):
        resolve_distributed(MeshConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="mesh.process_id=5"):
        resolve_distributed(MeshConfig(), {**env, "JAX_PROCESS_ID": "5"})


SCALE_CONFIGS = {  # config file -> (preset with the same shapes, devices of the target)
    "qwen2.5-math-7b-srft-v5p64": ("qwen2.5-math-7b-16k", 32),
    "qwen2.5-math-7b-srft-8xh100": ("qwen2.5-math-7b-16k", 8),
    "qwen2.5-math-1.5b-srft-v5e8": ("qwen2.5-math-1.5b", 8),
}


def test_scale_configs_load_and_fit_their_meshes():
    """The full-size configs load, their mesh covers the target's devices, every tensor-split
    dimension divides (nothing silently replicated), and micro-batches shard evenly."""
    import pytest

    from srft_jax.config import load_config
    from srft_jax.models.config import preset

    for name, (preset_name, devices) in SCALE_CONFIGS.items():
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        data, fsdp, tensor = cfg.mesh.shape(devices)
        model = preset(preset_name)
        for dim in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            assert getattr(model, dim) % tensor == 0, (name, dim)
        assert model.hidden_size % fsdp == 0, name
        t = cfg.train
        rows_per_update = t.prompts_per_step // t.updates_per_step * (t.rollouts_per_prompt + 1)
        assert t.micro_batch_size % (data * fsdp) == 0, name
        assert rows_per_update % t.micro_batch_size == 0, name
        assert (cfg.model.param_dtype, cfg.model.dtype, cfg.model.remat) == ("float32", "bfloat16", "full")
        assert (t.prompts_per_step, t.rollouts_per_prompt, t.updates_per_step, t.optim.lr) == (128, 7, 2, 1e-6)
        assert cfg.data.max_prompt_len == 1024 and cfg.data.max_response_len == 8192
        assert cfg.loss.preset == "paper"
        with pytest.raises(ValueError):
            cfg.mesh.shape(devices + 1)


def test_host_shard_is_disjoint_equal_and_covering():
    import pytest

    from srft_jax.distributed import host_shard

    items = list(range(23))
    shards = [host_shard(items, i, 4) for i in range(4)]
    assert all(len(s) == 5 for s in shards)
    assert sorted(x for s in shards for x in s) == sorted(set(x for s in shards for x in s))
    assert set().union(*map(set, shards)) == set(items) - {20, 21, 22}
    assert shards[1][:3] == [1, 5, 9]
    with pytest.raises(ValueError, match="shard_index"):
        host_shard(items, 4, 4)
    with pytest.raises(ValueError, match="one item"):
        host_shard(items[:3], 0, 4)
    # equal=False keeps every item: the first shards take one more, a shard may get none.
    uneven = [host_shard(items, i, 4, equal=False) for i in range(4)]
    assert [len(s) for s in uneven] == [6, 6, 6, 5] and sorted(sum(uneven, [])) == items
    assert host_shard(items[:3], 3, 4, equal=False) == []


def test_single_process_round_trip_and_errors():
    import jax
    import pytest

    from srft_jax import distributed
    from srft_jax.distributed import DataShard
    from srft_jax.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert distributed.data_shard(mesh) == DataShard(0, 1)
    x = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3, 8, 5)
    g = distributed.to_global({"x": x}, mesh, axis=1)["x"]
    assert g.shape == x.shape and g.sharding.spec[1] == ("data", "fsdp")
    np.testing.assert_array_equal(distributed.to_local(g, axis=1), x)
    assert distributed.process_max(7) == 7 and distributed.process_max([3, 5]) == (3, 5)
    np.testing.assert_array_equal(distributed.shard_sum([1.5, 2.0], mesh), [1.5, 2.0])
    assert distributed.is_shard_leader(mesh)
    np.testing.assert_array_equal(distributed.to_local(g, axis=1, shard=DataShard(0, 1)), x)
    # Shard 1 of 2 of a (here fully addressable) array: its half of the rows.
    np.testing.assert_array_equal(distributed.to_local(g, axis=1, shard=DataShard(1, 2)), x[:, 4:])
    assert distributed.process_mean(3.0, 2.0) == 1.5 and distributed.process_mean(0.0, 0.0) == 0.0
    assert distributed.is_main()
    # Two shards: 8 rows per shard would need 16 global rows; 3 rows do not divide 4 batch shards.
    with pytest.raises(ValueError, match="not divisible by the batch shards"):
        distributed.to_global(np.zeros((2, 3)), mesh, axis=1, shard=DataShard(0, 2))
    with pytest.raises(ValueError, match="micro_batch_size=6"):
        DataShard(0, 4).local_size(6, "micro_batch_size")
    assert jax.process_count() == 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    worker(a.worker, a.port, a.out)
