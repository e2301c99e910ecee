"""Tokenizer helpers shared by training, sampling and evaluation (no JAX)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from srft_jax.faults import MissingDataError

# tokenizer_class values of generic fast tokenizers (e.g. the synthetic one); AutoTokenizer
# would otherwise pick the class from a neighbouring config.json's model type.
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved in `path`, honouring its `tokenizer_config.json` class.

    `AutoTokenizer` picks the class from config.json's model type when there is one, so a
    generic fast tokenizer saved next to a Qwen2-shaped model (the synthetic demo's HF
    export) would be re-read as `Qwen2Tokenizer`, whose byte-level decoder mangles it.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not os.path.isdir(path):
        raise MissingDataError(f"tokenizer directory {path!r} does not exist")
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            if json.load(f).get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES:
                return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS plus the usual end-of-turn tokens that exist in this vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[t] for t in _STOP_TOKENS if t in vocab}
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos token and none of " + ", ".join(_STOP_TOKENS))
    return tuple(sorted(int(i) for i in ids))


def decode_response(tokenizer: Any, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Response text for the reward: special tokens kept (`</think>` may be one), the final
    stop token dropped."""
    ids = [int(t) for t in ids]
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)
