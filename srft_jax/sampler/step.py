"""One decode step of the slots, in the sampling layout: the weights, the slot KV cache, the step.

Dims legend:
  S slots (rows decoding at once), C cache slots per row (P + R), C_i slots of cache block i,
  L layers, K key/value heads, H head dim, D width, V vocabulary.

Weights (`DecodeModel`): the decoder's parameters cast to its compute dtype once per sampler
call, outside the decode loop, and placed in the *decode layout*: split over 'tensor' as in
training (heads, key/value heads, MLP width, vocabulary) but replicated over the batch axes
('data', 'fsdp') instead of FSDP-split over the model width. A decode step processes one token
per row, so FSDP would all-gather every weight on every step (per device (fsdp - 1) / fsdp of
the weights over the interconnect for a handful of tokens); the decode layout gathers them
once per call and then reads them from local memory, as every sampler with its own mesh does
(tunix's sampler mesh, vLLM's tensor parallelism). Cost: one extra copy of the weights in the
compute dtype, split over 'tensor', while sampling (7B in bfloat16: 15.2 GB / tensor per
device). The rows (slots) stay split over ('data', 'fsdp') and the cache's key/value heads over
'tensor'.

Cache (`SlotCache`): per layer, keys and values as tuples of blocks, keys [S,K,H,C_i] and
values [S,K,C_i,H] (C_i = kv_block, the last block shorter: the layouts `models.attention`
reads). A row's token at RoPE position p sits at cache slot p (its prompt from slot 0,
left-aligned, then its response), in block p // kv_block. Every row has the same layout
whichever slot decodes it and whenever it started, so the attention reduces a row's keys in the
same blocks, in the same order, in every batching (see models/attention.py). Blocks are
separate buffers so that a step reads exactly the blocks it needs, in place: XLA on CPU copies
a slice of one [S,K,C,H] buffer out before a matrix product (3x the bytes of the block in its
cost analysis), while a separate buffer is read directly on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax.models.attention import attention
from srft_jax.models.config import ModelConfig
from srft_jax.models.decoder import dtype_of, param_logical_axes, project_logits, rope_inv_freq

# Sharding of a cache block (keys [S,K,H,C_i] or values [S,K,C_i,H]: the last two dims are
# not split, so one spec serves both).
CACHE_AXES = ("batch", "kv_heads", None, None)
ACT = ("batch", "seq", "act_embed")


# ---- weights in the decode layout ---------------------------------------------------------------
def decode_axes(path: tuple[str, ...]) -> tuple[Optional[str], ...]:
    """Logical axes of a parameter in the decode layout: the training axes without 'embed'
    (replicated over the FSDP axis instead of split along the model width)."""
    return tuple(None if a == "embed" else a for a in param_logical_axes(path))


def _names(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


@jax.tree_util.register_dataclass
@dataclass
class DecodeModel:
    """The decoder's parameters in the decode layout and compute dtype, per layer (a pytree:
    built once per sampler call, before the loop, and read by every step)."""

    embedding: jax.Array  # [V, D]
    lm_head: Optional[jax.Array]  # [D, V]; None when tied to the embedding
    final_norm: nnx.State
    layers: tuple  # L x nnx.State of one `Block`
    config: ModelConfig = field(metadata=dict(static=True))
    block_def: Any = field(metadata=dict(static=True))
    norm_def: Any = field(metadata=dict(static=True))

    def blocks(self) -> list:
        return [nnx.merge(self.block_def, layer) for layer in self.layers]

    def unembedding(self) -> jax.Array:
        return self.embedding.T if self.lm_head is None else self.lm_head


def decode_model(model, merge_lora: bool = True) -> DecodeModel:
    """`model`'s parameters cast to the compute dtype and constrained to the decode layout, the
    stacked blocks taken apart layer by layer first (so neither a second stacked copy nor a
    float32 gathered one is ever held).

    LoRA adapters (models/lora.py) are folded into their kernels here, layer by layer, when
    `merge_lora` (`W + scale A B` in float32, then cast like every weight): the decode layout's
    copy of the weights is made anyway, so merging costs no memory, and the decode steps run
    the base model's matmuls only. Unmerged, they stay in the layout of their kernels and every
    step adds `scale (x A) B` per projection."""
    cfg = model.config
    dt = dtype_of(cfg.dtype)

    def place(tree, prefix=()):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: mesh_lib.constrain(x.astype(dt), decode_axes(prefix + _names(p))), tree)

    block_def, stacked = nnx.split(model.blocks)
    norm_def, norm = nnx.split(model.final_norm)
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_layers))
    if merge_lora and cfg.lora_rank:
        from srft_jax.models.decoder import Block
        from srft_jax.models.lora import fold_adapters

        cfg = cfg.base()
        block_def, like = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))

        def folded(layer):
            state = jax.tree.map(lambda x: x, like)
            nnx.replace_by_pure_dict(state, fold_adapters(nnx.to_pure_dict(layer), model.config.lora_scale,
                                                          stacked=False))
            return state

        layers = tuple(folded(layer) for layer in layers)
    layers = tuple(place(layer) for layer in layers)
    lm_head = None if model.lm_head is None else place(model.lm_head.kernel[...], ("lm_head", "kernel"))
    return DecodeModel(place(model.embed.embedding[...], ("embed", "embedding")), lm_head,
                       place(norm, ("final_norm",)), layers, cfg, block_def, norm_def)


# ---- the slot cache -----------------------------------------------------------------------------
def storage_dtype(dtype) -> jnp.dtype:
    """How the cache holds `dtype` values: 16-bit floats as their uint16 bit patterns. XLA on CPU
    computes an update of a 16-bit float buffer in float32 and writes a new buffer (a copy of the
    whole block per write, and twice the cache in memory); integer updates stay in place on
    every backend, and viewing the bits as the float again costs nothing."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 else dtype


