"""What every zoo reader shares: :class:`ZooReadError` and the names of the public layouts'
metric columns in metanet's vocabulary."""

from __future__ import annotations

__all__ = ["INT_METRICS", "METRIC_ALIASES", "ZooReadError"]

# metric names of the public layouts -> metanet's names (ZooGroup.metrics)
METRIC_ALIASES = {
    "test_accuracy": "test_acc",
    "train_accuracy": "train_acc",
    "val_accuracy": "val_acc",
    "step": "epoch",
}
#: metrics stored as integers (ids and counts), everything else is float
INT_METRICS = ("epoch", "run_id", "seed", "label")


class ZooReadError(ValueError):
    """A zoo folder or file that cannot be read; the message names the file (and row/key)."""
