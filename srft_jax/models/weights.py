"""Hugging Face safetensors checkpoints <-> the NNX `Decoder`, loaded straight into sharded arrays.

Dims legend: L layers, D model width, V vocabulary, F MLP width, N query heads, K key/value heads,
H head dim.

One declarative table, `RULES`, maps each HF tensor name (with `{i}` for the layer index) to a
parameter path of the decoder and a transform:
  copy      the HF tensor has our shape (embedding [V,D], norm scales [D] / [H]);
  split     a 1-D HF tensor reshaped to heads (biases [N*H] -> [N,H]);
  linear    an HF `nn.Linear` weight [out, in] transposed to our kernel [in..., out...] and
            reshaped to named dims (q_proj [N*H, D] -> [D,N,H], o_proj [D, N*H] -> [N,H,D]).
Per-layer HF tensors are stacked into the leading L axis of the `blocks` parameters.

Loading never builds a full host copy of a parameter per device: every parameter is created with
`jax.make_array_from_callback`, whose callback reads from the safetensors files only the slice
that one device shard needs (`safe_open(...).get_slice`), for every layer in the shard, and casts
it to `param_dtype`. Unknown HF tensors, missing tensors and shape mismatches fail before anything
is read, naming the tensor. Export (`save_pretrained`) writes safetensors (sharded with an index
past `max_shard_bytes`) and a `config.json` that `transformers.AutoModelForCausalLM` loads.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from srft_jax import mesh as mesh_lib
from srft_jax.faults import BadModelError, MissingDataError
from srft_jax.models.config import ModelConfig
from srft_jax.models.decoder import Decoder, param_logical_axes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# config.json fields that describe tokens rather than the architecture; kept on export.
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}


class CheckpointError(BadModelError):
    """A checkpoint does not match the model: the message names the tensor or field."""


@dataclass(frozen=True)
class Rule:
    """HF tensor `hf` (with '{i}' for the layer) <-> decoder parameter `path`.

    kind: 'copy', 'split' or 'linear' (see the module docstring); n_in: for 'linear', how many
    leading dims of our kernel are the HF input dims (1 for [D,N,H], 2 for o_proj [N,H,D]).
    """

    hf: str
    path: tuple[str, ...]
    kind: str
    n_in: int = 1

    def __post_init__(self):
        if self.kind not in ("copy", "split", "linear"):
            raise ValueError(f"Rule {self.hf}: kind={self.kind!r} is not copy/split/linear")

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def names(self, num_layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(num_layers)] if self.per_layer else [self.hf]


_ATTN = "model.layers.{i}.self_attn."
_BLK = ("blocks",)
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), "copy"),
    Rule("lm_head.weight", ("lm_head", "kernel"), "linear"),
    Rule("model.norm.weight", ("final_norm", "scale"), "copy"),
    Rule("model.layers.{i}.input_layernorm.weight", _BLK + ("input_norm", "scale"), "copy"),
    Rule("model.layers.{i}.post_attention_layernorm.weight", _BLK + ("post_attn_norm", "scale"), "copy"),
    Rule(_ATTN + "q_proj.weight", _BLK + ("attn", "q_proj", "kernel"), "linear"),
    Rule(_ATTN + "k_proj.weight", _BLK + ("attn", "k_proj", "kernel"), "linear"),
    Rule(_ATTN + "v_proj.weight", _BLK + ("attn", "v_proj", "kernel"), "linear"),
    Rule(_ATTN + "o_proj.weight", _BLK + ("attn", "o_proj", "kernel"), "linear", n_in=2),
    Rule(_ATTN + "q_proj.bias", _BLK + ("attn", "q_proj", "bias"), "split"),
    Rule(_ATTN + "k_proj.bias", _BLK + ("attn", "k_proj", "bias"), "split"),
    Rule(_ATTN + "v_proj.bias", _BLK + ("attn", "v_proj", "bias"), "split"),
    Rule(_ATTN + "q_norm.weight", _BLK + ("attn", "q_norm", "scale"), "copy"),
    Rule(_ATTN + "k_norm.weight", _BLK + ("attn", "k_norm", "scale"), "copy"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", _BLK + ("mlp", "gate_proj", "kernel"), "linear"),
    Rule("model.layers.{i}.mlp.up_proj.weight", _BLK + ("mlp", "up_proj", "kernel"), "linear"),
    Rule("model.layers.{i}.mlp.down_proj.weight", _BLK + ("mlp", "down_proj", "kernel"), "linear"),
)
RULE_BY_PATH = {r.path: r for r in RULES}
# HF tensors that carry no parameters (recomputed buffers).
IGNORED = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ---- transforms on one (per-layer) tensor -------------------------------------------------------
def hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for our per-layer parameter shape."""
    if rule.kind == "copy":
        return tuple(shape)
    if rule.kind == "split":
        return (math.prod(shape),)
    return (math.prod(shape[rule.n_in:]), math.prod(shape[:rule.n_in]))


