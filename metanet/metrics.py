"""Scores of predictions against true values, shared by the tasks, the plots and the CLIs.

* :func:`kendall_tau` - Kendall's tau-b rank correlation (the headline score of generalization
  prediction: does the metanetwork rank networks by accuracy correctly?);
* :func:`r2_score` - the coefficient of determination.

Both take ``[N]`` NumPy arrays or tensors and return a float, NaN where the score is undefined
(fewer than two values, or a constant input). Nothing here imports Lightning or matplotlib.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["kendall_tau", "r2_score"]


def kendall_tau(pred: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor) -> float:
    """Kendall's tau-b rank correlation of ``pred`` and ``true`` (``[N]`` each; NaN if constant)."""
    from scipy.stats import kendalltau

    p, t = _np(pred), _np(true)
    if p.size < 2 or np.all(p == p[0]) or np.all(t == t[0]):
        return float("nan")
    return float(kendalltau(p, t).statistic)


def r2_score(pred: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` of ``pred`` for ``true`` (``[N]``)."""
    p, t = _np(pred).astype(np.float64), _np(true).astype(np.float64)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    if p.size < 2 or ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(((t - p) ** 2).sum()) / ss_tot


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """``x`` as a flat float64 NumPy array (tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)
