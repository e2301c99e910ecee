"""Compile a training config's programs for a slice, without the slice: `srft-jax compile`.

    report = compile_config(cfg, slice_for("v5p-64"), progress=print)

Builds the config's own mesh on the slice's devices (libtpu's topology description for a
Cloud TPU name, forced host CPU devices for cpu:N) and lowers and compiles, with the config's
real shapes and `jax.ShapeDtypeStruct` arguments (nothing is allocated), the programs one
training step runs, made by the same code the training loop uses:

  train_step    `train.UpdateFunctions.train_step`: one optimiser update of a mini-batch
                [M micro-batches, b rows, P + R tokens] (widths: the largest buckets of
                data.max_prompt_len / data.max_response_len), donated params and optimiser state
  old_logprobs  `UpdateFunctions.logprobs` over the same mini-batch (train.recompute_old_logprobs)
  prefill       the sampler's prefill of the step's prompts [B, P] (`Sampler.programs`)
  decode        the sampler's decode loop: B x G rows in sampler.decode_slots slots, kv_block
  eval_decode   the in-training evaluation's decode loop (eval.batch_size sequences per call,
                eval.samples, eval.temperature, eval.max_new_tokens); only when eval.every > 0

Per program (per device): XLA's memory analysis (arguments, outputs, aliased = donated inputs
reused for outputs, temporaries; peak = arguments + outputs - aliased + temporaries), buffers
that stay resident across it without being its arguments (the optimiser state while sampling
and recomputing old log-probs), compile seconds, and a roofline from the compiled HLO with
every loop counted by its trip count (`hlo_cost`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srft_jax import distributed, hlo_cost, mesh as mesh_lib
from srft_jax.hardware import Slice

GB = 1e9
PROGRAMS = ("train_step", "old_logprobs", "prefill", "decode", "eval_decode")
STEP_PROGRAMS = PROGRAMS[:4]  # the programs of one training step (evaluation is not part of it)
KNOBS = {
    "train_step": "train.micro_batch_size, model.remat, mesh.fsdp / mesh.tensor, train.loss_chunk_size",
    "old_logprobs": "train.micro_batch_size, mesh.fsdp / mesh.tensor",
    "prefill": "train.prompts_per_step, mesh.fsdp / mesh.tensor",
    "decode": "sampler.decode_slots, sampler.kv_cache_dtype, mesh.fsdp / mesh.tensor",
    "eval_decode": "eval.batch_size, sampler.decode_slots, mesh.fsdp / mesh.tensor",
}


@dataclass
class ProgramReport:
    name: str
    what: str  # shapes, in words
    argument_bytes: float
    output_bytes: float
    alias_bytes: float
    temp_bytes: float
    resident_bytes: float  # live during the program without being its argument
    compile_s: float
    xla_flops: float  # XLA's cost_analysis: every loop body counted once
    xla_bytes: float
    flops: float  # XLA's figure with every loop body x its trip count (see `analyse`)
    bytes_accessed: float
    walk_ones_flops: float  # the walk with every trip count 1 (should match XLA's)
    walk_ones_bytes: float
    calls_per_step: float  # how often one training step runs it
    loop_note: str
    hbm_bytes: float
    compiler_error: str = ""  # the TPU compiler refused it (out of HBM): the figures are its
    walk_flops: float = math.nan  # the walk's own totals (its rules, every loop x trip count)
    walk_bytes: float = math.nan

    @property
    def peak_bytes(self) -> float:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def need_bytes(self) -> float:
        return self.peak_bytes + self.resident_bytes

    @property
    def fits(self) -> bool:
        return not self.compiler_error and self.need_bytes <= self.hbm_bytes

    def seconds(self, peak_flops: float, bandwidth: float) -> tuple[float, float]:
        return self.flops / peak_flops, self.bytes_accessed / bandwidth

    def as_json(self) -> dict:
        return dict(peak_bytes=self.peak_bytes, argument_bytes=self.argument_bytes,
                    temp_bytes=self.temp_bytes, fits=self.fits, flops=self.flops,
                    bytes_accessed=self.bytes_accessed, compile_s=self.compile_s,
                    output_bytes=self.output_bytes, alias_bytes=self.alias_bytes,
                    resident_bytes=self.resident_bytes, xla_flops_loop_bodies_once=self.xla_flops,
                    xla_bytes_loop_bodies_once=self.xla_bytes, calls_per_step=self.calls_per_step,
                    loops=self.loop_note, what=self.what, compiler_error=self.compiler_error or None,
                    walk_flops=self.walk_flops, walk_bytes=self.walk_bytes,
                    walk_trips_one_flops=self.walk_ones_flops, walk_trips_one_bytes=self.walk_ones_bytes)


@dataclass
class CompileReport:
    slice: Slice
    mesh: str
    model: str
    programs: dict[str, ProgramReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    model_flops: float = 0.0  # of one training step (PaLM convention, no recomputation)

    def left_out(self) -> list[str]:
        """Programs of a step that were neither compiled nor skipped for a reason of the config
        (`--programs` left them out): without them there is no step roofline."""
        return [p for p in STEP_PROGRAMS if p not in self.programs and p not in self.skipped]

    def roofline_s(self) -> float:
        """Lower bound of one training step: per program max(FLOPs / peak, bytes / bandwidth),
        times its calls per step, summed (eval_decode is not part of a step). NaN when a
        program of the step was left out."""
        gen = self.slice.generation
        if gen is None or self.left_out():
            return math.nan
        return sum(p.calls_per_step * max(p.seconds(gen.peak_flops, gen.hbm_bandwidth))
                   for p in self.programs.values())

    def mfu_ceiling(self) -> float:
        gen = self.slice.generation
        t = self.roofline_s()
        if gen is None or not t or math.isnan(t):
            return math.nan
        return self.model_flops / (self.slice.chips * gen.peak_flops * t)

    def as_json(self) -> dict:
        return {"topology": self.slice.name, "chips": self.slice.chips,
                "hbm_bytes_per_chip": None if not self.slice.is_tpu else self.slice.hbm_bytes,
                "libtpu_topology": self.slice.topology if self.slice.is_tpu else None,
                "mesh": self.mesh, "model": self.model,
                "programs": {k: v.as_json() for k, v in self.programs.items()},
                "skipped": self.skipped,
                "step": {"roofline_s": _num(self.roofline_s()), "mfu_ceiling": _num(self.mfu_ceiling()),
                         "model_flops": self.model_flops}}


def _num(x: float):
    return None if x is None or math.isnan(x) else x


# ---- the model and the shapes of a config ------------------------------------------------------
def model_config(cfg, vocab_size: Optional[int] = None):
    """The config's architecture with its numerics, without weights: from `model.path`'s
    config.json when it is here, else from the preset its directory is named after
    (`.../Qwen2.5-Math-7B-16k` -> qwen2.5-math-7b-16k; a `-16k` suffix means RoPE theta 40000
    and a 16384-token window, the paper's change), else ValueError."""
    from srft_jax import runs
    from srft_jax.models.config import PRESETS, preset

    spec = cfg.model
    path = spec.path
    if path is None or os.path.exists(runs.resolve_model_path(path) or ""):
        return runs.model_config_for(spec, vocab_size), None
    name = os.path.basename(os.path.normpath(path)).lower()
    long_ctx = name.endswith("-16k") and name not in PRESETS
    base = name[:-4] if long_ctx else name
    if base in PRESETS:
        # The same route as a preset in the config (`runs.model_config_for`), so every model
        # setting of the config (dtype, remat, attention, ...) applies.
        sizes = dict(max_position_embeddings=16384) if long_ctx else {}
        spec = dataclasses.replace(spec, path=None, preset=base, **sizes)
        mcfg = runs.model_config_for(spec, vocab_size or preset(base).vocab_size)
        return (mcfg.replace(rope_theta=40000.0) if long_ctx else mcfg), name
    raise ValueError(f"model.path={path!r} is not here and its name matches no preset "
                     f"({', '.join(sorted(PRESETS))}): give the architecture with "
                     f"model.path=null model.preset=NAME (and size overrides)")


def _vocab_and_stops(cfg) -> tuple[Optional[int], tuple[int, ...]]:
    """The tokenizer's size and stop ids when a tokenizer is at hand (synthetic task, or a
    local model directory); else (None, (0,)): the preset's vocabulary, one stop id."""
    import tempfile

    from srft_jax import runs
    from srft_jax.data.tokenizer import stop_token_ids

    path = cfg.model.tokenizer or cfg.model.path
    try:
        if path is None and cfg.data.source == runs.SYNTHETIC:
            with tempfile.TemporaryDirectory() as tmp:
                tok = runs.load_run_tokenizer(cfg.model, cfg.data.source, tmp)
        elif path is not None and os.path.isdir(path):
            with tempfile.TemporaryDirectory() as tmp:
                tok = runs.load_run_tokenizer(cfg.model, cfg.data.source, tmp)
        else:
            return None, (0,)
        return len(tok), tuple(stop_token_ids(tok))
    except (OSError, ValueError):
        return None, (0,)


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), tree, shardings)


