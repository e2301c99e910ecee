"""Sampler behaviour against independent references.

References: HF `transformers` greedy `generate` (token-for-token, tiny random Qwen2 and Llama),
a full forward pass of the same model over prompt + response (log-probs), NumPy formulas for
temperature / top-k / top-p distributions written here (chi-square tests with a fixed seed).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax import sampler as sampler_lib
from srft_jax.models.config import ModelConfig
from srft_jax.models.decoder import Decoder
from srft_jax.models.weights import load_pretrained, state_shardings
from srft_jax.sampler import Greedy, Sampler, SamplerConfig, Temperature, TopK, TopP, make_strategy

pytestmark = pytest.mark.compat

VOCAB = 128
PAD = 0
# kv_block 8: the caches of these tests (8 or 16 prompt + 16 or 32 response slots) have 3 to 6
# blocks, so every test runs the block-wise attention and its skipping of unfilled blocks.
SMALL = SamplerConfig(max_new_tokens=12, prompt_buckets=(8, 16), response_buckets=(8, 16, 32),
                      kv_block=8)
LENGTHS = [3, 7, 5, 1]  # the standard left-padded batch (prompt bucket 8)


@functools.lru_cache(maxsize=None)
def _sampler(stop_ids=(), kv_cache_dtype=None) -> Sampler:
    """Shared samplers, so tests with the same shapes reuse compiled programs (tests that count
    compiles or prefills use their own sampler or compare counters before/after)."""
    return Sampler(SMALL.replace(kv_cache_dtype=kv_cache_dtype), stop_ids=stop_ids, pad_id=PAD)


# ---- fixtures: tiny HF models and the same weights in our decoder --------------------------------
def _hf_model(arch: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed({"qwen2": 0, "llama": 1, "qwen3": 2}[arch])
    if arch == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    elif arch == "qwen3":  # q/k RMSNorm and head_dim * heads != hidden
        hf = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32)).eval()
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, rope_theta=5e5)).eval()
    with torch.no_grad():  # make norms and biases non-trivial, and logits less flat
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "embed_tokens" in name or "lm_head" in name:
                p.mul_(5.0)
    return hf


@functools.lru_cache(maxsize=None)
def _pair(arch: str, tmp_root: str):
    hf = _hf_model(arch)
    path = f"{tmp_root}/{arch}"
    hf.save_pretrained(path)
    model, _ = load_pretrained(path)
    return hf, model


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sampler_models"))


def _prompts(lengths, width=None, seed=0, vocab=VOCAB):
    """Left-padded random prompts (token ids 1..vocab-1, never the pad id)."""
    width = width or max(lengths)
    rs = np.random.RandomState(seed)
    tokens = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rs.randint(1, vocab, n)
        mask[i, width - n:] = 1
    return tokens, mask


def _hf_greedy(hf, tokens, mask, new, eos=None):
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = PAD
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD)
    return out[:, tokens.shape[1]:].numpy()


def _full_forward_logprobs(model, tokens, mask, out: sampler_lib.SampleOutput):
    """log_softmax of a full forward pass over [prompt ++ response]: [N, R, V] at the positions
    that predict each response token."""
    g = out.num_rows // tokens.shape[0]
    ptok = np.repeat(tokens, g, 0)
    pmask = np.repeat(mask, g, 0)
    seq = np.concatenate([ptok, out.tokens], 1)
    smask = np.concatenate([pmask, out.mask.astype(np.int32)], 1)
    logits = np.asarray(model(jnp.asarray(seq), mask=jnp.asarray(smask)), np.float64)
    p, r = tokens.shape[1], out.tokens.shape[1]
    return logits[:, p - 1: p - 1 + r]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- greedy parity with transformers ------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_greedy_matches_hf_generate(arch, tmp_root):
    hf, model = _pair(arch, tmp_root)
    tokens, mask = _prompts(LENGTHS)
    ref = _hf_greedy(hf, tokens, mask, new=12)
    out = _sampler().generate(
        model, tokens, mask, temperature=0.0, max_new_tokens=12)
    assert out.tokens.shape == (4, 16)
    np.testing.assert_array_equal(out.tokens[:, :12], ref)
    assert (out.lengths == 12).all() and not out.finished_by_stop.any()
    assert (out.tokens[:, 12:] == PAD).all() and (out.mask[:, 12:] == 0).all()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_with_eos_matches_hf_generate(arch, tmp_root):
    hf, model = _pair(arch, tmp_root)
    tokens, mask = _prompts(LENGTHS)
    free = _hf_greedy(hf, tokens, mask, new=12)
    eos = int(free[0, 4])  # row 0 stops after 5 tokens (or earlier if eos appeared before)
    ref = _hf_greedy(hf, tokens, mask, new=12, eos=eos)
    out = _sampler((eos,)).generate(
        model, tokens, mask, temperature=0.0, max_new_tokens=12)
    width = ref.shape[1]  # HF stops early when every row has finished
    np.testing.assert_array_equal(out.tokens[:, :width], ref)
    assert (out.tokens[:, width:] == PAD).all()
    for row in range(4):
        hits = np.flatnonzero(free[row] == eos)
        expect_len = hits[0] + 1 if hits.size else 12
        assert out.lengths[row] == expect_len
        assert out.finished_by_stop[row] == bool(hits.size)
    assert out.lengths[0] <= 5 and out.finished_by_stop[0]


# ---- log-probs ----------------------------------------------------------------------------------
def test_raw_logprobs_equal_full_forward(tmp_root):
    _, model = _pair("qwen2", tmp_root)
    tokens, mask = _prompts(LENGTHS)
    out = _sampler().generate(model, tokens, mask, num_samples=2, temperature=1.0, rng=3)
    assert len({tuple(r) for r in out.tokens}) == 8  # really sampled
    lsm = _log_softmax(_full_forward_logprobs(model, tokens, mask, out))
    ref = np.take_along_axis(lsm, out.tokens[..., None], -1)[..., 0]
    real = out.mask.astype(bool)
    assert np.abs(out.raw_logprobs - ref)[real].max() <= 1e-4
    # temperature 1 without filtering: the sampling distribution is the raw model
    np.testing.assert_allclose(out.logprobs, out.raw_logprobs, atol=1e-6)
    assert (out.raw_logprobs[~real] == 0).all() and (out.logprobs[~real] == 0).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (0.8, 0, 0.9),
                                                     (1.0, 6, 0.8)])
def test_sampling_logprobs_use_the_filtered_distribution(tmp_root, temperature, top_k, top_p):
    _, model = _pair("llama", tmp_root)
    tokens, mask = _prompts(LENGTHS)
    out = _sampler().generate(model, tokens, mask, num_samples=2, temperature=temperature,
                              top_k=top_k, top_p=top_p, rng=5)
    raw_logits = _full_forward_logprobs(model, tokens, mask, out)  # [N, R, V] float64
    logits = raw_logits / temperature
    if top_k:
        kth = np.sort(logits, -1)[..., -top_k][..., None]
        logits = np.where(logits >= kth, logits, -np.inf)
    if top_p < 1:
        probs = np.exp(_log_softmax(logits))
        order = np.argsort(-probs, -1)
        sorted_p = np.take_along_axis(probs, order, -1)
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        logits = np.where(keep, logits, -np.inf)
    ref = np.take_along_axis(_log_softmax(logits), out.tokens[..., None], -1)[..., 0]
    real = out.mask.astype(bool)
    assert np.isfinite(ref[real]).all()  # every sampled token lies in the filtered support
    assert np.abs(out.logprobs - ref)[real].max() <= 1e-4
    raw = np.take_along_axis(_log_softmax(raw_logits), out.tokens[..., None], -1)[..., 0]
    assert np.abs(out.raw_logprobs - raw)[real].max() <= 1e-4


def test_greedy_logprobs_are_point_mass(tmp_root):
    _, model = _pair("qwen2", tmp_root)
    tokens, mask = _prompts(LENGTHS)
    out = _sampler().generate(model, tokens, mask, temperature=0.0)
    assert (out.logprobs == 0).all()
    lsm = _log_softmax(_full_forward_logprobs(model, tokens, mask, out))
    real = out.mask.astype(bool)
    np.testing.assert_array_equal(out.tokens[real], lsm.argmax(-1)[real])
    ref = np.take_along_axis(lsm, out.tokens[..., None], -1)[..., 0]
    assert np.abs(out.raw_logprobs - ref)[real].max() <= 1e-4


# ---- group sharing --------------------------------------------------------------------------------
def test_group_shares_one_prefill_and_greedy_samples_agree(tmp_root):
    _, model = _pair("qwen2", tmp_root)
    tokens, mask = _prompts(LENGTHS)
    sampler = _sampler()
    before = dataclasses.replace(sampler.stats)
    group = sampler.generate(model, tokens, mask, num_samples=5, temperature=0.0)
    assert sampler.stats.prefill_calls - before.prefill_calls == 1
    assert sampler.stats.prefill_rows - before.prefill_rows == 4  # not 4 * 5
    assert sampler.stats.decode_rows - before.decode_rows == 20
    single = sampler.generate(model, tokens, mask, num_samples=1, temperature=0.0)
    np.testing.assert_array_equal(group.prompt_index, np.repeat(np.arange(4), 5))
    np.testing.assert_array_equal(group.sample_index, list(range(5)) * 4)
    for row in range(20):
        np.testing.assert_array_equal(group.tokens[row], single.tokens[group.prompt_index[row]])
        np.testing.assert_array_equal(group.raw_logprobs[row], single.raw_logprobs[group.prompt_index[row]])


def test_rows_do_not_depend_on_batch_layout(tmp_root):
    _, model = _pair("llama", tmp_root)
    sampler = _sampler()
    tokens, mask = _prompts([4, 9, 2, 6], width=9, seed=1)  # prompt bucket 16
    batch = sampler.generate(model, tokens, mask, num_samples=2, prompt_ids=[30, 71, 12, 5],
                             temperature=1.0, rng=11)
    alone = sampler.generate(model, tokens[2:3, -2:], mask[2:3, -2:], num_samples=2,
                             prompt_ids=[12], temperature=1.0, rng=11)  # batch 1, bucket 8
    np.testing.assert_array_equal(batch.tokens[4:6], alone.tokens)
    np.testing.assert_allclose(batch.raw_logprobs[4:6], alone.raw_logprobs, atol=1e-5)
    assert len({tuple(r) for r in batch.tokens}) == 8  # samples of a group differ
    other_seed = sampler.generate(model, tokens[2:3, -2:], mask[2:3, -2:], num_samples=2,
                                  prompt_ids=[12], temperature=1.0, rng=12)
    assert not np.array_equal(other_seed.tokens, alone.tokens)
    other_id = sampler.generate(model, tokens[2:3, -2:], mask[2:3, -2:], num_samples=2,
                                prompt_ids=[13], temperature=1.0, rng=11)
    assert not np.array_equal(other_id.tokens, alone.tokens)


# ---- stop handling --------------------------------------------------------------------------------
def test_stop_token_ends_row_and_pads_the_rest(tmp_root):
    _, model = _pair("qwen2", tmp_root)
    tokens, mask = _prompts(LENGTHS)
    free = _sampler().generate(model, tokens, mask, temperature=0.0)
    stop = int(free.tokens[0, 2])
    assert stop not in free.tokens[0, :2]
    out = _sampler((stop,)).generate(model, tokens, mask, temperature=0.0)
    assert out.lengths[0] == 3 and out.finished_by_stop[0]
    np.testing.assert_array_equal(out.tokens[0, :3], free.tokens[0, :3])
    np.testing.assert_array_equal(out.mask[0], [1, 1, 1] + [0] * 13)
    assert (out.tokens[0, 3:] == PAD).all()
    assert (out.raw_logprobs[0, 3:] == 0).all() and out.raw_logprobs[0, 2] < 0
    np.testing.assert_array_equal(out.response(0), free.tokens[0, :3])
    for row in range(1, 4):
        hits = np.flatnonzero(free.tokens[row, :12] == stop)
        n = hits[0] + 1 if hits.size else 12
        assert out.lengths[row] == n and out.finished_by_stop[row] == bool(hits.size)
        np.testing.assert_array_equal(out.tokens[row, :n], free.tokens[row, :n])
        assert (out.tokens[row, n:] == PAD).all() and (out.mask[row, n:] == 0).all()


def test_loop_exits_early_when_all_rows_stop(tmp_root):
    _, model = _pair("qwen2", tmp_root)
    tokens, mask = _prompts([5])
    free = _sampler().generate(model, tokens, mask, num_samples=4, temperature=0.0)
    assert free.num_steps == 12
    stop = int(free.tokens[0, 1])
    out = _sampler((stop,)).generate(model, tokens, mask, num_samples=4, temperature=0.0)
    first = int(np.flatnonzero(free.tokens[0] == stop)[0])
    assert out.num_steps == first + 1 and (out.lengths == first + 1).all()
    assert out.finished_by_stop.all() and (out.mask.sum(1) == first + 1).all()


# ---- sampling distributions (chi-square, fixed seed) ---------------------------------------------
def _chi2_critical(df: int, z: float = 3.0902) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _np_target(logits, temperature, top_k=0, top_p=1.0):
    z = logits / temperature
    if top_k:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("strategy", [Temperature(1.0), Temperature(0.6), TopK(0.9, 4),
                                      TopP(1.0, 0.8), TopP(1.2, 0.7, 5)])
def test_strategy_frequencies_match_target(strategy):
    logits = np.asarray([1.2, 0.3, -0.5, 2.0, 0.9, -1.4, 0.0, 1.7], np.float32)
    n = 40000
    keys = jax.random.split(jax.random.key(1234), n)
    tokens, logprobs = jax.jit(strategy.sample)(jnp.broadcast_to(jnp.asarray(logits), (n, 8)), keys)
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    kw = {TopK: lambda s: dict(top_k=s.k), TopP: lambda s: dict(top_p=s.p, top_k=s.k),
          Temperature: lambda s: {}}[type(strategy)](strategy)
    target = _np_target(logits.astype(np.float64), strategy.temperature, **kw)
    counts = np.bincount(tokens, minlength=8)
    support = target > 0
    assert counts[~support].sum() == 0  # never a filtered-out token
    expected = n * target[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(int(support.sum()) - 1), (chi2, counts, expected)
    np.testing.assert_allclose(logprobs, np.log(target[tokens]), atol=1e-5)


def test_top_p_keeps_the_token_that_crosses_the_mass():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    for p, support in [(0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (1.0, 4)]:
        keys = jax.random.split(jax.random.key(0), 2000)
        tokens, _ = TopP(1.0, p).sample(jnp.broadcast_to(logits, (2000, 4)), keys)
        assert set(np.unique(np.asarray(tokens))) == set(range(support)), p


def test_generate_first_token_frequencies_match_model():
    """End to end: G rows of one prompt draw independently from softmax(logits / T)."""
    cfg = ModelConfig.tiny(vocab_size=12, initializer_range=0.5)
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    tokens = np.asarray([[5, 7, 1, 3]], np.int32)
    n = 6000
    out = _sampler().generate(model, tokens, np.ones_like(tokens), num_samples=n, temperature=0.8,
                              max_new_tokens=1, rng=7)
    logits = np.asarray(model(jnp.asarray(tokens))[0, -1], np.float64)
    target = _np_target(logits, 0.8)
    counts = np.bincount(out.tokens[:, 0], minlength=12)
    chi2 = float(((counts - n * target) ** 2 / (n * target)).sum())
    assert chi2 < _chi2_critical(11), (chi2, counts, n * target)
    assert (out.lengths == 1).all() and out.num_steps == 1


def test_make_strategy():
    assert make_strategy(0.0, 0.5, 3) == Greedy()
    assert make_strategy(0.7) == Temperature(0.7)
    assert make_strategy(0.7, top_k=5) == TopK(0.7, 5)
    assert make_strategy(0.7, 0.9, 5) == TopP(0.7, 0.9, 5)


# ---- shapes, buckets, compiles ---------------------------------------------------------------------
def test_buckets_bound_the_number_of_compiles(tmp_root, caplog):
    _, model = _pair("qwen2", tmp_root)
    sampler = Sampler(SMALL, stop_ids=(), pad_id=PAD)
    with caplog.at_level(logging.INFO, logger="srft_jax.sampler"):
        a = sampler.generate(model, *_prompts([3, 5]), temperature=0.0, max_new_tokens=9)
        b = sampler.generate(model, *_prompts([7, 2], seed=1), temperature=0.0, max_new_tokens=16)
    assert sampler.stats.compiles == 2  # one prefill + one decode program for both calls
    assert a.tokens.shape == b.tokens.shape == (2, 16)
    assert a.lengths.tolist() == [9, 9] and b.lengths.tolist() == [16, 16]
    assert sum("compiling" in r.message for r in caplog.records) == 2
    sampler.generate(model, *_prompts([12, 2]), temperature=0.0, max_new_tokens=4)  # P 16, R 8
    assert sampler.stats.compiles == 4
    with pytest.raises(ValueError, match="sampler.prompt_buckets"):
        sampler.generate(model, *_prompts([17]), temperature=0.0)
    with pytest.raises(ValueError, match="sampler.max_new_tokens"):
        sampler.generate(model, *_prompts([3]), max_new_tokens=33)


def test_prompt_validation(tmp_root):
    _, model = _pair("qwen2", tmp_root)
    sampler = _sampler()
    tokens, mask = _prompts([3, 5])
    with pytest.raises(ValueError, match="left-padded"):
        sampler.generate(model, tokens, mask[:, ::-1])
    with pytest.raises(ValueError, match="prompt_ids"):
        sampler.generate(model, tokens, mask, prompt_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="rng or seed"):
        sampler.generate(model, tokens, mask, rng=1, seed=2)


def test_config_errors_name_the_field():
    for kwargs, field in [(dict(temperature=-1.0), "sampler.temperature"),
                          (dict(top_p=0.0), "sampler.top_p"), (dict(top_k=-2), "sampler.top_k"),
                          (dict(max_new_tokens=0), "sampler.max_new_tokens"),
                          (dict(prompt_buckets=(64, 32)), "sampler.prompt_buckets"),
                          (dict(response_buckets=()), "sampler.response_buckets"),
                          (dict(max_new_tokens=100, response_buckets=(64,)), "sampler.max_new_tokens"),
                          (dict(kv_cache_dtype="int8"), "sampler.kv_cache_dtype")]:
        with pytest.raises(ValueError, match=field):
            SamplerConfig(**kwargs)


def test_config_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(SamplerConfig),
                          OmegaConf.create({"temperature": 0.6, "response_buckets": [128, 256],
                                            "max_new_tokens": 200, "kv_cache_dtype": "bfloat16"}))
    sc = SamplerConfig(**OmegaConf.to_container(cfg))
    assert sc.response_buckets == (128, 256) and sc.kv_cache_dtype == "bfloat16"


# ---- cache dtype and sharding -----------------------------------------------------------------------
def test_bfloat16_kv_cache(tmp_root):
    _, model = _pair("qwen2", tmp_root)
    tokens, mask = _prompts(LENGTHS)
    spec = sampler_lib.PrefillSpec(4, 8, "bfloat16")
    graphdef, state = nnx.split(model)
    cache, _ = jax.eval_shape(functools.partial(sampler_lib.prefill, graphdef, spec), state,
                              jnp.asarray(tokens), jnp.asarray(mask))
    assert cache.k.dtype == cache.v.dtype == jnp.bfloat16
    out = _sampler(kv_cache_dtype="bfloat16").generate(model, tokens, mask, num_samples=2,
                                                        temperature=1.0, rng=2)
    lsm = _log_softmax(_full_forward_logprobs(model, tokens, mask, out))
    ref = np.take_along_axis(lsm, out.tokens[..., None], -1)[..., 0]
    # keys/values rounded to bfloat16 (8 bits of mantissa): log-probs agree to ~1e-2
    assert np.abs(out.raw_logprobs - ref)[out.mask.astype(bool)].max() < 5e-2


def test_sharded_generate_equals_unsharded(tmp_root):
    _, model = _pair("qwen2", tmp_root)
    tokens, mask = _prompts(LENGTHS)
    greedy = _sampler().generate(model, tokens, mask, num_samples=2, temperature=0.0)
    sampled = _sampler().generate(model, tokens, mask, num_samples=2, temperature=1.0, rng=4)

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    assert len(sharded.blocks.attn.q_proj.kernel[...].sharding.device_set) == 8
    sampler = _sampler()
    with jax.set_mesh(mesh):
        g = sampler.generate(sharded, tokens, mask, num_samples=2, temperature=0.0)
    s = sampler.generate(sharded, tokens, mask, num_samples=2, temperature=1.0, rng=4, mesh=mesh)
    np.testing.assert_array_equal(g.tokens, greedy.tokens)
    np.testing.assert_array_equal(s.tokens, sampled.tokens)
    np.testing.assert_allclose(s.raw_logprobs, sampled.raw_logprobs, atol=1e-5)
    np.testing.assert_allclose(s.logprobs, sampled.logprobs, atol=1e-5)


# ---- command line --------------------------------------------------------------------------------
def test_sample_command_prints_samples(tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from srft_jax import cli
    from srft_jax.testing import make_byte_tokenizer

    tokenizer = make_byte_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=128))
    hf.save_pretrained(str(tmp_path))
    code = cli.main(["sample", "--model", str(tmp_path), "--prompt", "What is 2+2?", "--n", "2",
                     "--temperature", "0.9", "--max-new-tokens", "6", "--seed", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("=== sample") == 2
    assert "=== sample 1 (" in printed
    greedy = cli.main(["sample", "--model", str(tmp_path), "--prompt", "hi", "--temperature", "0",
                       "--max-new-tokens", "3", "--no-chat-template"])
    assert greedy == 0 and "=== sample 0 (" in capsys.readouterr().out


def test_kv_block_size_does_not_change_results(tmp_root):
    """One cache block (kv_block 512) or blocks of 8 slots: the same rollouts (log-probs to float32
    rounding: the online softmax adds the blocks in a different grouping)."""
    _, model = _pair("llama", tmp_root)
    tokens, mask = _prompts(LENGTHS)
    blocks = _sampler().generate(model, tokens, mask, num_samples=2, temperature=1.0, rng=9)
    single = Sampler(SMALL.replace(kv_block=512), stop_ids=(), pad_id=PAD).generate(
        model, tokens, mask, num_samples=2, temperature=1.0, rng=9)
    np.testing.assert_array_equal(blocks.tokens, single.tokens)
    np.testing.assert_allclose(blocks.raw_logprobs, single.raw_logprobs, atol=1e-5)
    assert blocks.num_steps == single.num_steps == 12
