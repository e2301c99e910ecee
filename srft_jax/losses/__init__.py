"""SRFT loss library: small pure JAX array functions, importable without the trainer.

Imports only jax, numpy and the standard library. Contents:
  logprobs    `token_logprobs_and_entropy`, `chunked_token_logprobs_and_entropy`
  advantages  `group_advantages`, `compute_advantages`
  config      `SRFTLossConfig` (presets paper / official / grpo / luffy / sft + switches)
  srft        `srft_loss`, `loss_normalizers`, `entropy_weights`

Typical use inside a jitted train step:

    lp, ent = chunked_token_logprobs_and_entropy(hidden, unembed, targets)   # [B,R] each
    loss, metrics = srft_loss(lp, ent, batch, SRFTLossConfig())
"""

from srft_jax.losses.advantages import batch_field, compute_advantages, group_advantages
from srft_jax.losses.config import PRESET_NAMES, SRFTLossConfig, preset_values
from srft_jax.losses.logprobs import chunked_token_logprobs_and_entropy, token_logprobs_and_entropy
from srft_jax.losses.srft import entropy_weights, loss_normalizers, srft_loss

__all__ = [
    "PRESET_NAMES",
    "SRFTLossConfig",
    "batch_field",
    "chunked_token_logprobs_and_entropy",
    "compute_advantages",
    "entropy_weights",
    "group_advantages",
    "loss_normalizers",
    "preset_values",
    "srft_loss",
    "token_logprobs_and_entropy",
]
