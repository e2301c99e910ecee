"""Per-token log-probabilities and entropies, from logits or memory-bounded from hidden states.

Dims: B batch, T positions, D hidden width, V vocabulary, C sequence chunk, N = T/C chunks,
K vocabulary blocks, Vb = V/K block width.

`token_logprobs_and_entropy` takes full logits `[B,T,V]`. `chunked_token_logprobs_and_entropy`
takes the final hidden states and the unembedding matrix and never forms `[B,T,V]` logits:
it tiles positions into chunks of C and the vocabulary into K blocks, keeps an online
log-sum-exp and entropy per position (forward), and recomputes each `[B,C,Vb]` tile of
logits in a custom backward pass, accumulating gradients in float32. Live memory is
O(B*C*Vb + B*T*D + D*Vb) plus the unembedding gradient itself. Both functions return float32
values and agree in value and gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_logprobs_and_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-prob of `targets` and entropy of the full next-token distribution.

    Args:
      logits: `[B,T,V]` (any float dtype; upcast to float32).
      targets: `int[B,T]` token ids.
    Returns:
      `(logprobs[B,T], entropy[B,T])`, float32; entropy = -sum_v p_v log p_v.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    lp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    p = jnp.exp(logp)
    # p * logp with logits of -inf (masked vocabulary entries) is 0, not NaN.
    entropy = -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)
    return lp, entropy


def chunked_token_logprobs_and_entropy(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    chunk_size: int = 1024,
    bias: jax.Array | None = None,
    vocab_blocks: int = 8,
) -> tuple[jax.Array, jax.Array]:
    """`token_logprobs_and_entropy(hidden @ unembed + bias, targets)` without `[B,T,V]` logits.

    Args:
      hidden: `[B,T,D]` final hidden states (after the final norm), any float dtype.
      unembed: `[D,V]` unembedding matrix (the transposed embedding for tied weights).
      targets: `int[B,T]` the token whose log-prob is wanted at each position.
      chunk_size: positions per chunk C; T need not be a multiple (padded internally).
      bias: optional `[V]` output bias.
      vocab_blocks: number of vocabulary blocks K; the largest divisor of V not above it is
        used. Block j holds the columns v with v % K == j, so a vocabulary sharded in
        contiguous slices stays sharded inside every block.
    Returns:
      `(logprobs[B,T], entropy[B,T])`, float32, differentiable in hidden, unembed and bias
      (custom VJP: recomputes logits; gradients accumulated in float32, returned in the
      input dtypes). Logits are float32 (`preferred_element_type`), as in the plain form
      with `einsum(..., preferred_element_type=float32)`.
    """
    if chunk_size <= 0 or vocab_blocks <= 0:
        raise ValueError(f"chunk_size and vocab_blocks must be positive, got {chunk_size}, {vocab_blocks}")
    b, t, d = hidden.shape
    if unembed.ndim != 2 or unembed.shape[0] != d:
        raise ValueError(f"unembed must be [D={d}, V], got shape {unembed.shape}")
    if targets.shape != (b, t):
        raise ValueError(f"targets must be [B={b}, T={t}], got shape {targets.shape}")
    v = unembed.shape[1]
    k = max(i for i in range(1, min(vocab_blocks, v) + 1) if v % i == 0)
    has_bias = bias is not None
    if bias is None:
        bias = jnp.zeros((v,), jnp.float32)
    chunk = min(chunk_size, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden_c = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    targets_c = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    # Column v = a * K + j lives at [..., a, j]: a bitcast, no copy.
    lp, ent = _chunked(hidden_c, unembed.reshape(d, v // k, k), bias.reshape(v // k, k), targets_c, has_bias)
    lp = lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]  # lp, ent: [N, B, C] -> [B, T]
    ent = ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return lp, ent


def _block_logits(h, w_j, b_j):
    """[B,C,D] x [D,Vb] (+ [Vb]) -> float32 [B,C,Vb]; bf16 products are exact in float32."""
    logits = jax.lax.dot_general(h, w_j, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return logits + b_j.astype(jnp.float32)


def _vocab_block(w, bias, j):
    """Block j of the vocabulary (columns v with v % K == j): ([D,Vb], [Vb]); j traced.

    A `lax.switch` over static slices rather than a dynamic slice: XLA:CPU upcasts dynamic
    slices (and updates) of bf16 arrays to float32 and hoists a float32 copy of the whole
    unembedding out of the loop; a branch touches only the block it handles.
    """
    branches = [lambda w, bias, i=i: (w[:, :, i], bias[:, i]) for i in range(w.shape[2])]
    return jax.lax.switch(j, branches, w, bias)


def _set_vocab_block(w, bias, w_j, b_j, j):
    """`w[:, :, j] = w_j; bias[:, j] = b_j` in place, j traced (static updates, as above)."""
    branches = [
        lambda w, bias, w_j, b_j, i=i: (w.at[:, :, i].set(w_j), bias.at[:, i].set(b_j)) for i in range(w.shape[2])
    ]
    return jax.lax.switch(j, branches, w, bias, w_j, b_j)


def _scan_forward(hidden_c, w, bias, targets_c):
    """Online log-softmax over vocabulary blocks: (logprob, entropy, lse), each [N,B,C].

    Outer scan over blocks j, inner scan over sequence chunks. Per position: running max
    `mx`, `s = sum exp(z - mx)`, `u = sum exp(z - mx) (z - mx)` over the blocks seen; at the
    end lse = mx + log s and entropy = log s - u / s (no cancellation for peaked rows).
    """
    k = w.shape[2]
    tgt_a, tgt_j = targets_c // k, targets_c % k

    def vocab_step(state, j):
        w_j, b_j = _vocab_block(w, bias, j)

        def chunk_step(_, xs):
            h, a, jt, mx, s, u, z_tgt = xs
            z = _block_logits(h, w_j, b_j)  # [B, C, Vb]
            mx_new = jnp.maximum(mx, jnp.max(z, axis=-1))
            shift = mx - mx_new  # -inf on the first block, where s = 0
            scale = jnp.exp(shift)
            e = jnp.exp(z - mx_new[..., None])
            u = scale * (u + jnp.where(s > 0, shift * s, 0.0)) + jnp.sum(e * (z - mx_new[..., None]), axis=-1)
            s = scale * s + jnp.sum(e, axis=-1)
            z_at = jnp.take_along_axis(z, a[..., None], axis=-1)[..., 0]
            return None, (mx_new, s, u, z_tgt + jnp.where(jt == j, z_at, 0.0))

        _, state = jax.lax.scan(chunk_step, None, (hidden_c, tgt_a, tgt_j, *state))
        return state, None

    zeros = jnp.zeros(targets_c.shape, jnp.float32)
    init = (jnp.full(targets_c.shape, -jnp.inf, jnp.float32), zeros, zeros, zeros)
    (mx, s, u, z_tgt), _ = jax.lax.scan(vocab_step, init, jnp.arange(k))
    lse = mx + jnp.log(s)
    return z_tgt - lse, jnp.log(s) - u / s, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(hidden_c, w, bias, targets_c, has_bias):
    lp, ent, _ = _scan_forward(hidden_c, w, bias, targets_c)
    return lp, ent


def _chunked_fwd(hidden_c, w, bias, targets_c, has_bias):
    lp, ent, lse = _scan_forward(hidden_c, w, bias, targets_c)
    return (lp, ent), (hidden_c, w, bias, targets_c, lse, ent)


def _chunked_bwd(has_bias, residuals, cotangents):
    """Outer scan over vocabulary blocks, inner scan over sequence chunks; logits recomputed.

    d lp / d z = onehot - p and d H / d z = -p (log p + H), z the logits. A block's
    unembedding gradient is accumulated in float32 over the chunks, cast once and written
    into the gradient in place; the hidden-state gradient is accumulated in float32.
    """
    hidden_c, w, bias, targets_c, lse, ent = residuals
    g_lp, g_ent = (g.astype(jnp.float32) for g in cotangents)  # [N, B, C]
    k = w.shape[2]
    tgt_a, tgt_j = targets_c // k, targets_c % k

    def vocab_step(carry, j):
        d_hidden, d_w, d_bias = carry
        w_j, b_j = _vocab_block(w, bias, j)

        def chunk_step(acc, xs):
            d_w_j, d_b_j = acc
            h, a, jt, lse_c, ent_c, glp, gent, dh = xs
            logp = _block_logits(h, w_j, b_j) - lse_c[..., None]  # [B, C, Vb]
            p = jnp.exp(logp)
            onehot = (jnp.arange(logp.shape[-1]) == a[..., None]) & (jt == j)[..., None]
            d_z = glp[..., None] * (onehot - p) - gent[..., None] * p * (logp + ent_c[..., None])
            # Mixed-dtype dots with float32 accumulation, as JAX's own transpose of the
            # forward dot does.
            dh = dh + jax.lax.dot_general(d_z, w_j, (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            d_w_j = d_w_j + jax.lax.dot_general(h, d_z, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32)
            return (d_w_j, d_b_j + jnp.sum(d_z, axis=(0, 1))), dh

        init = (jnp.zeros(w_j.shape, jnp.float32), jnp.zeros(b_j.shape, jnp.float32))
        xs = (hidden_c, tgt_a, tgt_j, lse, ent, g_lp, g_ent, d_hidden)
        (d_w_j, d_b_j), d_hidden = jax.lax.scan(chunk_step, init, xs)
        d_w, d_bias = _set_vocab_block(d_w, d_bias, d_w_j.astype(w.dtype), d_b_j, j)
        return (d_hidden, d_w, d_bias), None

    init = (jnp.zeros(hidden_c.shape, jnp.float32), jnp.zeros(w.shape, w.dtype), jnp.zeros(bias.shape, jnp.float32))
    (d_hidden, d_w, d_bias), _ = jax.lax.scan(vocab_step, init, jnp.arange(k))
    d_bias = d_bias.astype(bias.dtype) if has_bias else jnp.zeros_like(bias)
    return d_hidden.astype(hidden_c.dtype), d_w, d_bias, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
