"""The pure, jitted SRFT update: `train_step(params, opt_state, batch) -> (params, opt_state, metrics)`.

Dims: M micro-batches, b sequences per micro-batch, P prompt width, R response width,
D model width, V vocabulary.

The batch arrives as [M, b, ...] (see `batch.to_micro_batches`). Gradients of the loss are
accumulated over micro-batches in a `lax.scan`; the loss's normalisers (token counts) are
computed once for the whole mini-batch, so the accumulated gradient is exactly that of
`srft_loss` on the whole mini-batch. Log-probs and entropies come from the chunked form that
never holds [b, R, V]. A non-finite loss or gradient keeps the old parameters and optimiser
state and reports `train/skipped = 1`.

With LoRA (models/lora.py) `params` holds only the adapters and the frozen base parameters come
as a fourth argument (`train_step(adapters, opt_state, batch, frozen)`): gradients, optimiser
state and updates exist for the adapters alone, and the base is read, never written or donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from srft_jax import mesh as mesh_lib
from srft_jax.batch import MixedBatch
from srft_jax.losses import SRFTLossConfig, chunked_token_logprobs_and_entropy, loss_normalizers, srft_loss
from srft_jax.models.lora import join_params
from srft_jax.models.weights import state_shardings


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a learning-rate schedule (config section `train.optim`).

    lr: peak learning rate (paper: 1e-6).
    b1, b2: Adam betas (paper: 0.9, 0.999).
    weight_decay: decoupled weight decay (paper: 0.01).
    grad_clip: global gradient-norm clip; 0 = off (paper: 1.0).
    schedule: 'constant' (paper) or 'cosine' (from lr down to 0 at the last update).
    warmup_steps: training steps of linear warmup from 0 to lr before the schedule.
    The schedule advances once per optimiser update (`train.updates_per_step` per step).
    """

    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self):
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr, weight_decay and grad_clip must be >= 0, got "
                             f"{self.lr}, {self.weight_decay}, {self.grad_clip}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"b1/b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; choose 'constant' or 'cosine'")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def make_schedule(cfg: OptimizerConfig, steps: int, updates_per_step: int = 1) -> optax.Schedule:
    """The learning rate as a function of the update count, for a run of `steps` training
    steps of `updates_per_step` updates each."""
    warmup = cfg.warmup_steps * updates_per_step
    decay = max(steps * updates_per_step - warmup, 1)
    main = optax.cosine_decay_schedule(cfg.lr, decay) if cfg.schedule == "cosine" else optax.constant_schedule(cfg.lr)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def make_optimizer(cfg: OptimizerConfig, steps: int = 1, updates_per_step: int = 1) -> optax.GradientTransformation:
    """AdamW following `make_schedule(cfg, steps, updates_per_step)`, after global-norm
    clipping when `cfg.grad_clip` > 0."""
    schedule = make_schedule(cfg, steps, updates_per_step)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def param_shardings(params: Any, mesh) -> Any:
    """NamedShardings of a parameter pure dict (the decoder's logical axes on `mesh`)."""
    return state_shardings(params, mesh)


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, p_shardings: Any, mesh) -> Any:
    """Optimiser-state shardings: per-parameter moments follow their parameter, the rest replicate."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract, p_shardings,
        transform_non_params=lambda _: mesh_lib.replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding))


def response_logprobs(model, mb: MixedBatch, chunk_size: int, dropout_key=None):
    """log pi(y_t) and entropy [b, R] of the response tokens of a micro-batch (`dropout_key`:
    the LoRA adapters' dropout draws, in the update only)."""
    tokens = jnp.concatenate([mb.prompt_tokens, mb.response_tokens], axis=1)  # [b, P + R]
    mask = jnp.concatenate([mb.prompt_mask, mb.response_mask], axis=1)
    hidden, _ = model.hidden_states(tokens, mask, dropout_key=dropout_key)  # [b, P + R, D]
    p = mb.prompt_tokens.shape[1]
    h_resp = hidden[:, p - 1:-1]  # the states that predict the response tokens, [b, R, D]
    return chunked_token_logprobs_and_entropy(h_resp, model.unembedding(), mb.response_tokens, chunk_size)


def _flat(batch: MixedBatch) -> MixedBatch:
    return batch.map(lambda a: a.reshape((-1,) + a.shape[2:]))


def update_count(opt_state) -> jax.Array:
    """The optimiser's update count (the first `count` in its state; 0 if it keeps none)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return found[0][1] if found else jnp.zeros((), jnp.int32)


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_config: SRFTLossConfig,
                    chunk_size: int = 1024, seed: int = 0) -> Callable:
    """The un-jitted step; `jit_train_step` adds shardings and donation. With LoRA dropout
    (`model.lora.dropout` > 0) micro-batch m of update n draws its dropout from
    fold_in(fold_in(key(seed), n), m), n the optimiser's update count: a resumed run draws
    what an uninterrupted one would."""

    def loss_fn(params, mb, normalizers, frozen, key):
        model = nnx.merge(graphdef, params if frozen is None else join_params(params, frozen))
        lp, ent = response_logprobs(model, mb, chunk_size, key)
        loss, _ = srft_loss(lp, ent, mb, loss_config, normalizers=normalizers)
        return loss, (lp, ent)

    def train_step(params, opt_state, batch: MixedBatch, frozen=None):
        normalizers = loss_normalizers(_flat(batch), loss_config)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        # Unused (and removed by XLA) unless the model has LoRA dropout.
        update_key = jax.random.fold_in(jax.random.key(seed), update_count(opt_state))

        def accumulate(carry, xs):
            mb, m = xs
            g_acc, l_acc = carry
            (loss, (lp, ent)), g = grad_fn(params, mb, normalizers, frozen, jax.random.fold_in(update_key, m))
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, l_acc + loss), (lp, ent)

        n_micro = jax.tree.leaves(batch)[0].shape[0]
        (grads, loss), (lp, ent) = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)),
                                                (batch, jnp.arange(n_micro)))
        # Exact whole-mini-batch metrics from the collected log-probs (no model involved).
        flat = _flat(batch)
        _, metrics = srft_loss(lp.reshape(flat.response_mask.shape), ent.reshape(flat.response_mask.shape),
                               flat, loss_config)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_params = keep(new_params, params)
        new_opt_state = keep(new_opt_state, opt_state)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["train/grad_norm"] = grad_norm
        metrics["train/skipped"] = 1.0 - finite.astype(jnp.float32)
        return new_params, new_opt_state, metrics

    return train_step


def make_logprob_fn(graphdef, chunk_size: int = 1024) -> Callable:
    """logprob_fn(params, batch [M, b, ...], frozen=None) -> log-probs [M, b, R] (the old
    policy's; `frozen`: the base parameters of a LoRA model, `params` its adapters)."""

    def logprob_fn(params, batch, frozen=None):
        full = params if frozen is None else join_params(params, frozen)

        def one(_, mb):
            lp, _ = response_logprobs(nnx.merge(graphdef, full), mb, chunk_size)
            return None, lp

        return jax.lax.scan(one, None, batch)[1]

    return logprob_fn


def batch_shardings(mesh, batch: MixedBatch) -> MixedBatch:
    """Micro-batched arrays [M, b, ...]: b over ('data', 'fsdp'), everything else replicated."""

    def one(a):
        logical = (None, "batch") + (None,) * (a.ndim - 2)
        return NamedSharding(mesh, mesh_lib.logical_to_spec(logical, a.shape, mesh))

    return jax.tree.map(one, batch)


def jit_train_step(step_fn, p_shardings, o_shardings, b_shardings, mesh, f_shardings=None):
    """The jitted step; `f_shardings`: those of the frozen base of a LoRA model (an extra,
    not donated, argument)."""
    extra = () if f_shardings is None else (f_shardings,)
    return jax.jit(step_fn, in_shardings=(p_shardings, o_shardings, b_shardings) + extra,
                   out_shardings=(p_shardings, o_shardings, mesh_lib.replicated(mesh)),
                   donate_argnums=(0, 1))
