"""What a plan is for: a TPU slice named as users name it (``v3-8``, ``v5e-16``), or a number of GPUs.

TPU slices become compile-only devices from libtpu (``jax.experimental.topologies``), so the real
TPU compiler can lay the step out on a CPU-only machine. GPUs have no such devices here; their
plans are analytic.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from functools import lru_cache

from mesh_transformer.hardware import GIB, Accelerator, accelerator_named, gpu_names

TPU_INSTALL_HINT = 'pip install -e ".[tpu]"'

# How the number in a slice name counts: TensorCores (v2, v3, v4, v5p) or chips (v5e, v6e).
_COUNTS_CORES = {"v2": True, "v3": True, "v4": True, "v5p": True, "v5e": False, "v6e": False}
_TORUS_DIMS = {"v2": 2, "v3": 2, "v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_MEGACORE = ("v4", "v5p")  # one JAX device per chip, as JAX runs them by default
_GENERATION_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


class PlanError(ValueError):
    """A bad planning request (unknown slice or GPU, missing libtpu), with a one-line message."""


@dataclass(frozen=True)
class Target:
    name: str                 # as the user wrote it
    accelerator: Accelerator
    devices: int              # JAX devices
    topology: str | None = None  # libtpu topology name, e.g. "v3:2x2"; None for GPUs

    @property
    def compiled(self) -> bool:
        """True when the real compiler can plan it (TPU slices); GPU plans are analytic."""
        return self.topology is not None

    def describe(self) -> str:
        a = self.accelerator
        if self.compiled:
            return f"{self.name}: {self.devices} JAX devices ({a.name}), topology {self.topology}"
        return f"{self.name}: {self.devices} x {a.name} GPU"


def _chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The slice's chip grid, as Google lays out power-of-two slices: 4 chips = 2x2(x1), then the
    smallest axis doubles first (v3-256 = 8x16, v4-32 = 2x2x4)."""
    exponents = [0] * dims
    for _ in range(int(math.log2(chips))):
        smallest = min(range(dims), key=lambda i: (exponents[i], -i))
        exponents[smallest] += 1
    return tuple(sorted((2**e for e in exponents), key=lambda size: (size == 1, size)))  # 2x2x1, not 1x2x2


def parse_tpu(name: str) -> Target:
    """``v3-8``, ``v3-256``, ``v4-32``, ``v5e-16``, ``v5litepod-16``, ``v5p-8``, ``v6e-8``."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    generation = _GENERATION_ALIASES.get(match.group(1), match.group(1)) if match else None
    if not match or generation not in _COUNTS_CORES:
        raise PlanError(f"unknown TPU slice {name!r}: expected a name like v2-8, v3-8, v3-256, v4-32, v5e-16 "
                        f"(or v5litepod-16), v5p-8 or v6e-8")
    count = int(match.group(2))
    accelerator = accelerator_named(generation)
    cores_per_chip = 2 if _COUNTS_CORES[generation] else 1
    chips = count // cores_per_chip
    minimum = 4 if _TORUS_DIMS[generation] == 3 else 1
    if count % cores_per_chip or chips < minimum or chips & (chips - 1):
        raise PlanError(f"unknown TPU slice {name!r}: {generation} slices have a power-of-two number of chips "
                        f"(at least {minimum}), counted in {'TensorCores' if cores_per_chip == 2 else 'chips'}")
    grid = _chip_grid(chips, _TORUS_DIMS[generation])
    devices = chips * accelerator.devices_per_chip
    return Target(name, accelerator, devices, f"{generation}:{'x'.join(map(str, grid))}")


def parse_gpu(name: str) -> Target:
    """``h100-80gb``, ``a100-40gb``, ``h200``; ``8xh100-80gb`` for eight of them."""
    match = re.fullmatch(r"(?:(\d+)x)?([a-z0-9-]+)", name.strip().lower())
    accelerator = accelerator_named(match.group(2)) if match else None
    if accelerator is None or accelerator.platform != "gpu":
        raise PlanError(f"unknown GPU {name!r}: expected one of {', '.join(gpu_names())}, "
                        f"optionally with a count (8xh100-80gb)")
    return Target(name, accelerator, int(match.group(1) or 1))


def parse_target(name: str) -> Target:
    """A TPU slice (``v3-8``) or GPUs (``8xh100-80gb``), as a config's ``slice`` key may name either."""
    return parse_tpu(name) if re.match(r"v\d", name.strip().lower()) else parse_gpu(name)


@lru_cache(maxsize=None)
def tpu_devices(topology: str) -> tuple:
    """Compile-only devices of a TPU slice (no TPU needed; libtpu must be installed)."""
    from jax.experimental import topologies
    generation, grid = topology.split(":")
    options = {"chip_config_name": "megacore"} if generation in _MEGACORE else {}
    chips = [int(n) for n in grid.split("x")]
    if math.prod(chips) < 4:  # smaller than libtpu's default host (2x2): the slice is its own host
        options["chips_per_host_bounds"] = tuple(chips + [1] * (3 - len(chips)))
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"planning for TPUs needs libtpu, which is not installed: {TPU_INSTALL_HINT}")
    try:
        return tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology, **options).devices)
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "lockfile" in message:  # libtpu lets one process at a time load it
            raise PlanError("libtpu is in use by another process (only one at a time may load it): wait for "
                            f"it to finish, then plan again ({message})") from None
        raise PlanError(f"libtpu could not describe TPU topology {topology}: {message}") from None


def check_devices(target: Target) -> None:
    """The compile-only devices exist and number as the slice name says."""
    devices = tpu_devices(target.topology)
    if len(devices) != target.devices:
        raise PlanError(f"{target.name}: libtpu describes {len(devices)} devices for {target.topology}, "
                        f"expected {target.devices}")


@lru_cache(maxsize=None)
def usable_hbm_bytes(topology: str) -> float:
    """HBM per device as XLA's TPU compiler counts it (a little under the nominal size).

    Compiling a program that needs far more memory than any TPU has makes the compiler state its
    limit ("exceeds available HBM (15.48G)"); that figure is the one every plan is checked against.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    device = tpu_devices(topology)[0]
    replicated = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    try:
        jax.jit(lambda x: jnp.broadcast_to(x, (2**16, 2**20)), out_shardings=replicated).lower(scalar).compile()
    except Exception as e:
        available = parse_available_hbm(str(e))
        if available is not None:
            return available
    raise PlanError(f"could not read the HBM size of {topology} from the TPU compiler")


def parse_available_hbm(message: str) -> float | None:
    found = re.search(r"available HBM \(([\d.]+)([KMGT])\)", message)
    return _bytes(*found.groups()) if found else None


def parse_required_hbm(message: str) -> float | None:
    found = re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
    return _bytes(*found.groups()) if found else None


def _bytes(number: str, unit: str) -> float:
    # XLA prints binary units (GiB) with one letter.
    return float(number) * {"K": 2**10, "M": 2**20, "G": GIB, "T": 2**40}[unit]
