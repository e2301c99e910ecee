"""Rollout sampler: prefill each prompt once, share its KV cache across the group, decode in one loop.

Dims legend:
  B prompts in the batch, G samples per prompt, N = B*G rows (prompt-major: row b*G+g is
  sample g of prompt b), P prompt width (rounded up to a prompt bucket), R response width
  (max_new_tokens rounded up to a response bucket), S = P + R cache slots, V vocabulary,
  L layers, K key/value heads, H head dim.

Flow of `Sampler.generate(model, prompt_tokens[B,P0], prompt_mask[B,P0], num_samples=G)`:
  1. host: left-pad the prompts to the bucket width P; R = bucket(max_new_tokens).
  2. prefill (jitted once per shape): one forward pass over [B,P] into a KV cache of P slots;
     returns the cache and the float32 logits of the last prompt position [B,V].
  3. decode (jitted once per shape): the cache grows to S = P + R slots and each prompt's row is
     repeated G times (`KVCache.repeat`), so a prompt is prefilled once for its whole group; the
     first token is drawn from the prefill logits, then one `lax.while_loop` feeds one token per
     step and stops as soon as every row has emitted a stop token or max_new_tokens tokens.
     All rows advance in lockstep; a row that has stopped keeps running but its outputs are
     replaced by padding (tokens = pad id, mask 0, log-probs 0).
  4. host: the results come back as numpy arrays in a `SampleOutput`.

Randomness is per row: row (prompt id p, sample g) draws step t with the key
fold_in(fold_in(fold_in(base, p), g), t), so a row's tokens do not depend on the batch size, on
the other prompts in the batch, or on where the row sits (pass global `prompt_ids` to keep them
fixed across batchings). Sampling strategies (`Greedy`, `Temperature`, `TopK`, `TopP`) are tiny
frozen dataclasses with one method; their maths is float32 from the logits on.

Each row also records, for every sampled token, its log-prob under the distribution it was drawn
from (temperature and top-k/top-p applied; 0 for greedy, which is a point mass) and its log-prob
under the raw model (temperature 1, no filtering) for the RL importance ratios.

Shapes are bucketed so that a training run compiles a handful of programs; every new compile is
logged, and `Sampler.stats` counts compiles and prefill calls (tests assert on them). Under a
mesh (`jax.set_mesh(mesh)` or `generate(..., mesh=mesh)`) prompt rows are sharded over
('data', 'fsdp') and the cache's key/value heads over 'tensor'; the decoder constrains its own
activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax.models.decoder import KVCache, apply_rope, dtype_of, positions_from_mask, rope_inv_freq

log = logging.getLogger(__name__)

F32 = jnp.float32
KV_DTYPES = ("float32", "bfloat16", "float16")
_CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
_LAYER_CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")
_NEG = -1e30  # finite mask value, as in the decoder
_DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
_DEFAULT_RESPONSE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


# ---- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerConfig:
    """How rollouts are drawn.

    temperature: softmax temperature; 0 means greedy (argmax; top_p/top_k are then ignored).
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
      (after temperature and top-k) reaches top_p; 1.0 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    max_new_tokens: response tokens per sample (a generation stops earlier on a stop token).
    prompt_buckets: allowed prompt widths; a batch is left-padded to the smallest one that fits.
    response_buckets: allowed response widths; max_new_tokens is rounded up to the smallest one
      that fits, which sets the output width R and the cache length P + R.
    kv_cache_dtype: dtype of the KV cache ('float32', 'bfloat16', 'float16'); None = the
      model's compute dtype. 'bfloat16' halves cache memory for a float32 model.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    prompt_buckets: tuple[int, ...] = _DEFAULT_PROMPT_BUCKETS
    response_buckets: tuple[int, ...] = _DEFAULT_RESPONSE_BUCKETS
    kv_cache_dtype: Optional[str] = None

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

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)


