"""HF directory or GGUF file -> HF directory (safetensors + config.json + tokenizer files) in
one dtype; and a model's summary (architecture, exact parameter count, memory per dtype).

    convert("/models/Qwen2.5-Math-1.5B", "/models/qwen-math-1.5b-bf16", dtype="bfloat16")
    print("\\n".join(describe(read_model_config(path))))
"""

from __future__ import annotations

import os

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def convert(src: str, out: str, dtype: str = "bfloat16", max_shard_bytes: int = 4 * 10**9) -> str:
    """Loads `src` (HF directory, .gguf, or a training run directory: its latest checkpoint,
    LoRA adapters merged into their base) and writes an HF directory with tensors in `dtype`."""
    from srft_jax.models import gguf, weights
    from srft_jax.runs import is_run_dir

    if is_run_dir(src):
        return convert_run(src, out, dtype, max_shard_bytes)

    model, _ = weights.load_pretrained(src, param_dtype=dtype, dtype=dtype)
    if src.endswith(".gguf"):
        hf_config = gguf.read_config(src)
        tokens = {k: hf_config[k] for k in weights.TOKEN_FIELDS if k in hf_config}
        weights.save_pretrained(model, out, dtype, extra_config=tokens, max_shard_bytes=max_shard_bytes)
        gguf.save_tokenizer(src, out)
    else:
        weights.save_pretrained(model, out, dtype, source_dir=src, max_shard_bytes=max_shard_bytes)
    return out


def convert_run(run_dir: str, out: str, dtype: str, max_shard_bytes: int) -> str:
    """A run directory's latest checkpoint as an HF directory (with the run's tokenizer); a LoRA
    run's adapters are merged into the base they were trained on (its fingerprint checked)."""
    import jax

    from srft_jax import mesh as mesh_lib
    from srft_jax.models import weights
    from srft_jax.models.lora import merged_model
    from srft_jax.runs import load_model

    mesh = mesh_lib.make_mesh()
    model, tokenizer, _ = load_model(run_dir, mesh)
    with jax.set_mesh(mesh):
        model = merged_model(model, mesh)
    extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
             if getattr(tokenizer, k, None) is not None}
    weights.save_pretrained(model, out, dtype, tokenizer=tokenizer, extra_config=extra,
                            max_shard_bytes=max_shard_bytes)
    return out


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def checkpoint_summary(path: str) -> str:
    """Files, tensor count, on-disk dtypes and size of an HF directory's safetensors."""
    from srft_jax.models.weights import SafetensorsReader

    reader = SafetensorsReader(path)
    names = reader.names()
    dtypes = sorted({reader.dtype(n) for n in names})
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    reader.close()
    return f"{len(names)} tensors in {len(files)} file(s), {'/'.join(dtypes)}, {human_bytes(size)}"


def describe(cfg) -> list[str]:
    """Lines describing a `ModelConfig`: architecture, attention, embeddings, exact parameter
    count (`jax.eval_shape`, nothing allocated) and memory per dtype."""
    from srft_jax.models.weights import count_params

    num_params = count_params(cfg)
    return [
        f"architecture:  {cfg.arch} ({cfg.num_layers} layers, width {cfg.hidden_size}, "
        f"MLP {cfg.intermediate_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads "
        f"x {cfg.head_dim}, vocab {cfg.vocab_size})",
        f"attention:     bias={cfg.attention_bias} qk_norm={cfg.qk_norm} rope_theta={cfg.rope_theta:g}"
        + (f" llama3 scaling x{cfg.rope_scaling_factor:g}" if cfg.rope_scaling_factor else "")
        + f" max_position={cfg.max_position_embeddings}",
        f"embeddings:    {'tied' if cfg.tie_word_embeddings else 'untied'}",
        f"parameters:    {num_params:,} ({num_params / 1e9:.3f} B)" if num_params >= 10**8 else
        f"parameters:    {num_params:,} ({num_params / 1e6:.3f} M)",
        "memory:        " + " | ".join(f"{dt} {human_bytes(num_params * b)}" for dt, b in BYTES.items()),
    ]
