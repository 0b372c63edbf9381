"""Transparent huge pages for the large tensors of training on the CPU device.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages from the kernel and
unmaps them on free, so each step's large tensors fault in zeroed memory again, 4 KiB at a time. In the tiny
example the logits, their log-softmax and its gradients are 8 × 128 × 32,000 fp32 = 125 MiB each: about
128,000 page faults per step, a quarter of the process's CPU time spent in the kernel. With
`THP_MEM_ALLOC_ENABLE` set, PyTorch's CPU allocator aligns tensors of 2 MiB and more to the page and asks for
transparent huge pages (`madvise(MADV_HUGEPAGE)`, where the kernel's THP mode is `always` or `madvise`): the
same memory arrives in 2 MiB faults, about 2,300 per step.

PyTorch reads the variable once, at its first CPU allocation, so it is set before anything allocates a tensor;
a value already in the environment stands. Freed tensors still go back to the kernel, so the peak resident set
(`cpu.vm_hwm`, the CPU device's memory counter) stays the live tensors' peak, give or take the 2 MiB rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MMAP_THRESHOLD_ENV", "THP_ENV", "fix_mmap_threshold", "use_huge_pages"]

THP_ENV = "THP_MEM_ALLOC_ENABLE"
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc reads it at process start
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # e.g. "always [madvise] never"
_PROBE_BYTES = 4 * 1024**2


def use_huge_pages(mode_path: Path = _THP_MODE) -> bool:
    """Asks PyTorch to back large CPU tensors with transparent huge pages, unless the environment already says;
    returns whether they are: False where the kernel has no THP (or it is `never`), or where a tensor was
    allocated before the setting could apply."""
    if not mode_path.is_file() or "[never]" in mode_path.read_text():
        return False
    import torch

    os.environ.setdefault(THP_ENV, "1")
    # With the setting in force, large tensors start on a page boundary; without it, 64 bytes past one.
    probe = torch.empty(_PROBE_BYTES, dtype=torch.uint8)
    return probe.data_ptr() % os.sysconf("SC_PAGE_SIZE") == 0


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Fixes glibc's mmap threshold at `threshold_bytes` (the plan's MALLOC_MMAP_THRESHOLD_) in a process started
    without it in its environment (glibc reads the variable at start only); returns whether mallopt took it.
    Call it before torch is imported: set after torch's own allocations, it no longer stops the heap's creep.
    Fixed, every allocation above it is mapped and unmapped on free, so the 2 MiB-aligned huge-page tensors
    cannot fragment the heap and the resident set stays the live tensors' (dapc.memory.CPU_MMAP_THRESHOLD_BYTES)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return bool(name) and ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
