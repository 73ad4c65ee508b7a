"""CSV tables of per-network metrics (plain or gzipped), split into metrics and hyperparameters."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from metanet.data.readers.base import INT_METRICS, METRIC_ALIASES, ZooReadError

__all__ = ["factorize", "read_csv", "split_table"]


def read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a (possibly gzipped) CSV file."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", newline="") as fh:
                text = fh.read()
        else:
            with open(path, newline="") as fh:
                text = fh.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ZooReadError(f"{path}: cannot be read as CSV: {err}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise ZooReadError(f"{path}: empty CSV file")
    header, body = rows[0], [r for r in rows[1:] if r]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ZooReadError(f"{path}: row {i + 2} has {len(r)} fields, the header {len(header)}")
    return header, body


def _column(values: list[str]) -> np.ndarray:
    """Numbers when every entry parses as one (ints stay ints), else strings."""
    try:
        arr = np.array([float(v) if v.strip() else np.nan for v in values], dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=str)
    if (
        np.all(np.isfinite(arr))
        and np.all(arr == np.round(arr))
        and all("." not in v and "e" not in v.lower() for v in values)
    ):
        return arr.astype(np.int64)
    return arr


def factorize(values: np.ndarray) -> np.ndarray:
    """Integer ids in order of first appearance."""
    ids: dict[Any, int] = {}
    return np.array([ids.setdefault(v, len(ids)) for v in values.tolist()], dtype=np.int64)


def split_table(
    header: list[str], body: list[list[str]], skip: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Columns -> (metrics, hparams): ``config.*`` and text columns are hyperparameters."""
    metrics: dict[str, np.ndarray] = {}
    hparams: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        if name in skip:
            continue
        col = _column([r[j] for r in body])
        if name.startswith("config."):
            hparams[name[len("config.") :]] = col
        elif col.dtype.kind in "US":
            hparams[name] = col
        else:
            key = METRIC_ALIASES.get(name, name)
            metrics[key] = col.astype(np.int64) if key in INT_METRICS else col
    return metrics, hparams