def bucket(length: int, buckets: Sequence[int], field: str) -> int:
    """The smallest bucket >= length; fails naming the config field when none fits."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest sampler.{field} entry {buckets[-1]}; "
                     f"add a larger bucket")


# ---- sampling strategies ----------------------------------------------------------------------
def _draw(logprobs: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One categorical draw per row with that row's key. logprobs f32[N,V], keys [N]."""
    tokens = jax.vmap(jax.random.categorical)(keys, logprobs).astype(jnp.int32)  # [N]
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def _top_k_mask(scaled: jax.Array, k: int) -> jax.Array:
    """Sets every logit below the row's k-th largest to -inf (ties with it are kept)."""
    k = min(k, scaled.shape[-1])
    kth = jax.lax.top_k(scaled, k)[0][:, -1:]  # [N, 1]
    return jnp.where(scaled >= kth, scaled, -jnp.inf)


def _top_p_mask(scaled: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest prefix of the descending-sorted tokens whose mass reaches p (the token
    that crosses p is kept; ties with the last kept logit are kept too)."""
    desc = -jnp.sort(-scaled, axis=-1)  # [N, V] descending
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # [N, 1] >= 1
    threshold = jnp.take_along_axis(desc, keep - 1, axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


@dataclass(frozen=True)
class Greedy:
    """argmax; the sampling distribution is a point mass, so its log-prob is 0."""

    def sample(self, logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        tokens = jnp.argmax(logits.astype(F32), axis=-1).astype(jnp.int32)
        return tokens, jnp.zeros(tokens.shape, F32)


@dataclass(frozen=True)
class Temperature:
    """Draws from softmax(logits / temperature)."""

    temperature: float = 1.0

    def sample(self, logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _draw(jax.nn.log_softmax(logits.astype(F32) / self.temperature, axis=-1), keys)


@dataclass(frozen=True)
class TopK:
    """Draws from softmax(logits / temperature) restricted to the k most likely tokens."""

    temperature: float = 1.0
    k: int = 1

    def sample(self, logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        scaled = _top_k_mask(logits.astype(F32) / self.temperature, self.k)
        return _draw(jax.nn.log_softmax(scaled, axis=-1), keys)


@dataclass(frozen=True)
class TopP:
    """Nucleus sampling on softmax(logits / temperature), after an optional top-k (k=0: off)."""

    temperature: float = 1.0
    p: float = 1.0
    k: int = 0

    def sample(self, logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        scaled = logits.astype(F32) / self.temperature
        if self.k:
            scaled = _top_k_mask(scaled, self.k)
        return _draw(jax.nn.log_softmax(_top_p_mask(scaled, self.p), axis=-1), keys)


Strategy = Union[Greedy, Temperature, TopK, TopP]


def make_strategy(temperature: float, top_p: float = 1.0, top_k: int = 0) -> Strategy:
    """The strategy for these settings (HF order: temperature, then top-k, then top-p)."""
    if temperature == 0:
        return Greedy()
    if top_p < 1.0:
        return TopP(temperature, top_p, top_k)
    if top_k > 0:
        return TopK(temperature, top_k)
    return Temperature(temperature)


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
    num_steps: decode steps the loop ran (<= max_new_tokens; fewer when all rows stopped).
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
    """Counters for logs and tests: compiles per program kind, and prefill work done."""

    prefill_compiles: int = 0
    decode_compiles: int = 0
    prefill_calls: int = 0
    prefill_rows: int = 0
    decode_calls: int = 0
    decode_rows: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # wall time of prefill calls (compiles included)
    decode_seconds: float = 0.0  # wall time of decode calls (compiles included)

    @property
    def compiles(self) -> int:
        return self.prefill_compiles + self.decode_compiles


# ---- the jitted programs ---------------------------------------------------------------------
@dataclass(frozen=True)
class _PrefillShape:
    """Static settings of a prefill program (hashable; part of the compile-cache key)."""

    batch: int  # B prompts
    prompt_len: int  # P (bucketed)
    kv_cache_dtype: Optional[str]


@dataclass(frozen=True)
class _DecodeShape:
    """Static settings of a decode program (hashable; part of the compile-cache key)."""

    batch: int  # B prompts
    prompt_len: int  # P (bucketed)
    response_len: int  # R (bucketed)
    num_samples: int  # G
    strategy: Strategy
    kv_cache_dtype: Optional[str]


@jax.tree_util.register_dataclass
@dataclass
class DecodeCache:
    """The decode loop's KV cache: one buffer per layer in [N,K,S,H] layout.

    The decoder's `KVCache` stacks layers ([L,B,S,K,H]), which suits its layer scan; in a
    one-token step on CPU, XLA copies each layer's slice of stacked caches and weights and
    transposes [S,K] for the attention dots on every step. Separate per-layer buffers with the
    slot axis next to the head dim are updated in place and read once per step.
    """

    k: tuple[jax.Array, ...]  # L x [N, K, S, H]
    v: tuple[jax.Array, ...]  # L x [N, K, S, H]
    valid: jax.Array  # bool[N, S]: the slot holds a real token
    index: jax.Array  # int32[]: next slot to write


@jax.tree_util.register_dataclass
@dataclass
class _LoopState:
    step: jax.Array  # int32[]: tokens generated so far by every row
    last: jax.Array  # int32[N]: the token to feed next
    done: jax.Array  # bool[N]
    stopped: jax.Array  # bool[N]
    lengths: jax.Array  # int32[N]
    tokens: jax.Array  # int32[N, R]
    logprobs: jax.Array  # f32[N, R]
    raw_logprobs: jax.Array  # f32[N, R]
    cache: DecodeCache


def _constrain_cache(cache: KVCache) -> KVCache:
    return KVCache(mesh_lib.constrain(cache.k, _CACHE_AXES), mesh_lib.constrain(cache.v, _CACHE_AXES),
                   mesh_lib.constrain(cache.valid, ("batch", "cache_seq")), cache.index)


def _constrain_decode_cache(cache: DecodeCache) -> DecodeCache:
    c = lambda a: mesh_lib.constrain(a, _LAYER_CACHE_AXES)
    return DecodeCache(tuple(c(a) for a in cache.k), tuple(c(a) for a in cache.v),
                       mesh_lib.constrain(cache.valid, ("batch", "cache_seq")), cache.index)


def _prefill(graphdef, shape: _PrefillShape, state, tokens, mask):
    """[B,P] prompts -> (KV cache of P slots, float32 logits of the last position [B,V])."""
    model = nnx.merge(graphdef, state)
    tokens = mesh_lib.constrain(tokens, ("batch", None))
    mask = mesh_lib.constrain(mask, ("batch", None))
    cache = _constrain_cache(model.init_cache(shape.batch, shape.prompt_len, shape.kv_cache_dtype))
    hidden, cache = model.hidden_states(tokens, mask, positions_from_mask(mask), cache)
    return _constrain_cache(cache), model.logits(hidden[:, -1:])[:, 0]


def _to_decode_cache(cache: KVCache, extra: int, n: int) -> DecodeCache:
    """Prefilled [L,B,P,K,H] -> per-layer [B*n,K,P+extra,H]: `extra` empty slots after the
    prompt, each prompt row repeated n times (prompt-major), so the group shares one prefill."""
    def layer(a):  # [B, P, K, H] -> [B*n, K, P+extra, H]
        a = jnp.pad(jnp.swapaxes(a, 1, 2), ((0, 0), (0, 0), (0, extra), (0, 0)))
        return jnp.repeat(a, n, axis=0) if n > 1 else a

    num_layers = cache.k.shape[0]
    valid = jnp.pad(cache.valid, ((0, 0), (0, extra)))
    return _constrain_decode_cache(DecodeCache(
        tuple(layer(cache.k[i]) for i in range(num_layers)),
        tuple(layer(cache.v[i]) for i in range(num_layers)),
        jnp.repeat(valid, n, axis=0) if n > 1 else valid, cache.index))


# ---- one decode step in the sampling layout ----------------------------------------------------
def layer_blocks(model) -> list:
    """The decoder's stacked blocks as L per-layer `Block` modules (static slices)."""
    block_def, block_state = nnx.split(model.blocks)
    return [nnx.merge(block_def, jax.tree.map(lambda a, i=i: a[i], block_state))
            for i in range(model.config.num_layers)]


def _project(p, x: jax.Array) -> jax.Array:
    """x [N,T,D] through a decoder `Projection` with kernel [D,heads,H] -> [N,T,heads,H]."""
    y = jnp.einsum("BTD,DNH->BTNH", x, p.kernel[...].astype(x.dtype))
    return y if p.bias is None else y + p.bias[...].astype(x.dtype)


def _attention_step(attn, x, positions, inv_freq, k_cache, v_cache, visible, index):
    """The decoder's attention (same projections, q/k norm, RoPE, GQA and masking) for T new
    tokens against one layer's cache in [N,K,S,H] layout. x [N,T,D]; visible bool[N,T,S].
    Returns (out [N,T,D], k_cache, v_cache) with the new keys/values written at `index`."""
    q, k, v = _project(attn.q_proj, x), _project(attn.k_proj, x), _project(attn.v_proj, x)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = apply_rope(q, positions, inv_freq)  # [N, T, Nq, H]
    k = apply_rope(k, positions, inv_freq)  # [N, T, K, H]
    put = lambda buf, new: jax.lax.dynamic_update_slice(
        buf, jnp.swapaxes(new, 1, 2).astype(buf.dtype), (0, 0, index, 0))
    k_cache, v_cache = put(k_cache, k), put(v_cache, v)
    b, t, n, h = q.shape
    kh = attn.num_kv_heads
    # [N, K, G*T, H]: rows of one KV head together. The two attention contractions are written
    # as dot_generals with batch dims (N, K) first, so the cache is read in place and the
    # output comes out as [N, K, G*T, H] (with explicit einsums XLA may instead transpose the
    # o_proj weight on every step).
    g = n // kh
    q = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(q, k_cache.astype(x.dtype), (((3,), (3,)), batch),
                                 preferred_element_type=F32)  # [N, K, G*T, S]
    scores = scores.reshape(b, kh, g, t, -1)
    scores = jnp.where(visible[:, None, None], scores * (1.0 / math.sqrt(h)), _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype).reshape(b, kh, g * t, -1)
    out = jax.lax.dot_general(probs, v_cache.astype(x.dtype), (((3,), (2,)), batch))  # [N,K,G*T,H]
    out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)
    # One merged contraction dim: with (N, H) separate, XLA reorders them and transposes the
    # o_proj weight on every step.
    w_o = attn.o_proj.kernel[...].astype(x.dtype).reshape(n * h, -1)  # [N*H, D]
    out = jnp.einsum("BTE,ED->BTD", out, w_o)
    return out, k_cache, v_cache


