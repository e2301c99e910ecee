"""Per-device memory of the 7B SRFT train step, measured by XLA, plus the model FLOPs of one
paper step (the sampler's decode: benchmarks/decode_7b.py).

Run (8 forced CPU devices are set up by the script; nothing is allocated or run, only
`jax.eval_shape` -> `jit(...).lower(abstract, sharded args).compile().memory_analysis()`):
    python benchmarks/memory_7b.py                                   # everything below
    python benchmarks/memory_7b.py --what train --micro-batch 1 --remat full
    python benchmarks/memory_7b.py --what flops                      # formula only (instant)
    python benchmarks/memory_7b.py --what train --devices 32 --fsdp 8 --tensor 4 --micro-batch 4
                                                                     # configs/...-v5p64.yaml
    python benchmarks/memory_7b.py --what train --fsdp 2 --tensor 4 --micro-batch 2   # ...-8xh100
    python benchmarks/memory_7b.py --model 1.5b --fsdp 4 --tensor 2                  # ...-v5e8
    python benchmarks/memory_7b.py --what train --lora-rank 64 --param-dtype bfloat16 --fsdp 2 --tensor 4
                                                                     # ...-lora-v5e8 (LoRA)

Model: Qwen2.5-Math-7B with the paper's 16k window (28 layers, D 3584, F 18944, 28 query /
4 KV heads, V 152064), float32 parameters and AdamW moments (the paper's lr 1e-6 is below
bfloat16's resolution of a weight, so bf16 master weights would drop most updates) and
bfloat16 compute. Mesh: 8 devices, ('data', 'fsdp', 'tensor') = (1, 8, 1) by default.
Shapes: prompt 1024 + response 8192 tokens per sequence.

- train: `train_step.make_train_step` (the real step: scan over M micro-batches of
  `--micro-batch` sequences per device, chunked log-prob/entropy, SRFT paper loss, AdamW with
  clipping, donated params/opt state) for one update of the paper (64 prompts x 8 = 512 rows).

Peak per device ~ arguments + outputs - aliased (donated) + temporaries. XLA's cost_analysis
counts each loop body (layer scan, micro-batch scan) once, so its flops are not a
step total; the FLOPs lines use the formula in `paper_step_flops` (for one unrolled layer it
agrees with cost_analysis to 0.5%, forward and forward+backward). Prints one line per program
and, last, the comparable number: the train step's peak GB per device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

def _devices_from_argv(default: int = 8) -> int:
    """--devices N must be known before JAX is imported (it sets the forced CPU device count)."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return default


DEVICES = _devices_from_argv()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dataclasses import dataclass  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from srft_jax import mesh as mesh_lib  # noqa: E402
from srft_jax.models import ModelConfig, abstract_model  # noqa: E402

GB = 1e9
PROMPT, RESPONSE = 1024, 8192
PAPER = dict(prompts=128, rollouts=7, demos=1, updates=2)

# Peak dense bf16 FLOP/s per chip (vendor figures) and HBM per chip.
HARDWARE = {
    "v5p-64 (32 chips)": dict(chips=32, flops=459e12, hbm=95e9, bw=2.765e12, model="7b"),
    "8 x H100 SXM 80GB": dict(chips=8, flops=989e12, hbm=80e9, bw=3.35e12, model="7b"),
    "v5e-8 (8 chips)": dict(chips=8, flops=197e12, hbm=16e9, bw=0.819e12, model="1.5b"),
}


MODELS = {"7b": ModelConfig.qwen2_5_math_7b_16k, "1.5b": ModelConfig.qwen2_5_math_1_5b}
# Set from the command line (here and in decode_7b.py): LoRA adapters and the base's dtype.
OVERRIDES: dict = {}


def model_config(remat: str, model: str = "7b") -> ModelConfig:
    extra = dict(rope_theta=40000.0, max_position_embeddings=16384) if model == "1.5b" else {}
    kw = dict(param_dtype="float32", dtype="bfloat16", remat=remat, **extra)
    kw.update(OVERRIDES)
    return MODELS[model](**kw)


def add_model_arguments(parser) -> None:
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="LoRA adapters of this rank on all 7 projections (0: full fine-tuning)")
    parser.add_argument("--lora-targets", nargs="+", default=None, help="projections with adapters")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the (base) parameters")


def set_overrides(args) -> None:
    OVERRIDES.clear()
    OVERRIDES["param_dtype"] = args.param_dtype
    if args.lora_rank:
        OVERRIDES.update(lora_rank=args.lora_rank, lora_alpha=float(2 * args.lora_rank))
        if args.lora_targets:
            OVERRIDES["lora_targets"] = tuple(args.lora_targets)


