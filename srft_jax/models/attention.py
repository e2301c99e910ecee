"""The decoder's attention core: grouped-query attention over keys/values held in blocks.

Dims legend:
  B batch rows, T query tokens, N query heads, K key/value heads, G = N // K query heads per
  key/value head, H head dim, S key/value slots (the sum of the block lengths S_i).

Keys are held transposed, [B,K,H,S] (head dim before slots), values as [B,K,S,H]: the layouts
in which both products read the cache as it is stored (XLA on CPU copies a [B,K,S,H] key block
to [B,K,H,S] before the score product, on every decode step).

One implementation serves every caller:
  - the forward pass over a sequence (training, scoring) and the prefill pass over a prompt
    (`Decoder.hidden_states`): one block holding all S slots;
  - the sampler's decode step: the KV cache split into blocks of `SamplerConfig.kv_block`
    slots, `live_blocks` of them read (a dynamic count: later blocks are skipped with a
    `lax.cond`), so a decode step reads the cache up to the longest live row, not all of it.

The softmax is accumulated block by block (online softmax, float32): running max m (starting
at NEG = -1e30), running sum l and running output acc per query, rescaled by
alpha = exp(m_old - m_new) when a block raises the max. A key is visible to a query iff its slot
is not after the query's slot and, when a mask is given, the slot holds a real token; a masked
score is set to NEG. Once a query has seen a visible key its max is a real score, and a masked
slot's weight exp(NEG - m) is exactly 0, so a later block that holds no visible key for it
leaves its (m, l, acc) bit for bit unchanged (alpha = 1, nothing added); what blocks before its
first visible key added is multiplied by alpha = exp(NEG - m) = 0 when that key arrives. So a
row's result depends only on its own keys and on the fixed block boundaries, not on how many
blocks the batch reads nor on the other rows -- the sampler relies on this to give the same
rollouts whichever slots decode them. A query with no visible key at all (a left-padding
position) gets the mean of the values, as a plain masked softmax would, never NaN.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

F32 = jnp.float32
NEG = -1e30  # finite stand-in for -inf in the running max

Blocks = Union[jax.Array, Sequence[jax.Array]]


def _as_blocks(x: Blocks) -> tuple[jax.Array, ...]:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _block_update(carry, q, k, v, start: int, q_slot, kv_mask):
    """Folds one block of keys/values into (m, l, acc): m, l [B,K,G,T], acc [B,K,G,T,H].
    q [B,K,G,T,H]; k [B,K,H,S_i], v [B,K,S_i,H] holding slots [start, start + S_i);
    q_slot int32[B,T]; kv_mask bool[B,S_i] or None."""
    m, l, acc = carry
    h = q.shape[-1]
    slots = start + jnp.arange(k.shape[3])
    visible = slots[None, None, :] <= q_slot[:, :, None]  # [B, T, S_i]
    if kv_mask is not None:
        visible = visible & kv_mask[:, None, :]
    visible = visible[:, None, None]  # [B, 1, 1, T, S_i]
    scores = jnp.einsum("BKGTH,BKHS->BKGTS", q, k.astype(q.dtype), preferred_element_type=F32)
    scores = jnp.where(visible, scores * (1.0 / math.sqrt(h)), NEG)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))  # [B, K, G, T]
    p = jnp.exp(scores - m_new[..., None])  # exactly 0 on masked slots once m_new > NEG
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(q.dtype), v.astype(q.dtype),
                    preferred_element_type=F32)
    return m_new, l, acc * alpha[..., None] + pv


def attention(q: jax.Array, k: Blocks, v: Blocks, q_slot: jax.Array,
              kv_mask: Optional[jax.Array] = None,
              live_blocks: Union[None, int, jax.Array] = None,
              load: Optional[Callable[[jax.Array], jax.Array]] = None) -> jax.Array:
    """Grouped-query attention of T queries over S key/value slots held in blocks.

    q [B,T,N,H]: queries (RoPE applied).
    k, v: keys [B,K,H,S] and values [B,K,S,H], or sequences of blocks k [B,K,H,S_i],
      v [B,K,S_i,H] holding consecutive slots (block i starts at slot S_0 + ... + S_{i-1}).
    q_slot int32[B,T]: the slot of each query's own token; keys in later slots are its future.
    kv_mask bool[B,S] or None: the slot holds a real token (None: every slot up to q_slot does).
    live_blocks: None reads every block; an int reads the first `live_blocks` blocks (the rest
      are left out of the program); an int32[] array reads the first `live_blocks` blocks and
      skips the others at run time (`lax.cond`). The caller guarantees that the skipped blocks
      hold no key visible to any query that matters.
    load: applied to each key and value block where it is read (inside the skip), e.g. to view
      a cache's stored bits as floats; None: the blocks are read as they are.
    Returns [B,T,N,H] in q.dtype.
    """
    k_blocks, v_blocks = _as_blocks(k), _as_blocks(v)
    b, t, n, h = q.shape
    kh = k_blocks[0].shape[1]
    g = n // kh
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    carry = (jnp.full((b, kh, g, t), NEG, F32), jnp.zeros((b, kh, g, t), F32),
             jnp.zeros((b, kh, g, t, h), F32))
    start = 0
    for i, (kb, vb) in enumerate(zip(k_blocks, v_blocks)):
        if isinstance(live_blocks, int) and i >= live_blocks:
            break
        mask = None if kv_mask is None else kv_mask[:, start:start + vb.shape[2]]
        update = lambda c, kb=kb, vb=vb, start=start, mask=mask: _block_update(
            c, qg, load(kb) if load else kb, load(vb) if load else vb, start, q_slot, mask)
        if live_blocks is None or isinstance(live_blocks, int) or i == 0:
            carry = update(carry)
        else:
            carry = jax.lax.cond(i < live_blocks, update, lambda c: c, carry)
        start += vb.shape[2]
    _, l, acc = carry
    out = acc / l[..., None]  # [B, K, G, T, H]; l >= 1 (the max term contributes exp(0))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
