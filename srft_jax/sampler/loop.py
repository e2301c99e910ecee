"""The jitted programs: prefill, and the decode loop with its slots and its queue of waiting rows.

Dims legend:
  B prompts, G samples per prompt, N = B*G rows (prompt-major: row b*G+g is sample g of prompt
  b), P prompt width, R response width, S slots, D batch shards (devices along ('data','fsdp');
  1 without a mesh), B_d = B / D, N_d = N / D, S_d = S / D, V vocabulary, L layers,
  K key/value heads, H head dim.

`prefill(graphdef, spec, state, tokens[B,P], mask[B,P])`: the decoder's own forward pass over
right-padded prompts (real tokens first) writes a P-slot `KVCache` -- the *prompt store*, one
entry per prompt, shared by its G samples -- and gives the float32 logits of each prompt's last
real token [B,V].

`decode(graphdef, spec, state, store, last_logits, ...)`: continuous batching on the device.
  1. Every row's first token is drawn from its prompt's prefill logits (one batch of N rows).
  2. Rows wait in per-shard queues: shard d owns prompts [d*B_d, (d+1)*B_d) -- its share of the
     batch-sharded prompt store -- their N_d rows, its block of the outputs and S_d slots, so
     every copy below stays on the devices that hold both ends. A free slot takes the shard's
     next waiting row (prompt-major, so a group's rows follow each other): its prompt's cache
     entries are copied from the store into the slot (positions [0, P)), the row's step count,
     position and first token are set.
  3. `lax.while_loop` until no slot is live and every queue is empty; each iteration runs one
     `decode_step` of all S slots (reading the cache blocks up to the longest live row), draws
     one token per slot with the row's own key at the row's own step, records it in the
     outputs [N,R] at (row, step), and refills the slots whose row just stopped (stop token or
     max_new tokens) from the queue.
  Nothing returns to the host until the loop ends: refill decisions are functions of the
  device state, so every process of a multi-host run makes the same ones.

With S = N (decode_slots 0) every row is admitted at once and the loop is the static batch of
earlier versions; with S < N the KV cache holds S rows. A row's tokens, log-probs and length do
not depend on S: its key is fold_in(fold_in(fold_in(seed, prompt id), sample), step), its cache
layout and its attention blocks are the same in any slot (see step.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax.models.decoder import KVCache, positions_from_mask
from srft_jax.sampler.step import (CACHE_AXES, SlotCache, block_sizes, decode_model, decode_step,
                                   empty_cache, live_block_count, to_storage)
from srft_jax.sampler.strategies import Strategy, draw

F32 = jnp.float32
STORE_AXES = ("layers", "batch", "kv_heads", None, None)  # KVCache k [L,B,K,H,P], v [L,B,K,P,H]


# ---- static settings (hashable: part of the compile-cache key) ----------------------------------
@dataclass(frozen=True)
class PrefillSpec:
    batch: int  # B prompts
    prompt_len: int  # P (bucketed)
    kv_cache_dtype: Optional[str]


@dataclass(frozen=True)
class DecodeSpec:
    batch: int  # B prompts (a multiple of shards)
    prompt_len: int  # P
    num_samples: int  # G
    response_len: int  # R: output width; the cache holds P + R slots per row
    slots: int  # S (a multiple of shards, at most N)
    shards: int  # D batch shards
    kv_block: int
    strategy: Strategy
    kv_cache_dtype: Optional[str]
    lora_merge: bool = True  # fold LoRA adapters into the decode layout's weights (see decode_model)

    def __post_init__(self):
        if self.batch % self.shards or self.slots % self.shards:
            raise ValueError(f"batch {self.batch} and slots {self.slots} must be multiples of the "
                             f"{self.shards} batch shards")
        if not 0 < self.slots <= self.rows:
            raise ValueError(f"slots {self.slots} must be in [1, {self.rows}]")

    @property
    def rows(self) -> int:
        return self.batch * self.num_samples

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.response_len


# ---- prefill ----------------------------------------------------------------------------------
def _constrain_store(cache: KVCache) -> KVCache:
    c = lambda a: mesh_lib.constrain(a, STORE_AXES)
    return KVCache(c(cache.k), c(cache.v), mesh_lib.constrain(cache.valid, ("batch", "cache_seq")),
                   cache.index)


def prefill(graphdef, spec: PrefillSpec, state, tokens, mask):
    """Right-padded prompts tokens, mask [B,P] -> (prompt store: KVCache of P slots, float32
    logits of each prompt's last real token [B,V])."""
    model = nnx.merge(graphdef, state)
    tokens = mesh_lib.constrain(tokens, ("batch", None))
    mask = mesh_lib.constrain(mask, ("batch", None))
    cache = _constrain_store(model.init_cache(spec.batch, spec.prompt_len, spec.kv_cache_dtype))
    hidden, cache = model.hidden_states(tokens, mask, positions_from_mask(mask), cache)
    last = jnp.sum(mask.astype(jnp.int32), axis=1) - 1  # [B]
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    return _constrain_store(cache), model.logits(hidden)[:, 0]


# ---- loop state ---------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclass
class Slots:
    """What each of the S slots decodes. row: the row's index within its shard (N_d rows);
    t: tokens the row has drawn; pos: position (and cache slot) of `last`, the token to feed;
    live: the row is still generating; key: the row's key data."""

    row: jax.Array  # int32[S]
    t: jax.Array  # int32[S]
    pos: jax.Array  # int32[S]
    last: jax.Array  # int32[S]
    live: jax.Array  # bool[S]
    key: jax.Array  # uint32[S, ...]: jax.random.key_data of the row's key


@jax.tree_util.register_dataclass
@dataclass
class Queue:
    """Per shard: `next` waiting row (index among the shard's rows) and `length` rows to run."""

    next: jax.Array  # int32[D]
    length: jax.Array  # int32[D]


@jax.tree_util.register_dataclass
@dataclass
class Outputs:
    tokens: jax.Array  # int32[N, R], pad id after the row's last token
    logprobs: jax.Array  # f32[N, R]
    raw_logprobs: jax.Array  # f32[N, R]
    lengths: jax.Array  # int32[N]
    stopped: jax.Array  # bool[N]


@jax.tree_util.register_dataclass
@dataclass
class LoopState:
    slots: Slots
    queue: Queue
    out: Outputs
    cache: SlotCache
    rounds: jax.Array  # int32[]: decode steps run


@jax.tree_util.register_dataclass
@dataclass
class Waiting:
    """Read-only inputs of a refill: the prompt store and every row's first token."""

    store_k: tuple  # L x [B, K, H, P]
    store_v: tuple  # L x [B, K, P, H]
    prompt_lens: jax.Array  # int32[B]
    first: jax.Array  # int32[N]: token 0 of each row
    first_done: jax.Array  # bool[N]: the row ends at token 0
    keys: jax.Array  # uint32[N, ...]: key data of each row


# ---- per-shard updates (run on each shard's own rows: shard_map under a mesh) -------------------
def _spec(x, mesh):
    """Sharding of a loop array: scalars replicated, 4-D cache arrays as `CACHE_AXES`, the
    rest split along their leading (slot / row / prompt / shard) axis."""
    if x.ndim == 0:
        return jax.sharding.PartitionSpec()
    axes = CACHE_AXES if x.ndim == 4 else ("batch",) + (None,) * (x.ndim - 1)
    return mesh_lib.logical_to_spec(axes, x.shape, mesh)


def per_shard(fn, *args):
    """fn applied to each batch shard's own part of args (all arrays' leading axes split D ways,
    see `_spec`); fn itself without a mesh."""
    mesh = mesh_lib.current_mesh()
    if mesh is None:
        return fn(*args)
    out = jax.eval_shape(fn, *args)
    specs = lambda tree: jax.tree.map(lambda x: _spec(x, mesh), tree)
    return jax.shard_map(fn, in_specs=specs(args), out_specs=specs(out))(*args)


def _copy_prompt(cache: SlotCache, waiting: Waiting, slot, prompt) -> SlotCache:
    """Cache positions [0, P) of `slot` <- the store entry of `prompt` (local indices)."""
    p = waiting.store_v[0].shape[2]

    def layer(blocks, store, axis):  # axis: the slot axis (3 for keys, 2 for values)
        out, start = [], 0
        for b in blocks:
            n = min(b.shape[axis], p - start)
            if n > 0:
                begin, size = [prompt, 0, 0, 0], list(store.shape)
                begin[axis], size[0], size[axis] = start, 1, n
                piece = to_storage(jax.lax.dynamic_slice(store, begin, size), cache.dtype)
                b = jax.lax.dynamic_update_slice(b, piece, (slot, 0, 0, 0))
            out.append(b)
            start += b.shape[axis]
        return tuple(out)

    return SlotCache(tuple(layer(b, s, 3) for b, s in zip(cache.k, waiting.store_k)),
                     tuple(layer(b, s, 2) for b, s in zip(cache.v, waiting.store_v)), cache.dtype)


def admit(num_samples: int, slots: Slots, queue: Queue, cache: SlotCache, waiting: Waiting):
    """Fills this shard's free slots with its next waiting rows, in slot order."""
    free = ~slots.live
    item = queue.next[0] + jnp.cumsum(free.astype(jnp.int32)) - 1  # [S_d]
    take = free & (item < queue.length[0])
    row = jnp.clip(item, 0, waiting.first.shape[0] - 1)
    prompt = row // num_samples
    pick = lambda new, old: jnp.where(take.reshape(take.shape + (1,) * (old.ndim - 1)), new, old)
    slots = Slots(row=pick(row, slots.row), t=pick(jnp.ones_like(slots.t), slots.t),
                  pos=pick(waiting.prompt_lens[prompt], slots.pos),
                  last=pick(waiting.first[row], slots.last),
                  live=pick(~waiting.first_done[row], slots.live),
                  key=pick(waiting.keys[row], slots.key))
    count = jnp.sum(take.astype(jnp.int32))
    order = jnp.argsort(~take, stable=True)  # the slots taken first, in slot order
    cache = jax.lax.fori_loop(
        0, count, lambda i, c: _copy_prompt(c, waiting, order[i], prompt[order[i]]), cache)
    return slots, Queue(queue.next + count, queue.length), cache


def record(slots: Slots, out: Outputs, tokens, logprobs, raw, is_stop, max_new):
    """Writes each live slot's new token at (row, t) and advances or ends its row
    (is_stop bool[S_d]: the token is a stop token)."""
    live = slots.live
    row = jnp.where(live, slots.row, out.lengths.shape[0])  # out of range: dropped
    t = slots.t
    hit = live & is_stop
    put = lambda buf, x: buf.at[row, t].set(x.astype(buf.dtype), mode="drop")
    out = Outputs(tokens=put(out.tokens, tokens), logprobs=put(out.logprobs, logprobs),
                  raw_logprobs=put(out.raw_logprobs, raw),
                  lengths=out.lengths.at[row].set(t + 1, mode="drop"),
                  stopped=out.stopped.at[row].set(hit, mode="drop"))
    done = hit | (t + 1 >= max_new)
    step = lambda x: jnp.where(live, x + 1, x)
    slots = dataclasses.replace(slots, t=step(t), pos=step(slots.pos),
                                last=jnp.where(live, tokens, slots.last), live=live & ~done)
    return slots, out


# ---- the decode program -------------------------------------------------------------------------
def _row_keys(rng: jax.Array, prompt_ids: jax.Array, num_samples: int) -> jax.Array:
    """One key per row from (base key, global prompt id, sample index). Returns keys [N]."""
    per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(rng, prompt_ids)  # [B]
    samples = jnp.arange(num_samples, dtype=jnp.uint32)
    per_row = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, samples))(per_prompt)
    return per_row.reshape(-1)


