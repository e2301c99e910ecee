"""CPU train-step time with each way of computing the sequence attention, in one process,
measured in turns (so that a busy, shared machine slows every variant alike).

    python benchmarks/attention_cpu.py               # about 4 minutes on 2 quiet CPU cores
    python benchmarks/attention_cpu.py --repeats 8

The step and shapes are benchmarks/train_step_vs_torch.py's (Llama-shaped, D 512, 8 layers,
8 heads, V 32000, float32; batch 8 x (64 + 192) tokens; `train_step` with the `sft` preset),
with random weights. Variants of the attention inside the same compiled step:
  xla        `attention_kernels.sequence_attention(..., "xla")`: one masked softmax (what
             model.attention=auto/xla runs on CPU);
  blockwise  `attention.attention` with one block (online softmax, keys transposed), what
             every sequence forward ran at 7d65738;
  dpa        `jax.nn.dot_product_attention(implementation="xla")` with the same boolean mask.
Per variant: the fastest and the median step, wall-clock and process CPU time (all threads),
and each variant's ratio to blockwise (< 1 is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=192)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from srft_jax import mesh as mesh_lib
    from srft_jax.batch import MixedBatch, to_micro_batches
    from srft_jax.losses import SRFTLossConfig
    from srft_jax.models import ModelConfig, attention_kernels
    from srft_jax.models.attention import attention
    from srft_jax.models.weights import create_sharded_model
    from srft_jax.train_step import (OptimizerConfig, batch_shardings, jit_train_step, make_optimizer,
                                     make_train_step, opt_state_shardings, param_shardings)

    def blockwise(q, k, v, mask, impl):
        b, t = mask.shape
        return attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3),
                         jnp.broadcast_to(jnp.arange(t), (b, t)), mask)

    def dpa(q, k, v, mask, impl):
        t = mask.shape[1]
        visible = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], implementation="xla")

    original = attention_kernels.sequence_attention
    variants = {"xla": original, "blockwise": blockwise, "dpa": dpa}

    @contextlib.contextmanager
    def using(fn):
        attention_kernels.sequence_attention = fn
        try:
            yield
        finally:
            attention_kernels.sequence_attention = original

    cfg = ModelConfig(arch="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 8 // 3, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.heads, attention_bias=False,
                      max_position_embeddings=1024, attention="xla")
    b, p, r = args.batch, args.prompt, args.response
    rng = np.random.RandomState(0)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=1), devices=jax.devices()[:1])
    steps, states = {}, {}
    with jax.set_mesh(mesh):
        model = create_sharded_model(cfg, mesh, seed=0)
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        tx = make_optimizer(OptimizerConfig(lr=1e-5, weight_decay=0.01, grad_clip=1.0))
        p_sh = param_shardings(params, mesh)
        o_sh = opt_state_shardings(tx, params, p_sh, mesh)
        batch = MixedBatch(
            prompt_tokens=rng.randint(0, args.vocab, (b, p)).astype(np.int32),
            prompt_mask=np.ones((b, p), np.float32),
            response_tokens=rng.randint(0, args.vocab, (b, r)).astype(np.int32),
            response_mask=np.ones((b, r), np.float32), is_demo=np.ones(b, bool),
            group=np.arange(b, dtype=np.int32), reward=np.ones(b, np.float32),
            advantage=np.zeros(b, np.float32), old_logprobs=np.zeros((b, r), np.float32))
        mb = to_micro_batches(batch, b)
        b_sh = batch_shardings(mesh, mb)
        mb = jax.device_put(mb, b_sh)
        for name, fn in variants.items():
            step = jit_train_step(make_train_step(graphdef, tx, SRFTLossConfig(preset="sft"), 512),
                                  p_sh, o_sh, b_sh, mesh)
            prm = jax.tree.map(jnp.copy, params)
            opt = jax.jit(tx.init, out_shardings=o_sh)(prm)
            with using(fn):  # traced and compiled now, with this attention
                prm, opt, m = step(prm, opt, mb)
                jax.block_until_ready(m)
            steps[name], states[name] = step, (prm, opt)
            print(f"{name}: compiled, loss {float(m['loss']):.4f}", flush=True)
        wall = {n: [] for n in variants}
        cpu = {n: [] for n in variants}
        for _ in range(args.repeats):
            for name, step in steps.items():
                prm, opt = states[name]
                t, c = time.perf_counter(), time.process_time()
                prm, opt, m = step(prm, opt, mb)
                jax.block_until_ready(m)
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
                states[name] = (prm, opt)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    print(f"Llama-shaped D {args.hidden}, {args.layers} layers, batch {b} x ({p} + {r}) tokens, "
          f"{args.repeats} steps each in turns; load average {' '.join(load)} at the end")
    base_w, base_c = statistics.median(wall["blockwise"]), statistics.median(cpu["blockwise"])
    for name in variants:
        w, c = wall[name], cpu[name]
        print(f"  {name:9s} wall min {min(w):.3f} median {statistics.median(w):.3f} s/step; "
              f"cpu min {min(c):.3f} median {statistics.median(c):.3f} s/step; median vs blockwise: "
              f"wall {statistics.median(w) / base_w:.3f}, cpu {statistics.median(c) / base_c:.3f}")


if __name__ == "__main__":
    main()