def decode_step(model, blocks, tokens, positions, cache: DecodeCache):
    """One new token per row: tokens int32[N], positions int32[N] (RoPE positions) ->
    (float32 logits [N,V], cache with the token's keys/values at slot `cache.index`)."""
    x = jnp.take(model.embed.embedding[...], tokens[:, None], axis=0).astype(dtype_of(model.config.dtype))
    x = mesh_lib.constrain(x, ("batch", "seq", "act_embed"))  # [N, 1, D]
    index = cache.index
    new_slot = jnp.ones((tokens.shape[0], 1), bool)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_slot, index, axis=1)
    visible = valid[:, None, :]  # [N, 1, S]: written slots only hold this or earlier tokens
    inv_freq = rope_inv_freq(model.config)
    ks, vs = [], []
    for block, k_cache, v_cache in zip(blocks, cache.k, cache.v):
        out, k_cache, v_cache = _attention_step(block.attn, block.input_norm(x), positions[:, None],
                                                inv_freq, k_cache, v_cache, visible, index)
        x = x + out
        x = mesh_lib.constrain(x + block.mlp(block.post_attn_norm(x)), ("batch", "seq", "act_embed"))
        ks.append(k_cache)
        vs.append(v_cache)
    logits = model.logits(model.final_norm(x))[:, 0]
    return logits, _constrain_decode_cache(DecodeCache(tuple(ks), tuple(vs), valid, index + 1))


