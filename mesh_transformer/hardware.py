"""Published figures of the accelerators this library plans for and measures against: one table.

Figures are per JAX device. TPU v2 and v3 chips have two TensorCores that JAX exposes as two
devices, so a device gets half a chip; v4 and v5p chips run their two TensorCores as one "megacore"
device; v5e and v6e chips have one TensorCore. Sources: the Cloud TPU system-architecture pages
(peak bf16 per chip: v2 45 T, v3 123 T, v4 275 T, v5e 197 T, v5p 459 T, v6e 918 T; HBM per chip and
its bandwidth; bidirectional inter-chip interconnect per chip), Google's TPU v2/v3 paper (Norrie et
al., IEEE Micro 2021) for v2/v3 HBM and ICI bandwidth, and NVIDIA's A100/H100/H200 datasheets (dense
bf16 = half the "with sparsity" figure; NVLink bandwidth per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str                      # the name users write: "v3", "h100-80gb"
    device_kinds: tuple[str, ...]  # substrings of jax.Device.device_kind that identify it
    platform: str                  # "tpu" or "gpu"
    peak_bf16_flops: float         # dense, per JAX device
    hbm_bytes: float               # per JAX device (nominal; XLA can use a little less)
    hbm_bandwidth: float           # bytes/s per JAX device
    interconnect_bandwidth: float  # bytes/s per JAX device: ICI (TPU) or NVLink (GPU), both directions
    devices_per_chip: int = 1


def _tpu(name: str, kinds: tuple[str, ...], per_chip_flops: float, hbm_gib: float, hbm_gbs: float,
         ici_gbs: float, devices_per_chip: int) -> Accelerator:
    d = devices_per_chip
    return Accelerator(name, kinds, "tpu", per_chip_flops / d, hbm_gib * GIB / d, hbm_gbs * GB / d,
                       ici_gbs * GB / d, d)


def _gpu(name: str, kinds: tuple[str, ...], flops: float, hbm_gb: float, hbm_gbs: float,
         link_gbs: float) -> Accelerator:
    return Accelerator(name, kinds, "gpu", flops, hbm_gb * GB, hbm_gbs * GB, link_gbs * GB)


# More specific device kinds come first: lookup takes the first match.
ACCELERATORS: tuple[Accelerator, ...] = (
    _tpu("v2", ("TPU v2",), 45e12, 16, 700, 248, devices_per_chip=2),
    _tpu("v3", ("TPU v3",), 123e12, 32, 900, 328, devices_per_chip=2),
    _tpu("v4", ("TPU v4",), 275e12, 32, 1200, 300, devices_per_chip=1),
    _tpu("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16, 819, 400, devices_per_chip=1),
    _tpu("v5p", ("TPU v5p", "TPU v5"), 459e12, 95, 2765, 1200, devices_per_chip=1),
    _tpu("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32, 1638, 800, devices_per_chip=1),
    _gpu("a100-40gb", ("A100-SXM4-40GB", "A100-PCIE-40GB"), 312e12, 40, 1555, 600),
    _gpu("a100-80gb", ("A100",), 312e12, 80, 2039, 600),
    _gpu("h100-pcie", ("H100 PCIe",), 756e12, 80, 2000, 128),
    _gpu("h100-nvl", ("H100 NVL",), 835e12, 94, 3900, 600),
    _gpu("h100-80gb", ("H100",), 989e12, 80, 3350, 900),
    # GH200's GPU is a Hopper H100 with 96 GB HBM3 ("GH200" must come before "H200", which it contains).
    _gpu("gh200", ("GH200",), 989e12, 96, 4000, 900),
    _gpu("h200-nvl", ("H200 NVL",), 835e12, 141, 4800, 900),
    _gpu("h200", ("H200",), 989e12, 141, 4800, 900),
    # A 24 GiB card (GDDR6X; bf16 with float32 accumulation; no NVLink: PCIe 4.0 x16 between cards).
    _gpu("rtx-4090", ("RTX 4090",), 165e12, 24 * GIB / GB, 1008, 32),
)

GPU_ALIASES = {"a100": "a100-40gb", "h100": "h100-80gb", "h200-141gb": "h200"}


def accelerator_for_device_kind(device_kind: str) -> Accelerator | None:
    """The table row of a JAX device (``jax.Device.device_kind``), or None for CPUs and unknown kinds."""
    for accelerator in ACCELERATORS:
        if any(kind in device_kind for kind in accelerator.device_kinds):
            return accelerator
    return None


def accelerator_named(name: str) -> Accelerator | None:
    """The table row for a name as users write it (``v3``, ``h100-80gb``, ``h100``), or None."""
    name = GPU_ALIASES.get(name.lower(), name.lower())
    return next((a for a in ACCELERATORS if a.name == name), None)


def gpu_names() -> list[str]:
    return [a.name for a in ACCELERATORS if a.platform == "gpu"]
