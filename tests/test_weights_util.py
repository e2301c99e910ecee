"""Shared helpers for the weight tests (tiny random HF models) and unit tests of the name-map
transforms against direct NumPy reshapes."""

import json
import os

import numpy as np
import pytest

from srft_jax.models import weights

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
# name -> (transformers class names, extra config); covers bias / qk-norm / tied / llama3 rope.
MODELS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "qwen3-tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8, tie_word_embeddings=True)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5e5)),
    "llama-tied-rope3": ("LlamaConfig", "LlamaForCausalLM",
                         dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)),
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A tiny random HF model in eval mode; norms and biases are randomised too (they start at
    1 / 0, which would hide a mapping mistake)."""
    import torch
    import transformers

    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "bias" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(model, path, max_shard_size=None, dtype=None) -> str:
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, **kwargs)
    return str(path)


def left_padded_batch(seed: int = 0):
    """tokens int[3,10], mask int[3,10]: row 0 full, rows 1 and 2 left-padded by 3 and 6."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, VOCAB, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return tokens, mask


def hf_logits(model, tokens, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    return out.float().numpy()


def our_logits(model, tokens, mask) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(tokens), mask=jnp.asarray(mask)))


def masked_max_err(a, b, mask) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


def edit_config(path: str, **changes) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


# ---- unit tests of the transforms -----------------------------------------------------------------
def _reference_from_hf(rule, hf, shape):
    """Our parameter from an HF tensor, written directly with NumPy."""
    if rule.kind == "copy":
        return hf
    if rule.kind == "split":
        return hf.reshape(shape)
    return hf.T.reshape(shape)


CASES = [  # (rule path, our per-layer shape)
    (("blocks", "attn", "q_proj", "kernel"), (12, 4, 6)),
    (("blocks", "attn", "o_proj", "kernel"), (4, 6, 12)),
    (("blocks", "attn", "k_proj", "bias"), (4, 6)),
    (("embed", "embedding"), (10, 12)),
    (("lm_head", "kernel"), (12, 10)),
]


@pytest.mark.parametrize("path,shape", CASES)
def test_read_slice_matches_numpy_for_every_shard_slice(path, shape):
    rule = weights.RULE_BY_PATH[path]
    rng = np.random.RandomState(0)
    hf = rng.randn(*weights.hf_shape(rule, shape)).astype(np.float32)
    reader = weights.ArrayReader({"t": hf})
    full = _reference_from_hf(rule, hf, shape)
    np.testing.assert_array_equal(weights.to_hf(rule, full), hf)
    for trial in range(20):
        idx = []
        for n in shape:  # a random contiguous block per dim, as a device shard would ask
            parts = [p for p in (1, 2, 3, 4) if n % p == 0]
            k = parts[rng.randint(len(parts))]
            j = rng.randint(k)
            idx.append(slice(j * n // k, (j + 1) * n // k))
        got = weights.read_slice(reader, "t", rule, shape, tuple(idx))
        np.testing.assert_array_equal(got, full[tuple(idx)])


def test_plan_shards_respects_limit_and_order():
    layout = [("a", (10,)), ("b", (10,)), ("c", (30,)), ("d", (5,))]
    assert weights.plan_shards(layout, 4, 80) == [["a", "b"], ["c"], ["d"]]
    assert weights.plan_shards(layout, 4, 10**6) == [["a", "b", "c", "d"]]