def _row_keys(rng: jax.Array, prompt_ids: jax.Array, num_samples: int) -> jax.Array:
    """One key per row from (base key, global prompt id, sample index). Returns keys [N]."""
    per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(rng, prompt_ids)  # [B]
    samples = jnp.arange(num_samples, dtype=jnp.uint32)
    per_row = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, samples))(per_prompt)
    return per_row.reshape(-1)


def _sample_step(strategy: Strategy, logits: jax.Array, row_keys: jax.Array, step: jax.Array):
    """Draws one token per row. logits f32[N,V] -> (tokens int32[N], logprobs, raw logprobs f32[N])."""
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    tokens, logprobs = strategy.sample(logits, keys)
    raw = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    raw = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs, raw


def _record(state: _LoopState, tokens, logprobs, raw, stop_ids, pad_id, max_new) -> _LoopState:
    """Writes step `state.step`'s draws into the buffers (padding for rows already done)."""
    live = ~state.done
    col = state.step
    put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, col))
    tokens = jnp.where(live, tokens, pad_id)
    hit_stop = live & jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)
    return dataclasses.replace(
        state,
        step=col + 1,
        last=tokens,
        done=state.done | hit_stop | (col + 1 >= max_new),
        stopped=state.stopped | hit_stop,
        lengths=jnp.where(live, col + 1, state.lengths),
        tokens=put(state.tokens, tokens),
        logprobs=put(state.logprobs, jnp.where(live, logprobs, 0.0)),
        raw_logprobs=put(state.raw_logprobs, jnp.where(live, raw, 0.0)),
    )


