"""`srft-jax eval --model DIR [--benchmarks ...]`: the paper's benchmark table for a model.

    srft-jax eval --model Qwen2.5-Math-7B-srft --data-dir benchmarks_data
    srft-jax eval --model runs/demo --benchmarks openr1 --data-dir runs/demo/data --n 4
    srft-jax eval --compare runs/grpo/eval runs/srft/eval

Defaults follow the paper: temperature 0.6, top-p 1.0, up to 8192 new tokens, avg@32 on
AIME24 and AMC, one sample elsewhere. `--model` is an HF directory (tokenizer in the same
directory) or a training run directory (latest checkpoint, its tokenizer and its prompt
template). Results go to `--out` (default `<model>/eval`): `<benchmark>.jsonl` per-item
records (the resume cache: rerunning the same command skips finished items),
`results.json` and `table.md`.
"""

from __future__ import annotations

import dataclasses
import os

from srft_jax.commands.common import (mesh_size, non_negative_float, positive_float, positive_int,
                                     unit_interval)
from srft_jax.rewards import DEFAULT_REWARD_TIMEOUT

PAPER_BENCHMARKS = "aime24,amc,math500,minerva,olympiad,arc_c,gpqa_diamond,mmlu_pro"


def add_arguments(parser):
    parser.add_argument("--model", help="HF model directory or training run directory")
    parser.add_argument("--benchmarks", default=PAPER_BENCHMARKS,
                        help=f"comma-separated benchmark names (default: {PAPER_BENCHMARKS})")
    parser.add_argument("--data-dir", default=None,
                        help="directory with local <benchmark>.jsonl/.json/.parquet files (or "
                             "<benchmark>/ directories); benchmarks not found there are read "
                             "from the Hugging Face hub")
    parser.add_argument("--out", default=None, help="output directory (default: <model>/eval)")
    parser.add_argument("--name", default=None,
                        help="model name in the table (default: the model directory's name)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.6, help="default 0.6 (0 = greedy)")
    parser.add_argument("--top-p", type=unit_interval, default=1.0, help="default 1.0")
    parser.add_argument("--max-new-tokens", type=positive_int, default=8192, help="default 8192")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="samples per item for every benchmark (overrides the paper's "
                             "avg@32 on aime24/amc)")
    parser.add_argument("--samples", default=None,
                        help="per-benchmark samples, e.g. aime24=4,amc=4 (applied after --n)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="sequences per sampler call (default 128)")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N items of each benchmark")
    parser.add_argument("--system-prompt", default=None,
                        help="system prompt (default: LUFFY's, or the run's training prompt)")
    parser.add_argument("--think-prefix", default=None,
                        help="text after the generation prompt (default '<think>\\n', or the run's)")
    parser.add_argument("--reward-workers", type=positive_int, default=None,
                        help="reward worker processes (default: one per CPU core)")
    parser.add_argument("--reward-timeout", type=positive_float, default=DEFAULT_REWARD_TIMEOUT,
                        help=f"seconds per response for Math-Verify (default {DEFAULT_REWARD_TIMEOUT:g})")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                        help="print two evaluated runs (results.json, or a directory holding "
                             "one or eval/results.json) side by side, then exit")
    parser.add_argument("--data", type=mesh_size, default=1, help="mesh data axis size (default 1)")
    parser.add_argument("--fsdp", type=mesh_size, default=-1, help="mesh fsdp axis size (default -1 = rest)")
    parser.add_argument("--tensor", type=mesh_size, default=1, help="mesh tensor axis size (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def protocol_from_args(args, template):
    """The EvalProtocol of the command line; ``template`` is the model's `PromptTemplate`
    (a training run's own, or the paper's)."""
    from srft_jax.evaluation.harness import PAPER_SAMPLES, EvalProtocol

    samples = list(PAPER_SAMPLES)
    default_samples = 1
    if args.n is not None:
        samples, default_samples = [], args.n
    if args.samples:
        samples += [s.strip() for s in args.samples.split(",") if s.strip()]
    changes = {name: value for name, value in (("system_prompt", args.system_prompt),
                                               ("think_prefix", args.think_prefix)) if value is not None}
    return EvalProtocol(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        default_samples=default_samples, samples=tuple(samples), seed=args.seed,
        batch_size=args.batch_size, reward_timeout=args.reward_timeout,
        reward_workers=args.reward_workers, template=dataclasses.replace(template, **changes))


def run(args) -> int:
    from srft_jax.faults import MissingDataError, UsageError

    if args.compare:
        from srft_jax.evaluation.report import compare

        try:
            table = compare(*args.compare)
        except MissingDataError as e:
            raise MissingDataError(f"--compare: {e}") from None
        print(table, end="")
        return 0
    if not args.model:
        raise UsageError("--model is required (or --compare RUN_A RUN_B)")
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    from srft_jax.data.eval_sets import BENCHMARKS

    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown or not names:
        raise UsageError(f"--benchmarks: unknown {unknown}; choose from {sorted(BENCHMARKS)}")
    from srft_jax.data.prompts import PromptTemplate

    try:  # the settings' own checks (--samples entries), before a model is loaded
        protocol_from_args(args, PromptTemplate())
    except ValueError as e:
        raise UsageError(f"{e}") from None
    from srft_jax.runs import check_model_source

    check_model_source(args.model, "--model", gguf=False)
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise MissingDataError(f"--data-dir={args.data_dir!r}: no such directory")

    import jax

    from srft_jax.evaluation.policy import evaluate_model
    from srft_jax.mesh import MeshConfig

    results, out = evaluate_model(
        args.model, names, lambda template: protocol_from_args(args, template),
        data_dir=args.data_dir, limit=args.limit, out=args.out, name=args.name,
        mesh_config=MeshConfig(data=args.data, fsdp=args.fsdp, tensor=args.tensor),
        progress=not args.no_progress)
    if jax.process_index() == 0:
        with open(os.path.join(out, "table.md"), encoding="utf-8") as f:
            print(f.read(), end="")
        for bench in results.benchmarks.values():
            shown = ", ".join(f"{k} {100 * v:.1f}" for k, v in bench.metrics.items() if k != "accuracy")
            print(f"{bench.name}: {bench.num_items} items x {bench.num_samples} samples: {shown}; "
                  f"mean length {bench.mean_length:.0f} tokens, truncated "
                  f"{100 * bench.truncated:.1f}%")
        print(f"results: {os.path.join(out, 'results.json')}")
    return 0