def to_hf(rule: Rule, x: np.ndarray) -> np.ndarray:
    """Our per-layer parameter -> the HF tensor (C-contiguous)."""
    if rule.kind == "copy":
        return np.ascontiguousarray(x)
    if rule.kind == "split":
        return np.ascontiguousarray(x.reshape(-1))
    n_in = math.prod(x.shape[:rule.n_in])
    return np.ascontiguousarray(x.reshape(n_in, -1).T)


def _flat_range(idx: tuple[slice, ...], dims: tuple[int, ...]) -> slice:
    """Range of a flattened axis covering the leading-dim slice `idx[0]` of `dims`."""
    step = math.prod(dims[1:])
    return slice(idx[0].start * step, idx[0].stop * step)


def _unflatten(block: np.ndarray, idx: tuple[slice, ...], dims: tuple[int, ...], axis: int):
    """Reshapes flattened `axis` of `block` to (lead, *dims[1:]) and applies the inner slices."""
    lead = idx[0].stop - idx[0].start
    shape = block.shape[:axis] + (lead,) + tuple(dims[1:]) + block.shape[axis + 1:]
    block = block.reshape(shape)
    inner = (slice(None),) * (axis + 1) + tuple(idx[1:])
    return block[inner]


def read_slice(reader: "TensorReader", name: str, rule: Rule, shape: tuple[int, ...],
               idx: tuple[slice, ...]) -> np.ndarray:
    """Reads the part `idx` (normalised slices of our per-layer `shape`) of HF tensor `name`."""
    if rule.kind == "copy":
        return reader.read(name, idx)
    if rule.kind == "split":
        block = reader.read(name, (_flat_range(idx, shape),))
        return _unflatten(block, idx, shape, 0)
    in_dims, out_dims = shape[:rule.n_in], shape[rule.n_in:]
    in_idx, out_idx = idx[:rule.n_in], idx[rule.n_in:]
    block = reader.read(name, (_flat_range(out_idx, out_dims), _flat_range(in_idx, in_dims))).T
    block = _unflatten(block, in_idx, in_dims, 0)      # [in..., out_flat]
    return _unflatten(block, out_idx, out_dims, len(in_idx))  # [in..., out...]


# ---- readers -----------------------------------------------------------------------------------
class TensorReader:
    """Named tensors with shapes, readable by slices. Subclasses: safetensors files, in memory."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SafetensorsReader(TensorReader):
    """`model.safetensors` or the shards listed by `model.safetensors.index.json` in a directory."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        index_path = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(model_dir, SINGLE_FILE)):
            weight_map = None
        else:
            raise MissingDataError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in model directory {model_dir!r}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {}
        for fname in files:
            path = os.path.join(model_dir, fname)
            if not os.path.isfile(path):
                raise MissingDataError(f"{index_path} lists shard {fname!r}, which does not exist")
            self._handles[fname] = safe_open(path, framework="numpy")
        self._file_of = {}
        for fname, handle in self._handles.items():
            for name in handle.keys():
                self._file_of[name] = fname
        if weight_map:
            for name, fname in weight_map.items():
                if self._file_of.get(name) != fname:
                    raise CheckpointError(f"{index_path}: tensor {name!r} is not in shard {fname!r}")

    def names(self) -> list[str]:
        return list(self._file_of)

    def _slice(self, name: str):
        return self._handles[self._file_of[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._slice(name)[idx])

    def close(self) -> None:
        self._handles.clear()


class ArrayReader(TensorReader):
    """Tensors already in host memory (e.g. dequantised from a GGUF file)."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        return self._tensors[name][idx]


# ---- model structure ---------------------------------------------------------------------------
def abstract_model(cfg: ModelConfig) -> Decoder:
    """The decoder with `jax.ShapeDtypeStruct` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of the decoder, from `jax.eval_shape` (no memory used)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_model(cfg))))


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(model_or_state: Any, mesh: Optional[Mesh] = None):
    """The sharding of every parameter (a pytree like the state, or like its pure dict):
    NamedSharding from the parameter's logical axes on `mesh`, or the first device when `mesh`
    is None."""
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    single = SingleDeviceSharding(jax.devices()[0])

    def one(path, leaf):
        if mesh is None:
            return single
        return mesh_lib.named_sharding(mesh, param_logical_axes(_path_names(path)), leaf.shape)

    return jax.tree_util.tree_map_with_path(one, state)


