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

Cache (`SlotCache`): per layer, keys and values as a tuple of blocks [S,K,C_i,H]
(C_i = kv_block, the last block shorter). A row's token at RoPE position p sits at cache slot p
(its prompt from slot 0, left-aligned, then its response), in block p // kv_block. Every row has
the same layout whichever slot decodes it and whenever it started, so the attention reduces a
row's keys in the same blocks, in the same order, in every batching (see models/attention.py).
Blocks are separate buffers so that a step reads exactly the blocks it needs, in place: a slice
of one [S,K,C,H] buffer is copied out before a matrix product by XLA on CPU (3x the bytes of the
block, measured with cost_analysis), a separate buffer is read directly on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax.models.attention import attention
from srft_jax.models.decoder import dtype_of, param_logical_axes, rope_inv_freq

CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")  # one block [S, K, C_i, H]
ACT = ("batch", "seq", "act_embed")


# ---- weights in the decode layout ---------------------------------------------------------------
def decode_axes(path: tuple[str, ...]) -> tuple[Optional[str], ...]:
    """Logical axes of a parameter in the decode layout: the training axes without 'embed'
    (replicated over the FSDP axis instead of split along the model width)."""
    return tuple(None if a == "embed" else a for a in param_logical_axes(path))


def _names(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


@dataclass
class DecodeModel:
    """The decoder in the decode layout and compute dtype (built inside a jitted program,
    before the loop): `model` a `Decoder`, `blocks` its L layers as `Block` modules."""

    model: nnx.Module
    blocks: list


def decode_model(model) -> DecodeModel:
    """`model`'s parameters cast to the compute dtype and constrained to the decode layout,
    split into per-layer blocks (static slices, taken once)."""
    dt = dtype_of(model.config.dtype)
    graphdef, state = nnx.split(model)
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: mesh_lib.constrain(x.astype(dt), decode_axes(_names(p))), state)
    model = nnx.merge(graphdef, state)
    block_def, block_state = nnx.split(model.blocks)
    blocks = [nnx.merge(block_def, jax.tree.map(lambda a, i=i: a[i], block_state))
              for i in range(model.config.num_layers)]
    return DecodeModel(model, blocks)


# ---- the slot cache -----------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclass
class SlotCache:
    """Keys and values of the S slots: k[l][i], v[l][i] are layer l's block i [S,K,C_i,H]."""

    k: tuple[tuple[jax.Array, ...], ...]
    v: tuple[tuple[jax.Array, ...], ...]

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b.shape[2] for b in self.k[0])

    @property
    def kv_block(self) -> int:
        return self.k[0][0].shape[2]


def block_sizes(cache_len: int, kv_block: int) -> tuple[int, ...]:
    """Sizes of the blocks of a `cache_len`-slot cache: kv_block each, the last shorter."""
    full, rest = divmod(cache_len, kv_block)
    return (kv_block,) * full + ((rest,) if rest else ())


def constrain_cache(cache: SlotCache) -> SlotCache:
    c = lambda layers: tuple(tuple(mesh_lib.constrain(b, CACHE_AXES) for b in blocks)
                             for blocks in layers)
    return SlotCache(c(cache.k), c(cache.v))


def empty_cache(num_layers: int, slots: int, kv_heads: int, head_dim: int, sizes, dtype) -> SlotCache:
    def layer():
        return tuple(jnp.zeros((slots, kv_heads, n, head_dim), dtype) for n in sizes)

    return constrain_cache(SlotCache(tuple(layer() for _ in range(num_layers)),
                                     tuple(layer() for _ in range(num_layers))))


def _put_rows(block: jax.Array, new: jax.Array, offset: jax.Array, inside: jax.Array) -> jax.Array:
    """Row s of `block` [S,K,C_i,H] gets new[s] [K,H] at slot offset[s] where inside[s]. One
    dynamic update per row (vmapped), so a batch-sharded cache is updated shard-locally."""
    slot = lambda b, o: jax.lax.dynamic_slice_in_dim(b, o, 1, axis=1)
    current = jax.vmap(slot)(block, offset)  # [S, K, 1, H]
    rows = jnp.where(inside[:, None, None, None], new[:, :, None, :].astype(block.dtype), current)
    return jax.vmap(lambda b, r, o: jax.lax.dynamic_update_slice_in_dim(b, r, o, axis=1))(
        block, rows, offset)


def write_kv(blocks: tuple[jax.Array, ...], new: jax.Array, positions: jax.Array):
    """Writes each row's new key (or value) new [S,K,H] at its cache slot positions int32[S]."""
    out, start = [], 0
    for b in blocks:
        n = b.shape[2]
        inside = (positions >= start) & (positions < start + n)
        out.append(_put_rows(b, new, jnp.clip(positions - start, 0, n - 1), inside))
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
    model = dm.model
    x = jnp.take(model.embed.embedding[...], tokens[:, None], axis=0)
    x = mesh_lib.constrain(x.astype(dtype_of(model.config.dtype)), ACT)  # [S, 1, D]
    pos = positions[:, None]  # [S, 1]
    inv_freq = rope_inv_freq(model.config)
    ks, vs = [], []
    for layer, block in enumerate(dm.blocks):
        def attend(q, k, v, layer=layer):
            k_blocks = write_kv(cache.k[layer], k[:, 0], positions)
            v_blocks = write_kv(cache.v[layer], v[:, 0], positions)
            return attention(q, k_blocks, v_blocks, pos, live_blocks=live_blocks), (k_blocks, v_blocks)

        x, (k_blocks, v_blocks) = block(x, pos, inv_freq, attend)
        ks.append(k_blocks)
        vs.append(v_blocks)
    logits = model.logits(model.final_norm(x))[:, 0]
    return logits, constrain_cache(SlotCache(tuple(ks), tuple(vs)))
