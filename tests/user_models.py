"""A user's own data set and model family, as a test stands in for them (nothing downloaded).

``Bars`` draws 12x12 grayscale images of three classes (horizontal, vertical, diagonal bars at
random positions, with noise); ``SmallNet`` is a user module with a width argument. Recipes name
them by class path (``user_models:Bars``), exactly as a user names their own package.
"""

from __future__ import annotations

import torch
from torch import nn


class Bars(torch.utils.data.Dataset):
    """``n`` images ``[1, size, size]`` of class 0 (horizontal bar), 1 (vertical), 2 (diagonal)."""

    def __init__(self, n: int = 240, size: int = 12, seed: int = 0, noise: float = 0.1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        images = noise * torch.rand(n, 1, size, size, generator=g)
        pos = torch.randint(1, size - 1, (n,), generator=g)
        idx = torch.arange(size)
        for i in range(n):
            c, p = int(self.labels[i]), int(pos[i])
            if c == 0:
                images[i, 0, p, :] += 1.0
            elif c == 1:
                images[i, 0, :, p] += 1.0
            else:
                images[i, 0, idx, (idx + p) % size] += 1.0
        self.images = images.clamp(0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class SmallNet(nn.Module):
    """A user's CNN family: conv(width) -> ReLU -> global average pool -> Linear(classes)."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.head(h.mean(dim=(2, 3)))


class WrongOutput(SmallNet):
    """A module whose output does not fit the data (two logits for three classes)."""

    def __init__(self) -> None:
        super().__init__(width=2, classes=2)
