"""Deep weight-space networks (Navon et al. 2023): DWS layers and the DWSNet model.

The DWS layer is the space of linear maps between weight spaces of MLPs that commute with the
hidden-neuron permutation group (the network's input and output neurons are not permuted). It is
written as four kinds of blocks — weight→weight, weight→bias, bias→weight, bias→bias — for every
pair of layers, each block being the sum of the parameter-sharing terms the group allows: e.g. for
``W_i -> W_i`` with both axes hidden: identity, row pooling, column pooling and full pooling, each
followed by a broadcast; for ``W_{i+1} -> W_i`` the shared axis is kept and the other pooled; for
non-adjacent layers only full pooling survives. Unpermuted axes (input neurons of the first layer,
output neurons of the last) are dense feature axes. This is the same space as NFN's HNP layer; the
enumeration is shared with :mod:`metanet.nn.unf_terms`. DWS's defaults differ: pooling is ``max``
and the model interleaves batch norm (:class:`~metanet.nn.layers.ChannelBatchNorm`), as in the
paper's experiments (``hidden_dim=32``, 5 DWS layers, ``reduction="max"``, batch norm on).

DWS is defined for MLP weight spaces; conv layers are accepted (kernels become feature channels,
as in NFN), which keeps the layer exactly equivariant.
"""

from __future__ import annotations

import torch
from torch import nn

from metanet.nn.base import WeightSpaceModel
from metanet.nn.layers import ChannelBatchNorm, ChannelDropout, Pointwise
from metanet.nn.unf import InvariantPool, UNFLayer, tensors_of
from metanet.weightspace import WeightSpace, WeightSpaceError, WeightSpaceSpec


class DWSLayer(UNFLayer):
    """Equivariant layer between weight-and-bias spaces of an MLP chain (all W/B blocks).

    Args:
        spec: the weight space (a feed-forward chain).
        in_channels, out_channels: features per weight.
        reduction: pooling of the pooled terms: ``"max"`` (paper default), ``"mean"``, ``"sum"``.
    """

    def __init__(
        self, spec: WeightSpaceSpec, in_channels: int, out_channels: int, reduction: str = "max"
    ) -> None:
        if not isinstance(spec, WeightSpaceSpec):
            raise TypeError(f"DWSLayer needs a WeightSpaceSpec, got {type(spec).__name__}")
        if not spec.is_chain:
            raise WeightSpaceError("DWSLayer is written for feed-forward chains; use UNFLayer")
        super().__init__(spec, in_channels, out_channels, reduction=reduction)

    def block_terms(self) -> dict[str, int]:
        """Number of parameter-sharing terms per block kind ``"W->W"``, ``"W->B"``, ``"B->W"``,
        ``"B->B"`` (summed over all layer pairs)."""
        counts = {"W->W": 0, "W->B": 0, "B->W": 0, "B->B": 0}
        for o, groups in enumerate(self.groups):
            for _, plans in groups:
                for plan in plans:
                    src = "W" if plan.tensor % 2 == 0 else "B"
                    dst = "W" if o % 2 == 0 else "B"
                    counts[f"{src}->{dst}"] += 1
        return counts


class DWSNet(WeightSpaceModel):
    """DWSNet: DWS layers with batch norm, ReLU and dropout, then an invariant head.

    ``forward(ws) -> [B, out_dim]``. Layout as in the paper's classifier:
    ``DWSLayer(1 -> hidden)`` then ``num_layers - 1`` times ``[BN] -> ReLU -> Dropout -> DWSLayer``,
    then ReLU, dropout, invariant pooling (hidden axes pooled, the first layer's input neurons and
    the last layer's output neurons kept) and a head of ``head_layers`` linear layers.

    Args:
        spec: weight space of the input networks (chain).
        out_dim: outputs.
        hidden: channels (paper: ``dim_hidden=32``).
        num_layers: DWS layers (paper: 5, i.e. 4 after the first).
        reduction: ``"max"`` (paper), ``"mean"`` or ``"sum"``.
        batch_norm: interleave channel batch norm (paper: on).
        dropout: dropout rate (paper: 0).
        head_layers: 1 = a single linear readout (paper), 2+ = MLP with ``head_hidden`` units.
        head_hidden: width of the MLP head when ``head_layers > 1``.
    """

    def __init__(
        self,
        spec: WeightSpaceSpec,
        out_dim: int = 1,
        hidden: int = 32,
        num_layers: int = 5,
        reduction: str = "max",
        batch_norm: bool = True,
        dropout: float = 0.0,
        head_layers: int = 1,
        head_hidden: int = 128,
    ) -> None:
        super().__init__(spec, out_dim, hidden, num_layers, dropout)
        spec = self.spec
        n_tensors = 2 * spec.num_layers
        mods: list[nn.Module] = [DWSLayer(spec, 1, hidden, reduction)]
        for _ in range(num_layers - 1):
            if batch_norm:
                mods.append(ChannelBatchNorm(n_tensors, hidden))
            mods.append(Pointwise(nn.ReLU()))
            if dropout > 0:
                mods.append(ChannelDropout(dropout))
            mods.append(DWSLayer(spec, hidden, hidden, reduction))
        mods.append(Pointwise(nn.ReLU()))
        if dropout > 0:
            mods.append(ChannelDropout(dropout))
        self.body = nn.ModuleList(mods)
        self.pool = InvariantPool(spec, hidden, reduction=reduction)
        self.head = self._invariant_head(self.pool.out_dim, head_layers, head_hidden)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        self.check_input(ws)
        xs = tensors_of(ws, self.pool.pspec)
        for m in self.body:
            xs = m(xs)
        return self.head(self.pool(xs))


__all__ = ["DWSLayer", "DWSNet"]
