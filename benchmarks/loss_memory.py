"""XLA temporary memory of the SRFT loss's value-and-grad: chunked vs plain log-prob/entropy.

Run:
    python benchmarks/loss_memory.py                      # paper shape, bf16, chunk 1024, 8 vocab blocks
    python benchmarks/loss_memory.py --vocab 152064 --chunk-size 512 --vocab-blocks 16 --dtype float32

Only lowers and compiles (no arrays are allocated, nothing runs; a few seconds on a laptop
CPU) on the default backend. Shape of the paper's setting: one sequence of 8192 response
tokens, Qwen2.5-Math-7B hidden 3584, vocabulary 151,936, bfloat16 hidden states and
unembedding as in training. The loss is `srft_loss` (paper preset) of the per-token
log-probs and entropies; gradients are taken with respect to the hidden states and the
unembedding matrix. "plain" materialises float32 logits `[B,T,V]` and calls
`token_logprobs_and_entropy`; "chunked" calls `chunked_token_logprobs_and_entropy`.
Prints `compile().memory_analysis().temp_size_in_bytes` of both and the ratio
chunked/plain (target: <= 1/8 = 0.125).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from srft_jax.losses import (
    SRFTLossConfig,
    chunked_token_logprobs_and_entropy,
    srft_loss,
    token_logprobs_and_entropy,
)


def make_loss(chunked: bool, chunk_size: int, vocab_blocks: int, config: SRFTLossConfig):
    def loss_fn(hidden, unembed, targets, batch):
        if chunked:
            lp, ent = chunked_token_logprobs_and_entropy(
                hidden, unembed, targets, chunk_size=chunk_size, vocab_blocks=vocab_blocks
            )
        else:
            logits = jnp.einsum("BTD,DV->BTV", hidden, unembed, preferred_element_type=jnp.float32)
            lp, ent = token_logprobs_and_entropy(logits, targets)
        loss, _ = srft_loss(lp, ent, batch, config)
        return loss

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))


def temp_bytes(fn, *args) -> tuple[int, dict]:
    analysis = fn.lower(*args).compile().memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    return analysis.temp_size_in_bytes, {f: getattr(analysis, f) for f in fields}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--vocab-blocks", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of hidden states and unembedding")
    args = parser.parse_args()

    b, t, d, v = args.batch, args.length, args.hidden, args.vocab
    dtype = jnp.dtype(args.dtype)
    sds = jax.ShapeDtypeStruct
    hidden = sds((b, t, d), dtype)
    unembed = sds((d, v), dtype)
    targets = sds((b, t), jnp.int32)
    batch = {
        "response_mask": sds((b, t), jnp.float32),
        "is_demo": sds((b,), jnp.bool_),
        "reward": sds((b,), jnp.float32),
        "advantage": sds((b,), jnp.float32),
        "old_logprobs": sds((b, t), jnp.float32),
    }
    config = SRFTLossConfig()
    print(
        f"backend={jax.default_backend()} B={b} T={t} D={d} V={v} chunk={args.chunk_size} "
        f"vocab_blocks={args.vocab_blocks} dtype={dtype.name}"
    )
    plain, plain_info = temp_bytes(make_loss(False, args.chunk_size, args.vocab_blocks, config), hidden, unembed, targets, batch)
    chunked, chunked_info = temp_bytes(make_loss(True, args.chunk_size, args.vocab_blocks, config), hidden, unembed, targets, batch)
    gib = 2**30
    print(f"plain   : temp {plain / gib:8.3f} GiB  {plain_info}")
    print(f"chunked : temp {chunked / gib:8.3f} GiB  {chunked_info}")
    print(f"ratio chunked/plain temp bytes = {chunked / plain:.4f} (target <= 0.125)")


if __name__ == "__main__":
    main()
