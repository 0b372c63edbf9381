"""The hardware catalog: what each accelerator can hold and do, and a resolved description of the cluster."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from dapc.errors import HardwareError

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class Device:
    """One accelerator type. Capacities in bytes, rates per second, power in watts."""

    name: str
    memory_bytes: int
    bf16_tflops: float  # dense, no sparsity
    memory_bandwidth_gbps: float  # GB/s, HBM (or DRAM for the CPU)
    tdp_watts: float
    intra_node_gbps: float  # GB/s per device per direction to its node peers
    is_cpu: bool = False
    source: str = ""


# Memory: the total `nvidia-smi` reports (MiB), from which the CUDA context and allocator reserve are
# modelled as `buffers` in the memory model, not subtracted here. Throughput: dense figures of the
# vendors' datasheets. Links: NVLink/PCIe bandwidth per direction.
CATALOG: dict[str, Device] = {
    d.name.lower(): d
    for d in (
        Device("H100-SXM-80GB", 81559 * MIB, 989.4, 3350, 700, 450,
               source="NVIDIA H100 datasheet (SXM5): 989 TF bf16 dense, 3.35 TB/s, 700 W, NVLink4 900 GB/s"),
        Device("H100-PCIe-80GB", 81559 * MIB, 756.0, 2000, 350, 64,
               source="NVIDIA H100 datasheet (PCIe): 756 TF bf16 dense, 2.0 TB/s, 350 W, PCIe Gen5 x16"),
        Device("H200-SXM-141GB", 143771 * MIB, 989.4, 4800, 700, 450,
               source="NVIDIA H200 datasheet (SXM): 989 TF bf16 dense, 4.8 TB/s, 700 W, NVLink4 900 GB/s"),
        Device("A100-SXM-80GB", 81920 * MIB, 312.0, 2039, 400, 300,
               source="NVIDIA A100 datasheet (SXM4 80GB): 312 TF bf16 dense, 2.04 TB/s, 400 W, NVLink3 600 GB/s"),
        Device("A100-SXM-40GB", 40960 * MIB, 312.0, 1555, 400, 300,
               source="NVIDIA A100 datasheet (SXM4 40GB): 312 TF bf16 dense, 1.56 TB/s, 400 W, NVLink3 600 GB/s"),
        Device("A100-PCIe-80GB", 81920 * MIB, 312.0, 1935, 300, 64,
               source="NVIDIA A100 datasheet (PCIe 80GB): 312 TF bf16 dense, 1.94 TB/s, 300 W, PCIe Gen4 x16"),
        Device("RTX-A6000-48GB", 49140 * MIB, 154.8, 768, 300, 32,
               source="NVIDIA RTX A6000 datasheet: 154.8 TF bf16 dense (tensor), 768 GB/s, 300 W, PCIe Gen4 x16"),
        Device("RTX-4090-24GB", 24564 * MIB, 165.2, 1008, 450, 32,
               source="NVIDIA Ada whitepaper (RTX 4090): 165.2 TF bf16 dense (fp32 accumulate), 1008 GB/s, 450 W, PCIe Gen4"),
        Device("RTX-3090-24GB", 24576 * MIB, 71.0, 936, 350, 32,
               source="NVIDIA Ampere GA102 whitepaper (RTX 3090): 71 TF bf16 dense, 936 GB/s, 350 W, PCIe Gen4"),
        Device("L40S-48GB", 46068 * MIB, 362.05, 864, 350, 32,
               source="NVIDIA L40S datasheet: 362 TF bf16 dense, 864 GB/s, 350 W, PCIe Gen4 x16"),
        Device("B200-180GB", 183359 * MIB, 2250.0, 8000, 1000, 900,
               source="NVIDIA HGX B200 datasheet: 2.25 PF bf16 dense, 8 TB/s, 1000 W, NVLink5 1.8 TB/s"),
        Device("MI300X-192GB", 196592 * MIB, 1307.4, 5300, 750, 64,
               source="AMD Instinct MI300X datasheet: 1307 TF bf16 dense, 5.3 TB/s, 750 W, Infinity Fabric"),
        # The CPU is a device too, so the tiny example plans like any other. Capacity comes from the
        # recipe (`gpu_memory_gib`); the rates are modest figures for two cores with AVX2/AVX-512.
        Device("cpu", 0, 0.2, 20, 65, 10, is_cpu=True,
               source="stated, not measured: 2 x86 cores ~0.2 TF fp32, DDR ~20 GB/s, shared-memory gloo"),
    )
}


def device_names() -> list[str]:
    """Returns the catalog's device names as written in recipes."""
    return [d.name for d in CATALOG.values()]


def resolve_device(
    gpu: str,
    memory_gib: float | None = None,
    bf16_tflops: float | None = None,
    memory_bandwidth_gbps: float | None = None,
    tdp_watts: float | None = None,
    intra_node_gbps: float | None = None,
) -> Device:
    """Returns the catalog device named `gpu` with any given override applied, or a `custom` device.

    Raises HardwareError for an unknown name, or where a figure the planner needs is missing.
    """
    key = gpu.lower()
    if key == "custom":
        missing = [n for n, v in (("gpu_memory_gib", memory_gib), ("gpu_bf16_tflops", bf16_tflops)) if v is None]
        if missing:
            raise HardwareError(f"gpu: custom needs {' and '.join('hardware.' + m for m in missing)}")
        base = Device("custom", 0, 0.0, 1000.0, 400.0, 100.0, source="custom: from the recipe")
    elif key in CATALOG:
        base = CATALOG[key]
    else:
        close = difflib.get_close_matches(key, list(CATALOG), n=1, cutoff=0.5)
        hint = f"did you mean {CATALOG[close[0]].name!r}? " if close else ""
        raise HardwareError(
            f"unknown gpu {gpu!r}: {hint}known: {', '.join(device_names())}, custom"
        )
    if base.is_cpu and memory_gib is None:
        raise HardwareError("gpu: cpu needs hardware.gpu_memory_gib (the RAM one training process may use)")
    return Device(
        name=base.name,
        memory_bytes=int(memory_gib * GIB) if memory_gib is not None else base.memory_bytes,
        bf16_tflops=bf16_tflops if bf16_tflops is not None else base.bf16_tflops,
        memory_bandwidth_gbps=memory_bandwidth_gbps or base.memory_bandwidth_gbps,
        tdp_watts=tdp_watts or base.tdp_watts,
        intra_node_gbps=intra_node_gbps or base.intra_node_gbps,
        is_cpu=base.is_cpu,
        source=base.source if memory_gib is None and bf16_tflops is None else base.source + "; overridden by recipe",
    )
