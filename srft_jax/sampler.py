"""Rollout sampler: prefill each prompt once, share its KV cache across the group, decode in one loop.

Dims legend:
  B prompts in the batch, G samples per prompt, N = B*G rows (prompt-major: row b*G+g is
  sample g of prompt b), P prompt width (rounded up to a prompt bucket), R response width
  (max_new_tokens rounded up to a response bucket), S cache slots (P + the current phase's
  response bucket, at most P + R), V vocabulary, L layers, K key/value heads, H head dim.

Flow of `Sampler.generate(model, prompt_tokens[B,P0], prompt_mask[B,P0], num_samples=G)`:
  1. host: left-pad the prompts to the bucket width P; R = bucket(max_new_tokens).
  2. prefill (jitted once per shape): the decoder's own forward pass over [B,P] writes a KV
     cache of P slots (`Decoder.hidden_states` with a `KVCache`) and gives the float32 logits
     of the last prompt position [B,V].
  3. decode (jitted once per shape): the cache is laid out for decoding (`DecodeCache`: one
     [N,K,S,H] buffer per layer) with each prompt's rows repeated G times, so a prompt is
     prefilled once for its whole group; the first token is drawn from the prefill logits,
     then a `lax.while_loop` feeds one token per step (`decode_step`) and stops as soon as
     every row has emitted a stop token or max_new_tokens tokens. The loop runs in phases, one
     per response bucket up to R, with S = P + bucket cache slots (the cache grows between
     phases, and a phase only starts if some row is still running). All rows advance in
     lockstep; a row that has stopped keeps running but its outputs are replaced by padding
     (tokens = pad id, mask 0, log-probs 0).
     `decode_step` runs the decoder's own modules (embedding, norms, q/k/v/o projections,
     q/k norms, RoPE, MLP, unembedding) layer by layer; only the attention against the cache
     is written here, for the per-layer layout (see `DecodeCache` for why).
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
activations. With several processes (`jax.distributed`) each process passes its own prompt rows
and gets its own rows' samples back from one global prefill and decode (`distributed.to_global`
/ `to_local`); see `Sampler.generate`.
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

from srft_jax import distributed, mesh as mesh_lib
from srft_jax.models.decoder import KVCache, apply_rope, dtype_of, positions_from_mask, rope_inv_freq

log = logging.getLogger(__name__)

F32 = jnp.float32
KV_DTYPES = ("float32", "bfloat16", "float16")
_CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
_LAYER_CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")
_NEG = -1e30  # finite mask value, as in the decoder
_DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Also the decode phases (see SamplerConfig): few enough that a long generation compiles a few
# loop bodies, fine enough that attention never reads more than ~4x the slots in use.
_DEFAULT_RESPONSE_BUCKETS = (128, 512, 2048, 4096, 8192, 16384, 32768)


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
      that fits, which sets the output width R. The buckets below R are also decode phases:
      the KV cache holds P + bucket slots until that many tokens are drawn, then grows to the
      next bucket (P + R at most), so attention reads about as many slots as there are tokens.
      Each phase is one more loop body in the compiled program, and growing the cache briefly
      holds the old and the new cache (1.5x at the last phase boundary with doubling buckets).
      For long responses on accelerators use one bucket: XLA's memory analysis of the 7B decode
      (16 prompts x 7, 8192 new tokens, 8 devices) gives 147 GB per device with the five default
      buckets as phases and 41 GB with one (`benchmarks/memory_7b.py --decode-phases`).
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
    num_samples: int  # G
    strategy: Strategy
    kv_cache_dtype: Optional[str]
    phases: tuple[int, ...]  # response buckets up to R; the last one is R

    @property
    def response_len(self) -> int:
        return self.phases[-1]


@jax.tree_util.register_dataclass
@dataclass
class DecodeCache:
    """The decode loop's KV cache: one buffer per layer in [N,K,S,H] layout.

    The decoder's `KVCache` stacks layers ([L,B,S,K,H]), which suits its layer scan; in a
    one-token step on CPU, XLA copies each layer's slice of stacked caches and weights and
    transposes [S,K] for the attention dots on every step. Separate per-layer buffers with the
    slot axis next to the head dim are updated in place and read once per step (on a 110M
    Llama-shaped model, batch 8, 2 CPU cores: 2.2x fewer CPU-seconds per decode step than
    calling `Decoder.decode` in the loop).
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


