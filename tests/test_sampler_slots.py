"""Continuous batching (`SamplerConfig.decode_slots`): the same rollouts as the static batch,
whatever the number of slots and shards; the cache sized for the slots; and the decode loop's
compiled body free of weight all-gathers on a mesh.

The reference is the static batch itself (decode_slots 0: every row in its own slot from the
start), which test_sampler.py checks against HF `generate` and a full forward pass.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srft_jax import mesh as mesh_lib
from srft_jax import sampler as sampler_lib
from srft_jax.models.config import ModelConfig
from srft_jax.models.decoder import Decoder
from srft_jax.models.weights import state_shardings
from srft_jax.sampler import Sampler, SamplerConfig
from test_sampler import _prompts as sampler_prompts

pytestmark = pytest.mark.compat

VOCAB, PAD = 96, 0
CFG = SamplerConfig(max_new_tokens=12, prompt_buckets=(8,), response_buckets=(16,), kv_block=8)
LENGTHS = [3, 7, 5, 1, 6]  # left-padded to the bucket of 8
G = 3  # N = 15 rows


@functools.lru_cache(maxsize=None)
def _model(seed: int = 0):
    return Decoder(ModelConfig.tiny(vocab_size=VOCAB, initializer_range=0.3), rngs=nnx.Rngs(seed))


def _prompts(lengths, width=8, seed=0):
    return sampler_prompts(lengths, width, seed, vocab=VOCAB)


def _stops_at_different_steps(out) -> tuple[int, ...]:
    """Stop tokens taken from a run without stops, so that rows end at several different steps."""
    n = out.num_rows
    return tuple(sorted({int(out.tokens[0, 2]), int(out.tokens[n // 2, 6]), int(out.tokens[n - 1, 9])}))


def _assert_same(got, want):
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.finished_by_stop, want.finished_by_stop)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    np.testing.assert_allclose(got.raw_logprobs, want.raw_logprobs, atol=1e-5)


@pytest.mark.parametrize("temperature,slots", [(1.0, 4), (1.0, 15), (1.0, 40), (0.0, 4)])
def test_slots_give_the_static_batch_rollouts(temperature, slots):
    """Left-padded prompts of mixed lengths, groups of 3, rows ending at different steps:
    decode_slots < N, = N and > N give the rollouts of the static batch."""
    tokens, mask = _prompts(LENGTHS)
    kw = dict(num_samples=G, temperature=temperature, seed=7, prompt_ids=[11, 3, 25, 8, 40])
    free = Sampler(CFG, stop_ids=(), pad_id=PAD).generate(_model(), tokens, mask, **kw)
    stops = _stops_at_different_steps(free)
    static = Sampler(CFG, stop_ids=stops, pad_id=PAD).generate(_model(), tokens, mask, **kw)
    assert len(set(static.lengths.tolist())) >= 3, static.lengths
    assert static.finished_by_stop.any() and not static.finished_by_stop.all()
    assert static.num_steps == static.lengths.max()
    sampler = Sampler(CFG.replace(decode_slots=slots), stop_ids=stops, pad_id=PAD)
    got = sampler.generate(_model(), tokens, mask, **kw)
    _assert_same(got, static)
    used = min(slots, 15)
    assert sampler.stats.slot_steps == used * sampler.stats.decode_steps
    assert sampler.stats.generated_tokens == static.lengths.sum()
    if slots < 15:  # fewer slots: more steps, every slot busy most of the time
        assert got.num_steps > static.num_steps
        assert sampler.stats.generated_tokens > 0.6 * sampler.stats.slot_steps
    assert sampler.stats.prefill_rows == len(LENGTHS)  # each prompt prefilled once for its group


def test_slots_on_a_mesh_give_the_one_device_rollouts():
    """8 devices (data 2 x fsdp 2 x tensor 2): four shards, each refilling its one slot from its
    own queue, give the rollouts of one device decoding every row at once."""
    tokens, mask = _prompts(LENGTHS[:4])
    kw = dict(num_samples=2, temperature=1.0, seed=3)
    free = Sampler(CFG, stop_ids=(), pad_id=PAD).generate(_model(), tokens, mask, **kw)
    stops = _stops_at_different_steps(free)
    want = Sampler(CFG, stop_ids=stops, pad_id=PAD).generate(_model(), tokens, mask, **kw)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(_model())
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    sampler = Sampler(CFG.replace(decode_slots=4), stop_ids=stops, pad_id=PAD)
    _assert_same(sampler.generate(sharded, tokens, mask, mesh=mesh, **kw), want)
    assert sampler.stats.slot_steps == 4 * sampler.stats.decode_steps


def _decode_program(slots: int, response_len: int, mesh=None, kv_block: int = 16):
    """The compiled decode program of the tiny model for 8 prompts x 2 samples."""
    b, p = 8, 8
    model = _model()
    graphdef, state = nnx.split(model)
    spec = sampler_lib.DecodeSpec(batch=b, prompt_len=p, num_samples=2, response_len=response_len,
                                  slots=slots, shards=4 if mesh is not None else 1, kv_block=kv_block,
                                  strategy=sampler_lib.Temperature(1.0), kv_cache_dtype=None)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
    tokens = jnp.ones((b, p), jnp.int32)
    prefill = jax.jit(functools.partial(sampler_lib.prefill, graphdef, sampler_lib.PrefillSpec(b, p, None)))
    store, logits = prefill(state, tokens, tokens)
    decode = jax.jit(functools.partial(sampler_lib.decode, graphdef, spec))
    return decode.lower(state, store, logits, jnp.full((b,), p, jnp.int32), jnp.ones((b,), bool),
                        jax.random.key(0), jnp.arange(b), np.int32(response_len),
                        np.asarray([1], np.int32), np.int32(PAD)).compile()


def test_kv_cache_is_sized_for_the_slots():
    """XLA's memory analysis of the decode program: 4 slots hold a quarter of 16 rows' cache."""
    small, full = (_decode_program(s, 256, kv_block=128).memory_analysis().temp_size_in_bytes
                   for s in (4, 16))
    cfg = _model().config
    row_cache = 2 * cfg.num_layers * cfg.num_kv_heads * (8 + 256) * cfg.head_dim * 4  # bytes
    assert full - small >= 12 * row_cache * 0.95, (full, small, row_cache)


# ---- no weight all-gather inside the decode loop -------------------------------------------------
def _loop_body_all_gathers(hlo: str) -> list[int]:
    """Element counts of the all-gathers inside every while-loop body of a compiled HLO module
    (and the computations those bodies call)."""
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?(%\S+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            comps[current] = []
        elif current:
            comps[current].append(line)
    todo = [re.search(r"body=(%[^,\s]+)", l).group(1) for ls in comps.values() for l in ls
            if " while(" in l]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            for m in re.finditer(r"(?:calls|body|condition|to_apply|branch_computations)="
                                 r"\{?(%[^}\s,]+(?:, %[^}\s,]+)*)", line):
                todo.extend(n.strip() for n in m.group(1).split(","))
    sizes = []
    for name in seen:
        for line in comps[name]:
            m = re.search(r"= \w+\[([0-9,]*)\]\S* all-gather\(", line)
            if m:
                sizes.append(int(np.prod([int(d) for d in m.group(1).split(",") if d])))
    return sizes


def test_decode_loop_body_holds_no_weight_all_gather():
    """fsdp 4 x tensor 2: the weights are gathered into the decode layout once, before the loop;
    inside it, all-gathers move only per-step activations (here at most slots x vocabulary
    elements, 8 x 96), never a weight matrix (the smallest per-device shard of one is
    64 x 1 x 16 = 1024 elements)."""
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2))
    with jax.set_mesh(mesh):
        hlo = _decode_program(8, 16, mesh).as_text()
    gathers = _loop_body_all_gathers(hlo)
    assert all(n < 1024 for n in gathers), gathers
    assert "all-gather(" in hlo  # the one-time gather into the decode layout, outside the loop

    # The check itself finds a weight gathered inside a loop: a weight carried through the loop
    # in the FSDP layout is gathered on every iteration.
    def carried(w, x):
        def body(c):
            i, w, x = c
            w = mesh_lib.constrain(w * 1.001, ("embed", "mlp"))
            y = mesh_lib.constrain(x @ w, ("batch", "mlp"))
            return i + 1, w, mesh_lib.constrain(y[:, :64], ("batch", None))
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, w, x))

    with jax.set_mesh(mesh):
        control = jax.jit(carried).lower(jnp.ones((64, 128)), jnp.ones((8, 64))).compile().as_text()
    assert max(_loop_body_all_gathers(control)) >= 64 * 64