def sds(shape, dtype, sharding=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: sds(x.shape, x.dtype, s), tree, shardings)


@dataclass
class Report:
    name: str
    argument: float
    output: float
    alias: float
    temp: float
    flops: float
    compile_s: float

    @property
    def peak(self) -> float:
        return self.argument + self.output - self.alias + self.temp

    def line(self) -> str:
        return (f"{self.name}: per device arguments {self.argument / GB:.2f} GB, outputs {self.output / GB:.2f} GB, "
                f"donated/aliased {self.alias / GB:.2f} GB, temporaries {self.temp / GB:.2f} GB -> peak "
                f"~{self.peak / GB:.2f} GB; XLA cost_analysis flops/device {self.flops:.3e} (each loop "
                f"body counted once); "
                f"compile {self.compile_s:.0f} s")


def analyse(name: str, jitted, *args) -> Report:
    """XLA's memory and cost analysis of `jitted(*args)`, through the library's
    `srft_jax.compile_report.analyse` (what `srft-jax compile` reports)."""
    from srft_jax.compile_report import analyse as compile_and_analyse

    rep, _ = compile_and_analyse(name, "", jitted, args, float("inf"))
    return Report(name, rep.argument_bytes, rep.output_bytes, rep.alias_bytes, rep.temp_bytes,
                  rep.xla_flops, rep.compile_s)


# ---- train step --------------------------------------------------------------------------------
def train_report(mesh, micro_batch: int, remat: str, chunk_size: int, model: str = "7b",
                 response: int = RESPONSE) -> Report:
    from srft_jax.batch import MixedBatch
    from srft_jax.losses import SRFTLossConfig
    from srft_jax.train_step import (OptimizerConfig, batch_shardings, jit_train_step, make_optimizer,
                                     make_train_step, opt_state_shardings, param_shardings)

    from srft_jax.models.lora import split_params

    cfg = model_config(remat, model)
    graphdef, state = nnx.split(abstract_model(cfg))
    params = nnx.to_pure_dict(state)
    frozen_args, f_sh = (), None
    if cfg.lora_rank:  # the update trains the adapters; the base is a frozen argument
        params, frozen = split_params(params)
        f_sh = param_shardings(frozen, mesh)
        frozen_args = (with_shardings(frozen, f_sh),)
    tx = make_optimizer(OptimizerConfig(lr=1e-6, weight_decay=0.01, grad_clip=1.0))
    p_sh = param_shardings(params, mesh)
    o_sh = opt_state_shardings(tx, params, p_sh, mesh)
    opt = jax.eval_shape(tx.init, params)
    rows = PAPER["prompts"] // PAPER["updates"] * (PAPER["rollouts"] + PAPER["demos"])  # 512
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    b = micro_batch * batch_shards
    m = rows // b
    f32, i32 = jnp.float32, jnp.int32
    batch = MixedBatch(
        prompt_tokens=sds((m, b, PROMPT), i32), prompt_mask=sds((m, b, PROMPT), f32),
        response_tokens=sds((m, b, response), i32), response_mask=sds((m, b, response), f32),
        is_demo=sds((m, b), bool), group=sds((m, b), i32), reward=sds((m, b), f32),
        advantage=sds((m, b), f32), old_logprobs=sds((m, b, response), f32))
    b_sh = batch_shardings(mesh, batch)
    step = jit_train_step(make_train_step(graphdef, tx, SRFTLossConfig(), chunk_size=chunk_size),
                          p_sh, o_sh, b_sh, mesh, f_sh)
    lora = f", LoRA rank {cfg.lora_rank} on {len(cfg.lora_targets)} projections" if cfg.lora_rank else ""
    with jax.set_mesh(mesh):
        return analyse(f"train step (update of {rows} rows = {m} micro-batches x {b} sequences of "
                       f"{PROMPT}+{response} tokens, {micro_batch} per batch shard, remat={remat}, "
                       f"{cfg.param_dtype} base{lora})",
                       step, with_shardings(params, p_sh), with_shardings(opt, o_sh),
                       with_shardings(batch, b_sh), *frozen_args)


# ---- FLOPs of one paper step -------------------------------------------------------------------
def paper_step_flops(cfg: ModelConfig, response_len: int = RESPONSE) -> dict[str, float]:
    """Model FLOPs (no rematerialisation, PaLM convention) of one SRFT step of the paper with
    every response `response_len` tokens long (an upper bound; real rollouts stop earlier):
    `srft_jax.compile_report.step_model_flops` (its docstring has the formula) for 128 prompts x
    (7 rollouts + 1 demonstration), prompt 1024, old log-probs recomputed."""
    from srft_jax.compile_report import step_model_flops

    return step_model_flops(cfg, PAPER["prompts"], PAPER["rollouts"], PAPER["demos"], PROMPT,
                            response_len, recompute_old_logprobs=True)