def _grow_decode_cache(cache: DecodeCache, extra: int) -> DecodeCache:
    """`extra` more empty slots at the end of every layer's cache."""
    grow = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return _constrain_decode_cache(DecodeCache(
        tuple(grow(a) for a in cache.k), tuple(grow(a) for a in cache.v),
        jnp.pad(cache.valid, ((0, 0), (0, extra))), cache.index))


# ---- one decode step in the sampling layout ----------------------------------------------------
def layer_blocks(model) -> list:
    """The decoder's stacked blocks as L per-layer `Block` modules (static slices)."""
    block_def, block_state = nnx.split(model.blocks)
    return [nnx.merge(block_def, jax.tree.map(lambda a, i=i: a[i], block_state))
            for i in range(model.config.num_layers)]


@dataclass
class DecodeWeights:
    """The decoder's weights arranged for `decode_step` (built inside the jitted program).

    blocks: the L per-layer `Block` modules (their norms and biases are used as they are).
    kernels: per layer, the matmul weights as 2-D arrays q, k, v [D, N*H] / [D, K*H], o
      [N*H, D], gate, up [D, F], down [F, D] -- or all transposed to [out, in] when
      `transposed`; unembed [D, V] or [V, D].
    On CPU the sampler builds them once before the decode loop with `transposed=True`: XLA on
    CPU copies a slice of a stacked weight on every use, and its matrix-vector kernels stream a
    weight with the contracted dim contiguous ([out, in]) about twice as fast as [in, out]
    (measured: ~14 vs ~7 GB/s for [8,768] x [768,2048] on 2 cores). This holds a second copy of
    the block weights while decoding. On accelerators the views are taken inside the step
    (`transposed=False`), where slicing fuses and no copy is made.
    """

    blocks: list
    kernels: list
    unembed: jax.Array
    transposed: bool


def decode_weights(model, transposed: bool) -> DecodeWeights:
    dt = dtype_of(model.config.dtype)

    def two_d(p, in_dims: int):  # kernel [in..., out...] -> [in, out] (or [out, in])
        w = p.kernel[...].astype(dt)
        w = w.reshape(math.prod(w.shape[:in_dims]), -1)
        return w.T if transposed else w

    blocks = layer_blocks(model)
    kernels = [dict(q=two_d(b.attn.q_proj, 1), k=two_d(b.attn.k_proj, 1), v=two_d(b.attn.v_proj, 1),
                    o=two_d(b.attn.o_proj, 2), gate=two_d(b.mlp.gate_proj, 1),
                    up=two_d(b.mlp.up_proj, 1), down=two_d(b.mlp.down_proj, 1)) for b in blocks]
    unembed = model.unembedding().astype(dt)  # [D, V]
    return DecodeWeights(blocks, kernels, unembed.T if transposed else unembed, transposed)


def _hoist_decode_weights() -> bool:
    """Whether `_decode` copies the weights into `DecodeWeights(transposed=True)` before its
    loop (on CPU) instead of taking views inside the step (accelerators)."""
    return jax.default_backend() == "cpu"


def _linear(x: jax.Array, w: jax.Array, transposed: bool, **kw) -> jax.Array:
    """x [N,T,in] times a 2-D kernel stored [in, out] (or [out, in] when transposed)."""
    return jnp.einsum("BTI,OI->BTO" if transposed else "BTI,IO->BTO", x, w, **kw)


def _heads(x: jax.Array, num: int) -> jax.Array:
    return x.reshape(x.shape[0], x.shape[1], num, -1)


