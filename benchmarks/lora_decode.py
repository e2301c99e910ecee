"""LoRA in the sampler: adapters folded into the decode layout's weights once per call
(`sampler.lora_merge: true`, the default) against adding `(x A) B` on every decode step
(`false`), with the model without adapters as the floor. CPU, float32, one process.

    python benchmarks/lora_decode.py                 # a few minutes on 2 busy CPU cores
    python benchmarks/lora_decode.py --rank 16 --repeats 3

Model: Llama-shaped, random weights (hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048,
vocab 32000: ~110M parameters), LoRA rank --rank on all 7 projections with random (non-zero)
B. Greedy `Sampler.generate` of a batch of 8 random 64-token prompts, exactly --new-tokens new
tokens (no stop ids), after one warm-up call that compiles. Runs are interleaved and the best of
--repeats is kept for each (the machine is shared; the best run is the least disturbed one).

Prints tokens/s of the three and the comparable numbers:
  merged / unmerged   tokens/s ratio (> 1: merging is faster)
  merged / base       tokens/s ratio (1 = the adapters cost nothing while sampling)
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    from flax import nnx

    from srft_jax.models.config import ModelConfig
    from srft_jax.models.lora import with_adapters
    from srft_jax.models.weights import create_sharded_model
    from srft_jax.sampler import Sampler, SamplerConfig

    cfg = ModelConfig(arch="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                      num_heads=12, num_kv_heads=4, tie_word_embeddings=True, attention_bias=False)
    base = create_sharded_model(cfg, seed=0)
    lora = with_adapters(base, cfg.replace(lora_rank=args.rank, lora_alpha=float(2 * args.rank)), seed=1)
    adapters = nnx.to_pure_dict(nnx.state(lora, nnx.LoRAParam))
    keys = iter(jax.random.split(jax.random.key(2), 64))
    nnx.update(lora, jax.tree_util.tree_map_with_path(
        lambda p, x: 0.01 * jax.random.normal(next(keys), x.shape) if str(p[-1].key) == "lora_b" else x, adapters))
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    print(f"model: {cfg.num_params() / 1e6:.1f}M parameters, LoRA rank {args.rank} on 7 projections: "
          f"{n_adapter / 1e6:.2f}M adapter parameters; batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, float32, {jax.devices()[0].platform}")

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    sampler_cfg = SamplerConfig(temperature=0.0, max_new_tokens=args.new_tokens,
                                response_buckets=(args.new_tokens,), prompt_buckets=(args.prompt_len,))
    runs = {
        "merged": (Sampler(sampler_cfg.replace(lora_merge=True), stop_ids=[], pad_id=0), lora),
        "unmerged": (Sampler(sampler_cfg.replace(lora_merge=False), stop_ids=[], pad_id=0), lora),
        "base (no adapters)": (Sampler(sampler_cfg, stop_ids=[], pad_id=0), base),
    }
    outputs = {}
    for name, (sampler, model) in runs.items():  # warm-up: compiles
        outputs[name] = sampler.generate(model, tokens, mask, seed=0).tokens
    same = np.array_equal(outputs["merged"], outputs["unmerged"])
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, (sampler, model) in runs.items():
            t0 = time.perf_counter()
            sampler.generate(model, tokens, mask, seed=0)
            best[name] = min(best[name], time.perf_counter() - t0)
    rate = {name: args.batch * args.new_tokens / t for name, t in best.items()}
    for name in runs:
        print(f"{name}: {rate[name]:.1f} tokens/s (best of {args.repeats}: {best[name]:.2f} s per call)")
    print(f"merged and unmerged greedy tokens identical: {same}")
    print(f"merged / unmerged: {rate['merged'] / rate['unmerged']:.3f}")
    print(f"merged / base: {rate['merged'] / rate['base (no adapters)']:.3f}")


if __name__ == "__main__":
    main()
