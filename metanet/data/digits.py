"""scikit-learn's bundled digits (8x8 images, 10 classes) with a fixed train/test split.

Every zoo, benchmark and task in metanet uses this one loader so splits agree everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Digits:
    """Tensors of the digits split: images ``[N, 1, 8, 8]`` scaled to [0, 1], labels ``[N]``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return 10

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and test images flattened to ``[N, 64]`` (for MLPs)."""
        return self.x_train.flatten(1), self.x_test.flatten(1)


def load_digits(
    seed: int = DIGITS_SPLIT_SEED, test_fraction: float = DIGITS_TEST_FRACTION
) -> Digits:
    """Load digits with a stratified split fixed by ``seed`` (1347 train / 450 test by default)."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return Digits(
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
    )


def digit_image_coordinates(size: int = 8) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1]^2, ``[size*size, 2]`` in row-major order (for SIRENs)."""
    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=-1)