def create_sharded_model(cfg: ModelConfig, mesh: Optional[Mesh] = None, seed: int = 0) -> Decoder:
    """A randomly initialised decoder whose parameters are created already sharded."""
    graphdef, abstract = nnx.split(abstract_model(cfg))
    shardings = state_shardings(abstract, mesh)

    def init():
        return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)))

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ---- checking a checkpoint against the model ----------------------------------------------------
def _expected_tensors(abstract: nnx.State, cfg: ModelConfig) -> dict[str, tuple[Rule, tuple[int, ...]]]:
    """HF name -> (rule, expected HF shape) for every parameter of the model."""
    expected = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        names = _path_names(path)
        if names not in RULE_BY_PATH:
            raise KeyError(f"no HF name rule for parameter {'/'.join(names)}")
        rule = RULE_BY_PATH[names]
        shape = leaf.shape[1:] if rule.per_layer else leaf.shape
        for name in rule.names(cfg.num_layers):
            expected[name] = (rule, hf_shape(rule, shape))
    return expected


def check_tensors(reader: TensorReader, expected: dict, cfg: ModelConfig, where: str) -> None:
    """Fails naming the tensor on unexpected, missing or wrongly shaped tensors."""
    present = set(reader.names())
    ignorable = {n for n in present if any(p.fullmatch(n) for p in IGNORED)}
    if cfg.tie_word_embeddings:
        ignorable |= {"lm_head.weight"} & present  # a tied copy of the embedding
    unexpected = sorted(present - ignorable - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {unexpected[:8]} with no mapping for "
                              f"model_type={cfg.arch!r} (attention_bias={cfg.attention_bias}, "
                              f"qk_norm={cfg.qk_norm}, tie_word_embeddings={cfg.tie_word_embeddings})")
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    for name, (_, shape) in expected.items():
        got = reader.shape(name)
        if got != shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {got}, expected {shape} "
                                  f"from config.json")


# ---- loading -----------------------------------------------------------------------------------
def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {index} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


def _make_param(reader: TensorReader, rule: Rule, cfg: ModelConfig, leaf, sharding) -> jax.Array:
    """One parameter as a global array; each device shard reads only its own slice."""
    dtype = NP_DTYPES[cfg.param_dtype]
    shape = tuple(leaf.shape)
    cache: dict[tuple, np.ndarray] = {}  # replicated shards ask for the same slice

    def callback(index):
        idx = _normalise(index, shape)
        key = tuple((s.start, s.stop) for s in idx)
        if key not in cache:
            if rule.per_layer:
                layers = range(idx[0].start, idx[0].stop)
                parts = [read_slice(reader, rule.hf.format(i=i), rule, shape[1:], idx[1:])
                         for i in layers]
                block = np.stack(parts)
            else:
                block = read_slice(reader, rule.hf, rule, shape, idx)
            cache[key] = block.astype(dtype)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def load_state(reader: TensorReader, cfg: ModelConfig, mesh: Optional[Mesh] = None,
               where: str = "checkpoint") -> Decoder:
    """Builds a decoder for `cfg` from HF-named tensors, each parameter created sharded."""
    graphdef, abstract = nnx.split(abstract_model(cfg))
    expected = _expected_tensors(abstract, cfg)
    check_tensors(reader, expected, cfg, where)
    shardings = state_shardings(abstract, mesh)

    def one(path, leaf, sharding):
        return _make_param(reader, RULE_BY_PATH[_path_names(path)], cfg, leaf, sharding)

    state = jax.tree_util.tree_map_with_path(one, abstract, shardings)
    return nnx.merge(graphdef, state)


def read_model_config(path: str, **config_overrides) -> ModelConfig:
    """The ModelConfig of an HF model directory or a `.gguf` file (no weights are read)."""
    if path.endswith(".gguf"):
        from srft_jax.models import gguf

        return ModelConfig.from_hf(gguf.read_config(path), **config_overrides)
    return ModelConfig.from_pretrained(path, **config_overrides)


