"""Continuous batching vs static chunks at equal KV-cache memory, on length-skewed rollouts (CPU).

    python benchmarks/sampler_continuous.py                  # both workloads, ~10 min on 2 cores
    python benchmarks/sampler_continuous.py --workload geometric --repeats 1

Workload: 32 prompts x 8 samples = 256 rows, up to 512 new tokens, KV memory for 64 rows at a
time (64 x (64 + 512) cache slots):
  - static chunks: `generate` on 8 prompts at a time (decode_slots 0: the call's 64 rows decode
    together until its longest row stops), 4 calls;
  - continuous: one `generate` on all 32 prompts with decode_slots 64 (a finished row's slot
    takes the next waiting row at once); the cache holds the same 64 rows (plus a prompt store
    of 32 x 64 slots instead of 8 x 64).
Both produce the same rollouts (checked: tokens and lengths equal); the comparable number is
generated tokens per second (prefill + decode wall time, compiles excluded by a warm-up;
best of --repeats, runs interleaved).

Model: Llama-shaped, hidden 512, 8 layers, 8 query heads sharing 2 key/value heads (grouped-query
attention, as in Qwen2.5 and Llama 3), MLP 1536, vocabulary 1024, float32, random
q/k/v/gate/up weights but zero attention-output and MLP-output weights, so that the residual
stream is the token embedding and the next-token distribution is a designed Markov chain on
three token classes (every layer still runs its full computation):
  - prompt tokens -> the first response token: a 'short' token with probability q, else 'long';
  - after a short token: the stop token with probability 1/96, else a short token;
  - after a long token: a long token (never stops: the row runs to the 512-token budget).
Workloads: `geometric` (q = 1: lengths geometric with mean 96 and a tail cut at 512) and
`long-cot` (q = 0.85: many short rows, a heavy tail of 15% at the budget -- the shape of
long chain-of-thought rollouts, where some traces run to the limit).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

V, D, LAYERS, HEADS, KV_HEADS, MLP = 1024, 512, 8, 8, 2, 1536
PROMPTS, SAMPLES, PROMPT_LEN, BUDGET, SLOTS = 32, 8, 64, 512, 64
STOP, PAD = 1, 0
SHORT = np.arange(2, 500)  # token classes (the rest are prompt tokens)
LONG = np.arange(500, 1000)
PROMPT_TOKENS = np.arange(1000, V)


def build_model(q_short: float, p_stop: float = 1 / 96):
    """The decoder whose next-token distribution is the Markov chain above."""
    import jax.numpy as jnp
    from flax import nnx

    from srft_jax.models.config import ModelConfig
    from srft_jax.models.decoder import Decoder

    cfg = ModelConfig(arch="llama", vocab_size=V, hidden_size=D, intermediate_size=MLP,
                      num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, attention_bias=False,
                      tie_word_embeddings=False, max_position_embeddings=1024)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    state = {0: PROMPT_TOKENS, 1: SHORT, 2: LONG}  # hidden unit -> tokens in that class
    emb = np.zeros((V, D), np.float32)
    for unit, tokens in state.items():
        emb[tokens, unit] = 1.0  # RMS-normalised: sqrt(D) on that unit
    logp = np.full((3, V), -1e4)
    logp[0, SHORT] = np.log(q_short / len(SHORT)) if q_short > 0 else -1e4
    logp[0, LONG] = np.log((1 - q_short) / len(LONG)) if q_short < 1 else -1e4
    logp[1, SHORT] = np.log((1 - p_stop) / len(SHORT))
    logp[1, STOP] = np.log(p_stop)
    logp[2, LONG] = np.log(1 / len(LONG))
    head = np.zeros((D, V), np.float32)
    head[:3] = logp / np.sqrt(D)
    model.embed.embedding[...] = jnp.asarray(emb)
    model.lm_head.kernel[...] = jnp.asarray(head)
    model.blocks.attn.o_proj.kernel[...] = jnp.zeros_like(model.blocks.attn.o_proj.kernel[...])
    model.blocks.mlp.down_proj.kernel[...] = jnp.zeros_like(model.blocks.mlp.down_proj.kernel[...])
    return model


def run(sampler, model, tokens, chunk: int, slots: int):
    """All prompts in calls of `chunk` prompts; returns (seconds, tokens [N,R], lengths [N])."""
    t = time.perf_counter()
    outs = [sampler.generate(model, tokens[i:i + chunk], np.ones_like(tokens[i:i + chunk]),
                             num_samples=SAMPLES, seed=1, prompt_ids=np.arange(i, i + chunk),
                             decode_slots=slots)
            for i in range(0, len(tokens), chunk)]
    dt = time.perf_counter() - t
    return dt, np.concatenate([o.tokens for o in outs]), np.concatenate([o.lengths for o in outs])


def workload(name: str, q_short: float, repeats: int) -> float:
    from srft_jax.sampler import Sampler, SamplerConfig

    model = build_model(q_short)
    tokens = np.random.RandomState(0).choice(PROMPT_TOKENS, (PROMPTS, PROMPT_LEN)).astype(np.int32)
    sampler = Sampler(SamplerConfig(temperature=1.0, max_new_tokens=BUDGET, prompt_buckets=(PROMPT_LEN,),
                                    response_buckets=(BUDGET,), kv_block=128), stop_ids=(STOP,), pad_id=PAD)
    per_call = SLOTS // SAMPLES
    run(sampler, model, tokens[:per_call], per_call, 0)  # warm-up: compiles both programs
    run(sampler, model, tokens, PROMPTS, SLOTS)
    static, cont = [], []
    for rep in range(repeats):
        s_before = sampler.stats.decode_steps
        dt_s, tok_s, len_s = run(sampler, model, tokens, per_call, 0)
        steps_s = sampler.stats.decode_steps - s_before
        c_before = sampler.stats.decode_steps
        dt_c, tok_c, len_c = run(sampler, model, tokens, PROMPTS, SLOTS)
        steps_c = sampler.stats.decode_steps - c_before
        assert np.array_equal(len_s, len_c) and np.array_equal(tok_s, tok_c), "rollouts differ"
        static.append(dt_s)
        cont.append(dt_c)
        print(f"  run {rep}: static chunks {dt_s:.2f}s ({steps_s} decode steps of {SLOTS} rows), "
              f"continuous {dt_c:.2f}s ({steps_c} steps of {SLOTS} slots)  (1-min load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    total = int(len_s.sum())
    hist = np.percentile(len_s, [10, 50, 90, 99])
    print(f"{name}: {len(len_s)} rows, {total} tokens; lengths p10/p50/p90/p99 = "
          f"{'/'.join(str(int(h)) for h in hist)}, {np.mean(len_s == BUDGET):.0%} at the budget")
    ratio = min(static) / min(cont)
    print(f"{name}: static chunks {total / min(static):.0f} tokens/s, continuous {total / min(cont):.0f} "
          f"tokens/s -> ratio {ratio:.2f} (target >= 2)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("both", "geometric", "long-cot"), default="both")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import jax

    print(f"model: Llama-shaped Markov chain, hidden {D}, {LAYERS} layers, vocab {V}, float32; "
          f"{PROMPTS} prompts x {SAMPLES} samples, budget {BUDGET}, KV for {SLOTS} rows; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    if args.workload in ("both", "geometric"):
        workload("geometric", 1.0, args.repeats)
    if args.workload in ("both", "long-cot"):
        workload("long-cot", 0.85, args.repeats)


if __name__ == "__main__":
    main()
