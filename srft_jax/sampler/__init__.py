"""Rollout sampler: prefill each prompt once, share its KV cache across the group, decode with
continuous batching in one jitted loop.

Modules (one concern each):
  config.py      `SamplerConfig` and shape buckets
  strategies.py  `Greedy`, `Temperature`, `TopK`, `TopP` (one `sample` method each)
  step.py        one decode step: weights in the decode layout, the slot KV cache in blocks
  loop.py        the jitted programs: prefill, and the decode loop with its slots and queues
  engine.py      `Sampler` (host side: buckets, padding, program cache, several processes)

Randomness is per row: row (prompt id p, sample g) draws step t with the key
fold_in(fold_in(fold_in(base, p), g), t), so a row's tokens do not depend on the batch size, on
the other prompts in the batch, on the number of slots, or on where the row sits (pass global
`prompt_ids` to keep them fixed across batchings). Each row also records, for every sampled
token, its log-prob under the distribution it was drawn from (temperature and top-k/top-p
applied; 0 for greedy) and under the raw model (temperature 1, no filtering).

Public API: `Sampler`, `SamplerConfig`, `SampleOutput`, `SamplerStats`, the strategies,
`make_strategy` and `draw`; for benchmarks and memory analysis, the programs `prefill` / `decode` with their
static specs `PrefillSpec` / `DecodeSpec`, and the step pieces `decode_model`, `decode_step`,
`empty_cache`, `block_sizes`, `write_kv`, `storage_dtype`, `SlotCache`.
"""

from srft_jax.sampler.config import SamplerConfig
from srft_jax.sampler.engine import SampleOutput, Sampler, SamplerStats
from srft_jax.sampler.loop import DecodeSpec, PrefillSpec, decode, prefill
from srft_jax.sampler.step import (DecodeModel, SlotCache, block_sizes, decode_model, decode_step,
                                   empty_cache, storage_dtype, write_kv)
from srft_jax.sampler.strategies import Greedy, Strategy, Temperature, TopK, TopP, draw, make_strategy

__all__ = [
    "DecodeModel", "DecodeSpec", "Greedy", "PrefillSpec", "SampleOutput", "Sampler",
    "SamplerConfig", "SamplerStats", "SlotCache", "Strategy", "Temperature", "TopK", "TopP",
    "block_sizes", "decode", "decode_model", "decode_step", "draw", "empty_cache",
    "make_strategy", "prefill", "storage_dtype", "write_kv",
]