def _attention_step(attn, kernels, transposed, x, positions, inv_freq, k_cache, v_cache, visible,
                    index):
    """The decoder's attention (same projections and biases, q/k norm, RoPE, GQA and masking)
    for T new tokens against one layer's cache in [N,K,S,H] layout. x [N,T,D]; visible
    bool[N,T,S]. Returns (out [N,T,D], k_cache, v_cache) with the new keys/values at `index`."""
    n, kh = attn.q_proj.kernel.shape[1], attn.num_kv_heads
    proj = lambda name, p, heads: _heads(_linear(x, kernels[name], transposed), heads) + (
        0 if p.bias is None else p.bias[...].astype(x.dtype))
    q = proj("q", attn.q_proj, n)  # [N, T, Nq, H]
    k = proj("k", attn.k_proj, kh)  # [N, T, K, H]
    v = proj("v", attn.v_proj, kh)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    put = lambda buf, new: jax.lax.dynamic_update_slice(
        buf, jnp.swapaxes(new, 1, 2).astype(buf.dtype), (0, 0, index, 0))
    k_cache, v_cache = put(k_cache, k), put(v_cache, v)
    b, t, _, h = q.shape
    g = n // kh
    # Both attention contractions are dot_generals with batch dims (N, K) first, so the cache is
    # read in place ([N,K,S,H]) and the output comes out as [N, K, G*T, H].
    q = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(q, k_cache.astype(x.dtype), (((3,), (3,)), batch),
                                 preferred_element_type=F32)  # [N, K, G*T, S]
    scores = scores.reshape(b, kh, g, t, -1)
    scores = jnp.where(visible[:, None, None], scores * (1.0 / math.sqrt(h)), _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype).reshape(b, kh, g * t, -1)
    out = jax.lax.dot_general(probs, v_cache.astype(x.dtype), (((3,), (2,)), batch))  # [N,K,G*T,H]
    out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)
    return _linear(out, kernels["o"], transposed), k_cache, v_cache


def decode_step(model, weights: DecodeWeights, tokens, positions, cache: DecodeCache):
    """One new token per row: tokens int32[N], positions int32[N] (RoPE positions) ->
    (float32 logits [N,V], cache with the token's keys/values at slot `cache.index`)."""
    tr = weights.transposed
    act = ("batch", "seq", "act_embed")
    x = jnp.take(model.embed.embedding[...], tokens[:, None], axis=0).astype(dtype_of(model.config.dtype))
    x = mesh_lib.constrain(x, act)  # [N, 1, D]
    index = cache.index
    new_slot = jnp.ones((tokens.shape[0], 1), bool)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_slot, index, axis=1)
    visible = valid[:, None, :]  # [N, 1, S]: written slots only hold this or earlier tokens
    inv_freq = rope_inv_freq(model.config)
    ks, vs = [], []
    for block, kern, k_cache, v_cache in zip(weights.blocks, weights.kernels, cache.k, cache.v):
        out, k_cache, v_cache = _attention_step(block.attn, kern, tr, block.input_norm(x),
                                                positions[:, None], inv_freq, k_cache, v_cache,
                                                visible, index)
        x = x + out
        h = block.post_attn_norm(x)
        hidden = jax.nn.silu(_linear(h, kern["gate"], tr)) * _linear(h, kern["up"], tr)
        hidden = mesh_lib.constrain(hidden, ("batch", "seq", "mlp"))
        x = mesh_lib.constrain(x + _linear(hidden, kern["down"], tr), act)
        ks.append(k_cache)
        vs.append(v_cache)
    logits = _linear(model.final_norm(x), weights.unembed, tr, preferred_element_type=F32)
    logits = mesh_lib.constrain(logits, ("batch", "seq", "vocab"))[:, 0]
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
    cache = _to_decode_cache(cache, shape.phases[0], g)
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

    # On CPU the per-layer weights are copied once, here, outside the loop (see DecodeWeights).
    hoisted = decode_weights(model, transposed=True) if _hoist_decode_weights() else None

    def body(s: _LoopState) -> _LoopState:
        # The token at response index step-1 sits at RoPE position prompt_len + step - 1 and is
        # written to cache slot P + step - 1 (the cache index advances by one per step).
        weights = hoisted if hoisted is not None else decode_weights(model, transposed=False)
        step_logits, cache = decode_step(model, weights, s.last, lens + s.step - 1, s.cache)
        s = dataclasses.replace(s, cache=cache)
        return record(s, *_sample_step(shape.strategy, step_logits, row_keys, s.step))

    # Phases: the cache holds P + phases[i] slots while the first phases[i] tokens are drawn, so
    # attention reads a cache about as long as the responses so far, not P + R slots from the
    # start; the cache grows between phases (one copy), and a phase starts only if some row
    # is still running.
    final = init
    for i, phase_len in enumerate(shape.phases):
        if i:
            final = dataclasses.replace(
                final, cache=_grow_decode_cache(final.cache, phase_len - shape.phases[i - 1]))
        final = jax.lax.while_loop(
            lambda s, phase_len=phase_len: cond(s) & (s.step < phase_len), body, final)
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


