"""Run configuration: frozen typed dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("configs/demo.yaml", ["train.lr=2e-6", "loss.preset=grpo"])

Parsing and type checking are OmegaConf's (structured configs); every dataclass validates its
values in `__post_init__`. Errors name the key (`train.lrr`) and the file they came from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field
from typing import Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from srft_jax.data.config import DataConfig
from srft_jax.faults import UsageError
from srft_jax.losses import SRFTLossConfig
from srft_jax.mesh import MeshConfig
from srft_jax.models.config import ATTENTION, DTYPES, PRESETS, REMAT, preset
from srft_jax.models.lora import LoraConfig
from srft_jax.rewards import DEFAULT_REWARD_TIMEOUT
from srft_jax.sampler import SamplerConfig
from srft_jax.train_step import OptimizerConfig

log = logging.getLogger(__name__)


class ConfigError(UsageError):
    """A configuration file or override is invalid; the message names the key and source
    (`srft-jax` exits 2)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where the policy comes from.

    path: an HF model directory, a `.gguf` file, or an earlier run's directory (its latest
      checkpoint; this is how SFT -> RL is two commands). None: random initialisation from
      `preset`, with the size overrides below (vocab_size None = the tokenizer's size).
    tokenizer: tokenizer directory; None = `path` (or the data's built-in tokenizer).
    dtype / param_dtype / remat / attention: the model's numerics (`models.config.ModelConfig`);
      attention: auto | xla | splash | cudnn (auto: splash on TPU, cudnn on an NVIDIA GPU with
      a 16-bit dtype, else xla; docs/attention.md).
    lora: LoRA adapters (`models.lora.LoraConfig`; rank 0 = full fine-tuning): the base
      weights stay frozen and only the adapters are trained, checkpointed and optimised.
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
    attention: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        if self.path is None and self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {DTYPES}")
        if self.remat not in REMAT:
            raise ValueError(f"model.remat={self.remat!r}; choose one of {REMAT}")
        if self.attention not in ATTENTION:
            raise ValueError(f"model.attention={self.attention!r}; choose one of {ATTENTION}")
        if self.path is None:  # the sizes must make a model now, not after the data is loaded
            preset(self.preset, **self.size_overrides())

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
    loss_chunk_size: sequence chunk of the memory-bounded log-prob/entropy computation.
    recompute_old_logprobs: recompute `old_logprobs` with a forward pass of the training model
      (as verl does) instead of taking the sampler's; exact ratio 1 on the first update.
    optim: AdamW, clipping and the learning-rate schedule (`OptimizerConfig`; paper: constant
      1e-6, betas 0.9/0.999, weight decay 0.01, grad-norm clip 1.0); the schedule's length is
      `steps * updates_per_step` updates.
    checkpoint_every / keep_checkpoints: save every N steps (and at the last), keep the newest K.
    log_every: write metrics every N steps (and at the last, and at every evaluation).
    export_hf: write an HF model directory to RUN_DIR/hf at the end.
    tensorboard / wandb_project: extra metric sinks (metrics.jsonl is always written).
    progress_bar: show a tqdm bar on process 0.
    reward_workers / reward_timeout: reward worker processes and seconds per response.
    The rollouts' sampling settings (temperature, top-p, top-k) are the `sampler` section's.
    """

    run_dir: str = "runs/srft"
    seed: int = 0
    steps: int = 500
    prompts_per_step: int = 128
    rollouts_per_prompt: int = 7
    updates_per_step: int = 2
    micro_batch_size: int = 8
    recompute_old_logprobs: bool = True
    loss_chunk_size: int = 1024
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    export_hf: bool = True
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    progress_bar: bool = True
    reward_workers: int = 2
    reward_timeout: float = DEFAULT_REWARD_TIMEOUT

    def __post_init__(self):
        positive = ("steps", "prompts_per_step", "updates_per_step", "micro_batch_size",
                    "checkpoint_every", "keep_checkpoints", "log_every", "reward_workers",
                    "loss_chunk_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.rollouts_per_prompt < 0:
            raise ValueError(f"train.rollouts_per_prompt must be >= 0, got {self.rollouts_per_prompt}")
        if self.prompts_per_step % self.updates_per_step:
            raise ValueError(f"train.prompts_per_step={self.prompts_per_step} must be divisible by "
                             f"train.updates_per_step={self.updates_per_step}")
        if self.reward_timeout <= 0:
            raise ValueError(f"train.reward_timeout must be > 0, got {self.reward_timeout}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training: the held-out split and, optionally, paper benchmarks.

    every: evaluate every N steps (0 = never; the final step is always evaluated when > 0).
    split: the held-out split of the training data source (logged as `eval/accuracy`).
    num_examples: held-out prompts used (0 = all).
    temperature: sampling temperature (0 = greedy).
    max_new_tokens: response cap; None = `data.max_response_len`.
    samples: samples per item (accuracy is avg@samples).
    batch_size: sequences per sampler call.
    benchmarks: paper benchmarks also evaluated (e.g. [math500, aime24]), read from
      `benchmark_dir` (local files) or the hub, first `benchmark_limit` items (0 = all) each;
      logged as `eval/<benchmark>/accuracy`.
    Everything is scored by the training reward pool, with the training prompt template.
    """

    every: int = 0
    split: str = "test"
    num_examples: int = 0
    temperature: float = 0.0
    max_new_tokens: Optional[int] = None
    samples: int = 1
    batch_size: int = 64
    benchmarks: tuple[str, ...] = ()
    benchmark_dir: Optional[str] = None
    benchmark_limit: int = 50

    def __post_init__(self):
        if self.every < 0 or self.num_examples < 0 or self.batch_size <= 0:
            raise ValueError("eval.every and eval.num_examples must be >= 0, eval.batch_size > 0")
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        if self.benchmark_limit < 0 or self.samples < 1:
            raise ValueError("eval.benchmark_limit must be >= 0 and eval.samples >= 1")


# Fields of the sampler section that a training config takes from the data section: rollouts
# are padded like demonstrations, so both share the prompt/response widths.
DERIVED_SAMPLER_FIELDS = {
    "max_new_tokens": ("data.max_response_len", lambda data: data.max_response_len),
    "prompt_buckets": ("data.prompt_buckets", lambda data: data.prompt_widths),
    "response_buckets": ("data.response_buckets", lambda data: data.response_widths),
}


@dataclass(frozen=True)
class Config:
    """A training run: one section per concern.

    The `sampler` section sets how rollouts are drawn (temperature, top_p, top_k: paper
    1.0, 1.0, off) and the KV-cache dtype; its `max_new_tokens`, `prompt_buckets` and
    `response_buckets` are derived from `data` (see `DERIVED_SAMPLER_FIELDS`).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: SRFTLossConfig = field(default_factory=SRFTLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        derived = {name: get(self.data) for name, (_, get) in DERIVED_SAMPLER_FIELDS.items()}
        object.__setattr__(self, "sampler", dataclasses.replace(self.sampler, **derived))
        # LUFFY's constant RL normaliser is the configured max response length unless set.
        if self.loss.rl_normalizer == "constant" and self.loss.rl_norm_constant == 0:
            object.__setattr__(self, "loss", dataclasses.replace(
                self.loss, rl_norm_constant=float(self.data.max_response_len)))

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


# Keys that moved: the old dotted key still works, with a warning naming the new one.
MOVED_KEYS = {
    **{f"train.{k}": f"train.optim.{k}" for k in
       ("lr", "b1", "b2", "weight_decay", "grad_clip", "schedule", "warmup_steps")},
    "train.rollout_temperature": "sampler.temperature",
    **{f"data.{k}": f"data.template.{k}" for k in ("system_prompt", "user_template", "think_prefix")},
    "eval.benchmark_samples": "eval.samples",
}
# Keys that are gone, with what to use instead.
REMOVED_KEYS = {
    "data.batch_size": "it was never read; the prompts of a step are train.prompts_per_step",
    "train.sample_chunk_prompts": ("a step's prompts are sampled in one call; sampler.decode_slots "
                                   "(rows decoded at once) bounds KV-cache memory"),
}


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML file (or the defaults when `path` is None) and dotted `key=value` overrides.

    Every error is a one-line ConfigError naming its source: `FILE:LINE: ...` for YAML syntax,
    `FILE: ...` for a bad key or value in the file, `command line: ...` for an override.
    """
    source = path or "<defaults>"
    base = _merge(source, OmegaConf.structured(_schema()))
    if path is not None:
        base = _merge(source, base, _upgrade(_read_yaml(path), path))
    merged = base
    overrides = _check_overrides(overrides)
    if overrides:  # an old and a new name of one key on the command line
        _upgrade(OmegaConf.from_dotlist(overrides), "command line", warn=False)
    for override in overrides:
        merged = _merge(f"command line ({override})", merged,
                        _upgrade(OmegaConf.from_dotlist([override]), "command line"))
    try:
        cfg = _build_from(merged)
        _check_derived(OmegaConf.to_container(merged, resolve=True), cfg)
        return cfg
    except (ValueError, TypeError, OmegaConfBaseException) as e:
        message = _first_line(e)
    if overrides and _builds(base):  # the file alone is fine: the command line is to blame
        raise ConfigError(f"command line: {message}")
    raise ConfigError(f"{source}: {message}")


def _builds(tree) -> bool:
    try:
        _build_from(tree)
        return True
    except (ValueError, TypeError, OmegaConfBaseException):
        return False


def _read_yaml(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        return OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError(f"{path}{line}: YAML syntax error: {problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable YAML file ({_first_line(e)})") from None


def _check_overrides(overrides: Sequence[str]) -> list[str]:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: override {bad[0]!r} is not of the form key=value")
    empty = [o for o in overrides if not o.split("=", 1)[1].strip()]
    if empty:  # OmegaConf reads `key=` as null, which would silently mean "the default"
        key = empty[0].split("=", 1)[0]
        raise ConfigError(f"command line: override {empty[0]!r} has no value: write {key}=\'\' (with the "
                          f"quotes reaching the program) for an empty string, or {key}=null for the default")
    return list(overrides)


def _merge(source: str, *layers):
    try:
        return OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f" (key {key})" if key else ""
        raise ConfigError(f"{source}: {_first_line(e)}{where}") from None


def _build_from(tree) -> Config:
    return _build(OmegaConf.to_container(tree, resolve=True))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _upgrade(layer, source: str, warn: bool = True):
    """`layer` with moved keys under their new names (with a warning); removed keys fail."""
    tree = OmegaConf.to_container(layer, resolve=False)
    if not isinstance(tree, dict):
        return layer
    for old, why in REMOVED_KEYS.items():
        if _pop(tree, old, check_only=True):
            raise ConfigError(f"{source}: {old} was removed: {why}")
    for old, new in MOVED_KEYS.items():
        found, value = _pop(tree, old)
        if not found:
            continue
        if _pop(tree, new, check_only=True):
            raise ConfigError(f"{source}: both {old} and {new} are set; {old} is the old name of {new}")
        if warn:
            log.warning("%s: %s is deprecated, use %s", source, old, new)
        node = tree
        for part in new.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[new.split(".")[-1]] = value
    return OmegaConf.create(tree)


def _pop(tree: dict, dotted: str, check_only: bool = False):
    """(found, value) of a dotted key in a nested dict, removed unless `check_only`."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return (False, None) if not check_only else False
    if leaf not in node:
        return (False, None) if not check_only else False
    if check_only:
        return True
    return True, node.pop(leaf)


def _check_derived(tree: dict, cfg: Config) -> None:
    """A derived sampler field given explicitly must agree with the data section it comes from."""
    given = tree.get("sampler") or {}
    for name, (source_key, _) in DERIVED_SAMPLER_FIELDS.items():
        value = given.get(name)
        if value is None:
            continue
        value = tuple(value) if isinstance(value, list) else value
        if value != getattr(cfg.sampler, name):
            raise ConfigError(f"sampler.{name}={value} disagrees with {source_key}, which sets it in "
                              f"training (it is {getattr(cfg.sampler, name)}); remove sampler.{name}")


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
            kwargs[f.name] = _build(value or {}, ftype, f"{section}.{f.name}" if section else f.name)
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
