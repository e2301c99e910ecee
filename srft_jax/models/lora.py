"""LoRA adapters on the decoder's projections: config, parameter split, merge, PEFT export.

Dims legend: L layers, r adapter rank, D model width, F MLP width, N query heads, K key/value
heads, H head dim; a projection's kernel is [*in, *out] (o_proj [N,H,D], the others [D,...]).

An adapted projection computes `x W + b + (alpha / r) (x A) B` with A [*in, r] and B [r, *out]
(`Projection` in decoder.py), A uniform in +-1/sqrt(fan_in), B = 0, so the adapted model equals
its base until the first update. Adapters are `nnx.LoRAParam` (a subclass of `nnx.Param`, the
type tunix and others select adapters by) and stay float32 whatever the base's dtype; their
logical axes are their kernel's (input axes on A, output axes on B, the rank replicated: see
`decoder.param_logical_axes`), so they shard with their projection on every mesh.

Why flax's `nnx.LoRAParam` in `Projection` and not qwix: `qwix.apply_lora_to_model` (0.1.8)
adds adapters by intercepting the model's matmuls on a traced call and creating parameters on
the module it finds them in. The decoder runs its L blocks as one `lax.scan` over stacked
parameters, with each block merged from its slice inside the scan body; qwix's interception
fails there (`IndexError: tuple index out of range` from `Decoder.hidden_states`), and a
parameter created on a block merged inside a scan body cannot become a stacked [L, ...]
parameter anyway. Applying qwix per layer before stacking would mean giving up the stacked
scan. Declaring the adapters in `Projection` keeps the scan, costs ~20 lines, and gives
tunix-compatible `nnx.LoRAParam` leaves.

Training touches only the adapters: `split_params` separates a parameter pure dict into
(adapters, base); the jitted train step differentiates with respect to the adapters only and
its optimiser state covers only them (train_step.py). `merged_params` folds the adapters into
the kernels (`W + (alpha / r) A B`, in the kernel's dtype) for the HF export; `peft_tensors`
gives the adapters under the names and layout HF `peft` loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srft_jax.models.config import LORA_TARGETS, ModelConfig

ADAPTERS = ("lora_a", "lora_b")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# HF module path of each projection inside a layer.
HF_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
             "down_proj": "mlp.down_proj"}


@dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (config section `model.lora`).

    rank: adapter rank r; 0 (the default) = full fine-tuning, no adapters.
    alpha: the adapters' output is scaled by alpha / rank (PEFT's `lora_alpha`).
    targets: which projections get adapters: a list of regular expressions, each matched in
      full against the names q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
      (a plain name matches itself; '.*' = all, '[qkvo]_proj' = attention only).
    dropout: dropout on the adapters' input in the update's forward pass, as PEFT's
      `lora_dropout`: `scale * (dropout(x) A) B`; 0 (the default) = none. Sampling, the
      old-policy log-probs and evaluation never drop. The draws are a function of
      `train.seed`, the optimiser update count and the micro-batch, so a resumed run draws
      what an uninterrupted one would.
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = (".*",)
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0 (0 = no adapters), got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if not targets:
            raise ValueError("model.lora.targets is empty; name at least one projection")
        for pattern in targets:
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"model.lora.targets: {pattern!r} is not a regular expression ({e})") from None
            if not any(rx.fullmatch(name) for name in LORA_TARGETS):
                raise ValueError(f"model.lora.targets: {pattern!r} matches no projection of "
                                 f"{', '.join(LORA_TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def projections(self) -> tuple[str, ...]:
        """The projection names the targets select, in block order."""
        return tuple(n for n in LORA_TARGETS if any(re.fullmatch(p, n) for p in self.targets))

    def model_fields(self) -> dict:
        """The `ModelConfig` fields of this section."""
        if not self.enabled:
            return {"lora_rank": 0}
        return {"lora_rank": self.rank, "lora_alpha": float(self.alpha), "lora_targets": self.projections(),
                "lora_dropout": float(self.dropout)}


# ---- the parameter pure dict ------------------------------------------------------------------
def is_adapter(path: tuple) -> bool:
    return str(path[-1]) in ADAPTERS


def _walk(tree: dict, keep) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _walk(v, keep)
            if sub:
                out[k] = sub
        elif keep(k):
            out[k] = v
    return out


def split_params(params: dict) -> tuple[dict, dict]:
    """(adapters, base) of a parameter pure dict: the `lora_a`/`lora_b` leaves, and the rest."""
    return _walk(params, lambda k: k in ADAPTERS), _walk(params, lambda k: k not in ADAPTERS)


def join_params(adapters: dict, base: dict) -> dict:
    """The inverse of `split_params`."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = join_params(v, out.get(k, {})) if isinstance(v, dict) else v
    return out