def _decode(graphdef, shape: _DecodeShape, state, cache: KVCache, last_logits, prompt_lens, rng,
            prompt_ids, max_new, stop_ids, pad_id):
    """The group decode loop. cache: prefilled [L,B,P,K,H]; last_logits f32[B,V]; prompt_lens
    int32[B] real prompt tokens; rng a key; prompt_ids int32[B]; max_new int32[] <= R;
    stop_ids int32[num stops] (-1 entries never match); pad_id int32[]."""
    model = nnx.merge(graphdef, state)
    g, r = shape.num_samples, shape.response_len
    n = shape.batch * g
    cache = _to_decode_cache(cache, r, g)
    logits = mesh_lib.constrain(jnp.repeat(last_logits, g, axis=0), ("batch", None))
    lens = mesh_lib.constrain(jnp.repeat(prompt_lens, g), ("batch",))
    row_keys = _row_keys(rng, prompt_ids, g)
    record = functools.partial(_record, stop_ids=stop_ids, pad_id=pad_id, max_new=max_new)
    zeros = lambda dt: mesh_lib.constrain(jnp.zeros((n, r), dt), ("batch", None))
    init = _LoopState(
        step=jnp.zeros((), jnp.int32), last=jnp.zeros((n,), jnp.int32),
        done=jnp.zeros((n,), bool), stopped=jnp.zeros((n,), bool),
        lengths=jnp.zeros((n,), jnp.int32), tokens=zeros(jnp.int32),
        logprobs=zeros(F32), raw_logprobs=zeros(F32), cache=cache)
    init = record(init, *_sample_step(shape.strategy, logits, row_keys, init.step))

    def cond(s: _LoopState):
        return (s.step < max_new) & ~jnp.all(s.done)

    # On CPU, XLA copies a slice of a stacked weight on every use, so the per-layer weights are
    # sliced once here, outside the loop (this holds a second copy of the block weights while
    # decoding); on accelerators the slices are taken inside the step, where they fuse.
    hoisted = layer_blocks(model) if jax.default_backend() == "cpu" else None

    def body(s: _LoopState) -> _LoopState:
        # The token at response index step-1 sits at RoPE position prompt_len + step - 1 and is
        # written to cache slot P + step - 1 (the cache index advances by one per step).
        blocks = hoisted if hoisted is not None else layer_blocks(model)
        step_logits, cache = decode_step(model, blocks, s.last, lens + s.step - 1, s.cache)
        s = dataclasses.replace(s, cache=cache)
        return record(s, *_sample_step(shape.strategy, step_logits, row_keys, s.step))

    final = jax.lax.while_loop(cond, body, init)
    mask = (jnp.arange(r)[None, :] < final.lengths[:, None]).astype(F32)
    return dict(tokens=final.tokens, mask=mask, lengths=final.lengths,
                finished_by_stop=final.stopped, logprobs=final.logprobs,
                raw_logprobs=final.raw_logprobs, num_steps=final.step)


# ---- host side ---------------------------------------------------------------------------------
def left_pad(tokens: np.ndarray, mask: np.ndarray, width: int, pad_id: int):
    """Left-pads [B,P0] prompts to [B,width] (tokens with pad_id, mask with 0)."""
    extra = width - tokens.shape[1]
    tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id)
    return tokens, np.pad(mask, ((0, 0), (extra, 0)))


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


