"""`srft-jax sample --model DIR --prompt "..."`: sample completions and print them.

Examples:
  srft-jax sample --model /models/Qwen2.5-Math-1.5B --prompt "What is 7 * 8?"
  srft-jax sample --model runs/demo/export --prompt "2+2=" --n 4 --temperature 0.7 \\
      --max-new-tokens 256 --no-chat-template

The prompt goes through the tokenizer's chat template (one user turn, generation prompt added)
unless `--no-chat-template`; generation stops at the tokenizer's end-of-sequence / end-of-turn
tokens. Each sample is printed after a `=== sample i (N tokens, stop|length) ===` header.
The work is `srft_jax.generate.complete`.
"""

from __future__ import annotations

import sys

from srft_jax.commands.common import non_negative_float, non_negative_int, positive_int, unit_interval


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="HF model directory (weights + tokenizer)")
    parser.add_argument("--prompt", required=True, help="the user message (or raw text with "
                                                        "--no-chat-template)")
    parser.add_argument("--n", type=positive_int, default=1, help="number of samples (default 1)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.7, help="default 0.7 (0 = greedy)")
    parser.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus mass (default 1.0 = off)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="top-k (default 0 = off)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="default 256")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="tokenize the prompt as is (with the tokenizer's special tokens)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="KV cache dtype (default: the model's compute dtype)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="parameter and compute dtype (default: float32)")


def run(args) -> int:
    from srft_jax.generate import complete, plain_template
    from srft_jax.runs import check_model_source

    model = check_model_source(args.model, "--model", gguf=False, run_dir=False)
    completions = complete(
        model, args.prompt, n=args.n, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed,
        template=plain_template(args.system), chat_template=not args.no_chat_template,
        kv_cache_dtype=args.kv_cache_dtype, dtype=args.dtype)
    for i, c in enumerate(completions):
        print(f"=== sample {i} ({c.length} tokens, {'stop' if c.stopped else 'length'}) ===")
        print(c.text)
    sys.stdout.flush()
    return 0
