"""One Flax NNX decoder for Qwen2/2.5(-Math), Qwen3 and Llama 3 / SmolLM2.

Dims legend:
  B batch, T new tokens in this call, S key/value slots (T without a cache, cache length with one)
  D model width, V vocabulary, F MLP width, N query heads, K key/value heads, G = N // K,
  H head dim, L layers.

The L transformer blocks are stored stacked (every block parameter has a leading L axis) and run
with `lax.scan`, so compile time does not grow with depth and per-layer rematerialisation is one
`jax.checkpoint` around the scan body.

Masks and positions: `mask[B,T]` is 1 on real tokens (left padding is 0). Positions default to
`cumsum(mask) - 1`, so a left-padded prompt gets the same RoPE positions as an unpadded one.
A key slot is visible to a query iff it holds a real token and is not in the query's future.
Attention over a whole sequence (no cache, or a prefill that fills a cache of exactly T slots)
runs `attention_kernels.sequence_attention` with the implementation `model.attention` resolves
to (xla, splash on TPU, cudnn on GPU); decoding against a longer cache runs the block-wise
`attention.attention`, shared with the sampler's decode step. Both give the same function.

The KV cache (`KVCache`) holds keys `k [L,B,K,H,S]`, values `v [L,B,K,S,H]`, `valid bool[B,S]` (slot holds a real token)
and `index` (next slot to write; all rows advance together, so left-padded prompts decode in
lockstep). `decode` writes the T new keys/values at `[index, index+T)` and returns the new cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax.models import attention_kernels
from srft_jax.models.attention import attention
from srft_jax.models.config import ModelConfig

F32 = jnp.float32


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


# Logical axes of every parameter, keyed by (module, parameter) name. Block parameters get a
# leading 'layers' axis (see `param_logical_axes`). Used by the mesh and by weight loading.
PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("final_norm", "scale"): ("norm",),
    ("q_proj", "kernel"): ("embed", "heads", "head_dim"),
    ("k_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("v_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("q_proj", "bias"): ("heads", "head_dim"),
    ("k_proj", "bias"): ("kv_heads", "head_dim"),
    ("v_proj", "bias"): ("kv_heads", "head_dim"),
    ("o_proj", "kernel"): ("heads", "head_dim", "embed"),
    ("q_norm", "scale"): ("head_dim",),
    ("k_norm", "scale"): ("head_dim",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("input_norm", "scale"): ("norm",),
    ("post_attn_norm", "scale"): ("norm",),
}


# LoRA adapters follow their projection's kernel: A [*in, r] keeps the kernel's input axes, B
# [r, *out] its output axes; the rank axis r is replicated.
LORA_IN_DIMS = {"o_proj": 2}  # leading kernel dims that are inputs (1 for the others)


def param_logical_axes(path: tuple[str, ...]) -> tuple[str, ...]:
    """Logical axes for a parameter path such as ('blocks', 'attn', 'q_proj', 'kernel')."""
    names = tuple(str(p) for p in path)
    if names[-1] in ("lora_a", "lora_b"):
        kernel = PARAM_AXES[(names[-2], "kernel")]
        n_in = LORA_IN_DIMS.get(names[-2], 1)
        axes = (kernel[:n_in] + ("lora_rank",)) if names[-1] == "lora_a" else (("lora_rank",) + kernel[n_in:])
        return (("layers",) + axes) if names[0] == "blocks" else axes
    axes = PARAM_AXES.get(names[-2:])
    if axes is None:
        raise KeyError(f"no logical axes for parameter {'/'.join(names)}")
    return (("layers",) + axes) if names[0] == "blocks" else axes


def _param(rngs: nnx.Rngs, shape, cfg: ModelConfig, init: str = "normal") -> nnx.Param:
    dtype = dtype_of(cfg.param_dtype)
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, F32)
    elif init == "zeros":
        value = jnp.zeros(shape, F32)
    else:
        value = jnp.ones(shape, F32)
    return nnx.Param(value.astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), cfg, "ones")
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Projection(nnx.Module):
    """A linear map stored with named dims (`kernel` shape `in_shape + out_shape`).

    With `lora`: adapters `lora_a [*in, r]` and `lora_b [r, *out]` (`nnx.LoRAParam`, float32,
    drawn from the `lora` stream of `rngs` so the base parameters do not depend on them), and
    `adapt` adds `scale * (x A) B` to the projection's output. A is uniform in +-1/sqrt(fan_in)
    (PEFT's default), B is 0: an adapted model starts equal to its base. With
    `cfg.lora_dropout` p > 0 and a `key`, `adapt` drops the adapters' input as PEFT does:
    `scale * (dropout(x) A) B`, each element kept with probability 1 - p and scaled by 1/(1 - p);
    without a key (sampling, old log-probs, evaluation) nothing is dropped.
    """

    def __init__(self, in_shape, out_shape, cfg: ModelConfig, *, bias: bool, rngs: nnx.Rngs,
                 lora: bool = False):
        self.kernel = _param(rngs, tuple(in_shape) + tuple(out_shape), cfg)
        self.bias = _param(rngs, tuple(out_shape), cfg, "zeros") if bias else None
        if lora:
            r, fan_in = cfg.lora_rank, math.prod(in_shape)
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(rngs.lora(), tuple(in_shape) + (r,), F32, -bound, bound)
            self.lora_a = nnx.LoRAParam(a)
            self.lora_b = nnx.LoRAParam(jnp.zeros((r,) + tuple(out_shape), F32))
        else:
            self.lora_a = self.lora_b = None
        self.lora_scale = cfg.lora_scale if lora else 0.0
        self.lora_dropout = cfg.lora_dropout if lora else 0.0

    def adapt(self, x: jax.Array, y: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """y + scale * (x A) B: x [B,T,*in] the projection's input, y [B,T,*out] its output
        (y unchanged without adapters). Computed in x's dtype, the adapters cast to it. `key`:
        the adapters' dropout draws (training only; see the class)."""
        if self.lora_a is None:
            return y
        if key is not None and self.lora_dropout > 0:
            x = lora_dropout(key, x, self.lora_dropout)
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        xa = jnp.tensordot(x, a, axes=a.ndim - 1)  # [B, T, r]
        return y + (self.lora_scale * jnp.tensordot(xa, b, axes=1)).astype(y.dtype)


def lora_dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout of `x`: each element kept with probability 1 - rate, scaled by
    1 / (1 - rate), the rest 0."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _keys(key: Optional[jax.Array], n: int) -> tuple:
    """n independent keys of `key` (n Nones without one)."""
    return (None,) * n if key is None else tuple(jax.random.fold_in(key, i) for i in range(n))


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse RoPE frequencies [H/2], with Llama-3 scaling when configured."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=F32) / h))
    if cfg.rope_scaling_factor:
        factor = cfg.rope_scaling_factor
        low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = ((cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor)
                  / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the HF 'rotate half' layout. x [B,T,N,H], positions [B,T]."""
    angles = positions.astype(F32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lora = lambda name: bool(cfg.lora_rank) and name in cfg.lora_targets
        self.q_proj = Projection((d,), (n, h), cfg, bias=cfg.attention_bias, rngs=rngs, lora=lora("q_proj"))
        self.k_proj = Projection((d,), (k, h), cfg, bias=cfg.attention_bias, rngs=rngs, lora=lora("k_proj"))
        self.v_proj = Projection((d,), (k, h), cfg, bias=cfg.attention_bias, rngs=rngs, lora=lora("v_proj"))
        self.o_proj = Projection((n, h), (d,), cfg, bias=False, rngs=rngs, lora=lora("o_proj"))
        self.q_norm = RMSNorm(h, cfg, rngs=rngs) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, cfg, rngs=rngs) if cfg.qk_norm else None
        self.num_kv_heads = k
        self.head_dim = h

    def _proj(self, p: Projection, x: jax.Array, key=None) -> jax.Array:
        y = jnp.einsum("BTD,DNH->BTNH", x, p.kernel[...].astype(x.dtype))
        if p.bias is not None:
            y = y + p.bias[...].astype(x.dtype)
        return p.adapt(x, y, key)

    def qkv(self, x, positions, inv_freq, key=None):
        """x [B,T,D], positions [B,T] -> q [B,T,N,H], k, v [B,T,K,H] (q/k norm and RoPE applied).
        `key`: LoRA dropout draws (training only)."""
        kq, kk, kv = _keys(key, 3)
        q = self._proj(self.q_proj, x, kq)
        k = self._proj(self.k_proj, x, kk)
        v = self._proj(self.v_proj, x, kv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def output(self, attended: jax.Array, key=None) -> jax.Array:
        """[B,T,N,H] attention outputs -> [B,T,D]. Heads and head dim are contracted as one
        merged dim F = N*H: XLA then lays out the (small) activation to match the kernel,
        instead of transposing the kernel (on every decode step, on CPU)."""
        b, t, n, h = attended.shape
        kernel = self.o_proj.kernel[...].astype(attended.dtype).reshape(n * h, -1)  # [F, D]
        out = jnp.einsum("BTF,FD->BTD", attended.reshape(b, t, n * h), kernel)
        return self.o_proj.adapt(attended, out, key)

    def __call__(self, x, positions, inv_freq, attend, key=None):
        """x [B,T,D], positions [B,T]; attend(q [B,T,N,H], k, v [B,T,K,H]) -> (outputs
        [B,T,N,H], aux): stores the keys/values where the caller keeps them and runs
        `attention` over them. Returns (out [B,T,D], aux). `key`: LoRA dropout draws."""
        k_in, k_out = _keys(key, 2)
        q, k, v = self.qkv(x, positions, inv_freq, k_in)
        attended, aux = attend(q, k, v)
        return self.output(attended, k_out), aux


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lora = lambda name: bool(cfg.lora_rank) and name in cfg.lora_targets
        self.gate_proj = Projection((d,), (f,), cfg, bias=False, rngs=rngs, lora=lora("gate_proj"))
        self.up_proj = Projection((d,), (f,), cfg, bias=False, rngs=rngs, lora=lora("up_proj"))
        self.down_proj = Projection((f,), (d,), cfg, bias=False, rngs=rngs, lora=lora("down_proj"))

    def __call__(self, x, key=None):
        kg, ku, kd = _keys(key, 3)
        gate = jnp.einsum("BTD,DF->BTF", x, self.gate_proj.kernel[...].astype(x.dtype))
        up = jnp.einsum("BTD,DF->BTF", x, self.up_proj.kernel[...].astype(x.dtype))
        gate, up = self.gate_proj.adapt(x, gate, kg), self.up_proj.adapt(x, up, ku)
        hidden = mesh_lib.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        out = jnp.einsum("BTF,FD->BTD", hidden, self.down_proj.kernel[...].astype(x.dtype))
        return self.down_proj.adapt(hidden, out, kd)


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.hidden_size), cfg)  # [V, D]


class LMHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (cfg.hidden_size, cfg.vocab_size), cfg)  # [D, V]


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, inv_freq, attend, key=None):
        """x [B,T,D] -> (x [B,T,D], aux of `attend`; see `Attention.__call__`). `key`: LoRA
        dropout draws (training only)."""
        k_attn, k_mlp = _keys(key, 2)
        attn, aux = self.attn(self.input_norm(x), positions, inv_freq, attend, k_attn)
        x = x + attn
        x = x + self.mlp(self.post_attn_norm(x), k_mlp)
        return mesh_lib.constrain(x, ("batch", "seq", "act_embed")), aux


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys [L,B,K,H,S] and values [L,B,K,S,H] (the layouts `attention` reads), slot
    validity [B,S] and the next write slot []."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.v.shape[3]


def project_logits(hidden: jax.Array, unembedding: jax.Array) -> jax.Array:
    """float32 logits [B,T,V] from final hidden states [B,T,D] and the output projection [D,V]."""
    out = jnp.einsum("BTD,DV->BTV", hidden, unembedding.astype(hidden.dtype), preferred_element_type=F32)
    return mesh_lib.constrain(out, ("batch", "seq", "vocab"))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """RoPE positions of a (left-)padded batch: the index among the row's real tokens."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
    """Decoder-only transformer. `model(tokens, mask=...)` gives float32 logits [B,T,V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embed(cfg, rngs=rngs)
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
        # Adapters draw from their own stream: the base parameters are those of cfg.base().
        stacked = jax.vmap(lambda key: nnx.state(Block(cfg, rngs=nnx.Rngs(
            params=key, lora=jax.random.fold_in(key, 0x10A)))))(keys)
        self.blocks = nnx.merge(block_def, stacked)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg, rngs=rngs)

    # ---- pieces ----------------------------------------------------------------------------
    def unembedding(self) -> jax.Array:
        """The output projection [D,V] (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embed.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [B,T,V] from final hidden states [B,T,D]."""
        return project_logits(hidden, self.unembedding())

    def init_cache(self, batch: int, max_len: int, dtype: Optional[str] = None) -> KVCache:
        cfg = self.config
        dt = dtype_of(dtype or cfg.dtype)
        l, k, h = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        return KVCache(jnp.zeros((l, batch, k, h, max_len), dt), jnp.zeros((l, batch, k, max_len, h), dt),
                       jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

    # ---- forward ---------------------------------------------------------------------------
    def hidden_states(self, tokens, mask=None, positions=None, cache: Optional[KVCache] = None,
                      dropout_key: Optional[jax.Array] = None):
        """Final-norm hidden states [B,T,D] and the updated cache (None without a cache).
        `dropout_key`: draws for the LoRA adapters' dropout (`model.lora.dropout`; the update
        passes one, nothing else does)."""
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        mask = mask.astype(bool)
        b, t = tokens.shape
        if cache is None:
            if positions is None:
                positions = positions_from_mask(mask)
            q_slot = jnp.broadcast_to(jnp.arange(t), (b, t))
            kv_mask, index = mask, None
        else:
            if positions is None:
                raise ValueError("decode with a cache needs explicit positions")
            index = cache.index
            kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, index, axis=1)
            q_slot = jnp.broadcast_to(index + jnp.arange(t), (b, t))

        # A cache of exactly T slots is a prefill: slots [0, T) hold this call's tokens, so its
        # attention is the sequence's own.
        sequence = cache is None or cache.max_len == t
        impl = attention_kernels.resolve(cfg.attention, cfg.dtype) if sequence else None
        x = jnp.take(self.embed.embedding[...], tokens, axis=0).astype(dt)
        x = mesh_lib.constrain(x, ("batch", "seq", "act_embed"))
        inv_freq = rope_inv_freq(cfg)
        block_def, block_state = nnx.split(self.blocks)

        def body(carry, xs):
            layer_state, layer_cache, layer_key = xs
            block = nnx.merge(block_def, layer_state)

            def attend(q, k, v):  # q [B,T,N,H], k, v [B,T,K,H]
                if layer_cache is None:
                    return attention_kernels.sequence_attention(q, k, v, kv_mask, impl), None
                ck, cv = layer_cache
                kt, vt = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B,K,H,T], [B,K,T,H]
                ck = jax.lax.dynamic_update_slice_in_dim(ck, kt.astype(ck.dtype), index, axis=3)
                cv = jax.lax.dynamic_update_slice_in_dim(cv, vt.astype(cv.dtype), index, axis=2)
                if sequence:  # attend to the keys/values as the cache stores them
                    k, v = (x.astype(ck.dtype).astype(q.dtype) for x in (k, v))
                    return attention_kernels.sequence_attention(q, k, v, kv_mask, impl), (ck, cv)
                return attention(q, ck, cv, q_slot, kv_mask), (ck, cv)

            return block(carry, positions, inv_freq, attend, layer_key)

        if cfg.remat == "full":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        elif cfg.remat == "dots":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        layer_caches = None if cache is None else (cache.k, cache.v)
        layer_keys = None
        if dropout_key is not None and cfg.lora_dropout > 0:
            layer_keys = jax.random.split(dropout_key, cfg.num_layers)
        x, new_kv = jax.lax.scan(body, x, (block_state, layer_caches, layer_keys))
        x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, KVCache(new_kv[0], new_kv[1], kv_mask, index + t)

    def __call__(self, tokens, mask=None, positions=None, dropout_key=None) -> jax.Array:
        """float32 logits [B,T,V] of a full (left-padded) sequence batch (`dropout_key`: see
        `hidden_states`)."""
        hidden, _ = self.hidden_states(tokens, mask, positions, dropout_key=dropout_key)
        return self.logits(hidden)

    def decode(self, tokens, positions, cache: KVCache, mask=None):
        """Runs T new tokens against the cache; returns (float32 logits [B,T,V], new cache)."""
        hidden, cache = self.hidden_states(tokens, mask, positions, cache)
        return self.logits(hidden), cache
