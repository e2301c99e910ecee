"""Completions of one prompt from a model: the library side of `srft-jax sample`.

    out = complete("/models/Qwen2.5-Math-1.5B", "What is 7 * 8?", n=4, temperature=0.7)
    for c in out: print(c.length, c.stopped, c.text)

The prompt goes through a `PromptTemplate` (the chat template with an optional system turn,
the bare question as the user turn and no think prefix, unless another template is given), or
is tokenised as it is with `chat_template=False`. Generation stops at the tokenizer's
end-of-sequence / end-of-turn tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from srft_jax.data.prompts import PromptTemplate


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    length: int  # tokens
    stopped: bool  # ended with a stop token (else hit max_new_tokens)


def plain_template(system: Optional[str] = None) -> PromptTemplate:
    """The chat template around the bare prompt: optional system turn, no think prefix."""
    return PromptTemplate(system_prompt=system or "", user_template="{question}", think_prefix="")


def prompt_ids(tokenizer, prompt: str, template: Optional[PromptTemplate] = None,
               chat_template: bool = True) -> list[int]:
    """Token ids of the prompt, through the chat template (`template`) unless disabled."""
    if not chat_template:
        return list(tokenizer(prompt)["input_ids"])
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; pass --no-chat-template")
    return (template or plain_template()).ids(tokenizer, prompt)


def complete(model_path: str, prompt: str, *, n: int = 1, temperature: float = 0.7,
             top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, seed: int = 0,
             template: Optional[PromptTemplate] = None, chat_template: bool = True,
             kv_cache_dtype: Optional[str] = None, dtype: Optional[str] = None) -> list[Completion]:
    """`n` completions of `prompt` from an HF model directory (weights + tokenizer)."""
    from srft_jax.data.tokenizer import decode_response, load_tokenizer, stop_token_ids
    from srft_jax.models import weights
    from srft_jax.sampler import Sampler, SamplerConfig

    overrides = {} if dtype is None else dict(param_dtype=dtype, dtype=dtype)
    model, _ = weights.load_pretrained(model_path, **overrides)
    tokenizer = load_tokenizer(model_path)
    ids = prompt_ids(tokenizer, prompt, template, chat_template)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # One call compiles one shape, so the buckets are the exact prompt and response lengths.
    config = SamplerConfig(temperature=temperature, top_p=top_p, top_k=top_k,
                           max_new_tokens=max_new_tokens, prompt_buckets=(len(ids),),
                           response_buckets=(max_new_tokens,), kv_cache_dtype=kv_cache_dtype)
    tokens = np.asarray([ids], np.int32)
    out = Sampler(config, stops, pad).generate(model, tokens, np.ones_like(tokens), num_samples=n, seed=seed)
    return [Completion(decode_response(tokenizer, out.response(row), stops), int(out.lengths[row]),
                       bool(out.finished_by_stop[row])) for row in range(out.num_rows)]
