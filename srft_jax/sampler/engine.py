"""The host side: `Sampler.generate` pads and buckets the prompts, picks the slots, runs the
prefill and decode programs (compiled once per shape) and returns numpy rollouts.

Dims legend: B prompts (B_p of them on this process), G samples per prompt, N = B*G rows
(prompt-major: row b*G+g is sample g of prompt b), P prompt width (a prompt bucket), R response
width (max_new_tokens rounded up to a response bucket), S slots, D batch shards.

Flow of `generate(model, prompt_tokens[B,P0], prompt_mask[B,P0], num_samples=G)`:
  1. pad the prompts to the bucket width P, turn them right-padded (real tokens first: a row's
     token at position p then sits in cache slot p), and add padding prompts up to a multiple of
     the batch shards (several processes: up to the same count on every process);
  2. prefill (`loop.prefill`): one forward pass over the [B,P] prompts -- the prompt store;
  3. decode (`loop.decode`): S slots (`SamplerConfig.decode_slots`, 0 = all N rows) decode
     until every row has stopped, refilled on the device from per-shard queues;
  4. the outputs come back as numpy arrays in a `SampleOutput`.

Shapes are bucketed so that a training run compiles a handful of programs; every new compile is
logged, and `Sampler.stats` counts compiles, prefills and decode steps (tests assert on them).
Under a mesh (`jax.set_mesh(mesh)` or `generate(..., mesh=mesh)`) prompts, rows and slots are
split over ('data', 'fsdp'), the cache's key/value heads over 'tensor', and the decode loop
reads the weights in the decode layout (step.py). With several processes (`jax.distributed`)
each process passes its own prompt rows and gets its own rows' samples back from one global
prefill and decode (`distributed.to_global` / `to_local`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srft_jax import distributed
from srft_jax.sampler import loop
from srft_jax.sampler.config import SamplerConfig
from srft_jax.shapes import bucket_length, widen_left
from srft_jax.sampler.strategies import make_strategy

log = logging.getLogger(__name__)


# ---- outputs and counters -----------------------------------------------------------------------
@dataclass
class SampleOutput:
    """Rollouts as host numpy arrays, rows prompt-major (row b*G+g = sample g of prompt b).

    tokens int32[N,R]: response tokens, right-padded with the pad id after the stop token.
    mask float32[N,R]: 1 on real response tokens (the stop token included), 0 on padding.
    lengths int32[N]: number of real response tokens.
    finished_by_stop bool[N]: the row emitted a stop token (else it hit max_new_tokens).
    logprobs float32[N,R]: log-prob of each token under the distribution it was drawn from
      (temperature, top-k, top-p applied; 0 for greedy); 0 on padding.
    raw_logprobs float32[N,R]: log-prob of each token under the raw model (temperature 1,
      no filtering); 0 on padding.
    prompt_index int32[N]: index of the row's prompt in the input batch; sample_index int32[N].
    num_steps: token rounds: 1 (every row's first token, from the prefill) + the decode steps
      the loop ran; with all rows in slots (decode_slots 0) the longest row's length.
    """

    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    finished_by_stop: np.ndarray
    logprobs: np.ndarray
    raw_logprobs: np.ndarray
    prompt_index: np.ndarray
    sample_index: np.ndarray
    num_steps: int

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def response(self, row: int) -> np.ndarray:
        """The real response tokens of one row."""
        return self.tokens[row, : self.lengths[row]]


@dataclass
class SamplerStats:
    """Counters for logs and tests: compiles per program kind, and the work done."""

    prefill_compiles: int = 0
    decode_compiles: int = 0
    prefill_calls: int = 0
    prefill_rows: int = 0
    decode_calls: int = 0
    decode_rows: int = 0
    decode_steps: int = 0  # loop iterations (each one step of every slot)
    slot_steps: int = 0  # decode steps x slots: generated_tokens / slot_steps is the slot use
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # wall time of prefill calls (compiles included)
    decode_seconds: float = 0.0  # wall time of decode calls (compiles included)

    @property
    def compiles(self) -> int:
        return self.prefill_compiles + self.decode_compiles


# ---- host-side preparation ----------------------------------------------------------------------
def right_align(tokens: np.ndarray, mask: np.ndarray):
    """Left-padded [B,P] prompts rotated so that each row's real tokens come first."""
    shift = tokens.shape[1] - mask.sum(1)  # left padding of each row
    idx = (np.arange(tokens.shape[1])[None, :] + shift[:, None]) % tokens.shape[1]
    return np.take_along_axis(tokens, idx, 1), np.take_along_axis(mask, idx, 1)


def _pad_rows(tokens: np.ndarray, mask: np.ndarray, rows: int, pad_id: int):
    """Appends padding prompts (one real pad token) up to `rows` rows; they are never decoded."""
    extra = rows - tokens.shape[0]
    pad_tokens = np.full((extra, tokens.shape[1]), pad_id, np.int32)
    pad_mask = np.zeros((extra, tokens.shape[1]), mask.dtype)
    pad_mask[:, -1] = 1
    return np.concatenate([tokens, pad_tokens]), np.concatenate([mask, pad_mask])


def _check_prompts(tokens: np.ndarray, mask: np.ndarray) -> None:
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must both be [B,P]")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"empty prompt batch {tokens.shape}")
    if not np.all(mask[:, -1]):
        raise ValueError("every prompt needs at least one real token in the last column "
                         "(prompts must be left-padded)")
    if np.any(np.diff(mask.astype(np.int8), axis=1) < 0):
        raise ValueError("prompt_mask is not left-padded (a 1 is followed by a 0)")


def _as_key(rng: Union[int, jax.Array]) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def _active_mesh(mesh):
    if mesh is not None:
        return mesh
    current = jax.sharding.get_mesh()
    return None if current is None or current.empty else current


def slots_per_shard(decode_slots: int, rows_per_shard: int, shards: int) -> int:
    """S_d: all of a shard's rows for decode_slots 0, else its share of decode_slots (at least
    one slot, at most its rows)."""
    if decode_slots == 0:
        return rows_per_shard
    return max(1, min(-(-decode_slots // shards), rows_per_shard))


@dataclass
class _Batch:
    """Host arrays of one (global) sampler call: B prompts, right-padded to P."""

    tokens: np.ndarray  # int32[B, P]
    mask: np.ndarray  # int32[B, P]
    prompt_lens: np.ndarray  # int32[B]
    real: np.ndarray  # bool[B]
    ids: np.ndarray  # int32[B]


def _prepare(tokens, mask, ids, rows: int, width: int, pad_id: int) -> _Batch:
    """This process's left-padded prompts -> `rows` right-padded prompts of `width` tokens."""
    b = tokens.shape[0]
    if b:
        tokens, mask = widen_left(tokens, mask, width, pad_id)
    else:
        tokens, mask = np.zeros((0, width), np.int32), np.zeros((0, width), np.int32)
    tokens, mask = _pad_rows(tokens, mask, rows, pad_id)
    tokens, mask = right_align(tokens, mask)
    return _Batch(tokens, mask, mask.sum(1).astype(np.int32), np.arange(rows) < b,
                  np.concatenate([ids, np.zeros(rows - b, np.int32)]))


class Sampler:
    """Draws groups of rollouts from the live NNX `Decoder` the trainer is training.

    `Sampler(config, stop_ids, pad_id)` is cheap; compiled programs are cached per
    (model graph, shape bucket, strategy, cache dtype, slots) and each new one is logged.
    """

    def __init__(self, config: SamplerConfig, stop_ids: Sequence[int], pad_id: int):
        self.config = config
        self.stop_ids = tuple(int(t) for t in stop_ids)
        self.pad_id = int(pad_id)
        if any(t < 0 for t in self.stop_ids) or self.pad_id < 0:
            raise ValueError(f"stop_ids {self.stop_ids} and pad_id {self.pad_id} must be >= 0")
        self._stop_array = np.asarray(self.stop_ids or (-1,), np.int32)  # -1 never matches
        self.stats = SamplerStats()
        self._programs: dict[tuple, Any] = {}

    def _program(self, kind: str, graphdef, spec):
        key = (kind, graphdef, spec)
        fn = self._programs.get(key)
        if fn is None:
            log.info("sampler: compiling %s program for %s", kind, spec)
            if kind == "prefill":
                fn = jax.jit(functools.partial(loop.prefill, graphdef, spec))
                self.stats.prefill_compiles += 1
            else:
                fn = jax.jit(functools.partial(loop.decode, graphdef, spec))
                self.stats.decode_compiles += 1
            self._programs[key] = fn
        return fn

    def generate(self, model, prompt_tokens, prompt_mask, *, num_samples: int = 1,
                 rng: Union[int, jax.Array, None] = None, seed: Optional[int] = None,
                 prompt_ids=None, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None,
                 top_p: Optional[float] = None, top_k: Optional[int] = None,
                 decode_slots: Optional[int] = None, mesh=None) -> SampleOutput:
        """Samples `num_samples` responses for each left-padded prompt row.

        prompt_tokens int32[B,P0], prompt_mask [B,P0]: 1 on real tokens, left padding 0 (host
          or single-host device arrays; every row needs at least one real token).
        num_samples: G rollouts per prompt, sharing the prompt's prefill.
        rng / seed: a JAX key or an int seed (give at most one; default seed 0).
        prompt_ids int32[B]: global ids that seed each prompt's rows (default 0..B-1); give
          stable ids (e.g. dataset indices) to make a row's draws independent of batching.
        max_new_tokens / temperature / top_p / top_k / decode_slots: override the config for
          this call.
        mesh: shard over this mesh (default: the mesh set with `jax.set_mesh`, if any).
        Returns host numpy arrays (`SampleOutput`); the first call of a shape compiles.

        Several processes (`jax.process_count() > 1`, a mesh required): every process calls
        this together (the same settings and seed) with its own rows, B_p of them (0 allowed),
        and gets its own rows' samples back. The call samples one global batch: each process's
        rows are padded to the same count (a multiple of its share of the batch devices) and
        the prompt width to the widest process's; the default prompt_ids are then the rows'
        global positions, so pass global ids to get the draws of a one-process run.
        """
        overrides = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, decode_slots=decode_slots)
        cfg = self.config.replace(**{k: v for k, v in overrides.items() if v is not None})
        if rng is not None and seed is not None:
            raise ValueError("give rng or seed, not both")
        key = _as_key(rng if rng is not None else (seed or 0))
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        tokens = np.asarray(prompt_tokens, np.int32)
        mask = np.asarray(prompt_mask).astype(np.int32)
        mesh = _active_mesh(mesh)
        if jax.process_count() > 1:
            return self._generate_global(model, tokens, mask, num_samples, key, prompt_ids, cfg, mesh)
        _check_prompts(tokens, mask)
        b = tokens.shape[0]
        ids = np.arange(b, dtype=np.int32) if prompt_ids is None else np.asarray(prompt_ids, np.int32)
        if ids.shape != (b,):
            raise ValueError(f"prompt_ids must have shape ({b},), got {ids.shape}")
        shards = distributed.batch_shards(mesh) if mesh is not None else 1
        p = bucket_length(tokens.shape[1], cfg.prompt_buckets, "sampler.prompt_buckets")
        batch = _prepare(tokens, mask, ids, -(-b // shards) * shards, p, self.pad_id)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            arrays = (batch.tokens, batch.mask, batch.prompt_lens, batch.real, batch.ids)
            if mesh is not None:
                arrays = distributed.to_global(arrays, mesh, axis=0)
            out = jax.device_get(self._run(model, *arrays, key, num_samples, cfg, shards))
        return self._output(out, b, num_samples)

    def programs(self, graphdef, b: int, p: int, num_samples: int, cfg: SamplerConfig, shards: int):
        """(prefill, decode, decode spec): the jitted programs of a call with B = `b` prompts
        of bucketed width P = `p` (`srft-jax compile` lowers these same programs)."""
        r = bucket_length(cfg.max_new_tokens, cfg.response_buckets, "sampler.response_buckets")
        s = shards * slots_per_shard(cfg.decode_slots, b // shards * num_samples, shards)
        spec = loop.DecodeSpec(
            batch=b, prompt_len=p, num_samples=num_samples, response_len=r, slots=s,
            shards=shards, kv_block=cfg.kv_block,
            strategy=make_strategy(cfg.temperature, cfg.top_p, cfg.top_k),
            kv_cache_dtype=cfg.kv_cache_dtype, lora_merge=cfg.lora_merge)
        prefill = self._program("prefill", graphdef, loop.PrefillSpec(b, p, cfg.kv_cache_dtype))
        return prefill, self._program("decode", graphdef, spec), spec

    def _run(self, model, tokens, mask, prompt_lens, real, ids, key, num_samples: int,
             cfg: SamplerConfig, shards: int) -> dict:
        """Prefill and decode of B (global) right-padded prompts [B,P]; the decode outputs and
        the number of slots."""
        b, p = tokens.shape
        graphdef, state = nnx.split(model)
        prefill, decode, spec = self.programs(graphdef, b, p, num_samples, cfg, shards)
        s = spec.slots
        t0 = time.perf_counter()
        store, last_logits = jax.block_until_ready(prefill(state, tokens, mask))
        t1 = time.perf_counter()
        out = jax.block_until_ready(decode(state, store, last_logits, prompt_lens, real, key, ids,
                                           np.int32(cfg.max_new_tokens), self._stop_array,
                                           np.int32(self.pad_id)))
        self.stats.prefill_seconds += t1 - t0
        self.stats.decode_seconds += time.perf_counter() - t1
        return {**out, "slots": s}

    def _output(self, out: dict, b: int, num_samples: int) -> SampleOutput:
        """The first b prompts' rows of host outputs, counted in the stats."""
        n = b * num_samples
        self.stats.prefill_calls += 1
        self.stats.prefill_rows += b
        self.stats.decode_calls += 1
        self.stats.decode_rows += n
        self.stats.decode_steps += int(out["num_steps"]) - 1
        self.stats.slot_steps += out["slots"] * (int(out["num_steps"]) - 1)
        self.stats.generated_tokens += int(out["lengths"][:n].sum())
        return SampleOutput(
            tokens=out["tokens"][:n], mask=out["mask"][:n], lengths=out["lengths"][:n],
            finished_by_stop=out["finished_by_stop"][:n], logprobs=out["logprobs"][:n],
            raw_logprobs=out["raw_logprobs"][:n],
            prompt_index=np.repeat(np.arange(b, dtype=np.int32), num_samples),
            sample_index=np.tile(np.arange(num_samples, dtype=np.int32), b),
            num_steps=int(out["num_steps"]))

    def _generate_global(self, model, tokens, mask, num_samples: int, key, prompt_ids,
                         cfg: SamplerConfig, mesh) -> SampleOutput:
        """`generate` with several processes: this process's rows -> one global batch -> its rows."""
        if mesh is None:
            raise ValueError("with several processes, Sampler.generate needs a mesh "
                             "(mesh=... or jax.set_mesh)")
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must both be [B,P]")
        b = tokens.shape[0]
        if b:
            _check_prompts(tokens, mask)
        shard = distributed.data_shard(mesh)
        shards = distributed.batch_shards(mesh)
        per_process = shards // shard.count  # batch devices per data shard
        most, width = distributed.process_max([b, tokens.shape[1] if b else 0])
        if most == 0 or width == 0:
            raise ValueError("empty prompt batch on every process")
        rows = -(-most // per_process) * per_process  # B_s: this process's share of the batch
        if prompt_ids is None:
            ids = shard.index * rows + np.arange(b, dtype=np.int32)
        else:
            ids = np.asarray(prompt_ids, np.int32)
            if ids.shape != (b,):
                raise ValueError(f"prompt_ids must have shape ({b},), got {ids.shape}")
        p = bucket_length(width, cfg.prompt_buckets, "sampler.prompt_buckets")
        batch = _prepare(tokens, mask, ids, rows, p, self.pad_id)
        with jax.set_mesh(mesh):
            arrays = (batch.tokens, batch.mask, batch.prompt_lens, batch.real, batch.ids)
            inputs = distributed.to_global(arrays, mesh, axis=0, shard=shard)
            out = self._run(model, *inputs, key, num_samples, cfg, shards)
            scalars = {k: distributed.to_local(out.pop(k)) for k in ("num_steps", "slots")}
            out = distributed.to_local(out, axis=0, shard=shard)
        return self._output({**out, **scalars}, b, num_samples)
