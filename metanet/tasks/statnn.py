"""StatNN baseline (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights").

Each network is summarized by simple statistics of its parameters — for every layer's weights and
biases: mean, variance and the 0/25/50/75/100 % quantiles — and a gradient-boosted tree ensemble
(scikit-learn's ``HistGradientBoostingRegressor``) regresses the test accuracy from them.

* :func:`metanet.nn.statnn.layer_statistics`: the paper's features for one architecture
  (``[B, 14 L]``);
* :func:`arch_agnostic_statistics`: a fixed-length variant for zoos of *different* architectures
  (first/last layer, hidden layers pooled, normalization parameters, depth and size);
* :func:`fit_gbt` / :func:`evaluate_predictions` / :func:`run_gbt`: fit on a split, score with
  Kendall's tau and R².

The MLP-head variant is a metanetwork like any other (``metanet.nn.statnn``) trained through
:class:`~metanet.tasks.generalization.GeneralizationTask` (``configs/predict_gen/statnn.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from metanet.metrics import kendall_tau, r2_score
from metanet.nn.statnn import layer_statistics
from metanet.weightspace import WeightSpace

STATISTICS = ("mean", "var", "q0", "q25", "q50", "q75", "q100")
_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def tensor_statistics(t: torch.Tensor) -> torch.Tensor:
    """Statistics of each row of ``t`` (``[B, ...]``, flattened per network) -> ``[B, 7]``.

    Columns follow :data:`STATISTICS`; an empty tensor gives zeros.
    """
    flat = t.detach().reshape(t.shape[0], -1).to(torch.float64)
    if flat.shape[1] == 0:
        return torch.zeros(t.shape[0], len(STATISTICS), dtype=torch.float64)
    q = torch.quantile(flat, torch.tensor(_QUANTILES, dtype=torch.float64), dim=1).T
    var = flat.var(dim=1, unbiased=False)
    return torch.cat([flat.mean(1, keepdim=True), var[:, None], q], dim=1)


def _split_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """``(layer weights, layer biases, norm params)`` of a state_dict, in key order."""
    weights, biases, norms = [], [], []
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("running_mean", "running_var"):
            continue
        if value.dim() >= 2:
            weights.append(value)
            prefix = key[: -len(leaf)]
            bias = sd.get(prefix + "bias")
            biases.append(bias if isinstance(bias, torch.Tensor) else value.new_zeros(0))
        elif leaf == "weight" or (leaf == "bias" and (key[:-4] + "weight") in sd
                                  and sd[key[:-4] + "weight"].dim() == 1):  # fmt: skip
            norms.append(value)
    return weights, biases, norms


def arch_agnostic_statistics(state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A fixed-length summary of any network's parameters, ``[7 * 7 + 3]``.

    Blocks of :data:`STATISTICS` for: first-layer weights, first-layer biases, last-layer weights,
    last-layer biases, all hidden-layer weights, all hidden-layer biases, normalization
    parameters; then depth (number of weight layers), log10 of the parameter count and the
    mean log2 width. Used for zoos whose networks differ in architecture (``digits-arch``).
    """
    weights, biases, norms = _split_state_dict(state_dict)
    if not weights:
        raise ValueError("state_dict has no weight matrices / kernels to summarize")

    def stats(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        if not ts:
            return torch.zeros(7, dtype=torch.float64)
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in ts])
        return tensor_statistics(flat[None])[0]

    hidden_w, hidden_b = weights[1:-1], biases[1:-1]
    num = sum(int(v.numel()) for v in state_dict.values() if isinstance(v, torch.Tensor))
    widths = [w.shape[0] for w in weights[:-1]] or [weights[0].shape[0]]
    extra = torch.tensor(
        [float(len(weights)), math.log10(max(num, 1)), float(np.mean(np.log2(widths)))],
        dtype=torch.float64,
    )
    blocks = [
        stats(weights[:1]), stats(biases[:1]), stats(weights[-1:]), stats(biases[-1:]),
        stats(hidden_w), stats(hidden_b), stats(norms), extra,
    ]  # fmt: skip
    return torch.cat(blocks).float()


def statnn_features(source: WeightSpace | Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """Features of a batch: :func:`layer_statistics` for a WeightSpace, otherwise
    :func:`arch_agnostic_statistics` of each state_dict. Returns ``[B, F]`` float32."""
    if isinstance(source, WeightSpace):
        return layer_statistics(source).float().numpy()
    if not source:
        raise ValueError("no networks given")
    return torch.stack([arch_agnostic_statistics(sd) for sd in source]).numpy()


def fit_gbt(
    features: np.ndarray,
    targets: np.ndarray,
    seed: int = 0,
    max_iter: int = 300,
    learning_rate: float = 0.05,
    max_leaf_nodes: int = 31,
    min_samples_leaf: int = 10,
    l2_regularization: float = 0.0,
) -> Any:
    """Fit the gradient-boosted trees of StatNN (``HistGradientBoostingRegressor``).

    Args:
        features: ``[N, F]`` statistics; targets: ``[N]`` accuracies.
        seed, max_iter, learning_rate, max_leaf_nodes, min_samples_leaf, l2_regularization:
            passed to scikit-learn (early stopping off: the split is given).
    """
    from sklearn.ensemble import HistGradientBoostingRegressor

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {x.shape} and targets {y.shape} do not match")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("features or targets contain NaN/inf")
    model = HistGradientBoostingRegressor(
        max_iter=max_iter,
        learning_rate=learning_rate,
        max_leaf_nodes=max_leaf_nodes,
        min_samples_leaf=min(min_samples_leaf, max(1, x.shape[0] // 4)),
        l2_regularization=l2_regularization,
        early_stopping=False,
        random_state=seed,
    )
    return model.fit(x, y)


def fit_gbt_classifier(
    features: np.ndarray, labels: np.ndarray, seed: int = 0, max_iter: int = 200,
    learning_rate: float = 0.1,
) -> Any:  # fmt: skip
    """StatNN statistics + gradient-boosted trees as a classifier (INR classification baseline)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {x.shape} and labels {y.shape} do not match")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN/inf")
    model = HistGradientBoostingClassifier(
        max_iter=max_iter, learning_rate=learning_rate, early_stopping=False, random_state=seed
    )
    return model.fit(x, y)


def evaluate_predictions(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """``{"kendall_tau", "r2"}`` of predictions against true values."""
    return {"kendall_tau": kendall_tau(pred, true), "r2": r2_score(pred, true)}


def run_gbt(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    seed: int = 0,
    **gbt_kwargs: Any,
) -> dict[str, float]:
    """Fit StatNN-GBT on ``train = (features, targets)`` and score it on ``test``."""
    model = fit_gbt(*train, seed=seed, **gbt_kwargs)
    return evaluate_predictions(model.predict(np.asarray(test[0], dtype=np.float64)), test[1])
