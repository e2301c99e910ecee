"""Cost of the checkpoint fingerprints: the jitted per-array fingerprint pass vs a plain sum over
the same arrays (both read every byte once; the sum is the memory-bandwidth floor).

    python benchmarks/checkpoint_fingerprint.py [--million 64] [--repeats 5]

`Checkpointer.save` fingerprints the parameters and the optimiser state once per checkpoint and
`restore_latest` once per resume; this prints the seconds per GB of both passes and their ratio
(the last line is the comparable number). Arrays: one float32 and one bfloat16 array of
`--million` million elements each, on the default device.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from srft_jax.checkpoint import _fingerprints


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--million", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.million * 1_000_000
    key = jax.random.key(0)
    leaves = [jax.random.normal(key, (n // 1024, 1024), jnp.float32),
              jax.random.normal(key, (n // 1024, 1024), jnp.bfloat16)]
    gigabytes = sum(x.size * x.dtype.itemsize for x in leaves) / 1e9
    fingerprint = jax.jit(_fingerprints)
    plain_sum = jax.jit(lambda xs: jnp.stack([jnp.sum(x, dtype=jnp.float32) for x in xs]))
    t_fp = best_time(fingerprint, leaves, repeats=args.repeats)
    t_sum = best_time(plain_sum, leaves, repeats=args.repeats)
    print(f"device: {jax.devices()[0].device_kind}, {gigabytes:.2f} GB in {len(leaves)} arrays")
    print(f"fingerprint: {t_fp:.4f} s ({t_fp / gigabytes:.4f} s/GB)")
    print(f"plain sum:   {t_sum:.4f} s ({t_sum / gigabytes:.4f} s/GB)")
    print(f"fingerprint / plain sum: {t_fp / t_sum:.2f}")


if __name__ == "__main__":
    main()
