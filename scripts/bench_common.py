"""Pieces the benchmark scripts share: a standard ResNet-18 (torchvision cannot be installed
next to the CPU build of torch here) and the allocator switch that steadies large-tensor
timings. Imported by ``scripts/bench_*.py`` (run from the repository root)."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# -- ResNet-18 (no torchvision) ---------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, identity or 1x1-conv + BN shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout: 7x7/2 stem + max pool, 4 stages of 2 basic blocks
    (64-128-256-512), global average pool, 1000-way Linear (11,689,512 parameters)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


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