def fold_adapters(params: dict, scale: float, stacked: bool = True) -> dict:
    """`params` (a pure dict holding projections) with every adapter folded into its kernel
    and dropped: `W + scale A B`, computed in float32 and stored in the kernel's dtype.
    stacked: the arrays have a leading layer axis L (the decoder's `blocks`)."""

    def delta(a, b):  # A [*in, r], B [r, *out] -> [*in, *out]
        return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)

    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and "lora_a" in v:
            kernel = v["kernel"]
            d = (jax.vmap(delta) if stacked else delta)(v["lora_a"], v["lora_b"])
            folded = (kernel.astype(jnp.float32) + scale * d).astype(kernel.dtype)
            out[k] = {**{n: x for n, x in v.items() if n not in ADAPTERS}, "kernel": folded}
        elif isinstance(v, dict):
            out[k] = fold_adapters(v, scale, stacked)
        else:
            out[k] = v
    return out


def merged_params(params: dict, cfg: ModelConfig) -> dict:
    """The decoder's parameter pure dict with every adapter folded into its kernel (jit-able)."""
    return fold_adapters(params, cfg.lora_scale, stacked=True)


def merged_model(model, mesh=None):
    """A decoder without adapters whose kernels hold the adapted weights (same shardings)."""
    from srft_jax.models.decoder import Decoder
    from srft_jax.models.weights import state_shardings

    cfg = model.config
    if not cfg.lora_rank:
        return model
    base_cfg = cfg.base()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(base_cfg, rngs=nnx.Rngs(0))))
    shardings = nnx.to_pure_dict(state_shardings(abstract, mesh)) if mesh is not None else None
    fn = jax.jit(lambda p: merged_params(p, cfg), out_shardings=shardings)
    merged = fn(nnx.to_pure_dict(nnx.state(model)))
    state = nnx.state(nnx.eval_shape(lambda: Decoder(base_cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, merged)
    return nnx.merge(graphdef, state)


def with_adapters(base_model, cfg: ModelConfig, mesh=None, seed: int = 0):
    """`base_model` (a decoder without adapters) with fresh adapters of `cfg` (B = 0), each
    created in its sharded layout; the base parameters are shared, not copied."""
    from srft_jax.models.decoder import Decoder
    from srft_jax.models.weights import state_shardings

    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shard = state_shardings(nnx.state(abstract, nnx.LoRAParam), mesh)

    def init():  # the base initialisers are dead code here: XLA drops them
        return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)), nnx.LoRAParam)

    adapters = jax.jit(init, out_shardings=shard)()
    params = join_params(nnx.to_pure_dict(adapters), nnx.to_pure_dict(nnx.state(base_model)))
    nnx.replace_by_pure_dict(abstract_state, params)
    return nnx.merge(graphdef, abstract_state)


def count_adapter_params(cfg: ModelConfig) -> int:
    """Adapter parameters of `cfg` (0 without adapters)."""
    from srft_jax.models.decoder import Decoder

    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.LoRAParam)))


# ---- the base model's identity -----------------------------------------------------------------
def fingerprint(base: dict) -> str:
    """A short hex digest of the base parameters' bits (the checkpoint module's per-array
    fingerprints, hashed together with their paths and dtypes; one jitted reduction)."""
    from srft_jax.checkpoint import _array_leaves, _fingerprints_jit

    leaves = _array_leaves(base)
    values = np.asarray(jax.device_get(_fingerprints_jit([x for _, x in leaves])))
    record = [[path, str(x.dtype), list(x.shape), int(v)] for (path, x), v in zip(leaves, values)]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]


# ---- PEFT export --------------------------------------------------------------------------------
def peft_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, float32 tensor) of every adapter: `lora_A.weight [r, in]` and
    `lora_B.weight [out, r]` of `base_model.model.model.layers.{i}.<module>` (inputs and
    outputs flattened in the order of the HF kernels, as `weights.to_hf` does)."""
    from srft_jax.models.weights import _host

    cfg = model.config
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))["blocks"]
    for group in ("attn", "mlp"):
        for name, sub in sorted(adapters.get(group, {}).items(), key=lambda kv: LORA_TARGETS.index(kv[0])):
            a, b = _host(sub["lora_a"]).astype(np.float32), _host(sub["lora_b"]).astype(np.float32)
            for i in range(cfg.num_layers):
                prefix = f"base_model.model.model.layers.{i}.{HF_MODULE[name]}"
                ai, bi = a[i].reshape(-1, cfg.lora_rank), b[i].reshape(cfg.lora_rank, -1)
                yield f"{prefix}.lora_A.weight", np.ascontiguousarray(ai.T)
                yield f"{prefix}.lora_B.weight", np.ascontiguousarray(bi.T)


def save_peft_adapter(model, out_dir: str, base_model_path: Optional[str]) -> str:
    """Writes a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the HF base model. Every
    process must call it (adapters are gathered); process 0 writes."""
    from safetensors.numpy import save_file

    cfg = model.config
    if not cfg.lora_rank:
        raise ValueError("the model has no LoRA adapters")
    tensors = dict(peft_tensors(model))
    if jax.process_index() != 0:
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "target_modules": list(cfg.lora_targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": os.path.abspath(base_model_path) if base_model_path else None,
    }
    with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def describe(cfg: ModelConfig) -> str:
    if not cfg.lora_rank:
        return "full fine-tuning"
    dropout = f", dropout {cfg.lora_dropout:g}" if cfg.lora_dropout else ""
    return (f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}{dropout} on {', '.join(cfg.lora_targets)}: "
            f"{count_adapter_params(cfg):,} adapter parameters")