def load_pretrained(path: str, mesh: Optional[Mesh] = None, **config_overrides) -> tuple[Decoder, ModelConfig]:
    """Loads an HF model directory (config.json + safetensors, sharded or not) or a `.gguf` file.

    `config_overrides` replace ModelConfig fields (e.g. param_dtype='bfloat16', remat='full').
    Parameters land directly in their shards on `mesh` (one device when None).
    """
    if path.endswith(".gguf"):
        from srft_jax.models import gguf

        hf_config, tensors = gguf.read_gguf(path)
        cfg = ModelConfig.from_hf(hf_config, **config_overrides)
        return load_state(ArrayReader(tensors), cfg, mesh, where=path), cfg
    cfg = ModelConfig.from_pretrained(path, **config_overrides)
    reader = SafetensorsReader(path)
    try:
        model = load_state(reader, cfg, mesh, where=path)
    finally:
        reader.close()
    return model, cfg


# ---- export ------------------------------------------------------------------------------------
def _host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array on this host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _param_leaves(model: Decoder):
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        yield RULE_BY_PATH[_path_names(path)], leaf


def hf_layout(model: Decoder) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor `hf_tensors` yields, in the same order."""
    out = []
    for rule, leaf in _param_leaves(model):
        shape = hf_shape(rule, leaf.shape[1:] if rule.per_layer else leaf.shape)
        out.extend((name, shape) for name in rule.names(model.config.num_layers))
    return out


def hf_tensors(model: Decoder, dtype: Optional[str] = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, tensor in `dtype`) for every parameter, one parameter on host at a time."""
    np_dtype = NP_DTYPES[dtype or model.config.param_dtype]
    for rule, leaf in _param_leaves(model):
        value = _host(leaf).astype(np_dtype)
        if rule.per_layer:
            for i in range(model.config.num_layers):
                yield rule.hf.format(i=i), to_hf(rule, value[i])
        else:
            yield rule.hf, to_hf(rule, value)


def plan_shards(layout: list[tuple[str, tuple[int, ...]]], itemsize: int,
                max_shard_bytes: int) -> list[list[str]]:
    """Groups tensor names (in order) into shards of at most `max_shard_bytes` (one tensor at least)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shard(tensors: dict[str, np.ndarray], path: str) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def save_pretrained(model: Decoder, out_dir: str, dtype: Optional[str] = None, *,
                    source_dir: Optional[str] = None, tokenizer: Any = None,
                    extra_config: Optional[dict[str, Any]] = None,
                    max_shard_bytes: int = 4 * 2**30) -> str:
    """Writes an HF model directory: safetensors (+ index when sharded) and config.json.

    dtype: tensor dtype on disk (default: the model's param_dtype). source_dir: an HF directory
    whose tokenizer / generation files and token ids (bos/eos/pad) are carried over.
    tokenizer: an HF tokenizer to save alongside. extra_config: more config.json fields
    (e.g. token ids); architecture fields always come from `model.config`.
    At most one shard plus one parameter is held on the host at a time. Every process must call
    this (parameters are gathered); only process 0 writes.
    """
    cfg = model.config
    dtype = dtype or cfg.param_dtype
    if dtype not in NP_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(NP_DTYPES)}")
    writer = jax.process_index() == 0
    plan = plan_shards(hf_layout(model), NP_DTYPES[dtype].itemsize, max_shard_bytes)
    fnames = ([SINGLE_FILE] if len(plan) == 1 else
              [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))])
    shard_of = {name: k for k, names in enumerate(plan) for name in names}
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        for fname in os.listdir(out_dir):  # weights of an earlier export
            if fname in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(fname):
                os.remove(os.path.join(out_dir, fname))
    pending: dict[str, np.ndarray] = {}
    total = 0
    for name, tensor in hf_tensors(model, dtype):
        pending[name] = tensor
        total += tensor.nbytes
        k = shard_of[name]
        if name == plan[k][-1]:
            if writer:
                _write_shard(pending, os.path.join(out_dir, fnames[k]))
            pending = {}
    if not writer:
        return out_dir
    if len(plan) > 1:
        weight_map = {name: fnames[k] for name, k in shard_of.items()}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = dict(extra_config or {})
    if source_dir is not None:
        hf_config.update(_token_fields(source_dir))
        copy_tokenizer_files(source_dir, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    hf_config.update(cfg.replace(param_dtype=dtype).to_hf())
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return out_dir


def _token_fields(source_dir: str) -> dict[str, Any]:
    path = os.path.join(source_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        src = json.load(f)
    return {k: src[k] for k in TOKEN_FIELDS if src.get(k) is not None}


def copy_tokenizer_files(source_dir: str, out_dir: str) -> list[str]:
    """Copies the tokenizer and generation-config files that exist in `source_dir`."""
    copied = []
    for fname in TOKENIZER_FILES:
        src = os.path.join(source_dir, fname)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, fname)):
            shutil.copyfile(src, os.path.join(out_dir, fname))
            copied.append(fname)
    return copied
