"""Run configuration: frozen typed dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("configs/demo.yaml", ["train.lr=2e-6", "loss.preset=grpo"])

Parsing and type checking are OmegaConf's (structured configs); every dataclass validates its
values in `__post_init__`. Errors name the key (`train.lrr`) and the file they came from.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from srft_jax.data.config import DataConfig
from srft_jax.losses import SRFTLossConfig
from srft_jax.mesh import MeshConfig
from srft_jax.models.config import DTYPES, PRESETS, REMAT
from srft_jax.sampler import SamplerConfig


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and source."""


@dataclass(frozen=True)
class ModelSpec:
    """Where the policy comes from.

    path: an HF model directory, a `.gguf` file, or an earlier run's directory (its latest
      checkpoint; this is how SFT -> RL is two commands). None: random initialisation from
      `preset`, with the size overrides below (vocab_size None = the tokenizer's size).
    tokenizer: tokenizer directory; None = `path` (or the data's built-in tokenizer).
    """

    path: Optional[str] = None
    tokenizer: Optional[str] = None
    preset: str = "tiny"
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.path is None and self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {DTYPES}")
        if self.remat not in REMAT:
            raise ValueError(f"model.remat={self.remat!r}; choose one of {REMAT}")

    def size_overrides(self) -> dict:
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings", "tie_word_embeddings")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (srft-method.md "Training setup of the paper" gives the defaults).

    prompts_per_step: prompts sampled per step (paper: 128).
    rollouts_per_prompt: self-generated samples per prompt (paper: 7; + 1 demonstration = 8).
    updates_per_step: optimiser updates per step, each on an equal share of the prompts
      (paper: 2 updates of 64 prompts).
    micro_batch_size: sequences per forward/backward; gradients accumulate over micro-batches.
    sample_chunk_prompts: retired (must stay 0): the loop samples a step's prompts in one
      sampler call, and `sampler.decode_slots` bounds the rows decoded at once (KV-cache memory).
    rollout_temperature: sampling temperature of the rollouts (paper: 1.0).
    loss_chunk_size: sequence chunk of the memory-bounded log-prob/entropy computation.
    recompute_old_logprobs: recompute `old_logprobs` with a forward pass of the training model
      (as verl does) instead of taking the sampler's; exact ratio 1 on the first update.
    lr, b1, b2, weight_decay, grad_clip: AdamW (paper: 1e-6, 0.9, 0.999, 0.01, 1.0).
    schedule: 'constant' (paper) or 'cosine' (to 0 at `steps`), after `warmup_steps` of linear warmup.
    """

    run_dir: str = "runs/srft"
    seed: int = 0
    steps: int = 500
    prompts_per_step: int = 128
    rollouts_per_prompt: int = 7
    updates_per_step: int = 2
    micro_batch_size: int = 8
    sample_chunk_prompts: int = 0
    rollout_temperature: float = 1.0
    recompute_old_logprobs: bool = True
    loss_chunk_size: int = 1024
    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    export_hf: bool = True
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    progress_bar: bool = True
    reward_workers: int = 2
    reward_timeout: float = 5.0

    def __post_init__(self):
        positive = ("steps", "prompts_per_step", "updates_per_step", "micro_batch_size",
                    "checkpoint_every", "keep_checkpoints", "log_every", "reward_workers",
                    "loss_chunk_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.sample_chunk_prompts:
            raise ValueError(f"train.sample_chunk_prompts={self.sample_chunk_prompts} is retired: a step's "
                             f"prompts are sampled in one call; set sampler.decode_slots (rows decoded at "
                             f"once) to bound KV-cache memory instead")
        if self.rollouts_per_prompt < 0:
            raise ValueError(f"train.rollouts_per_prompt must be >= 0, got {self.rollouts_per_prompt}")
        if self.prompts_per_step % self.updates_per_step:
            raise ValueError(f"train.prompts_per_step={self.prompts_per_step} must be divisible by "
                             f"train.updates_per_step={self.updates_per_step}")
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.lr, train.weight_decay and train.grad_clip must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"train.b1/b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"train.schedule={self.schedule!r}; choose 'constant' or 'cosine'")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.rollout_temperature <= 0:
            raise ValueError(f"train.rollout_temperature must be > 0, got {self.rollout_temperature}")
        if self.reward_timeout <= 0:
            raise ValueError(f"train.reward_timeout must be > 0, got {self.reward_timeout}")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during training (greedy by default, verified by the training reward).

    every: evaluate every N steps (0 = never; the final step is always evaluated when > 0).
    split: the held-out split of the training data source.
    num_examples: held-out prompts used (0 = all).
    benchmarks: paper benchmarks also evaluated every `every` steps (e.g. [math500, aime24]),
      from `benchmark_dir` (local files) or the hub, first `benchmark_limit` items each,
      `benchmark_samples` samples per item; logged as `eval/<benchmark>/accuracy`.
    """

    every: int = 0
    split: str = "test"
    num_examples: int = 0
    temperature: float = 0.0
    max_new_tokens: Optional[int] = None
    batch_size: int = 64
    benchmarks: tuple[str, ...] = ()
    benchmark_dir: Optional[str] = None
    benchmark_limit: int = 50
    benchmark_samples: int = 1

    def __post_init__(self):
        if self.every < 0 or self.num_examples < 0 or self.batch_size <= 0:
            raise ValueError("eval.every and eval.num_examples must be >= 0, eval.batch_size > 0")
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0, got {self.temperature}")
        if self.benchmark_limit < 0 or self.benchmark_samples < 1:
            raise ValueError("eval.benchmark_limit must be >= 0 and eval.benchmark_samples >= 1")


