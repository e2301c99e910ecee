"""Training tokens/s of the jitted SRFT train step against PyTorch on the same weights (CPU).

    python benchmarks/train_step_vs_torch.py            # about 3-5 minutes on 2 CPU cores
    python benchmarks/train_step_vs_torch.py --layers 4 --hidden 256 --repeats 3

One Llama-shaped model with random weights (transformers, torch float32) is saved and loaded
into the JAX decoder with `load_pretrained`, so both sides hold the same parameters. Per step,
on the same batch (B sequences of P prompt + R response tokens):
  - ours: `train_step` (forward, chunked log-probs and entropies, SRFT loss with the `sft`
    preset over the response tokens, backward, AdamW with grad-norm clipping);
  - torch: `model(input_ids, labels=...)` (cross entropy over the response tokens), backward,
    `clip_grad_norm_`, `torch.optim.AdamW.step()`.
Compiles are excluded (one warm-up step each). Prints tokens/s of each and the ratio.

Bound: both sides are bound by matrix-multiply throughput on a CPU. The script counts the least
work a step must do -- 6 FLOPs per parameter per token for the decoder blocks (every token) and
the output projection (response tokens only; torch projects every token), plus causal attention
(forward 2 x S^2 x D per layer and sequence, x 3 with the backward) -- and measures this
machine's float32 matrix-multiply rate in the same run (the faster of NumPy's and torch's BLAS
on the step's own [B*S, D] x [D, F] product, best of 5). Bound = FLOPs / rate: the fastest a
step could run; each side's share of it is printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM

    from srft_jax import mesh as mesh_lib
    from srft_jax.batch import MixedBatch, to_micro_batches
    from srft_jax.losses import SRFTLossConfig
    from srft_jax.models.weights import load_pretrained
    from srft_jax.train_step import (OptimizerConfig, batch_shardings, jit_train_step, make_optimizer,
                                     make_train_step, opt_state_shardings, param_shardings)

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=1024)
    hf = LlamaForCausalLM(hf_cfg)
    n_params = sum(p.numel() for p in hf.parameters())
    b, p, r = args.batch, args.prompt, args.response
    rng = np.random.RandomState(0)
    prompt = rng.randint(0, args.vocab, (b, p)).astype(np.int32)
    response = rng.randint(0, args.vocab, (b, r)).astype(np.int32)
    tokens_per_step = b * r

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=1), devices=jax.devices()[:1])
        with jax.set_mesh(mesh):
            model, _ = load_pretrained(d, mesh=mesh)
            graphdef, state = nnx.split(model)
            params = nnx.to_pure_dict(state)
            tx = make_optimizer(OptimizerConfig(lr=1e-5, weight_decay=0.01, grad_clip=1.0))
            p_sh = param_shardings(params, mesh)
            o_sh = opt_state_shardings(tx, params, p_sh, mesh)
            opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
            batch = MixedBatch(
                prompt_tokens=prompt, prompt_mask=np.ones((b, p), np.float32), response_tokens=response,
                response_mask=np.ones((b, r), np.float32), is_demo=np.ones(b, bool),
                group=np.arange(b, dtype=np.int32), reward=np.ones(b, np.float32),
                advantage=np.zeros(b, np.float32), old_logprobs=np.zeros((b, r), np.float32))
            mb = to_micro_batches(batch, b)
            b_sh = batch_shardings(mesh, mb)
            mb = jax.device_put(mb, b_sh)
            step = jit_train_step(make_train_step(graphdef, tx, SRFTLossConfig(preset="sft"), 512),
                                  p_sh, o_sh, b_sh, mesh)
            params, opt_state, m = step(params, opt_state, mb)
            jax.block_until_ready(m)
            ours = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                params, opt_state, m = step(params, opt_state, mb)
                jax.block_until_ready(m)
                ours.append(time.perf_counter() - t)

    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01)
    ids = torch.tensor(np.concatenate([prompt, response], 1), dtype=torch.long)
    labels = ids.clone()
    labels[:, :p] = -100

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = hf(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()

    torch_step()
    theirs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        torch_step()
        theirs.append(time.perf_counter() - t)

    # Least work of one step, and this machine's matmul rate (same run).
    d, f, v, L, s_len = args.hidden, hf_cfg.intermediate_size, args.vocab, args.layers, p + r
    body = L * (4 * d * d + 3 * d * f)
    flops = 6 * body * b * s_len + 6 * v * d * b * r + 3 * 2 * s_len * s_len * d * b * L
    x32 = rng.standard_normal((b * s_len, d)).astype(np.float32)
    w32 = rng.standard_normal((d, f)).astype(np.float32)
    rates = {}
    for name, mm, xa, wa in (("numpy", np.matmul, x32, w32),
                             ("torch", torch.matmul, torch.from_numpy(x32), torch.from_numpy(w32))):
        mm(xa, wa)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            mm(xa, wa)
            best = min(best, time.perf_counter() - t)
        rates[name] = 2 * b * s_len * d * f / best
    rate = max(rates.values())
    bound = flops / rate

    ours_tps = tokens_per_step / min(ours)
    torch_tps = tokens_per_step / min(theirs)
    print(f"model: Llama-shaped, {n_params / 1e6:.1f}M parameters, batch {b} x ({p} + {r}) tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"srft-jax train step: {min(ours):.3f} s/step, {ours_tps:.0f} response tokens/s")
    print(f"torch (transformers): {min(theirs):.3f} s/step, {torch_tps:.0f} response tokens/s")
    print(f"ratio (ours / torch): {ours_tps / torch_tps:.2f}")
    print(f"bound: {flops / 1e9:.0f} GFLOP per step at {rate / 1e9:.0f} GFLOP/s (matmul: numpy "
          f"{rates['numpy'] / 1e9:.0f}, torch {rates['torch'] / 1e9:.0f}) = {bound:.2f} s/step, "
          f"{tokens_per_step / bound:.0f} tokens/s; ours at {bound / min(ours):.0%} of it, "
          f"torch at {bound / min(theirs):.0%}")


if __name__ == "__main__":
    main()
