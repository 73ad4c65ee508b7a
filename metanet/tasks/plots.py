"""Plots of task results (matplotlib, Agg backend: no display needed).

* :func:`predicted_vs_true`: scatter of predicted against true test accuracy, with the
  diagonal, Kendall's tau and R² in the legend;
* :func:`training_curves`: the losses / metrics a CSV logger recorded, one panel per metric.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from metanet.metrics import kendall_tau, r2_score


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def predicted_vs_true(
    pred: Sequence[float] | np.ndarray,
    true: Sequence[float] | np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    label: str = "test accuracy",
) -> str:
    """Write a predicted-vs-true scatter PNG to ``path`` and return the path.

    Args:
        pred, true: ``[N]`` predicted and true values.
        path: output ``.png`` file (its folder is created).
        title: figure title; ``label``: what the axes measure.
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"pred and true must be equal-length, non-empty: {p.shape} vs {t.shape}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    tau, r2 = kendall_tau(p, t), r2_score(p, t)
    ax.scatter(t, p, s=10, alpha=0.6, color="tab:blue", edgecolors="none",
               label=f"{p.size} networks\nKendall τ = {tau:.3f}\nR² = {r2:.3f}")  # fmt: skip
    lo = float(min(p.min(), t.min()))
    hi = float(max(p.max(), t.max()))
    pad = 0.03 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=1, ls="--", label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label}")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def read_metrics_csv(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a Lightning ``CSVLogger`` ``metrics.csv``: metric -> (epochs, values)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            epoch = row.get("epoch")
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                try:
                    series[key].append((float(epoch) if epoch else np.nan, float(value)))
                except ValueError:
                    continue
    return {
        k: (np.array([e for e, _ in v]), np.array([x for _, x in v])) for k, v in series.items()
    }


def training_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> str:
    """Plot every metric of ``metrics_csv`` against the epoch (train/val curves share a panel)."""
    series = read_metrics_csv(metrics_csv)
    if not series:
        raise ValueError(f"{metrics_csv} holds no metrics")
    panels: dict[str, list[str]] = defaultdict(list)
    for key in sorted(series):
        name = key.split("/", 1)[1] if "/" in key else key
        panels[name].append(key)
    plt = _pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0), dpi=110, squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels.items()):
        for key in keys:
            epochs, values = series[key]
            ax.plot(epochs, values, marker="." if len(values) < 30 else None, label=key)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def training_curves_from_logger(trainer: Any) -> str | None:
    """Write ``training_curves.png`` next to the CSV logger's ``metrics.csv`` (if there is one)."""
    for logger in getattr(trainer, "loggers", []):
        experiment = getattr(logger, "experiment", None)
        metrics_file = getattr(experiment, "metrics_file_path", None)
        if metrics_file is None:
            continue
        try:
            logger.save()
        except Exception:  # noqa: BLE001 - a logger that cannot flush just gets no plot
            return None
        if not os.path.exists(metrics_file):
            return None
        try:
            return training_curves(
                metrics_file, os.path.join(os.path.dirname(metrics_file), "training_curves.png")
            )
        except ValueError:
            return None
    return None