def _per_device_bytes(tree) -> float:
    def one(a):
        try:
            return float(np.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize)
        except (TypeError, AttributeError):  # a key or a leaf without a sharding: tiny
            return 0.0

    return float(sum(one(a) for a in jax.tree.leaves(tree)))


# ---- model FLOPs of a step (for the MFU ceiling) ----------------------------------------------
def step_model_flops(mcfg, prompts: int, rollouts: int, demos: int, p: int, r: int,
                     recompute_old_logprobs: bool) -> dict[str, float]:
    """Model FLOPs (PaLM convention: no rematerialisation) of one SRFT step with every response
    `r` tokens long (an upper bound: real rollouts stop earlier).

    Per token: forward 2*N_mm + attention 4*L*N*H*c (N_mm: matmul parameters, all but the input
    embedding, a gather; N*H query heads x head dim; c the context the token attends to);
    training = 3 x forward. Sampling prefills each prompt once (mean context p/2) and decodes
    G rows per prompt for r steps (mean context p + r/2); the updates train every row (rollouts
    and demonstrations) over p + r tokens (mean context (p + r)/2); the old log-prob pass is one
    more forward of the rollout rows.
    """
    n_mm = mcfg.num_params() - mcfg.vocab_size * mcfg.hidden_size
    attn = mcfg.num_layers * mcfg.num_heads * mcfg.head_dim
    seq = p + r
    rows = prompts * (rollouts + demos)
    prefill = prompts * p * (2 * n_mm + 4 * attn * p / 2) if rollouts else 0.0
    decode = prompts * rollouts * r * (2 * n_mm + 4 * attn * (p + r / 2))
    train = rows * seq * (6 * n_mm + 12 * attn * seq / 2)
    old = prompts * rollouts * seq * (2 * n_mm + 4 * attn * seq / 2) if recompute_old_logprobs else 0.0
    return dict(n_mm=float(n_mm), prefill=prefill, decode=decode, train=train, old_logprobs=old,
                total=prefill + decode + train + old)


