"""The sampler's decode at the paper's 7B shape, measured by XLA without weights: memory per
device of the decode program for a number of slots, and bytes accessed per generated token by
one decode step at several cache fill levels against the floor.

Run (8 forced CPU devices are set up by the script; nothing is allocated or run, only
`jax.eval_shape` -> `jit(...).lower(abstract, sharded args).compile()`):
    python benchmarks/decode_7b.py                                     # both, fsdp 8
    python benchmarks/decode_7b.py --fsdp 2 --tensor 4 --slots 224    # configs/...-8xh100.yaml
    python benchmarks/decode_7b.py --what memory --slots 224 448 896   # decode_slots to fit HBM
    python benchmarks/decode_7b.py --what bytes --slots 224 --fills 0.05 0.5 0.95
    python benchmarks/decode_7b.py --model 1.5b --fsdp 4 --tensor 2 --slots 112  # ...-v5e8
    python benchmarks/decode_7b.py --what memory --lora-rank 64 --param-dtype bfloat16 --fsdp 2 --tensor 4 --slots 64
                                                                       # ...-lora-v5e8

Model: Qwen2.5-Math-7B, 16k variant (benchmarks/memory_7b.py), float32 parameters in the
training layout, bfloat16 compute and KV cache. Shapes: 128 prompts x 7 rollouts, prompt 1024,
response 8192, kv_block 512.

- memory: `sampler.decode` (the whole jitted decode loop: decode-layout weight copy, prompt
  store of all 128 prompts, S-slot cache, outputs) for each --slots value;
  `compile().memory_analysis()` per device: arguments (training-layout parameters, prompt
  store, prefill logits) + outputs + temporaries.
- bytes: one step of S slots (`sampler.decode_step` plus the token draw) at a cache fill f: the
  step reads the blocks up to the fill behind the loop's run-time skip (`lax.cond`; the blocks
  after it, which the loop skips, are left out of the program, as XLA's cost analysis would add
  every branch of a cond), weights given in the decode layout. XLA's cost analysis charges an in-place
  scatter with its whole operand read and written, and a gather with its whole operand read:
  the cache writes (one row scatter per block) and the token-embedding lookup (a gather of S
  rows) are therefore measured alone (same shapes and shardings) and replaced by the bytes they
  touch (2 x S x K x H per block for keys and values in every layer; S rows of the table). Floor per step and device = the bytes of every weight the step
  reads (all but the input embedding table, of which it reads S rows) + the live KV
  (S x f x 9216 tokens); per generated token = / (S per device).
  Prints XLA's raw figure, the corrected one and the ratio to the floor (target <= 1.3).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_7b import (GB, PAPER, PROMPT, RESPONSE, add_model_arguments, analyse, model_config, sds,  # noqa: E402
                       set_overrides, with_shardings)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from srft_jax import distributed, mesh as mesh_lib  # noqa: E402
from srft_jax import sampler as sampler_lib  # noqa: E402
from srft_jax.models import KVCache, abstract_model, state_shardings  # noqa: E402
from srft_jax.sampler.loop import STORE_AXES  # noqa: E402
from srft_jax.sampler.step import CACHE_AXES  # noqa: E402

KV_BLOCK = 512


def _named(mesh, axes, shape, dtype):
    return sds(shape, dtype, mesh_lib.named_sharding(mesh, axes, shape))


def memory_report(mesh, slots: int, model: str = "7b", response: int = RESPONSE):
    """XLA memory analysis of the decode program for 128 prompts x 7 rollouts in `slots` slots."""
    cfg = model_config("none", model)
    graphdef, state = nnx.split(abstract_model(cfg))
    abstract_state = with_shardings(state, state_shardings(state, mesh))
    b, g = PAPER["prompts"], PAPER["rollouts"]
    L, K, H, V = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    spec = sampler_lib.DecodeSpec(batch=b, prompt_len=PROMPT, num_samples=g, response_len=response,
                                  slots=slots, shards=distributed.batch_shards(mesh), kv_block=KV_BLOCK,
                                  strategy=sampler_lib.Temperature(1.0), kv_cache_dtype="bfloat16")
    keys = _named(mesh, STORE_AXES, (L, b, K, H, PROMPT), jnp.bfloat16)
    values = _named(mesh, STORE_AXES, (L, b, K, PROMPT, H), jnp.bfloat16)
    rep = mesh_lib.replicated(mesh)
    rows = lambda shape, dt: sds(shape, dt, mesh_lib.batch_sharding(mesh, len(shape), shape))
    store = KVCache(keys, values, rows((b, PROMPT), bool), sds((), jnp.int32, rep))
    key = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh):
        loop = jax.jit(functools.partial(sampler_lib.decode, graphdef, spec))
        return analyse(
            f"decode loop: {b} prompts x {g} rollouts in {slots} slots (cache {PROMPT}+{response} bf16 "
            f"per slot, prompt store of {b} x {PROMPT})",
            loop, abstract_state, store, rows((b, V), jnp.float32), rows((b,), jnp.int32),
            rows((b,), bool), sds(key.shape, key.dtype, rep), rows((b,), jnp.int32),
            sds((), jnp.int32, rep), sds((2,), jnp.int32, rep), sds((), jnp.int32, rep))


def _bytes(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["bytes accessed"])


def bytes_reports(mesh, slots: int, fills, model: str = "7b", dtype: str = "float32") -> list[str]:
    """Bytes accessed per generated token of one decode step at each cache fill, with weights
    and KV cache in `dtype`."""
    cfg = model_config("none", model).replace(dtype=dtype)
    graphdef, state = nnx.split(abstract_model(cfg))
    abstract_state = with_shardings(state, state_shardings(state, mesh))
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    cache_len = PROMPT + RESPONSE
    sizes = sampler_lib.block_sizes(cache_len, KV_BLOCK)
    shards = distributed.batch_shards(mesh)
    per_device = slots // shards
    kv_dtype = jnp.dtype(dtype)
    store = sampler_lib.storage_dtype(kv_dtype)
    k_blocks = tuple(_named(mesh, CACHE_AXES, (slots, K, H, n), store) for n in sizes)
    v_blocks = tuple(_named(mesh, CACHE_AXES, (slots, K, n, H), store) for n in sizes)
    k_dev = v_blocks[0].sharding.shard_shape(v_blocks[0].shape)[1]  # key/value heads per device
    rows = lambda shape, dt: sds(shape, dt, mesh_lib.batch_sharding(mesh, len(shape), shape))
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    lines = []
    with jax.set_mesh(mesh):
        to_decode = jax.jit(lambda s: sampler_lib.decode_model(nnx.merge(graphdef, s)))
        dm_shape = jax.eval_shape(to_decode, abstract_state)
        dm_sh = to_decode.lower(abstract_state).compile().output_shardings
        dm = jax.tree.map(lambda a, sh: sds(a.shape, a.dtype, sh), dm_shape, dm_sh)
        # Weight bytes a step reads on one device (decode layout), embedding table excepted.
        leaves = jax.tree_util.tree_leaves_with_path(dm)
        per_dev = lambda a: np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
        # (a tied embedding is also the output projection, read whole)
        tied = dm.lm_head is None
        weights = sum(per_dev(a) for p, a in leaves if tied or "embedding" not in jax.tree_util.keystr(p))
        embed_rows = per_device * cfg.hidden_size * kv_dtype.itemsize
        kv_token = 2 * L * k_dev * H * kv_dtype.itemsize  # one token's keys + values, one device

        def write_layer(k_blocks, v_blocks, new, pos):
            return (sampler_lib.write_kv(k_blocks, new, pos, 3, dtype),
                    sampler_lib.write_kv(v_blocks, new, pos, 2, dtype))

        # The token embedding: a gather of S rows, charged by XLA as the whole table.
        embed = jax.tree.leaves(dm.embedding)[0]
        gather_charge = _bytes(jax.jit(lambda e, t: jnp.take(e, t[:, None], axis=0)), embed,
                               rows((slots,), jnp.int32))
        gather_real = 2 * embed_rows
        for f in fills:
            live = int(round(f * cache_len))
            n = -(-live // KV_BLOCK)
            # The cache as a step at this fill sees it: the blocks up to the fill, read under the
            # same run-time skip (`lax.cond`) as in the loop; the later blocks are skipped there.
            cache = sampler_lib.SlotCache(tuple(k_blocks[:n] for _ in range(L)),
                                          tuple(v_blocks[:n] for _ in range(L)), dtype)

            def step(dm, cache, tokens, positions, keys, t, live_blocks):
                logits, cache = sampler_lib.decode_step(dm, tokens, positions, cache, live_blocks)
                drawn = sampler_lib.draw(sampler_lib.Temperature(1.0), logits,
                                         jax.random.wrap_key_data(keys), t)
                return drawn[0], cache

            raw = _bytes(jax.jit(step, donate_argnums=1), dm, cache, rows((slots,), jnp.int32),
                         rows((slots,), jnp.int32), rows((slots,) + key_data.shape, key_data.dtype),
                         rows((slots,), jnp.int32), sds((), jnp.int32, mesh_lib.replicated(mesh)))
            write_charge = L * _bytes(jax.jit(write_layer, donate_argnums=(0, 1)), k_blocks[:n],
                                      v_blocks[:n], rows((slots, K, H), kv_dtype), rows((slots,), jnp.int32))
            write_real = 2 * L * n * 2 * per_device * k_dev * H * kv_dtype.itemsize
            corrected = raw - write_charge + write_real - gather_charge + gather_real
            floor = weights + embed_rows + per_device * live * kv_token
            lines.append(
                f"fill {f:4.0%} ({live} of {cache_len} slots, {n} of {len(sizes)} blocks read): per device "
                f"{per_device} rows; XLA bytes/step {raw / GB:.2f} GB raw, {corrected / GB:.2f} GB with the "
                f"cache writes and embedding rows at their real size; floor {floor / GB:.2f} GB (weights "
                f"{weights / GB:.2f} + live KV {per_device * live * kv_token / GB:.2f}); per generated token "
                f"{corrected / per_device / 1e6:.1f} MB vs floor {floor / per_device / 1e6:.1f} MB: "
                f"ratio {corrected / floor:.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("all", "memory", "bytes"), default="all")
    parser.add_argument("--slots", type=int, nargs="+", default=[224], help="decode_slots (all devices)")
    parser.add_argument("--fills", type=float, nargs="+", default=[0.05, 0.25, 0.5, 0.75, 0.95])
    parser.add_argument("--model", choices=("7b", "1.5b"), default="7b")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute and KV dtype of the bytes analysis (CPU converts bfloat16 "
                             "operands to float32 before every matrix product, which XLA counts)")
    parser.add_argument("--devices", type=int, default=8, help="forced CPU devices (the mesh size)")
    parser.add_argument("--fsdp", type=int, default=-1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--response-len", type=int, default=RESPONSE,
                        help="response tokens per row (memory analysis only)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    set_overrides(args)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=args.fsdp, tensor=args.tensor))
    lora = f", LoRA rank {args.lora_rank} (merged into the decode layout)" if args.lora_rank else ""
    print(f"Qwen2.5-Math-{args.model.upper()}, mesh {mesh_lib.describe(mesh)}, kv_block {KV_BLOCK}, "
          f"{args.param_dtype} parameters{lora}")
    if args.what in ("all", "memory"):
        for s in args.slots:
            rep = memory_report(mesh, s, args.model, args.response_len)
            print(rep.line(), flush=True)
            print(f"  decode peak per device with {s} slots: {rep.peak / GB:.2f} GB", flush=True)
    if args.what in ("all", "bytes"):
        for s in args.slots:
            for line in bytes_reports(mesh, s, args.fills, args.model, args.dtype):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
