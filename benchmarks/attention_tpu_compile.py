"""TPU memory of attention=splash against attention=xla, from the TPU compiler on a CPU-only host.

    python benchmarks/attention_tpu_compile.py                 # both parts below, v5e:2x2
    python benchmarks/attention_tpu_compile.py --what kernel   # about 30 s on 2 busy CPU cores
    python benchmarks/attention_tpu_compile.py --what train --topology v5p:4x4x2 --model 7b \\
        --fsdp 8 --tensor 4 --micro-batch 4                   # configs/...-v5p64.yaml's step

Needs libtpu (`pip install 'jax[tpu]==<the jax version>'`, the `tpu` extra); nothing runs on a
TPU: `jax.experimental.topologies.get_topology_desc` gives the devices of a TPU slice, the
programs are `jit(...).lower(abstract args).compile()`d for them, and XLA's
`memory_analysis()` reports, per chip:
  arguments / outputs / aliased (donated) / temporaries, and peak ~ args + outputs - aliased
  + temporaries. Temporaries are what the program allocates beyond its inputs and outputs;
  attention's share of them is what the implementations change.

Parts:
  kernel  forward+backward of `sequence_attention` alone (sum of the outputs), causal, with
          a padding mask: batch 4 over the slice's chips, 8 heads, 4096 tokens, head dim 128,
          bfloat16.
  train   the SRFT train step (`train_step.make_train_step`: scan over micro-batches,
          chunked log-probs, paper loss, AdamW; remat full) of Qwen2.5-Math-1.5B (or 7B) for
          one update of the paper (512 rows of 1024 + 8192 tokens), as benchmarks/memory_7b.py
          builds it, with model.attention = splash and = xla.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import memory_7b  # noqa: E402
from srft_jax import mesh as mesh_lib  # noqa: E402
from srft_jax.models import attention_kernels  # noqa: E402

GB = 1e9


def tpu_devices(topology: str):
    """The chips of a TPU slice named like 'v5e:2x2' or 'v5p:4x4x2' (compile-only devices)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                        num_slices=1, wrap=(False, False, False)).devices


def kernel_report(mesh, impl: str, b=4, t=4096, n=8, kh=8, h=128) -> memory_7b.Report:
    bf16 = jnp.bfloat16
    act = mesh_lib.named_sharding(mesh, ("batch", None, "heads", None), (b, t, n, h))
    kv = mesh_lib.named_sharding(mesh, ("batch", None, "kv_heads", None), (b, t, kh, h))
    msk = mesh_lib.named_sharding(mesh, ("batch", None), (b, t))

    def loss(q, k, v, mask):
        return jnp.sum(attention_kernels.sequence_attention(q, k, v, mask, impl).astype(jnp.float32))

    args = (memory_7b.sds((b, t, n, h), bf16, act), memory_7b.sds((b, t, kh, h), bf16, kv),
            memory_7b.sds((b, t, kh, h), bf16, kv), memory_7b.sds((b, t), bool, msk))
    with jax.set_mesh(mesh):
        return memory_7b.analyse(f"attention={impl} forward+backward, batch {b} x {t} tokens, "
                                 f"{n} heads ({kh} KV) of {h}", jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
                                 *args)


def train_report(mesh, impl: str, micro_batch: int, model: str, remat: str) -> memory_7b.Report:
    original = memory_7b.model_config
    memory_7b.model_config = lambda remat, model="7b": original(remat, model).replace(attention=impl)
    try:
        rep = memory_7b.train_report(mesh, micro_batch, remat, 1024, model)
    finally:
        memory_7b.model_config = original
    rep.name = f"attention={impl} " + rep.name
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=("all", "kernel", "train"), default="all")
    ap.add_argument("--topology", default="v5e:2x2", help="TPU slice, e.g. v5e:2x2, v5e:2x4, v5p:4x4x2")
    ap.add_argument("--model", choices=("1.5b", "7b"), default="1.5b")
    ap.add_argument("--data", type=int, default=1)
    ap.add_argument("--fsdp", type=int, default=-1)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--remat", choices=("none", "full", "dots"), default="full")
    args = ap.parse_args(argv)

    devices = tpu_devices(args.topology)
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}")
    reports = []
    if args.what in ("all", "kernel"):
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=-1, tensor=1), devices=devices)
        with jax.set_mesh(mesh):
            assert attention_kernels.resolve("auto", "bfloat16") == "splash"  # decided by the mesh
        pair = [kernel_report(mesh, impl) for impl in ("splash", "xla")]
        reports.append(pair)
    if args.what in ("all", "train"):
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=args.data, fsdp=args.fsdp, tensor=args.tensor),
                                  devices=devices)
        print(f"mesh {mesh_lib.describe(mesh)}", flush=True)
        pair = []
        for impl in ("splash", "xla"):
            pair.append(train_report(mesh, impl, args.micro_batch, args.model, args.remat))
            print(pair[-1].line(), flush=True)
        reports.append(pair)
    print()
    for splash, xla in reports:
        for rep in (splash, xla):
            print(rep.line())
        print(f"  temporaries per chip: splash {splash.temp / 1e6:.1f} MB, xla {xla.temp / 1e6:.1f} MB; "
              f"peak splash {splash.peak / GB:.2f} GB, xla {xla.peak / GB:.2f} GB")
    print("(XLA's cost_analysis does not count the FLOPs inside the splash kernel, a custom call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
