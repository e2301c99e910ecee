"""Cloud TPU slices by name, with the per-chip figures `srft-jax compile` measures against.

    hw = slice_for("v5p-64")     # Slice(generation v5p, 32 chips, topology "2x4x4", ...)
    devices = hw.devices()       # the 32 chips, from libtpu (no TPU needed: compile-only)

Names are Cloud TPU accelerator types. v4 and v5p names count TensorCores (two per chip, one
JAX device per chip: v5p-64 is 32 chips); v5e and v6e names count chips (v5e-8 is 8 chips;
`v5litepod-N` is accepted for v5e-N). `cpu:N` is N forced host CPU devices, with no HBM limit.

Every figure below is copied from the generation's Cloud TPU documentation page (SOURCES), in
the units the page gives: v4's HBM is "32 GiB", v5e's "16 GB", v5p's "95 GB", v6e's "32 GB"
(a GB is 1e9 bytes, a GiB 2**30). Peak FLOP/s are dense bf16 per chip; HBM bandwidth per chip.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional

GiB = 2**30


@dataclass(frozen=True)
class Generation:
    name: str
    hbm_bytes: float  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    cores_per_chip_in_name: int  # 2: the accelerator-type number counts TensorCores
    dims: int  # 3: 3D topology names (AxBxC), 2: 2D (AxB)
    chips_per_host: int  # of a multi-host slice
    chip_config: str  # libtpu's chip config (v4 needs "megacore" for one device per chip)
    source: str


SOURCES = {
    "v4": "https://cloud.google.com/tpu/docs/v4 (275 teraflops bf16, HBM2 32 GiB, 1200 GBps; 4 chips per host)",
    "v5e": "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, HBM2 16 GB, 819 GBps; 8 chips per host)",
    "v5p": "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16, HBM2e 95 GB, 2765 GBps; 4 chips per host)",
    "v6e": "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16, HBM 32 GB, 1638 GBps; 8 chips per host)",
}

GENERATIONS = {
    "v4": Generation("v4", 32 * GiB, 275e12, 1200e9, 2, 3, 4, "megacore", SOURCES["v4"]),
    "v5e": Generation("v5e", 16e9, 197e12, 819e9, 1, 2, 8, "default", SOURCES["v5e"]),
    "v5p": Generation("v5p", 95e9, 459e12, 2765e9, 2, 3, 4, "default", SOURCES["v5p"]),
    "v6e": Generation("v6e", 32e9, 918e12, 1638e9, 1, 2, 8, "default", SOURCES["v6e"]),
}
ALIASES = {"v5litepod": "v5e"}

# Slice shapes (chips per axis) of the Cloud TPU docs' tables, by chip count.
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}


@dataclass(frozen=True)
class Slice:
    """A named slice: `chips` devices in `shape`, each with the generation's figures
    (`generation` None: forced host CPU devices, no HBM limit or roofline)."""

    name: str
    chips: int
    shape: tuple[int, ...]
    generation: Optional[Generation]

    @property
    def is_tpu(self) -> bool:
        return self.generation is not None

    @property
    def topology(self) -> str:
        """libtpu's topology name, e.g. 'v5p:2x4x4'."""
        gen = self.generation.name if self.generation else "cpu"
        return f"{gen}:" + "x".join(str(s) for s in self.shape)

    @property
    def hbm_bytes(self) -> float:
        return self.generation.hbm_bytes if self.generation else math.inf

    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host as (x, y, z), as libtpu wants it."""
        gen = self.generation
        if self.chips <= gen.chips_per_host:
            bounds = self.shape + (1,) * (3 - len(self.shape))
        else:
            bounds = (2, 4, 1) if gen.chips_per_host == 8 else (2, 2, 1)
        return tuple(bounds)

    def devices(self) -> list:
        """The slice's devices: libtpu's topology description (TPU), or the host CPU devices
        (`cpu:N`, which needs XLA_FLAGS=--xla_force_host_platform_device_count=N set before
        JAX starts: `force_cpu_devices`)."""
        import jax

        if not self.is_tpu:
            devices = jax.devices("cpu")
            if len(devices) < self.chips:
                raise ValueError(f"--topology {self.name}: only {len(devices)} CPU devices (set "
                                 f"XLA_FLAGS=--xla_force_host_platform_device_count={self.chips} before JAX starts)")
            return devices[: self.chips]
        import importlib.util

        from jax.experimental import topologies

        if importlib.util.find_spec("libtpu") is None:
            from srft_jax.faults import RunError

            raise RunError(f"--topology {self.name}: compiling for a TPU needs libtpu, which is not "
                           f"installed: pip install -e '.[tpu]' (or 'jax[tpu]=={jax.__version__}')")
        quiet_libtpu(self)
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=self.topology, chip_config_name=self.generation.chip_config,
            chips_per_host_bounds=self.host_bounds(), num_slices=1, wrap=(False, False, False))
        devices = list(desc.devices)
        if len(devices) != self.chips:
            raise RuntimeError(f"libtpu gave {len(devices)} devices for {self.topology}, expected {self.chips}")
        return devices


def slice_for(name: str) -> Slice:
    """The slice of a Cloud TPU accelerator type ('v5p-64', 'v5e-8', 'v4-8', 'v6e-256') or
    'cpu:N'. Raises ValueError with the accepted forms."""
    text = name.strip().lower()
    m = re.fullmatch(r"cpu:(\d+)", text)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"--topology {name}: cpu:N needs N >= 1")
        return Slice(text, n, (n,), None)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    gen = GENERATIONS.get(ALIASES.get(m.group(1), m.group(1))) if m else None
    if gen is None:
        raise ValueError(f"--topology {name!r}: expected a Cloud TPU type ({', '.join(examples())}) "
                         f"or cpu:N")
    count = int(m.group(2))
    chips, rest = divmod(count, gen.cores_per_chip_in_name)
    shapes = SHAPES_3D if gen.dims == 3 else SHAPES_2D
    if rest or chips not in shapes:
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip_in_name == 2 else "chips"
        valid = ", ".join(f"{gen.name}-{c * gen.cores_per_chip_in_name}" for c in shapes)
        raise ValueError(f"--topology {name}: {gen.name} names count {unit}; known slices: {valid}")
    return Slice(f"{gen.name}-{count}", chips, shapes[chips], gen)


def examples() -> list[str]:
    return ["v4-8", "v5e-8", "v5p-64", "v6e-256"]


def quiet_libtpu(target: Optional[Slice] = None) -> None:
    """Keeps libtpu's start-up warnings (no TPU worker hostnames / accelerator type on this
    machine) off the terminal on a machine without TPU chips: sets the variables it would ask
    for, unless they are set. Does nothing on a TPU VM."""
    if _local_tpu_chips():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name if target and target.is_tpu else "v5p-8")
    # Several compile-only processes may load libtpu at once (its lockfile guards real chips).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _local_tpu_chips() -> int:
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # jax moved it: assume a TPU VM and change nothing
        return 1


def table_lines() -> list[str]:
    """The hardware table for --help and the docs."""
    lines = []
    for g in GENERATIONS.values():
        unit = "TensorCores" if g.cores_per_chip_in_name == 2 else "chips"
        lines.append(f"  {g.name}: {g.hbm_bytes / 1e9:.1f} GB HBM, {g.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                     f"{g.hbm_bandwidth / 1e9:.0f} GB/s per chip; names count {unit}")
        lines.append(f"       {g.source}")
    return lines