@dataclass(frozen=True)
class Config:
    model: ModelSpec = field(default_factory=ModelSpec)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: SRFTLossConfig = field(default_factory=SRFTLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML file (or the defaults when `path` is None) and dotted `key=value` overrides."""
    source = path or "<defaults>"
    try:
        schema = OmegaConf.structured(_schema())
        layers = [schema]
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path!r} does not exist")
            layers.append(OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            empty = [o for o in overrides if not o.split("=", 1)[1].strip()]
            if empty:  # OmegaConf reads `key=` as null, which would silently mean "the default"
                key = empty[0].split("=", 1)[0]
                raise ConfigError(f"override {empty[0]!r} has no value: write {key}=\'\' (with the quotes "
                                  f"reaching the program) for an empty string, or {key}=null for the default")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return _build(OmegaConf.to_container(merged, resolve=True))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        where = f" (key {key})" if key else ""
        raise ConfigError(f"{source}: {msg}{where}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _schema_of(cls):
    """A schema dataclass with every field optional, used only for parsing and type checks:
    None means 'not set here', so a section's own defaults (and the loss preset) apply."""
    fields = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            sub = _schema_of(ftype)
            fields.append((f.name, sub, field(default_factory=sub)))
        else:
            fields.append((f.name, Optional[ftype], field(default=None)))
    return dataclasses.make_dataclass(cls.__name__, fields)


def _schema():
    return _schema_of(Config)


def _build(tree: dict, cls=Config, section: str = ""):
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = tree.get(f.name)
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            kwargs[f.name] = _build(value or {}, ftype, f.name)
        elif value is not None:
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        if section and not msg.startswith(f"{section}.") and f" {section}." not in msg:
            msg = f"{section}: {msg}"
        raise ValueError(msg) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))



CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_path(name_or_path: str) -> str:
    """A YAML path as given, or the bundled `configs/NAME.yaml` for a bare name."""
    if os.path.isfile(name_or_path):
        return name_or_path
    bundled = os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
    if os.path.isfile(bundled):
        return bundled
    names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) if os.path.isdir(CONFIG_DIR) else []
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a bundled config ({', '.join(names)})")