def _first_tokens(spec: DecodeSpec, last_logits, real, row_keys, max_new, stop_ids, pad_id):
    """Every row's token 0 from its prompt's prefill logits: (Outputs with column 0 written,
    token 0 [N], ends-at-token-0 [N])."""
    g, n, r = spec.num_samples, spec.rows, spec.response_len
    logits = mesh_lib.constrain(jnp.repeat(last_logits, g, axis=0), ("batch", None))
    tokens, logprobs, raw = draw(spec.strategy, logits, row_keys, jnp.zeros((), jnp.int32))
    real = jnp.repeat(real, g)
    stop = jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)
    buf = lambda fill, dt: mesh_lib.constrain(jnp.full((n, r), fill, dt), ("batch", None))
    out = Outputs(tokens=buf(pad_id, jnp.int32).at[:, 0].set(jnp.where(real, tokens, pad_id)),
                  logprobs=buf(0, F32).at[:, 0].set(jnp.where(real, logprobs, 0.0)),
                  raw_logprobs=buf(0, F32).at[:, 0].set(jnp.where(real, raw, 0.0)),
                  lengths=real.astype(jnp.int32), stopped=real & stop)
    return out, tokens, stop | (max_new <= 1)


def decode(graphdef, spec: DecodeSpec, state, store: KVCache, last_logits, prompt_lens, real, rng,
           prompt_ids, max_new, stop_ids, pad_id):
    """The decode loop. store: the prefill's KVCache (P slots); last_logits f32[B,V];
    prompt_lens int32[B] real prompt tokens; real bool[B] (False: a padding prompt, never
    decoded; within each shard the real prompts come first); rng a key; prompt_ids int32[B];
    max_new int32[] <= R; stop_ids int32[num stops] (-1 entries never match); pad_id int32[].
    Returns the outputs (tokens, mask, lengths, finished_by_stop, logprobs, raw_logprobs) and
    num_steps = 1 + decode steps run."""
    dm = decode_model(nnx.merge(graphdef, state), merge_lora=spec.lora_merge)
    cfg = dm.config
    g, s, d = spec.num_samples, spec.slots, spec.shards
    row_keys = _row_keys(rng, prompt_ids, g)
    out, first, first_done = _first_tokens(spec, last_logits, real, row_keys, max_new, stop_ids, pad_id)
    store = _constrain_store(store)
    waiting = Waiting(tuple(store.k), tuple(store.v), prompt_lens, first, first_done,
                      mesh_lib.constrain(jax.random.key_data(row_keys), ("batch", None)))
    per_real = jnp.sum(real.reshape(d, -1).astype(jnp.int32), axis=1)  # [D]
    queue = Queue(jnp.zeros((d,), jnp.int32), mesh_lib.constrain(per_real * g, ("batch",)))
    zeros = lambda dt, tail=(): mesh_lib.constrain(jnp.zeros((s,) + tail, dt),
                                                   ("batch",) + (None,) * len(tail))
    slots = Slots(row=zeros(jnp.int32), t=zeros(jnp.int32), pos=zeros(jnp.int32),
                  last=zeros(jnp.int32), live=zeros(bool),
                  key=zeros(waiting.keys.dtype, waiting.keys.shape[1:]))
    cache = empty_cache(cfg.num_layers, s, cfg.num_kv_heads, cfg.head_dim,
                        block_sizes(spec.cache_len, spec.kv_block), spec.kv_cache_dtype or cfg.dtype)
    refill = lambda sl, q, c, w: admit(g, sl, q, c, w)
    slots, queue, cache = per_shard(refill, slots, queue, cache, waiting)
    wrap = lambda data: jax.random.wrap_key_data(data, impl=jax.random.key_impl(rng))

    def cond(st: LoopState):
        return jnp.any(st.slots.live) | jnp.any(st.queue.next < st.queue.length)

    def body(st: LoopState) -> LoopState:
        sl = st.slots
        live_blocks = live_block_count(sl.pos, sl.live, spec.kv_block)
        logits, cache = decode_step(dm, sl.last, sl.pos, st.cache, live_blocks)
        tokens, logprobs, raw = draw(spec.strategy, logits, wrap(sl.key), sl.t)
        is_stop = jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)

        def advance(sl, q, out, c, w, tokens, logprobs, raw, is_stop, max_new):
            sl, out = record(sl, out, tokens, logprobs, raw, is_stop, max_new)
            sl, q, c = admit(g, sl, q, c, w)
            return sl, q, out, c

        sl, queue, out, cache = per_shard(advance, sl, st.queue, st.out, cache, waiting, tokens,
                                          logprobs, raw, is_stop, max_new)
        return LoopState(sl, queue, out, cache, st.rounds + 1)

    final = jax.lax.while_loop(cond, body, LoopState(slots, queue, out, cache,
                                                     jnp.zeros((), jnp.int32)))
    o = final.out
    mask = (jnp.arange(spec.response_len)[None, :] < o.lengths[:, None]).astype(F32)
    return dict(tokens=o.tokens, mask=mask, lengths=o.lengths, finished_by_stop=o.stopped,
                logprobs=o.logprobs, raw_logprobs=o.raw_logprobs, num_steps=final.rounds + 1)
