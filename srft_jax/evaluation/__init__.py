"""Benchmark evaluation: the harness (JAX-free), the report, and the model-backed policy.

`srft_jax.evaluation.policy` (ModelPolicy, evaluate_during_training, evaluate_model)
imports JAX and is not imported here, so the harness and report load without it.
"""

from srft_jax.evaluation.harness import (
    BenchmarkResult,
    CacheMismatch,
    Completion,
    EvalProtocol,
    EvalResults,
    Policy,
    Sampling,
    evaluate,
    evaluate_benchmark,
    extract_answer,
    load_benchmarks,
    prompt_ids,
)
from srft_jax.evaluation.report import compare, render_table, write_outputs

__all__ = [
    "BenchmarkResult", "CacheMismatch", "Completion", "EvalProtocol", "EvalResults", "Policy",
    "Sampling", "compare", "evaluate", "evaluate_benchmark", "extract_answer", "load_benchmarks", "prompt_ids",
    "render_table", "write_outputs",
]