def flops_lines(cfg: ModelConfig, model: str = "7b") -> list[str]:
    hardware = {k: v for k, v in HARDWARE.items() if v["model"] == model}
    f = paper_step_flops(cfg)
    lines = [f"model FLOPs of one paper step (128 prompts x 7 rollouts of {RESPONSE} tokens + 128 demos, "
             f"prompt {PROMPT}; N_matmul = {f['n_mm'] / 1e9:.3f} B; upper bound, every response full length):",
             f"  sampling: prefill {f['prefill']:.3e} + decode {f['decode']:.3e}",
             f"  two updates (fwd+bwd, 1024 rows x {PROMPT + RESPONSE} tokens): {f['train']:.3e}",
             f"  old log-prob recomputation (896 rows fwd): {f['old_logprobs']:.3e}",
             f"  total: {f['total']:.3e} FLOPs = {f['total'] / 1e15:.0f} PFLOP"]
    for name, hw in hardware.items():
        peak = hw["chips"] * hw["flops"]
        t = f["total"] / (0.4 * peak)
        t_train = (f["train"] + f["old_logprobs"] + f["prefill"]) / (0.4 * peak)
        lines.append(f"  {name}: peak {peak / 1e15:.1f} PFLOP/s -> {t:.0f} s per step at 40% MFU "
                     f"({t_train:.0f} s of it outside decoding); 500 steps = {500 * t / 3600:.1f} h")
    # Decoding is bandwidth-bound: each step reads every row's KV cache (mean context p + r/2)
    # and the bf16 weights once per device.
    rows = PAPER["prompts"] * PAPER["rollouts"]
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # k and v, bf16
    kv_bytes = rows * (PROMPT + RESPONSE / 2) * kv_per_token
    w_bytes = 2 * cfg.num_params()
    for name, hw in hardware.items():
        per_step = kv_bytes / (hw["chips"] * hw["bw"]) + w_bytes / hw["bw"]
        lines.append(f"  {name}: HBM-bound decode estimate {per_step * 1e3:.1f} ms/token step "
                     f"(KV {kv_bytes / GB:.0f} GB over all chips + {w_bytes / GB:.1f} GB weights per chip) "
                     f"-> {per_step * RESPONSE:.0f} s for {RESPONSE} steps")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("all", "train", "flops"), default="all")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per batch shard (one data x fsdp group of devices) per micro-batch")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="full")
    parser.add_argument("--chunk-size", type=int, default=1024, help="log-prob/entropy sequence chunk")
    parser.add_argument("--model", choices=sorted(MODELS), default="7b")
    parser.add_argument("--devices", type=int, default=8, help="forced CPU devices (the mesh size)")
    parser.add_argument("--fsdp", type=int, default=-1, help="fsdp axis size (-1: devices / tensor)")
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--hbm-gb", type=float, default=None,
                        help="also say whether the train step fits in this many GB per device")
    parser.add_argument("--response-len", type=int, default=RESPONSE, help="response tokens per sequence")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    set_overrides(args)

    cfg = model_config(args.remat, args.model)
    print(f"Qwen2.5-Math-{args.model.upper()}: {cfg.num_params() / 1e9:.3f} B parameters, float32 params + "
          f"AdamW moments, bf16 compute; mesh fsdp={args.fsdp} tensor={args.tensor} on "
          f"{jax.device_count()} devices")
    for line in flops_lines(cfg, args.model):
        print(line)
    if args.what == "flops":
        return 0
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=args.fsdp, tensor=args.tensor))
    reports = []
    if args.what in ("all", "train"):
        rep = train_report(mesh, args.micro_batch, args.remat, args.chunk_size, args.model, args.response_len)
        print(rep.line(), flush=True)
        reports.append(rep)
        limits = {name.split(" (")[0]: hw["hbm"] for name, hw in HARDWARE.items() if hw["model"] == args.model}
        if args.hbm_gb:
            limits = {"--hbm-gb": args.hbm_gb * GB}
        for name, hbm in limits.items():
            verdict = "fits" if rep.peak < hbm else "does NOT fit"
            print(f"  train step {verdict} in {hbm / GB:.0f} GB ({name})")
        print(f"train step peak per device: {rep.peak / GB:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
