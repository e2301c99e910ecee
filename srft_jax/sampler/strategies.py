"""Sampling strategies: tiny frozen dataclasses with one method, float32 from the logits on.

`sample(logits f32[N,V], keys [N]) -> (tokens int32[N], logprobs f32[N])`: one draw per row
with that row's key, and the token's log-prob under the distribution it was drawn from
(temperature, top-k, top-p applied; 0 for greedy, which is a point mass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import jax
import jax.numpy as jnp

F32 = jnp.float32


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


def draw(strategy: Strategy, logits: jax.Array, keys: jax.Array, step: jax.Array):
    """Draws one token per row at each row's step. logits f32[N,V], keys [N] (the rows' keys),
    step int32[] or int32[N] -> (tokens int32[N], logprobs, raw logprobs f32[N]); the raw
    log-prob is the token's under the model itself (temperature 1, no filtering)."""
    step = jnp.broadcast_to(step, keys.shape)
    tokens, logprobs = strategy.sample(logits, jax.vmap(jax.random.fold_in)(keys, step))
    raw = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    return tokens, logprobs, jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
