"""TFDS data path: conversion speed and read latency on a synthetic OpenR1-sized dataset.

Run:
    python benchmarks/tfds_data.py                          # 46,000 rows, 12,000-char demos
    python benchmarks/tfds_data.py --rows 5000 --demo-chars 2000 --keep /tmp/openr1_tfds

Writes ``--rows`` rows in the OpenR1 training layout (question ~300 characters, a
demonstration of ``--demo-chars`` characters of deterministic pseudo-text: OpenR1-Math-46k-
8192's demonstrations run to 8,192 tokens, a few thousand on average) to a jsonl file in a
temporary directory, then measures, one after the other on the CPU:

1. the peer: the jsonl read with the training validation (``iter_records`` +
   ``parse_training_row``, no tokenizer), rows/s;
2. ``convert_to_tfds`` end to end (read, validate, serialise, write ArrayRecord shards), rows/s;
3. a sequential read of the TFDS split (``TfdsRows.iter_range``), rows/s;
4. random single-row reads ``rows[i]`` (``--reads`` uniform random indices): median, p90, p99;
5. random batches ``rows.take(128 indices)`` (one step's prompts at the paper's batch): ms;
6. ``LazyExamples[i]`` over the first ``--lazy-rows`` rows (read + validate + template +
   tokenise with the byte-level test tokenizer, one token per byte): ms per example.

Every figure depends on the disk and on the machine's load; the ratio 2/1 says what the
conversion adds to merely reading and validating the source.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time

import numpy as np

from srft_jax.data.convert import convert_to_tfds
from srft_jax.data.sources import iter_records
from srft_jax.data.tfds_io import open_split
from srft_jax.data.training import load_training_examples, parse_training_row
from srft_jax.testing import make_byte_tokenizer

WORDS = ("so", "the", "sum", "of", "x", "and", "y", "is", "then", "we", "get", "=", "+", "2",
         "3", "\\frac{1}{2}", "Wait,", "check:", "therefore", "squares")


def pseudo_text(rng: random.Random, chars: int) -> str:
    return " ".join(rng.choices(WORDS, k=chars // 3 + 1))[:chars]  # words average > 3 chars


def write_source(path: str, rows: int, demo_chars: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(rows):
            row = {
                "data_source": "synthetic",
                "prompt": [{"role": "user", "content": "This is the problem: " + pseudo_text(rng, 300)}],
                "target": [{"role": "assistant",
                            "content": f"<think>\n{pseudo_text(rng, demo_chars)}\n</think>\n\n\\boxed{{{i}}}"}],
                "reward_model": {"ground_truth": str(i), "style": "rule"},
            }
            f.write(json.dumps(row) + "\n")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=46_000)
    parser.add_argument("--demo-chars", type=int, default=12_000)
    parser.add_argument("--reads", type=int, default=5_000)
    parser.add_argument("--lazy-rows", type=int, default=200)
    parser.add_argument("--keep", default=None, help="copy the converted directory here")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="tfds_bench_")
    try:
        src, dest = os.path.join(work, "train.jsonl"), os.path.join(work, "openr1_tfds")
        _, t_write = timed(lambda: write_source(src, args.rows, args.demo_chars))
        size = os.path.getsize(src)
        print(f"source: {args.rows} rows, {size / 2**20:.0f} MiB jsonl (written in {t_write:.1f} s)")

        n, t_peer = timed(lambda: sum(1 for r in iter_records(src) if parse_training_row(r)))
        print(f"1. jsonl read + validation (peer): {n / t_peer:,.0f} rows/s ({t_peer:.1f} s)")
        _, t_conv = timed(lambda: convert_to_tfds(src, dest, progress=False))
        shard_bytes = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
        print(f"2. convert_to_tfds: {args.rows / t_conv:,.0f} rows/s ({t_conv:.1f} s, "
              f"{shard_bytes / 2**20:.0f} MiB written; {t_conv / t_peer:.2f}x the peer's time)")

        rows = open_split(dest, "train")
        n, t_seq = timed(lambda: sum(1 for _ in rows.iter_range()))
        print(f"3. TFDS sequential read: {n / t_seq:,.0f} rows/s ({t_seq:.1f} s)")

        rng = np.random.default_rng(0)
        latencies = []
        for i in rng.integers(0, len(rows), args.reads):
            t0 = time.perf_counter()
            rows[int(i)]
            latencies.append(time.perf_counter() - t0)
        ms = np.asarray(latencies) * 1e3
        print(f"4. random row read: median {np.median(ms):.3f} ms, p90 {np.percentile(ms, 90):.3f} ms, "
              f"p99 {np.percentile(ms, 99):.3f} ms over {args.reads} reads")
        batches = []
        for _ in range(50):
            idx = rng.choice(len(rows), 128, replace=False)
            _, t = timed(lambda: rows.take(idx))
            batches.append(t * 1e3)
        print(f"5. random batch of 128 rows (take): median {np.median(batches):.1f} ms")

        tokenizer = make_byte_tokenizer()
        examples, _ = load_training_examples(dest, tokenizer, 4096, args.demo_chars + 64,
                                             max_rows=args.lazy_rows)
        per = []
        for i in rng.integers(0, len(examples), min(200, len(examples))):
            _, t = timed(lambda: examples[int(i)])
            per.append(t * 1e3)
        print(f"6. LazyExamples[i] (read + tokenise ~{args.demo_chars} byte tokens): "
              f"median {np.median(per):.2f} ms")
        if args.keep:
            shutil.copytree(dest, args.keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
