"""The decoder (Qwen2/2.5, Qwen3, Llama 3 / SmolLM2), its configs and HF / GGUF weight I/O."""

from srft_jax.models.config import PRESETS, ModelConfig, preset
from srft_jax.models.decoder import PARAM_AXES, Decoder, KVCache, param_logical_axes, positions_from_mask
from srft_jax.models.weights import (
    CheckpointError,
    abstract_model,
    create_sharded_model,
    load_pretrained,
    read_model_config,
    save_pretrained,
    state_shardings,
)

__all__ = [
    "PARAM_AXES", "PRESETS", "CheckpointError", "Decoder", "KVCache", "ModelConfig",
    "abstract_model", "create_sharded_model", "load_pretrained", "param_logical_axes",
    "positions_from_mask", "preset", "read_model_config", "save_pretrained", "state_shardings",
]
