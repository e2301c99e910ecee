"""`SamplerConfig`: the `sampler:` section of a training config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

KV_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
DEFAULT_RESPONSE_BUCKETS = (128, 512, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class SamplerConfig:
    """How rollouts are drawn.

    temperature: softmax temperature; 0 means greedy (argmax; top_p/top_k are then ignored).
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
      (after temperature and top-k) reaches top_p; 1.0 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    max_new_tokens: response tokens per sample (a generation stops earlier on a stop token).
    prompt_buckets: allowed prompt widths; a batch is padded to the smallest one that fits.
    response_buckets: allowed response widths; max_new_tokens is rounded up to the smallest one
      that fits, which sets the output width R (and the cache holds P + R slots per row).
    kv_cache_dtype: dtype of the KV cache ('float32', 'bfloat16', 'float16'); None = the
      model's compute dtype. 'bfloat16' halves cache memory for a float32 model.
    decode_slots: rows decoded at once (continuous batching). 0 = all N = B*G rows of a call
      together, each in its own slot. With S < N slots the call keeps S rows in flight: when a
      row stops, its slot takes the next waiting (prompt, sample) -- its prompt's prefilled
      cache is copied in, a prompt is still prefilled once for its whole group -- so the KV
      cache holds S rows, not N, and no slot idles while rows are waiting. The rollouts are the
      same whatever the value (a row's draws depend only on seed, prompt id, sample index and
      step). Counted over all devices; rounded up to a multiple of the batch shards.
    kv_block: slots per block of the KV cache. A decode step reads the blocks up to the one
      holding the longest live row's newest token and skips the rest, so its cost follows the
      longest live row, not the P + R slots allocated; smaller blocks skip more precisely, larger
      ones cost fewer per-block operations (L x (P + R) / kv_block of them per step).
    lora_merge: with a LoRA policy, fold the adapters into the weights once per sampler call
      (in the decode layout's copy, which exists anyway) instead of adding `(x A) B` on every
      decode step. The prefill always runs the adapters unmerged.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    response_buckets: tuple[int, ...] = DEFAULT_RESPONSE_BUCKETS
    kv_cache_dtype: Optional[str] = None
    decode_slots: int = 0
    kv_block: int = 512
    lora_merge: bool = True

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"sampler.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampler.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampler.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampler.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("prompt_buckets", "response_buckets"):
            buckets = tuple(getattr(self, name))
            object.__setattr__(self, name, buckets)
            if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
                raise ValueError(f"sampler.{name} must be a non-empty strictly increasing tuple of "
                                 f"positive ints, got {buckets}")
        if self.max_new_tokens > self.response_buckets[-1]:
            raise ValueError(f"sampler.max_new_tokens={self.max_new_tokens} exceeds the largest "
                             f"sampler.response_buckets entry {self.response_buckets[-1]}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"sampler.kv_cache_dtype={self.kv_cache_dtype!r}; choose one of "
                             f"{KV_DTYPES} or None")
        if self.decode_slots < 0:
            raise ValueError(f"sampler.decode_slots must be >= 0 (0 = all rows at once), got "
                             f"{self.decode_slots}")
        if self.kv_block < 1:
            raise ValueError(f"sampler.kv_block must be >= 1, got {self.kv_block}")

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)