# ---- compiling --------------------------------------------------------------------------------
def analyse(name: str, what: str, jitted, args, hbm: float, *, resident: float = 0.0,
            calls: float = 1.0, unknown_trips: float = 1.0, loop_note: str = "",
            progress: Callable[[str], None] = lambda s: None):
    """Lowers and compiles `jitted(*args)`; its ProgramReport and the compiled executable."""
    progress(f"compiling {name}: {what} ...")
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 -- the TPU compiler refuses a program over HBM
        elapsed = time.perf_counter() - t0
        m = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not m:
            raise
        unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        temp = float(m.group(1)) * unit[m.group(2)]
        usable = float(m.group(3)) * unit[m.group(4)]
        progress(f"  {name}: the TPU compiler ran out of HBM after {elapsed:.0f} s")
        args_bytes = _per_device_bytes(args)
        rep = ProgramReport(name, what, args_bytes, 0.0, 0.0, temp, resident, elapsed, math.nan, math.nan,
                            0.0, 0.0, math.nan, math.nan, calls, "not compiled", hbm,
                            compiler_error=f"temporaries {temp / GB:.2f} GB exceed the {usable / GB:.2f} GB "
                                           f"of HBM the compiler may use")
        return rep, None
    elapsed = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    text = compiled.as_text()
    walk = hlo_cost.loop_costs(text, unknown_trips=unknown_trips)
    ones = hlo_cost.loop_costs(text, ones=True, in_place=False)  # XLA's conventions
    note = loop_note or "every loop x its trip count"
    if walk.unknown_loops:
        note += f"; {walk.unknown_loops} loop(s) without a static trip count counted as told"
    xla_flops = float(cost.get("flops", math.nan))
    xla_bytes = float(cost.get("bytes accessed", math.nan))
    # XLA's own per-instruction figures with every loop x its trip count and in-place updates
    # charged at the bytes they write: the walk's factor (walk / walk with XLA's conventions:
    # trip counts 1, whole buffers for in-place updates) applied to XLA's cost analysis.
    scale = lambda x, w, w1: x * w / w1 if w1 and not math.isnan(x) else w
    rep = ProgramReport(
        name, what, float(mem.argument_size_in_bytes), float(mem.output_size_in_bytes),
        float(mem.alias_size_in_bytes), float(mem.temp_size_in_bytes), resident, elapsed,
        xla_flops, xla_bytes, scale(xla_flops, walk.flops, ones.flops),
        scale(xla_bytes, walk.bytes, ones.bytes), ones.flops, ones.bytes, calls, note, hbm,
        walk_flops=walk.flops, walk_bytes=walk.bytes)
    progress(f"  {name} compiled in {elapsed:.0f} s")
    return rep, compiled