def to_storage(x: jax.Array, dtype) -> jax.Array:
    x = x.astype(dtype)
    store = storage_dtype(dtype)
    return x if store == x.dtype else jax.lax.bitcast_convert_type(x, store)


def from_storage(x: jax.Array, dtype) -> jax.Array:
    dtype = jnp.dtype(dtype)
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


@jax.tree_util.register_dataclass
@dataclass
class SlotCache:
    """Keys and values of the S slots: k[l][i] [S,K,H,C_i] and v[l][i] [S,K,C_i,H] are layer
    l's block i, held as `storage_dtype(dtype)`."""

    k: tuple[tuple[jax.Array, ...], ...]
    v: tuple[tuple[jax.Array, ...], ...]
    dtype: str = field(metadata=dict(static=True))  # the KV dtype, e.g. 'bfloat16'

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b.shape[2] for b in self.v[0])


def block_sizes(cache_len: int, kv_block: int) -> tuple[int, ...]:
    """Sizes of the blocks of a `cache_len`-slot cache: kv_block each, the last shorter."""
    full, rest = divmod(cache_len, kv_block)
    return (kv_block,) * full + ((rest,) if rest else ())


def constrain_cache(cache: SlotCache) -> SlotCache:
    c = lambda layers: tuple(tuple(mesh_lib.constrain(b, CACHE_AXES) for b in blocks)
                             for blocks in layers)
    return SlotCache(c(cache.k), c(cache.v), cache.dtype)


def empty_cache(num_layers: int, slots: int, kv_heads: int, head_dim: int, sizes, dtype: str) -> SlotCache:
    """A zero cache of `slots` rows in blocks of `sizes` slots, KV dtype `dtype` (a name)."""
    store = storage_dtype(dtype)
    keys = lambda: tuple(jnp.zeros((slots, kv_heads, head_dim, n), store) for n in sizes)
    values = lambda: tuple(jnp.zeros((slots, kv_heads, n, head_dim), store) for n in sizes)
    return constrain_cache(SlotCache(tuple(keys() for _ in range(num_layers)),
                                     tuple(values() for _ in range(num_layers)), dtype))


def write_kv(blocks: tuple[jax.Array, ...], new: jax.Array, positions: jax.Array, axis: int,
             dtype: str):
    """Writes each row's new key (or value) new [S,K,H] at its cache slot positions int32[S]
    (in block p // C_0; `axis` is the slot axis of a block: 3 for keys, 2 for values; the
    blocks hold `storage_dtype(dtype)`). One row update per block, vmapped over rows, rows
    outside the block dropped: a batch-sharded cache is updated shard-locally and in place."""
    new = to_storage(new, dtype)

    def put(b, x, o):  # one row: b [K,H,C_i] or [K,C_i,H], x [K,H]
        index = (slice(None), slice(None), o) if axis == 3 else (slice(None), o)
        return b.at[index].set(x, mode="drop", unique_indices=True, indices_are_sorted=True)

    out, start = [], 0
    for b in blocks:
        n = b.shape[axis]
        offset = jnp.where((positions >= start) & (positions < start + n), positions - start, n)
        out.append(jax.vmap(put)(b, new, offset))
        start += n
    return tuple(out)


def live_block_count(positions: jax.Array, live: jax.Array, kv_block: int) -> jax.Array:
    """Blocks a step must read: up to the one holding the newest token of the longest live row."""
    return jnp.max(jnp.where(live, positions, 0)) // kv_block + 1


# ---- the step -----------------------------------------------------------------------------------
def decode_step(dm: DecodeModel, tokens: jax.Array, positions: jax.Array, cache: SlotCache,
                live_blocks):
    """One new token per slot: tokens int32[S] at RoPE positions int32[S] (their cache slots) ->
    (float32 logits [S,V], the cache with their keys/values written). Reads the first
    `live_blocks` cache blocks (int32[] or a static int, see `models.attention.attention`).

    Runs the decoder's own modules (embedding, norms, projections, q/k norms, RoPE, attention,
    MLP, unembedding) layer by layer; only the cache write is the sampler's."""
    x = jnp.take(dm.embedding, tokens[:, None], axis=0)
    x = mesh_lib.constrain(x.astype(dtype_of(dm.config.dtype)), ACT)  # [S, 1, D]
    pos = positions[:, None]  # [S, 1]
    inv_freq = rope_inv_freq(dm.config)
    ks, vs = [], []
    for layer, block in enumerate(dm.blocks()):
        def attend(q, k, v, layer=layer):
            k_blocks = write_kv(cache.k[layer], k[:, 0], positions, 3, cache.dtype)
            v_blocks = write_kv(cache.v[layer], v[:, 0], positions, 2, cache.dtype)
            out = attention(q, k_blocks, v_blocks, pos, live_blocks=live_blocks,
                            load=lambda b: from_storage(b, cache.dtype))
            return out, (k_blocks, v_blocks)

        x, (k_blocks, v_blocks) = block(x, pos, inv_freq, attend)
        ks.append(k_blocks)
        vs.append(v_blocks)
    hidden = nnx.merge(dm.norm_def, dm.final_norm)(x)
    logits = project_logits(hidden, dm.unembedding())[:, 0]
    return logits, constrain_cache(SlotCache(tuple(ks), tuple(vs), cache.dtype))
