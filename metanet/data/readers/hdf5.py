"""Conversion of any zoo with metanet arch dicts to metanet's HDF5 store: :func:`write_zoo`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from metanet.data.readers.base import INT_METRICS, ZooReadError
from metanet.data.zoo_protocol import ZooLike

__all__ = ["write_zoo"]


def write_zoo(
    zoo: ZooLike, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None
) -> None:
    """Write ``zoo`` as a metanet HDF5 zoo file (atomically, via ``ZooWriter``).

    Every group needs a metanet arch dict (``read_checkpoint_folder(..., arch=...)``); required
    metrics that the source lacks are filled with NaN (losses/accuracies) or -1 (seed).

    Raises:
        ZooReadError: a group without an arch dict (e.g. the Small CNN Zoo's TF architecture).
    """
    from metanet.data.zoo_store import REQUIRED_METRICS, ZooWriter

    for g in zoo:
        if g.arch is None:
            raise ZooReadError(
                f"group '{g.name}' of {zoo.path} has no metanet arch dict; the HDF5 store needs "
                "one (read it with arch=...), or use the reader's object directly"
            )
    with ZooWriter(
        path, attrs={"name": os.path.basename(zoo.path) or "imported", **(attrs or {})}
    ) as w:
        for g in zoo:
            metrics = dict(g.metrics)
            for m in REQUIRED_METRICS:
                if m not in metrics:
                    metrics[m] = (
                        np.full(len(g), -1, dtype=np.int64)
                        if m in INT_METRICS
                        else np.full(len(g), np.nan)
                    )
            w.add(g.arch, g.params(), metrics, g.hparams)
