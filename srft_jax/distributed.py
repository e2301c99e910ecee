"""Multi-host (multi-controller) training: start-up, which data each process feeds, and the
conversions between a process's own rows (numpy) and global sharded arrays.

Every process runs the same program (SPMD, `jax.distributed`); there is no launcher process.
A global batch is sharded over the mesh's ('data', 'fsdp') axes, so each process only ever
needs the rows that its own devices hold: it reads only its shard of the prompts
(`host_shard`), samples and scores them, builds its part of the mixed batch, and hands that
part to `to_global`. Processes whose devices hold the same rows (a 'tensor' axis that spans
processes) are replicas of one data shard and must feed identical rows; `data_shard` works this
out from the mesh, so the rule is the same on a TPU slice, on GPU nodes and in CPU tests.

Dims legend: B rows of a global batch, S data shards (distinct row blocks held by processes),
B_s = B / S rows fed by one process, M micro-batches, b rows per global micro-batch.

Start-up (`initialize`): coordinator address, process count and process id come from the config
(`mesh.coordinator_address` / `mesh.num_processes` / `mesh.process_id`, i.e. command-line
overrides), else from the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), else JAX auto-detects them (TPU VM slices, SLURM, Open MPI) when
`mesh.distributed` is true.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from srft_jax import mesh as mesh_lib
from srft_jax.mesh import MeshConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


# ---- start-up ------------------------------------------------------------------------------
def resolve_distributed(cfg: MeshConfig, environ: Optional[Mapping[str, str]] = None) -> MeshConfig:
    """Fills unset coordinator_address / num_processes / process_id from the environment.

    A coordinator address from either source turns `distributed` on. Fails naming the variable
    when a number does not parse, or when an address is given without the process count and id
    (JAX's auto-detection only applies when all three are left to it).
    """
    env = os.environ if environ is None else environ
    changes: dict[str, Any] = {}
    sources = (("coordinator_address", ENV_COORDINATOR, str),
               ("num_processes", ENV_NUM_PROCESSES, int),
               ("process_id", ENV_PROCESS_ID, int))
    for name, var, kind in sources:
        if getattr(cfg, name) is None and env.get(var):
            try:
                changes[name] = kind(env[var])
            except ValueError:
                raise ValueError(f"environment variable {var}={env[var]!r} is not an integer") from None
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    if cfg.coordinator_address is not None:
        if cfg.num_processes is None or cfg.process_id is None:
            raise ValueError(
                f"mesh.coordinator_address={cfg.coordinator_address!r} needs mesh.num_processes and "
                f"mesh.process_id too (or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); leave all three "
                f"unset with mesh.distributed=true to let JAX detect them (TPU VMs, SLURM)")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(f"mesh.process_id={cfg.process_id} must be in [0, mesh.num_processes="
                             f"{cfg.num_processes})")
        cfg = dataclasses.replace(cfg, distributed=True)
    return cfg


def initialize(cfg: MeshConfig, environ: Optional[Mapping[str, str]] = None) -> MeshConfig:
    """Starts JAX's multi-controller runtime when the (resolved) config asks for it.

    Must run before anything touches a JAX backend (`jax.devices()`, a computation, ...).
    Returns the resolved config; a no-op for a single process. CPU processes talk through
    gloo collectives (JAX's default `jax_cpu_collectives_implementation`).
    """
    cfg = resolve_distributed(cfg, environ)
    if not cfg.distributed or jax.distributed.is_initialized():
        return cfg
    kwargs: dict[str, Any] = {}
    if cfg.coordinator_address is not None:
        kwargs = dict(coordinator_address=cfg.coordinator_address,
                      num_processes=cfg.num_processes, process_id=cfg.process_id)
    jax.distributed.initialize(**kwargs)
    _no_persistent_cache_on_cpu_processes()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return cfg


def _no_persistent_cache_on_cpu_processes() -> None:
    """Turns JAX's persistent compilation cache off for CPU processes under jax.distributed.

    With jaxlib 0.12 a CPU program with cross-process (gloo) collectives that is loaded from
    the persistent cache never finishes: every process waits forever in its first
    cross-process all-reduce (a freshly compiled copy of the same program runs). jaxlib 0.10
    runs both. A multi-process CPU run (tests, debugging a multi-host set-up on one machine)
    therefore compiles its programs afresh, whatever JAX_COMPILATION_CACHE_DIR says;
    accelerators keep the cache. Must run before the first compilation.
    """
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return
    if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("jax.distributed on CPU: the persistent compilation cache (%s) is off for this run",
                 jax.config.jax_compilation_cache_dir)


def is_main() -> bool:
    """True on the process that writes metrics, configs and exports (process 0)."""
    return jax.process_index() == 0


# ---- which rows a process feeds ------------------------------------------------------------
@dataclass(frozen=True)
class DataShard:
    """The block of global batch rows a process feeds: block `index` of `count` equal blocks.

    Processes with the same index are replicas (their devices hold the same rows) and must feed
    identical data; `count` is 1 on a single process.
    """

    index: int
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"DataShard(index={self.index}, count={self.count}) is not a valid shard")

    def local_size(self, global_size: int, what: str) -> int:
        """`global_size / count`, failing with a message naming `what` when it does not divide."""
        if global_size % self.count:
            raise ValueError(f"{what}={global_size} must be divisible by the number of data shards "
                             f"({self.count}: processes that hold distinct batch rows)")
        return global_size // self.count


def _row_blocks(mesh: Mesh) -> dict[int, tuple[int, ...]]:
    """process index -> the sorted batch-axis indices its devices hold, for a length-n axis
    with n = data * fsdp (one index per batch shard)."""
    n = batch_shards(mesh)
    sharding = mesh_lib.batch_sharding(mesh, 1, (n,))
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((n,)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(n)))
    return {p: tuple(sorted(r)) for p, r in rows.items()}


def data_shard(mesh: Mesh, process_index: Optional[int] = None) -> DataShard:
    """The data shard of a process (default: this one) under `mesh`'s batch sharding."""
    process_index = jax.process_index() if process_index is None else process_index
    blocks = _row_blocks(mesh)
    if process_index not in blocks:
        raise ValueError(f"process {process_index} holds no device of the mesh")
    distinct = sorted(set(blocks.values()))
    sizes = {len(d) for d in distinct}
    covered = sorted(i for d in distinct for i in d)
    if len(sizes) != 1 or covered != list(range(len(covered))):
        raise ValueError(f"the mesh gives processes overlapping or unequal batch rows {blocks}; "
                         "order the devices so that each process holds whole batch shards")
    return DataShard(distinct.index(blocks[process_index]), len(distinct))


def host_shard(items: Sequence[T], shard_index: int, num_shards: int, *, equal: bool = True) -> list[T]:
    """This shard's items: every `num_shards`-th item from `shard_index`.

    equal=True: all shards get exactly `len(items) // num_shards` items (the remainder is
    dropped), so data iterators with the same seed stay in lockstep on every process and a
    checkpoint of one iterator position is valid for all. equal=False: nothing is dropped and
    the first `len(items) % num_shards` shards get one item more (possibly none at all for the
    others: evaluation sets, where `Sampler.generate` pads the processes to equal rows).
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
    if not equal:
        return list(items[shard_index::num_shards])
    per_shard = len(items) // num_shards
    if per_shard == 0:
        raise ValueError(f"{len(items)} items cannot give each of {num_shards} shards one item")
    return [items[shard_index + k * num_shards] for k in range(per_shard)]


def batch_shards(mesh: Mesh) -> int:
    """Number of devices a batch's rows are split over ('data' x 'fsdp')."""
    return math.prod(mesh.shape[a] for a in mesh_lib.RULES["batch"])


def is_shard_leader(mesh: Mesh, process_index: Optional[int] = None) -> bool:
    """True on the lowest-numbered process of its data shard: the one whose per-shard values
    count in `shard_sum` (replicas of a shard hold the same rows and would count them twice)."""
    process_index = jax.process_index() if process_index is None else process_index
    blocks = _row_blocks(mesh)
    return process_index == min(p for p, rows in blocks.items() if rows == blocks[process_index])


# ---- host-local rows <-> global arrays --------------------------------------------------------
def _batch_spec(mesh: Mesh, shape: Sequence[int], axis: int):
    logical = [None] * len(shape)
    logical[axis] = "batch"
    return mesh_lib.logical_to_spec(tuple(logical), tuple(shape), mesh)


def global_shape(local_shape: Sequence[int], shard: DataShard, axis: int) -> tuple[int, ...]:
    shape = list(local_shape)
    shape[axis] *= shard.count
    return tuple(shape)


def to_global(local_tree: Any, mesh: Mesh, axis: int = 0, shard: Optional[DataShard] = None) -> Any:
    """Global arrays, sharded over ('data', 'fsdp') along `axis`, from this process's rows.

    Every leaf of `local_tree` holds this process's B_s rows along `axis` (B_s = B / S); the
    result has B rows, with shard s's rows at [s * B_s, (s + 1) * B_s). The same sharding as
    `train_step.batch_shardings` (axis 1, micro-batched [M, b, ...]) and
    `mesh.batch_sharding` (axis 0). On one process this is `jax.device_put`.
    """
    shard = data_shard(mesh) if shard is None else shard

    def one(local):
        local = np.asarray(local)
        shape = global_shape(local.shape, shard, axis)
        spec = _batch_spec(mesh, shape, axis)
        if shard.count > 1 and spec[axis] is None:
            raise ValueError(f"{shape[axis]} rows along axis {axis} are not divisible by the batch "
                             f"shards ('data' x 'fsdp' = {batch_shards(mesh)}),"
                             f" so they would be replicated; make the batch size a multiple of it")
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_process_local_data(sharding, local, shape)

    return jax.tree.map(one, local_tree)


def _covers(slices: set[tuple[int, int]], size: int) -> bool:
    end = 0
    for start, stop in sorted(slices):
        if start > end:
            return False
        end = max(end, stop)
    return end >= size


def to_local(global_tree: Any, axis: int = 0, shard: Optional[DataShard] = None) -> Any:
    """numpy copies of the rows (along `axis`) that this process's devices hold, in global order.

    The inverse of `to_global` for batch-sharded arrays (e.g. the sampler's outputs); a fully
    replicated or fully addressable array comes back whole. Other axes must be complete on this
    process (sharded only over its own devices, or replicated).
    shard: return exactly that data shard's block of rows, [s * B_s, (s + 1) * B_s) with
    B_s = B / S, whatever the array's sharding (batch-sharded or replicated), as long as this
    process's devices hold those rows; the exact inverse of `to_global(..., shard=shard)`.
    """
    if shard is not None:
        return jax.tree.map(lambda x: _shard_block(x, axis, shard), global_tree)

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        shards = x.addressable_shards
        norm = lambda idx: tuple(s.indices(n)[:2] for s, n in zip(idx, x.shape))
        row_blocks = sorted({norm(s.index)[axis] for s in shards})
        offsets, total = {}, 0
        for start, stop in row_blocks:
            offsets[(start, stop)] = total
            total += stop - start
        for d in range(x.ndim):
            if d != axis and not _covers({norm(s.index)[d] for s in shards}, x.shape[d]):
                raise ValueError(f"axis {d} of an array of shape {x.shape} is split across processes; "
                                 "to_local only gathers rows along the batch axis")
        out_shape = list(x.shape)
        out_shape[axis] = total
        out = np.empty(out_shape, x.dtype)
        for s in shards:
            idx = norm(s.index)
            start, stop = idx[axis]
            where = [slice(a, b) for a, b in idx]
            where[axis] = slice(offsets[(start, stop)], offsets[(start, stop)] + stop - start)
            out[tuple(where)] = np.asarray(s.data)
        return out

    return jax.tree.map(one, global_tree)


def _shard_block(x, axis: int, shard: DataShard) -> np.ndarray:
    """Rows [s * B_s, (s + 1) * B_s) of `x` along `axis`, read from this process's shards."""
    rows = shard.local_size(x.shape[axis], f"rows along axis {axis} of an array of shape {x.shape}")
    lo = shard.index * rows
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x)).take(np.arange(lo, lo + rows), axis=axis)
    shape = list(x.shape)
    shape[axis] = rows
    out = np.empty(shape, x.dtype)
    written = np.zeros(shape, bool)
    for s in x.addressable_shards:
        idx = [sl.indices(n)[:2] for sl, n in zip(s.index, x.shape)]
        start, stop = max(idx[axis][0], lo), min(idx[axis][1], lo + rows)
        if start >= stop:
            continue
        src = [slice(None)] * x.ndim
        src[axis] = slice(start - idx[axis][0], stop - idx[axis][0])
        dst = [slice(a, b) for a, b in idx]
        dst[axis] = slice(start - lo, stop - lo)
        out[tuple(dst)] = np.asarray(s.data)[tuple(src)]
        written[tuple(dst)] = True
    if not written.all():
        raise ValueError(f"this process's devices do not hold all rows [{lo}, {lo + rows}) of an array "
                         f"of shape {x.shape} (sharding {x.sharding})")
    return out


