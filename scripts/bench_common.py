"""Pieces the benchmark scripts share: a standard ResNet-18 (torchvision cannot be installed
next to the CPU build of torch here) and the allocator switch that steadies large-tensor
timings. Imported by ``scripts/bench_*.py`` (run from the repository root)."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_real_archs import ResNet  # noqa: E402


# -- ResNet-18 (no torchvision) ---------------------------------------------------------------
def ResNet18(num_classes: int = 1000) -> nn.Module:  # noqa: N802 (named like torchvision's)
    """torchvision's ResNet-18 layout: 7x7/2 stem + max pool, 4 stages of 2 basic blocks
    (64-128-256-512), global average pool, 1000-way Linear (11,689,512 parameters); the
    ``ResNet`` family stand-in of ``tests/test_real_archs.py`` at full size."""
    return ResNet((64, 128, 256, 512), blocks=2, num_classes=num_classes, stem=64)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (no mmap/munmap per large tensor).

    By default every large temporary (>= 32 MB) is a fresh mmap whose pages fault in on first
    touch; on a shared machine that cost is bimodal (transparent huge pages available or not)
    and dominates the spread of large-tensor timings. False where it cannot be set.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30)
    return bool(ok and libc.mallopt(m_trim_threshold, 2**31 - 1))
