"""Prefill time saved by sharing one prompt's KV cache across its group of samples (CPU).

    python benchmarks/sampler_group_sharing.py            # about 2-3 minutes on 2 CPU cores

Same Llama-shaped 110M-parameter model as benchmarks/sampler_throughput.py (random weights,
float32). One 512-token prompt, G = 8 samples of 32 new tokens each (temperature 1):
  shared:      `generate(prompt[1,512], num_samples=8)`: the prompt is prefilled once and its
               cache is repeated for the 8 rows;
  independent: `generate(prompt repeated [8,512], num_samples=1)`: 8 prefills of the same prompt.
Both produce 8 rows of 32 tokens. Times come from `Sampler.stats` (prefill and decode wall time
of each call, compiles excluded by a warm-up call); best of --repeats.

Prints the prefill times and the comparable number: prefill time saved = 1 - shared/independent.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from flax import nnx

    from srft_jax.models.config import ModelConfig
    from srft_jax.models.decoder import Decoder
    from srft_jax.sampler import Sampler, SamplerConfig

    cfg = ModelConfig(arch="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_layers=12, num_heads=12, num_kv_heads=12, attention_bias=False,
                      tie_word_embeddings=True, max_position_embeddings=1024)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    p, g, new = args.prompt_len, args.samples, args.new_tokens
    prompt = np.random.RandomState(0).randint(1, cfg.vocab_size, (1, p)).astype(np.int32)
    copies = np.repeat(prompt, g, axis=0)
    sampler = Sampler(SamplerConfig(temperature=1.0, max_new_tokens=new, prompt_buckets=(p,),
                                    response_buckets=(new,)), stop_ids=(), pad_id=0)

    def run(tokens, num_samples):
        before = (sampler.stats.prefill_seconds, sampler.stats.decode_seconds)
        out = sampler.generate(model, tokens, np.ones_like(tokens), num_samples=num_samples,
                               seed=1)
        assert out.tokens.shape[0] == g
        return (sampler.stats.prefill_seconds - before[0], sampler.stats.decode_seconds - before[1])

    print(f"model: Llama-shaped, {cfg.num_params() / 1e6:.0f}M parameters, float32; prompt {p} "
          f"tokens, {g} samples of {new} new tokens")
    run(prompt, g)  # warm-up: compiles
    run(copies, 1)
    shared, independent = [], []
    for rep in range(args.repeats):
        shared.append(run(prompt, g))
        independent.append(run(copies, 1))
        print(f"run {rep}: shared prefill {shared[-1][0]:.2f}s decode {shared[-1][1]:.2f}s | "
              f"independent prefill {independent[-1][0]:.2f}s decode {independent[-1][1]:.2f}s")
    s_pre = min(t[0] for t in shared)
    i_pre = min(t[0] for t in independent)
    s_tot = min(sum(t) for t in shared)
    i_tot = min(sum(t) for t in independent)
    print(f"prefill: shared {s_pre:.2f}s vs independent {i_pre:.2f}s -> saved {i_pre - s_pre:.2f}s "
          f"({1 - s_pre / i_pre:.0%} of the prefill)")
    print(f"whole generate: shared {s_tot:.2f}s vs independent {i_tot:.2f}s "
          f"({1 - s_tot / i_tot:.0%} less)")


if __name__ == "__main__":
    main()