def _pad_rows(tokens: np.ndarray, mask: np.ndarray, rows: int, pad_id: int):
    """Appends dummy prompts (one real pad token) up to `rows` rows; their samples are dropped."""
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
                 prompt_ids=None, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None,
                 top_p: Optional[float] = None, top_k: Optional[int] = None,
                 mesh=None) -> SampleOutput:
        """Samples `num_samples` responses for each left-padded prompt row.

        prompt_tokens int32[B,P0], prompt_mask [B,P0]: 1 on real tokens, left padding 0 (host
          or single-host device arrays; every row needs at least one real token).
        num_samples: G rollouts per prompt, sharing the prompt's prefill.
        rng / seed: a JAX key or an int seed (give at most one; default seed 0).
        prompt_ids int32[B]: global ids that seed each prompt's rows (default 0..B-1); give
          stable ids (e.g. dataset indices) to make a row's draws independent of batching.
        max_new_tokens / temperature / top_p / top_k: override the config for this call.
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
                         top_k=top_k)
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
        p = bucket(tokens.shape[1], cfg.prompt_buckets, "prompt_buckets")
        tokens, mask = left_pad(tokens, mask, p, self.pad_id)
        prompt_lens = mask.sum(1).astype(np.int32)
        graphdef, state = nnx.split(model)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            if mesh is not None:
                tokens = jax.device_put(tokens, mesh_lib.batch_sharding(mesh, 2, tokens.shape))
                mask = jax.device_put(mask, mesh_lib.batch_sharding(mesh, 2, mask.shape))
            out = self._run(graphdef, state, tokens, mask, prompt_lens, key, ids, num_samples, cfg)
            out = jax.device_get(out)
        return self._output(out, b, num_samples)

    def _run(self, graphdef, state, tokens, mask, prompt_lens, key, ids, num_samples: int,
             cfg: SamplerConfig) -> dict:
        """Prefill and decode of B (global) prompt rows [B,P]; the decode program's outputs."""
        b, p = tokens.shape
        r = bucket(cfg.max_new_tokens, cfg.response_buckets, "response_buckets")
        strategy = make_strategy(cfg.temperature, cfg.top_p, cfg.top_k)
        prefill = self._program("prefill", graphdef, _PrefillShape(b, p, cfg.kv_cache_dtype))
        phases = tuple(x for x in cfg.response_buckets if x < r) + (r,)
        decode = self._program("decode", graphdef, _DecodeShape(
            b, p, num_samples, strategy, cfg.kv_cache_dtype, phases))
        t0 = time.perf_counter()
        cache, last_logits = jax.block_until_ready(prefill(state, tokens, mask))
        t1 = time.perf_counter()
        out = jax.block_until_ready(decode(state, cache, last_logits, prompt_lens, key, ids,
                                           np.int32(cfg.max_new_tokens), self._stop_array,
                                           np.int32(self.pad_id)))
        self.stats.prefill_seconds += t1 - t0
        self.stats.decode_seconds += time.perf_counter() - t1
        return out

    def _output(self, out: dict, b: int, num_samples: int) -> SampleOutput:
        """The first b prompts' rows of host outputs, counted in the stats."""
        n = b * num_samples
        self.stats.prefill_calls += 1
        self.stats.prefill_rows += b
        self.stats.decode_calls += 1
        self.stats.decode_rows += n
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
        per_process = distributed.batch_shards(mesh) // shard.count  # batch devices per data shard
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
        p = bucket(width, cfg.prompt_buckets, "prompt_buckets")
        if b:
            tokens, mask = left_pad(tokens, mask, p, self.pad_id)
        else:
            tokens, mask = np.zeros((0, p), np.int32), np.zeros((0, p), np.int32)
        tokens, mask = _pad_rows(tokens, mask, rows, self.pad_id)
        ids = np.concatenate([ids, np.zeros(rows - b, np.int32)])
        prompt_lens = mask.sum(1).astype(np.int32)
        graphdef, state = nnx.split(model)
        with jax.set_mesh(mesh):
            inputs = distributed.to_global((tokens, mask, prompt_lens, ids), mesh, axis=0, shard=shard)
            out = self._run(graphdef, state, *inputs[:3], key, inputs[3], num_samples, cfg)
            num_steps = distributed.to_local(out.pop("num_steps"))
            out = distributed.to_local(out, axis=0, shard=shard)
        return self._output({**out, "num_steps": num_steps}, b, num_samples)
