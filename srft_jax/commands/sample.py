"""`srft-jax sample --model DIR --prompt "..."`: sample completions and print them.

Examples:
  srft-jax sample --model /models/Qwen2.5-Math-1.5B --prompt "What is 7 * 8?"
  srft-jax sample --model runs/demo/export --prompt "2+2=" --n 4 --temperature 0.7 \\
      --max-new-tokens 256 --no-chat-template

The prompt goes through the tokenizer's chat template (one user turn, generation prompt added)
unless `--no-chat-template`; generation stops at the tokenizer's end-of-sequence / end-of-turn
tokens. Each sample is printed after a `=== sample i (N tokens, stop|length) ===` header.
"""

from __future__ import annotations

import sys


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="HF model directory (weights + tokenizer)")
    parser.add_argument("--prompt", required=True, help="the user message (or raw text with "
                                                        "--no-chat-template)")
    parser.add_argument("--n", type=int, default=1, help="number of samples (default 1)")
    parser.add_argument("--temperature", type=float, default=0.7, help="default 0.7 (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k (default 0 = off)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="tokenize the prompt as is (with the tokenizer's special tokens)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="KV cache dtype (default: the model's compute dtype)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="parameter and compute dtype (default: float32)")


def prompt_ids(tokenizer, prompt: str, system=None, chat_template: bool = True) -> list[int]:
    """Token ids of the prompt, through the chat template unless disabled."""
    if not chat_template:
        return list(tokenizer(prompt)["input_ids"])
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; pass --no-chat-template")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def run(args) -> int:
    import numpy as np

    from srft_jax.data.tokenizer import decode_response, load_tokenizer, stop_token_ids
    from srft_jax.models import weights
    from srft_jax.sampler import Sampler, SamplerConfig

    overrides = {} if args.dtype is None else dict(param_dtype=args.dtype, dtype=args.dtype)
    model, _ = weights.load_pretrained(args.model, **overrides)
    tokenizer = load_tokenizer(args.model)
    ids = prompt_ids(tokenizer, args.prompt, args.system, not args.no_chat_template)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # One call compiles one shape, so the buckets are the exact prompt and response lengths.
    config = SamplerConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, prompt_buckets=(len(ids),),
        response_buckets=(args.max_new_tokens,), kv_cache_dtype=args.kv_cache_dtype)
    sampler = Sampler(config, stops, pad)
    tokens = np.asarray([ids], np.int32)
    out = sampler.generate(model, tokens, np.ones_like(tokens), num_samples=args.n, seed=args.seed)
    for row in range(out.num_rows):
        reason = "stop" if out.finished_by_stop[row] else "length"
        print(f"=== sample {row} ({int(out.lengths[row])} tokens, {reason}) ===")
        print(decode_response(tokenizer, out.response(row), stops))
    sys.stdout.flush()
    return 0
