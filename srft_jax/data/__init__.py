"""Prompts, demonstrations, answers: training data, evaluation sets, synthetic task."""

from srft_jax.data.config import DataConfig
from srft_jax.data.eval_sets import BENCHMARKS, EvalItem, format_question, load_benchmark
from srft_jax.data.iterator import PromptIterator
from srft_jax.data.prompts import (
    LUFFY_SYSTEM_PROMPT,
    SYNTHETIC_SYSTEM_PROMPT,
    THINK_PREFIX,
    USER_TEMPLATE,
    PAPER_TEMPLATE,
    SYNTHETIC_TEMPLATE,
    PromptTemplate,
)
from srft_jax.data.synthetic import (
    generate_problems,
    make_synthetic_tokenizer,
    write_synthetic_dataset,
)
from srft_jax.data.training import (
    Example,
    LoadStats,
    load_training_examples,
    load_training_examples_from_config,
)

__all__ = [
    "BENCHMARKS",
    "DataConfig",
    "EvalItem",
    "Example",
    "LUFFY_SYSTEM_PROMPT",
    "LoadStats",
    "PAPER_TEMPLATE",
    "PromptTemplate",
    "SYNTHETIC_TEMPLATE",
    "PromptIterator",
    "SYNTHETIC_SYSTEM_PROMPT",
    "THINK_PREFIX",
    "USER_TEMPLATE",
    "format_question",
    "generate_problems",
    "load_benchmark",
    "load_training_examples",
    "load_training_examples_from_config",
    "make_synthetic_tokenizer",
    "write_synthetic_dataset",
]