def compile_config(cfg, hw: Slice, progress: Callable[[str], None] = lambda s: None,
                   only: Optional[tuple[str, ...]] = None) -> CompileReport:
    """Compiles every program of a training step of `cfg` for the slice `hw` (see module doc)."""
    from srft_jax.sampler import Sampler
    from srft_jax.sampler.engine import slots_per_shard
    from srft_jax.shapes import bucket_length, padded_count
    from srft_jax.train import BatchLayout, UpdateFunctions
    from srft_jax.train_step import param_shardings
    from srft_jax.batch import MixedBatch
    from srft_jax.models import state_shardings
    from srft_jax.models.weights import abstract_model

    wanted = set(only or PROGRAMS)
    devices = hw.devices()
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    vocab, stops = _vocab_and_stops(cfg)
    mcfg, guessed = model_config(cfg, vocab)
    if guessed:
        progress(f"model.path {cfg.model.path!r} is not here: architecture of preset {guessed}")
    hbm = hw.hbm_bytes
    report = CompileReport(hw, mesh_lib.describe(mesh),
                           f"{mcfg.arch} {mcfg.num_params() / 1e9:.3f} B parameters, L={mcfg.num_layers} "
                           f"D={mcfg.hidden_size} params {mcfg.param_dtype}, compute {mcfg.dtype}, "
                           f"remat {mcfg.remat}")
    tcfg, data = cfg.train, cfg.data
    shard = distributed.DataShard(0, 1)  # the global view: every row of the step
    layout = BatchLayout.of(tcfg, cfg.loss, shard)
    shards = distributed.batch_shards(mesh)
    p_width = bucket_length(data.max_prompt_len, data.prompt_widths, "data.prompt_buckets")
    r_width = bucket_length(data.max_response_len, data.response_widths, "data.response_buckets")
    report.model_flops = step_model_flops(mcfg, tcfg.prompts_per_step, layout.rollouts,
                                          int(layout.demos), p_width, r_width,
                                          tcfg.recompute_old_logprobs and bool(layout.rollouts))["total"]
    f32, i32 = jnp.float32, jnp.int32
    # Built outside `jax.set_mesh`: optax initialises placeholders eagerly, which cannot run on
    # a topology's devices (they exist only for the compiler).
    model = abstract_model(mcfg)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    lora = bool(mcfg.lora_rank)
    updates = UpdateFunctions(tcfg, cfg.loss, graphdef, params, mesh, layout, lora=lora)
    frozen = None
    if lora:  # as the loop does: the adapters are trained, the base is a frozen argument
        from srft_jax.models.lora import split_params
        params, frozen = split_params(params)
    opt = jax.eval_shape(updates.tx.init, params)
    with jax.set_mesh(mesh):
        a_params = _abstract(params, updates.param_shardings)
        a_opt = _abstract(opt, updates.opt_shardings)
        extra = () if frozen is None else (_abstract(frozen, param_shardings(frozen, mesh)),)
        opt_bytes = _per_device_bytes(a_opt)
        m, b = layout.local_rows // layout.local_micro, layout.micro_batch
        spec = mesh_lib.logical_to_spec((None, "batch"), (1, b), mesh)
        bsh = jax.sharding.NamedSharding(mesh, spec)
        batch = MixedBatch(
            prompt_tokens=_sds((m, b, p_width), i32, bsh), prompt_mask=_sds((m, b, p_width), f32, bsh),
            response_tokens=_sds((m, b, r_width), i32, bsh), response_mask=_sds((m, b, r_width), f32, bsh),
            is_demo=_sds((m, b), bool, bsh), group=_sds((m, b), i32, bsh), reward=_sds((m, b), f32, bsh),
            advantage=_sds((m, b), f32, bsh), old_logprobs=_sds((m, b, r_width), f32, bsh))
        rows_txt = (f"{m} micro-batches x {b} rows of {p_width}+{r_width} tokens "
                    f"({layout.local_rows} rows per update)")
        updates_per_step = tcfg.updates_per_step
        if "train_step" in wanted:
            rep, _ = analyse("train_step", f"one update: {rows_txt}", updates.train_step,
                             (a_params, a_opt, batch) + extra, hbm, calls=updates_per_step, progress=progress)
            report.programs["train_step"] = rep
        recompute = tcfg.recompute_old_logprobs and layout.rollouts
        if "old_logprobs" in wanted:
            if recompute:
                rep, _ = analyse("old_logprobs", f"forward of {rows_txt}", updates.logprobs,
                                 (a_params, batch) + extra, hbm, resident=opt_bytes, calls=updates_per_step,
                                 progress=progress)
                report.programs["old_logprobs"] = rep
            else:
                report.skipped["old_logprobs"] = ("train.recompute_old_logprobs is false" if layout.rollouts
                                                  else "no rollouts")
        a_state = _abstract(state, state_shardings(state, mesh))
        sampler = Sampler(cfg.sampler, stop_ids=stops, pad_id=0)
        if layout.rollouts and wanted & {"prefill", "decode"}:
            b_prompts = -(-tcfg.prompts_per_step // shards) * shards
            _sampler_programs(report, sampler, cfg.sampler, graphdef, a_state, mesh, b_prompts, p_width,
                              layout.rollouts, shards, hbm, opt_bytes, stops, wanted, progress,
                              names=("prefill", "decode"), calls=1.0)
        elif not layout.rollouts:
            report.skipped.update(prefill="no rollouts", decode="no rollouts")
        if "eval_decode" in wanted:
            ecfg = cfg.eval
            if not ecfg.every:
                report.skipped["eval_decode"] = "eval.every is 0 (no evaluation during training)"
            else:
                n = ecfg.samples
                items = max(1, ecfg.batch_size // n)
                b_eval = padded_count(items, n, shards)
                scfg = cfg.sampler.replace(temperature=ecfg.temperature, top_p=1.0,
                                           max_new_tokens=ecfg.max_new_tokens or data.max_response_len)
                _sampler_programs(report, sampler, scfg, graphdef, a_state, mesh, b_eval, p_width, n, shards,
                                  hbm, opt_bytes, stops, {"decode"}, progress,
                                  names=("eval_prefill", "eval_decode"), calls=0.0)
    return report


def _sampler_programs(report, sampler, scfg, graphdef, a_state, mesh, b: int, p: int, g: int,
                      shards: int, hbm: float, opt_bytes: float, stops, wanted, progress, names,
                      calls: float):
    prefill, decode, spec = sampler.programs(graphdef, b, p, g, scfg, shards)
    rows = lambda shape, dt: _sds(shape, dt, mesh_lib.batch_sharding(mesh, len(shape), shape))
    rep_sh = mesh_lib.replicated(mesh)
    tokens, mask = rows((b, p), jnp.int32), rows((b, p), jnp.int32)
    # The prefill is lowered even when only the decode is reported: its outputs are the decode's inputs.
    pre_name, dec_name = names
    if "prefill" in wanted and pre_name == "prefill":
        rep, compiled = analyse("prefill", f"{b} prompts x {p} tokens", prefill, (a_state, tokens, mask),
                                hbm, resident=opt_bytes, calls=calls, progress=progress)
        report.programs["prefill"] = rep
    else:
        compiled = prefill.lower(a_state, tokens, mask).compile()
    if compiled is None:
        report.skipped[dec_name] = "its prefill did not compile"
        return
    out_shape = jax.eval_shape(prefill, a_state, tokens, mask)
    store, last_logits = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), out_shape,
                                      compiled.output_shardings)
    if "decode" not in wanted:
        return
    key = jax.eval_shape(lambda: jax.random.key(0))
    steps = -(-spec.rows // spec.slots) * max(spec.response_len - 1, 1)
    args = (a_state, store, last_logits, rows((b,), jnp.int32), rows((b,), bool),
            _sds(key.shape, key.dtype, rep_sh), rows((b,), jnp.int32), _sds((), jnp.int32, rep_sh),
            _sds((len(stops),), jnp.int32, rep_sh), _sds((), jnp.int32, rep_sh))
    what = (f"{b} prompts x {g} samples = {spec.rows} rows in {spec.slots} slots, cache {p}+"
            f"{spec.response_len}, kv_block {spec.kv_block}, {type(spec.strategy).__name__}")
    note = (f"decode while-loop x {steps} steps (every row full length: ceil(rows/slots) x "
            f"(R-1)), each step reading its most expensive branch (the full cache); other loops x "
            f"their trip counts; in-place cache writes charged at the bytes they write, the layout "
            f"copies the compiler puts around them in full")
    rep, _ = analyse(dec_name, what, decode, args, hbm, resident=opt_bytes, calls=calls,
                     unknown_trips=steps, loop_note=note, progress=progress)
    report.programs[dec_name] = rep
