"""The device mesh, logical-axis rules and multi-host start-up.

One mesh with named axes ('data', 'fsdp', 'tensor'). Parameters and activations carry logical
axis names; `RULES` maps each logical name to mesh axes. The mesh uses `AxisType.Auto`
(GSPMD-style propagation plus `with_sharding_constraint`), and this module is the only place
that knows about it.

Logical axes:
  batch     sequences of a batch                  -> ('data', 'fsdp')
  embed     model width D (parameters)            -> 'fsdp'   (FSDP: weights split over D)
  vocab     vocabulary V                          -> 'tensor'
  heads     query heads N                         -> 'tensor'
  kv_heads  key/value heads K                     -> 'tensor'
  mlp       MLP width F                           -> 'tensor'
  layers, head_dim, norm, seq, act_embed, lora_rank -> replicated
A dimension that a rule's mesh axes do not divide is replicated instead (e.g. 2 KV heads on a
tensor axis of 4), so every config runs on every mesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from srft_jax.faults import MeshError, UsageError

AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),
    "head_dim": (),
    "norm": (),
    "seq": (),
    "act_embed": (),
    "cache_seq": (),
    "lora_rank": (),
}


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (all remaining devices).

    coordinator_address / num_processes / process_id: multi-host start-up through
    `jax.distributed.initialize`. Leave them unset on a single host; on TPU VMs and SLURM
    `distributed=True` alone auto-detects them.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    distributed: bool = False
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise UsageError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
        for name, s in zip(AXES, sizes):
            if s == 0 or s < -1:
                raise UsageError(f"mesh.{name} must be a positive size or -1, got {s}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        given = " ".join(f"mesh.{name}={s}" for name, s in zip(AXES, sizes))
        plural = "device" if num_devices == 1 else "devices"
        if -1 in sizes:
            if num_devices % known:
                raise MeshError(f"{given}: the {num_devices} {plural} are not divisible by the "
                                f"fixed axis sizes (their product is {known})")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise MeshError(f"{given}: data*fsdp*tensor = {math.prod(sizes)} but there "
                            f"{'is' if num_devices == 1 else 'are'} {num_devices} {plural} "
                            f"(use -1 for one axis to absorb the rest)")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh over all devices (or `devices`) with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    if getattr(devices[0], "platform", "") == "tpu":  # a TPU topology (srft-jax compile): ICI-aware
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
                    mesh: Optional[Any] = None) -> P:
    """PartitionSpec for logical axis names; dims the mesh axes don't divide are replicated."""
    entries = []
    used: set[str] = set()
    for i, name in enumerate(logical):
        axes = RULES[name] if name is not None else ()
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                size = math.prod(mesh.shape[a] for a in axes)
                if shape[i] % size:
                    axes = ()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def named_sharding(mesh: Mesh, logical: Sequence[Optional[str]], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def current_mesh():
    """The (abstract) mesh set with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def constrain(x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the mesh set with `jax.set_mesh`;
    the identity when no mesh is set (single-device use of the model)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int, shape: Optional[Sequence[int]] = None) -> NamedSharding:
    """Sharding of a batch array: leading axis over ('data', 'fsdp'), the rest replicated."""
    logical = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.size} devices)"

