"""Causal self-attention over a whole sequence -- the training forward/backward, scoring and the
sampler's prefill -- in three implementations, and how `model.attention` picks one.

Dims legend:
  B batch, T tokens (the queries and the key/value slots are the same T positions), N query
  heads, K key/value heads, G = N // K query heads per key/value head, H head dim;
  Tp: T padded up to a multiple of the splash kernel's block; n, k: the heads of one shard.

Every implementation computes the same function of (q, k, v, mask):
  query t sees key s iff s <= t and mask[b, s] (the slot holds a real token), softmax over the
  visible keys of q.k / sqrt(H); a query that sees no key at all (a left-padding position before
  its row's first real token) gets the mean of the values over all T slots -- what a masked
  softmax over equal scores gives, and what the block-wise `attention.attention` gives. So the
  implementations agree everywhere, padding positions included, and so do their gradients.

  xla     one masked softmax over the [T, T] scores per head (XLA; every platform).
  splash  the Pallas splash-attention kernel (TPU): causal block mask, padding as segment ids,
          run per shard inside `jax.shard_map` over the batch axes and the heads axis.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA GPU, bf16/fp16).

`model.attention=auto` resolves to splash on TPU, cudnn on an NVIDIA GPU with a 16-bit compute
dtype, xla otherwise -- from the platform of the devices in use: the mesh set with `jax.set_mesh`
(whose devices may be TPU devices of a topology compiled for from a CPU-only host), else
`jax.devices()`. The decode step keeps the block-wise `attention.attention` over its cache.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

from srft_jax import mesh as mesh_lib
from srft_jax.faults import RunError
from srft_jax.models.config import ATTENTION as IMPLEMENTATIONS

F32 = jnp.float32
NEG = -1e30  # finite stand-in for -inf: a query with no visible key gets equal scores
SPLASH_BLOCKS = (512, 256, 128)  # block sizes tried, largest first; Tp is a multiple of 128

_interpret = [False]  # see `splash_interpret`


class AttentionUnavailable(RunError, ValueError):
    """`model.attention` names an implementation the devices in use cannot run (one line)."""


@contextlib.contextmanager
def splash_interpret():
    """Within this block, 'splash' runs the kernel in Pallas interpret mode on any platform
    (slow; for checking its numerics on CPU)."""
    _interpret.append(True)
    try:
        yield
    finally:
        _interpret.pop()


def devices_in_use() -> tuple[str, str]:
    """(platform, device kind) of the devices a program traced now runs on: the mesh set with
    `jax.set_mesh` if any (also a mesh of another platform's devices, compiled for from here),
    else the default devices."""
    mesh = mesh_lib.current_mesh()
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    if device is None or device.platform is None:
        device = jax.devices()[0]
    return str(device.platform).lower(), str(device.device_kind or "")


def resolve(name: str, dtype: str, platform: str | None = None, device_kind: str = "") -> str:
    """The implementation `model.attention=name` means for compute dtype `dtype` on devices of
    `platform` ('tpu', 'gpu', 'cpu'; None: `devices_in_use()`). Raises AttentionUnavailable
    (a ValueError; the CLI prints its one line) when `name` cannot run there."""
    if platform is None:
        platform, device_kind = devices_in_use()
    nvidia = platform in ("gpu", "cuda") and "nvidia" in device_kind.lower()
    if name == "auto":
        if platform == "tpu":
            return "splash"
        return "cudnn" if nvidia and dtype in ("bfloat16", "float16") else "xla"
    if name == "splash" and platform != "tpu" and not _interpret[-1]:
        raise AttentionUnavailable(f"model.attention=splash needs TPU devices, but the devices in use are "
                         f"{platform}; use model.attention=auto or xla")
    if name == "cudnn":
        if not nvidia:
            raise AttentionUnavailable(f"model.attention=cudnn needs NVIDIA GPU devices, but the devices in "
                             f"use are {platform} {device_kind}".rstrip()
                             + "; use model.attention=auto or xla")
        if dtype not in ("bfloat16", "float16"):
            raise AttentionUnavailable(f"model.attention=cudnn needs model.dtype bfloat16 or float16 (cuDNN "
                             f"flash attention has no {dtype}); use model.attention=xla")
    if name not in IMPLEMENTATIONS:
        raise AttentionUnavailable(f"model.attention={name!r}; choose one of {IMPLEMENTATIONS}")
    return name


def sequence_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                       impl: str = "xla") -> jax.Array:
    """Causal grouped-query self-attention over a whole (padded) sequence.

    q [B,T,N,H] (RoPE applied); k, v [B,T,K,H]; mask bool[B,T]: the slot holds a real token;
    impl: 'xla', 'splash' or 'cudnn' (`resolve` gives it). Returns [B,T,N,H] in q.dtype."""
    if impl == "xla":
        return _xla(q, k, v, mask)
    if impl == "splash":
        return _splash(q, k, v, mask, interpret=_interpret[-1])
    if impl == "cudnn":
        return _cudnn(q, k, v, mask)
    raise ValueError(f"unknown attention implementation {impl!r}")


# ---- shared pieces ------------------------------------------------------------------------------
def _has_key(mask: jax.Array) -> jax.Array:
    """bool[B,T]: query t sees at least one key (a real token at or before t)."""
    return jnp.cumsum(mask.astype(jnp.int32), axis=1) > 0


def _no_key_rows(out: jax.Array, v: jax.Array, has_key: jax.Array) -> jax.Array:
    """out [B,T,N,H] with the rows of queries that see no key replaced by the mean of the values
    over all T slots (per key/value head, v [B,T,K,H]) -- the xla path's value there."""
    b, t, n, h = out.shape
    mean = jnp.mean(v.astype(F32), axis=1)  # [B, K, H]
    mean = jnp.repeat(mean, n // v.shape[2], axis=1)[:, None].astype(out.dtype)  # [B, 1, N, H]
    return jnp.where(has_key[:, :, None, None], out, mean)


# ---- xla ----------------------------------------------------------------------------------------
def _xla(q, k, v, mask):
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=F32)
    slots = jnp.arange(t)
    visible = (slots[None, :] <= slots[:, None])[None] & mask[:, None, :]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores * (1.0 / math.sqrt(h)), NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # uniform on a row with no key
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


# ---- cuDNN (GPU) --------------------------------------------------------------------------------
def cudnn_arguments(q, k, v, mask) -> dict:
    """Keyword arguments of `jax.nn.dot_product_attention` for our semantics (but for the rows
    with no key): causal, and the key mask as a boolean [B,1,T,T] mask (cuDNN turns it into a
    bias). Left padding rules out the kernel's own sequence lengths (right padding only)."""
    b, t = mask.shape
    return dict(query=q, key=k, value=v, is_causal=True,
                mask=jnp.broadcast_to(mask[:, None, None, :], (b, 1, t, t)))


def _cudnn(q, k, v, mask, implementation: str = "cudnn"):
    """(`implementation="xla"` runs the same call through XLA: how it is checked without a GPU.)"""
    out = jax.nn.dot_product_attention(**cudnn_arguments(q, k, v, mask),
                                       implementation=implementation)
    return _no_key_rows(out, v, _has_key(mask))


# ---- splash (TPU) -------------------------------------------------------------------------------
def splash_block(t: int) -> tuple[int, int]:
    """(Tp, block): T padded to a multiple of 128 and the largest of `SPLASH_BLOCKS` dividing it."""
    tp = -(-t // 128) * 128
    return tp, next(bs for bs in SPLASH_BLOCKS if tp % bs == 0)


def splash_segments(mask: jax.Array, tp: int) -> tuple[jax.Array, jax.Array]:
    """Segment ids int32[B,Tp] of the queries and the keys: a key is in segment 1 iff it is a real
    token; a query iff it sees a real key (else 0, and the causal mask still lets it see itself, a
    padding key of segment 0, so no row of the kernel is empty). With the causal mask this gives
    every query that sees a key exactly its visible keys; the rows that see none are replaced
    afterwards (`_no_key_rows`). Padding slots [T, Tp) are segment 0 (after every real query)."""
    pad = ((0, 0), (0, tp - mask.shape[1]))
    return (jnp.pad(_has_key(mask).astype(jnp.int32), pad),
            jnp.pad(mask.astype(jnp.int32), pad))


def _splash_local(q, k, v, mask, interpret: bool):
    """One shard: q [B,T,n,H], k, v [B,T,k,H] (n a multiple of k), mask [B,T] -> [B,T,n,H]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, h = q.shape
    tp, block = splash_block(t)
    q_seg, kv_seg = splash_segments(mask, tp)
    pad = ((0, 0), (0, 0), (0, tp - t), (0, 0))
    # Head-major [B, heads, Tp, H]; the kernel does not scale the scores, so q is.
    qs = jnp.pad((q * (1.0 / math.sqrt(h))).transpose(0, 2, 1, 3), pad)
    ks = jnp.pad(k.transpose(0, 2, 1, 3), pad)
    vs = jnp.pad(v.transpose(0, 2, 1, 3), pad)
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)
    causal = sa.MultiHeadMask([sa.CausalMask((tp, tp)) for _ in range(n)])
    kernel = sa.make_splash_mha(causal, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                interpret=interpret)

    def row(q, k, v, q_seg, kv_seg):  # one sequence: q [n,Tp,H], k, v [k,Tp,H]
        return kernel(q, k, v, segment_ids=sa.SegmentIds(q_seg, kv_seg))

    out = jax.vmap(row)(qs, ks, vs, q_seg, kv_seg)[:, :, :t].transpose(0, 2, 1, 3)  # [B,T,n,H]
    return _no_key_rows(out.astype(q.dtype), v, _has_key(mask))


def _kv_heads_for(k, n_local: int, g: int, shard):
    """The key/value heads [B,T,k',H] that query heads [shard * n_local, (shard + 1) * n_local)
    read (head i reads key/value head i // g), from all K heads k [B,T,K,H]; local query head j
    then reads local head j // (n_local // k'). Only used when the heads axis does not divide K
    (else K is sharded like N), so n_local is not a multiple of g."""
    if g % n_local == 0:  # the shard's query heads share one key/value head
        return jax.lax.dynamic_slice_in_dim(k, (shard * n_local) // g, 1, axis=2)
    return jnp.take(k, (shard * n_local + jnp.arange(n_local)) // g, axis=2)  # one per head


def _splash(q, k, v, mask, interpret: bool):
    mesh = mesh_lib.current_mesh()
    if mesh is None:
        return _splash_local(q, k, v, mask, interpret)
    n, kh = q.shape[2], k.shape[2]
    q_spec = mesh_lib.logical_to_spec(("batch", None, "heads", None), q.shape, mesh)
    kv_spec = mesh_lib.logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh)
    m_spec = mesh_lib.logical_to_spec(("batch", None), mask.shape, mesh)
    heads_split = q_spec[2] is not None and kv_spec[2] is None  # K does not divide the axis

    def body(q, k, v, mask):
        if heads_split:
            shard = jax.lax.axis_index(q_spec[2])
            k = _kv_heads_for(k, q.shape[2], n // kh, shard)
            v = _kv_heads_for(v, q.shape[2], n // kh, shard)
        return _splash_local(q, k, v, mask, interpret)

    # Mosaic kernels cannot be partitioned by XLA: each shard runs its own kernel.
    return jax.shard_map(body, in_specs=(q_spec, kv_spec, kv_spec, m_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, mask)

