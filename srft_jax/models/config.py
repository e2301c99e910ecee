"""Decoder configuration: one frozen dataclass for the Qwen2/2.5, Qwen3 and Llama/SmolLM2 families.

`ModelConfig.from_hf(config_dict)` reads a Hugging Face `config.json`; presets give the paper's
model sizes (for shape checks without weights) and a `tiny()` model for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from srft_jax.faults import BadModelError, MissingDataError

ARCHS = ("qwen2", "qwen3", "llama")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
# Projections that can carry LoRA adapters (`lora_targets`), in the order of a block.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("auto", "xla", "splash", "cudnn")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of the decoder.

    arch: 'qwen2' (Qwen2, Qwen2.5, Qwen2.5-Math: q/k/v bias), 'qwen3' (q/k RMSNorm, explicit
      head_dim) or 'llama' (Llama 3, SmolLM2: no bias).
    head_dim: 0 means hidden_size // num_heads.
    rope_scaling_*: Llama-3 style frequency scaling; factor 0 disables it.
    param_dtype / dtype: storage and compute dtypes ('float32', 'bfloat16', 'float16').
    remat: per-layer rematerialisation: 'none', 'full' (save nothing) or 'dots' (save matmuls).
    attention: the attention over a whole sequence (training forward/backward, scoring, the
      prefill): 'xla' (a masked softmax, any platform), 'splash' (the Pallas splash kernel, TPU),
      'cudnn' (cuDNN flash attention, NVIDIA GPU, bfloat16/float16) or 'auto' (splash on TPU,
      cudnn on an NVIDIA GPU with a 16-bit dtype, else xla), resolved from the platform of the
      devices in use when the program is traced (`models/attention_kernels.py`). The decode step
      always uses the block-wise attention over its cache.
    """

    arch: str = "qwen2"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    qk_norm: bool = False
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.0

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is not supported; choose one of {ARCHS}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ValueError(f"model.head_dim must be >= 0 (0 = hidden_size // num_heads), got {self.head_dim}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                    f"{self.num_heads}")
            if (self.hidden_size // self.num_heads) % 2:
                raise ValueError(
                    f"model.hidden_size={self.hidden_size} / model.num_heads={self.num_heads} gives "
                    f"attention heads of size {self.hidden_size // self.num_heads}; RoPE needs an even size")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                             f"model.num_kv_heads={self.num_kv_heads}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {DTYPES}")
        if self.remat not in REMAT:
            raise ValueError(f"model.remat={self.remat!r}; choose one of {REMAT}")
        if self.attention not in ATTENTION:
            raise ValueError(f"model.attention={self.attention!r}; choose one of {ATTENTION}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a list from JSON
        if self.lora_rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0 (0 = no adapters), got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.lora_dropout}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"model.lora.targets: {bad[0]!r} is not a projection; choose from {LORA_TARGETS}")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def base(self) -> "ModelConfig":
        """This architecture without adapters."""
        return dataclasses.replace(self, lora_rank=0)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- sizes -------------------------------------------------------------------------
    def num_params(self) -> int:
        """Exact parameter count (matches the HF checkpoint's tensor sizes)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_heads, self.num_kv_heads
        attn = d * n * h + 2 * d * k * h + n * h * d
        if self.attention_bias:
            attn += n * h + 2 * k * h
        if self.qk_norm:
            attn += 2 * h
        mlp = 3 * d * f
        layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dict. Fails naming the field."""
        model_type = hf.get("model_type")
        if model_type not in ARCHS:
            raise ValueError(
                f"config.json model_type={model_type!r} is not supported (supported: {ARCHS})")

        def req(key):
            if key not in hf:
                raise ValueError(f"config.json is missing required field {key!r}")
            return hf[key]

        num_heads = req("num_attention_heads")
        hidden = req("hidden_size")
        if model_type == "qwen2":
            if hf.get("use_sliding_window", False):
                raise ValueError("config.json use_sliding_window=true is not supported")
            bias, qk_norm = True, False
        elif model_type == "qwen3":
            bias, qk_norm = bool(hf.get("attention_bias", False)), True
        else:
            bias, qk_norm = bool(hf.get("attention_bias", False)), False
            if hf.get("mlp_bias", False):
                raise ValueError("config.json mlp_bias=true is not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r} is not supported (only 'silu')")
        rope = dict(hf.get("rope_scaling") or {})
        rope_params = dict(hf.get("rope_parameters") or {})
        theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling_kwargs = {}
        rtype = rope.get("rope_type", rope.get("type")) or rope_params.get("rope_type")
        src = rope if rope else rope_params
        if rtype in (None, "default"):
            pass
        elif rtype == "llama3":
            scaling_kwargs = dict(
                rope_scaling_factor=float(src["factor"]),
                rope_low_freq_factor=float(src.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(src.get("high_freq_factor", 4.0)),
                rope_original_max_position=int(src.get("original_max_position_embeddings", 8192)),
            )
        else:
            raise ValueError(f"config.json rope_scaling type {rtype!r} is not supported")
        head_dim = hf.get("head_dim") or hidden // num_heads
        kwargs = dict(
            arch=model_type,
            vocab_size=req("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_layers=req("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bias,
            qk_norm=qk_norm,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            **scaling_kwargs,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, model_dir: str, **overrides) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise MissingDataError(f"no config.json in model directory {model_dir!r}")
        try:
            with open(path) as f:
                hf = json.load(f)
        except (OSError, ValueError) as e:  # unreadable, or not JSON
            raise BadModelError(f"{path}: not a readable JSON file ({e})") from None
        try:
            return cls.from_hf(hf, **overrides)
        except ValueError as e:
            raise BadModelError(f"{path}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers loads for this architecture."""
        archs = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
        hf = dict(
            architectures=[archs[self.arch]],
            model_type=self.arch,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            torch_dtype=self.param_dtype,
        )
        if self.arch != "qwen2":
            hf["attention_bias"] = self.attention_bias
        if self.arch == "llama":
            hf["mlp_bias"] = False
        if self.rope_scaling_factor:
            hf["rope_scaling"] = dict(
                rope_type="llama3", factor=self.rope_scaling_factor,
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position)
        return hf

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A 2-layer Qwen2-shaped model for tests."""
        kw = dict(arch="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=False)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def qwen2_5_math_1_5b(cls, **overrides) -> "ModelConfig":
        kw = dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_layers=28, num_heads=12, num_kv_heads=2, rope_theta=10000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def qwen2_5_math_7b(cls, **overrides) -> "ModelConfig":
        kw = dict(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=10000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def qwen2_5_math_7b_16k(cls, **overrides) -> "ModelConfig":
        """The paper's variant: RoPE theta raised 10k -> 40k and a 16k context window."""
        kw = dict(rope_theta=40000.0, max_position_embeddings=16384)
        kw.update(overrides)
        return cls.qwen2_5_math_7b(**kw)


PRESETS = {
    "tiny": ModelConfig.tiny,
    "qwen2.5-math-1.5b": ModelConfig.qwen2_5_math_1_5b,
    "qwen2.5-math-7b": ModelConfig.qwen2_5_math_7b,
    "qwen2.5-math-7b-16k": ModelConfig.qwen2_5_math_7b_16k,
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)