def offset_groups(group: np.ndarray, offset: int) -> np.ndarray:
    """Group ids of a process's rows made global (padding rows keep -1). Use with
    offset = shard.index * prompts per shard, so that no two processes share a group id."""
    group = np.asarray(group)
    return np.where(group >= 0, group + offset, group).astype(group.dtype)


# ---- small reductions over processes (host values: metrics, widths) ---------------------------
def all_gather(value) -> np.ndarray:
    """[process_count, ...] stack of every process's `value` (same shape and dtype on every
    process; the value alone on one process).

    The bytes travel as uint8, so 64-bit values arrive exactly (JAX would cast them to 32
    bits unless jax_enable_x64 is on).
    """
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    stacked = np.asarray(multihost_utils.process_allgather(raw))  # [process_count, bytes]
    return np.ascontiguousarray(stacked).view(value.dtype).reshape((-1,) + value.shape)


def process_max(value):
    """The largest `value` over processes: agree on shapes (bucket widths) before a step, since
    every process must compile and run the same program. An int gives an int; a sequence of
    ints gives a tuple of element-wise maxima (one collective for several widths)."""
    if np.ndim(value) == 0:
        return int(all_gather(np.int64(value)).max())
    return tuple(int(v) for v in all_gather(np.asarray(value, np.int64)).max(axis=0))


def process_sum(values) -> np.ndarray:
    """Element-wise sum over processes of a float vector (e.g. [reward sum, count, tokens])."""
    return all_gather(np.asarray(values, np.float64)).sum(axis=0)


def process_mean(total: float, count: float) -> float:
    """Global mean from every process's local (sum, count); 0.0 when the global count is 0."""
    s, n = process_sum([total, count])
    return float(s / n) if n else 0.0


def shard_sum(values, mesh: Mesh) -> np.ndarray:
    """Element-wise sum over data shards of per-shard float values (sums over a process's own
    rows: rewards, token counts): like `process_sum`, but each data shard counts once however
    many processes feed it (see `is_shard_leader`). Exact for integer-valued sums."""
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    return process_sum(values if is_shard_leader(mesh) else np.zeros_like(values))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
