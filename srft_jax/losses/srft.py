"""`srft_loss`: the SRFT objective (Eq. 13) and its baselines as one pure float32 function.

Dims: B sequences (demonstrations and rollouts mixed), R response positions.

Inputs per token: `lp` log-prob of the sequence's token, `h` entropy of the next-token
distribution, `m` response mask; per sequence: `is_demo`, `reward`, `advantage` (already
computed, see `compute_advantages`), and per token `old_logprobs` (`lp_old`, sampling policy;
read only by the ratio forms). Formulas: docs/srft-method.md; switches: `SRFTLossConfig`.

    loss = L_sft + L_rl - entropy_coef * mean(h)
    L_sft = sum_{demo tokens} w_sft * (-lp) / #demo tokens
    L_rl  = (sum_{demo tokens} -A f(p) + sum_{rollout tokens} on-policy term) / normaliser

The denominators come from `loss_normalizers` (of the batch itself by default, or of the
whole mini-batch when `srft_loss` runs on its micro-batches for gradient accumulation).
Weights `w_sft`, `w_rl` are functions of `sg(h)`, so the entropy receives gradient only
from the entropy bonus. Positions with mask 0 are zeroed before any arithmetic, so padded
values (even inf/NaN) never reach the loss or the gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from srft_jax.losses.advantages import batch_field
from srft_jax.losses.config import SRFTLossConfig

_SIGN = {"neg": -1.0, "pos": 1.0, "none": 0.0}


def srft_loss(
    logprobs: jax.Array,
    entropy: jax.Array,
    batch,
    config: SRFTLossConfig = SRFTLossConfig(),
    normalizers: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SRFT loss (or a baseline, per `config.preset`) and its metrics.

    Args:
      logprobs: `[B,R]` log-probs of the response tokens under the current policy.
      entropy: `[B,R]` entropies of the next-token distributions at those positions.
      batch: mapping or object with `response_mask float[B,R]`, `is_demo bool[B]`,
        `reward float[B]`, `advantage float[B]`, `old_logprobs float[B,R]`.
      config: `SRFTLossConfig` (hashable, so it can be a static jit argument).
      normalizers: the denominators, `loss_normalizers(batch, config)` of this batch when
        None. Pass those of the whole mini-batch when `batch` is one micro-batch of it: the
        losses (and gradients) of the micro-batches then sum to those of the mini-batch.
    Returns:
      `(loss, metrics)`: float32 scalar and a flat dict of float32 scalars (see
      `_metrics`); every mean over an empty set is 0.
    """
    m, m_demo, m_roll = _source_masks(batch)
    valid = m > 0
    lp = jnp.where(valid, logprobs.astype(jnp.float32), 0.0)
    h = jnp.where(valid, entropy.astype(jnp.float32), 0.0)
    reward = jnp.asarray(batch_field(batch, "reward"), jnp.float32)[:, None]  # [B, 1]
    adv = jnp.asarray(batch_field(batch, "advantage"), jnp.float32)[:, None]
    adv = jnp.where(jnp.any(valid, axis=-1, keepdims=True), adv, 0.0)

    w_sft, w_rl = entropy_weights(h, m, config)
    p = jnp.exp(lp)

    # Eq. 5, 8: SFT on demonstrations.
    sft_tok = w_sft * (-lp)
    # Eq. 9-10: off-policy RL on demonstrations, pi_beta = 1, optional LUFFY shaping.
    f_p = p / (p + config.shaping_gamma) if config.use_shaping else p
    demo_tok = -adv * f_p
    # Eq. 11-12 (or the ratio variants): on-policy RL on rollouts.
    roll_tok, clipped = _onpolicy_token_loss(lp, batch, m, reward, adv, w_rl, config)

    m_sft, m_demo_rl, m_onp = _term_masks(m_demo, m_roll, config)
    if normalizers is None:
        normalizers = loss_normalizers(batch, config)
    loss_sft = _safe_div(_masked_sum(sft_tok, m_sft), normalizers["sft"])
    loss_demo_rl = _safe_div(_masked_sum(demo_tok, m_demo_rl), normalizers["rl"])
    loss_onpolicy = _safe_div(_masked_sum(roll_tok, m_onp), normalizers["rl"])
    m_active = jnp.maximum(m_sft, m_demo_rl + m_onp)
    entropy_bonus = -config.entropy_coef * _safe_div(_masked_sum(h, m_active), normalizers["entropy"])
    loss = loss_sft + loss_demo_rl + loss_onpolicy + entropy_bonus

    terms = {
        "loss/total": loss,
        "loss/sft": loss_sft,
        "loss/demo_rl": loss_demo_rl,
        "loss/onpolicy": loss_onpolicy,
        "loss/rl": loss_demo_rl + loss_onpolicy,
        "loss/entropy_bonus": entropy_bonus,
        "loss/rl_normaliser": jnp.asarray(normalizers["rl"], jnp.float32),
    }
    metrics = _metrics(terms, m_demo, m_roll, h, p, w_sft, w_rl, reward, clipped, config)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def loss_normalizers(batch, config: SRFTLossConfig) -> dict[str, jax.Array]:
    """Denominators of the loss terms of `batch` (float32 scalars):

      sft      number of demonstration tokens receiving the SFT term;
      rl       RL denominator (`config.rl_normalizer`): tokens receiving an RL term,
               B_rl * T_max over the sequences that receive one, or the constant
               `config.rl_norm_constant` (LUFFY's L_max);
      entropy  number of tokens of sequences receiving some term (entropy-bonus mean).
    Reads only `response_mask` and `is_demo`.
    """
    _, m_demo, m_roll = _source_masks(batch)
    m_sft, m_demo_rl, m_onp = _term_masks(m_demo, m_roll, config)
    m_rl = m_demo_rl + m_onp
    if config.rl_normalizer == "token_mean":
        rl = jnp.sum(m_rl)
    elif config.rl_normalizer == "constant":
        if not config.rl_norm_constant > 0:
            raise ValueError("SRFTLossConfig.rl_norm_constant must be > 0 with rl_normalizer='constant' "
                             "(LUFFY: the max response length, e.g. 8192)")
        rl = jnp.asarray(config.rl_norm_constant, jnp.float32)
    else:
        lengths = jnp.sum(m_rl, axis=-1)  # [B]
        rl = jnp.sum(lengths > 0).astype(jnp.float32) * jnp.max(lengths, initial=0.0)
    return {"sft": jnp.sum(m_sft), "rl": rl, "entropy": jnp.sum(jnp.maximum(m_sft, m_rl))}