class Sampler:
    """Draws groups of rollouts from the live NNX `Decoder` the trainer is training.

    `Sampler(config, stop_ids, pad_id)` is cheap; compiled programs are cached per
    (model graph, shape bucket, strategy, cache dtype) and each new one is logged.
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

    def _program(self, kind: str, graphdef, shape):
        key = (kind, graphdef, shape)
        fn = self._programs.get(key)
        if fn is None:
            log.info("sampler: compiling %s program for %s", kind, shape)
            if kind == "prefill":
                fn = jax.jit(functools.partial(_prefill, graphdef, shape))
                self.stats.prefill_compiles += 1
            else:
                fn = jax.jit(functools.partial(_decode, graphdef, shape))
                self.stats.decode_compiles += 1
            self._programs[key] = fn
        return fn

    def generate(self, model, prompt_tokens, prompt_mask, *, num_samples: int = 1,
                 rng: Union[int, jax.Array, None] = None, seed: Optional[int] = None,
                 prompt_ids=None,
                 max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 top_p: Optional[float] = None, top_k: Optional[int] = None,
                 mesh=None) -> SampleOutput:
        """Samples `num_samples` responses for each left-padded prompt row.

        prompt_tokens int32[B,P0], prompt_mask [B,P0] (1 on real tokens, left padding 0), host
        or device arrays. rng: a JAX key or an int seed; seed: an int seed (give one of the two;
        default seed 0). prompt_ids int32[B]: global ids that
        seed each prompt's rows (default 0..B-1). max_new_tokens / temperature / top_p / top_k
        override the config for this call. mesh: shard over this mesh (default: the mesh set
        with `jax.set_mesh`, if any).
        """
        overrides = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k)
        cfg = self.config.replace(**{k: v for k, v in overrides.items() if v is not None})
        if rng is not None and seed is not None:
            raise ValueError("give rng or seed, not both")
        key = _as_key(rng if rng is not None else (seed or 0))
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        tokens = np.asarray(prompt_tokens, np.int32)
        mask = np.asarray(prompt_mask).astype(np.int32)
        _check_prompts(tokens, mask)
        b = tokens.shape[0]
        ids = np.arange(b, dtype=np.int32) if prompt_ids is None else np.asarray(prompt_ids, np.int32)
        if ids.shape != (b,):
            raise ValueError(f"prompt_ids must have shape ({b},), got {ids.shape}")
        p = bucket(tokens.shape[1], cfg.prompt_buckets, "prompt_buckets")
        r = bucket(cfg.max_new_tokens, cfg.response_buckets, "response_buckets")
        tokens, mask = left_pad(tokens, mask, p, self.pad_id)
        prompt_lens = mask.sum(1).astype(np.int32)
        strategy = make_strategy(cfg.temperature, cfg.top_p, cfg.top_k)
        graphdef, state = nnx.split(model)
        mesh = _active_mesh(mesh)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            if mesh is not None:
                tokens = jax.device_put(tokens, mesh_lib.batch_sharding(mesh, 2, tokens.shape))
                mask = jax.device_put(mask, mesh_lib.batch_sharding(mesh, 2, mask.shape))
            prefill = self._program("prefill", graphdef, _PrefillShape(b, p, cfg.kv_cache_dtype))
            decode = self._program("decode", graphdef, _DecodeShape(
                b, p, r, num_samples, strategy, cfg.kv_cache_dtype))
            t0 = time.perf_counter()
            cache, last_logits = jax.block_until_ready(prefill(state, tokens, mask))
            t1 = time.perf_counter()
            out = jax.device_get(decode(state, cache, last_logits, prompt_lens, key, ids,
                                        np.int32(cfg.max_new_tokens), self._stop_array,
                                        np.int32(self.pad_id)))
            t2 = time.perf_counter()
        self.stats.prefill_calls += 1
        self.stats.prefill_rows += b
        self.stats.prefill_seconds += t1 - t0
        self.stats.decode_seconds += t2 - t1
        self.stats.decode_calls += 1
        self.stats.decode_rows += b * num_samples
        self.stats.generated_tokens += int(out["lengths"].sum())
        return SampleOutput(
            tokens=out["tokens"], mask=out["mask"], lengths=out["lengths"],
            finished_by_stop=out["finished_by_stop"], logprobs=out["logprobs"],
            raw_logprobs=out["raw_logprobs"],
            prompt_index=np.repeat(np.arange(b, dtype=np.int32), num_samples),
            sample_index=np.tile(np.arange(num_samples, dtype=np.int32), b),
            num_steps=int(out["num_steps"]))
