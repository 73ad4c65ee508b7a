"""StatNN (Unterthiner et al. 2020): per-layer weight statistics as features of a network.

For every layer, the weight tensor and the bias vector are each summarised by 7 numbers: mean,
variance and the 0/25/50/75/100 % quantiles. The statistics ignore the order of the entries, so
they are invariant to every neuron permutation (and to much more — which is why they are a
baseline). :func:`layer_statistics` gives the features; :class:`StatNN` is the MLP-head variant;
the gradient-boosted-trees variant (metanet.tasks) can reuse :func:`layer_statistics`.
"""

from __future__ import annotations

import torch
from torch import nn

from metanet.nn.base import WeightSpaceModel
from metanet.weightspace import WeightSpace, WeightSpaceSpec

STAT_NAMES = ("mean", "var", "q0", "q25", "q50", "q75", "q100")
_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _stats(x: torch.Tensor) -> torch.Tensor:
    """``[B, N] -> [B, 7]``."""
    q = torch.quantile(x, torch.tensor(_QUANTILES, dtype=x.dtype, device=x.device), dim=1).t()
    var = x.var(dim=1, unbiased=False)
    return torch.cat([x.mean(1, keepdim=True), var.unsqueeze(1), q], dim=1)


def layer_statistics(ws: WeightSpace) -> torch.Tensor:
    """``[B, num_layers * 14]``: per layer, the 7 statistics of the weight then of the bias.

    Layers without bias contribute zeros for the bias statistics. Names in order:
    :func:`statistic_names`.
    """
    feats = []
    for layer, w, b in zip(ws.spec.layers, ws.weights, ws.biases):
        feats.append(_stats(w.flatten(1)))
        feats.append(_stats(b) if layer.has_bias else b.new_zeros(b.shape[0], len(STAT_NAMES)))
    return torch.cat(feats, dim=1)


def statistic_names(spec: WeightSpaceSpec) -> list[str]:
    """Column names of :func:`layer_statistics` (``"<layer>.weight:q50"``...)."""
    return [
        f"{key}:{stat}"
        for layer in spec.layers
        for key in (layer.weight_key, layer.bias_key)
        for stat in STAT_NAMES
    ]


class StatFeaturizer(WeightSpaceModel):
    """:func:`layer_statistics` as a module: ``WeightSpace -> [B, num_layers * 14]``."""

    def __init__(self, spec: WeightSpaceSpec) -> None:
        super().__init__(spec)
        self.out_dim = self.spec.num_layers * 2 * len(STAT_NAMES)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        self.check_input(ws)
        return layer_statistics(ws)


class StatNN(WeightSpaceModel):
    """StatNN with an MLP head: statistics -> batch-normalised -> MLP -> ``[B, out_dim]``.

    Args:
        spec: weight space of the input networks (any spec, chains or not).
        out_dim: outputs.
        hidden: MLP width.
        num_layers: hidden layers of the MLP.
        dropout: dropout in the MLP.
    """

    min_layers = 0

    def __init__(
        self,
        spec: WeightSpaceSpec,
        out_dim: int = 1,
        hidden: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spec, out_dim, hidden, num_layers, dropout)
        self.features = StatFeaturizer(self.spec)
        self.norm = nn.BatchNorm1d(self.features.out_dim)
        self.head = self._invariant_head(self.features.out_dim, num_layers + 1, hidden, dropout)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        return self.head(self.norm(self.features(ws)))


__all__ = ["STAT_NAMES", "StatFeaturizer", "StatNN", "layer_statistics", "statistic_names"]