def _source_masks(batch):
    """(m, m_demo, m_roll), each float32 [B,R] of 0/1: response tokens, of demos, of rollouts."""
    m = jnp.where(jnp.asarray(batch_field(batch, "response_mask")) > 0, 1.0, 0.0)
    is_demo = jnp.asarray(batch_field(batch, "is_demo"), bool)[:, None]  # [B, 1]
    return m, jnp.where(is_demo, m, 0.0), jnp.where(is_demo, 0.0, m)


def _term_masks(m_demo, m_roll, config):
    """Tokens receiving the SFT, off-policy demo and on-policy terms under `config`."""
    off = jnp.zeros_like(m_demo)
    return (
        m_demo if config.use_sft else off,
        m_demo if config.use_demo_rl else off,
        m_roll if config.use_onpolicy_rl else off,
    )


def entropy_weights(h: jax.Array, m: jax.Array, config: SRFTLossConfig) -> tuple[jax.Array, jax.Array]:
    """Stop-gradient `w_sft[B,R]` (Eq. 8) and `w_rl[B,R]` (Eq. 12) from entropies `h[B,R]`."""
    h = jax.lax.stop_gradient(h)
    if config.entropy_granularity == "sequence":
        h_seq = _safe_div(jnp.sum(h * m, axis=-1, keepdims=True), jnp.sum(m, axis=-1, keepdims=True))
        h = jnp.broadcast_to(h_seq, m.shape)
    w_sft = config.sft_coef * jnp.exp(_SIGN[config.sft_weight_sign] * h)
    w_rl = config.rl_coef * jnp.exp(_SIGN[config.rl_weight_sign] * h)
    return w_sft, w_rl


def _onpolicy_token_loss(lp, batch, m, reward, adv, w_rl, config):
    """Per-token rollout loss `[B,R]` and the clipped-token indicator (None if no clipping)."""
    if config.onpolicy_form == "reinforce":
        correct = reward > 0
        return jnp.where(correct, -w_rl * lp, lp), None
    old = jnp.where(m > 0, jnp.asarray(batch_field(batch, "old_logprobs"), jnp.float32), 0.0)
    ratio = jnp.exp(lp - old)
    tok = -adv * ratio
    clipped = None
    if config.use_clip:
        eps = config.clip_eps
        tok_clip = -adv * jnp.clip(ratio, 1.0 - eps, 1.0 + eps)
        clipped = tok_clip > tok
        tok = jnp.maximum(tok, tok_clip)
    if config.onpolicy_form == "ratio_reweighted":
        tok = jnp.where(adv > 0, w_rl, 1.0) * tok
    return tok, clipped


def _masked_sum(x, mask):
    """sum of x where mask > 0; an inf elsewhere (e.g. -lp of a zero-probability token that
    this term does not cover) cannot turn into NaN."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0))


def _safe_div(num, den):
    """num / den, and 0 where den == 0 (gradient-safe)."""
    nonzero = den > 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def _metrics(terms, m_demo, m_roll, h, p, w_sft, w_rl, reward, clipped, config):
    """Loss terms plus, per source s in (demo, rollout): s/tokens, s/sequences, s/entropy,
    s/prob, s/w_sft, s/w_rl (token means); rollout/correct_fraction (of rollout sequences);
    rollout/clip_fraction (of rollout tokens) when the ratio is clipped."""
    out = dict(terms)
    for name, mask in (("demo", m_demo), ("rollout", m_roll)):
        n = jnp.sum(mask)
        out[f"{name}/tokens"] = n
        out[f"{name}/sequences"] = jnp.sum(jnp.any(mask > 0, axis=-1)).astype(jnp.float32)
        out[f"{name}/entropy"] = _safe_div(jnp.sum(h * mask), n)
        out[f"{name}/prob"] = _safe_div(jnp.sum(p * mask), n)
        out[f"{name}/w_sft"] = _safe_div(jnp.sum(w_sft * mask), n)
        out[f"{name}/w_rl"] = _safe_div(jnp.sum(w_rl * mask), n)
    roll_seq = jnp.any(m_roll > 0, axis=-1)
    out["rollout/correct_fraction"] = _safe_div(
        jnp.sum(roll_seq & (reward[:, 0] > 0)).astype(jnp.float32), jnp.sum(roll_seq).astype(jnp.float32)
    )
    if clipped is not None and config.use_onpolicy_rl:
        out["rollout/clip_fraction"] = _safe_div(jnp.sum(jnp.where(clipped, m_roll, 0.0)), jnp.sum(m_roll))
    return out
