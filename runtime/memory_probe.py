"""Read the peak-memory counter a plan names (`memory.counter`), in bytes, for this process.

The plan's `memory.per_gpu_bytes.total` predicts exactly one of these figures:
- `cpu.vm_hwm`: the peak resident set of this process (`VmHWM` in `/proc/self/status`). It is never reset
  here, so it covers the whole run up to the moment it is read: interpreter, libraries, data, training.
- `cuda.max_memory_reserved` / `cuda.max_memory_allocated`: the CUDA caching allocator's peaks on the
  current device since the process started.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["COUNTERS", "peak_bytes", "vm_hwm_bytes"]

COUNTERS = ("cpu.vm_hwm", "cuda.max_memory_reserved", "cuda.max_memory_allocated")
_STATUS = Path("/proc/self/status")


def vm_hwm_bytes(status_path: Path = _STATUS) -> int:
    """Peak resident set size of this process in bytes, from the `VmHWM:  <n> kB` line."""
    for line in status_path.read_text().splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"{status_path}: unexpected VmHWM unit {unit!r}")
            return int(value) * 1024
    raise ValueError(f"{status_path} has no VmHWM line (not Linux?)")


def peak_bytes(counter: str) -> int:
    """The current value of `counter` (one of COUNTERS) for this process, in bytes."""
    if counter == "cpu.vm_hwm":
        return vm_hwm_bytes()
    if counter in ("cuda.max_memory_reserved", "cuda.max_memory_allocated"):
        import torch

        read = torch.cuda.max_memory_reserved if counter.endswith("reserved") else torch.cuda.max_memory_allocated
        return int(read())
    raise ValueError(f"unknown memory counter {counter!r}; known: {', '.join(COUNTERS)}")
