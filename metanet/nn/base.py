"""The shared frame of the weight-space metanetworks: :class:`WeightSpaceModel`.

Every model that reads a :class:`~metanet.weightspace.WeightSpace` (DWS, NFN NP/HNP, UNF, StatNN,
invariant and equivariant) subclasses it, so all of them build from the same keywords and check
their input the same way. The graph metanetworks share
:class:`~metanet.nn.readout.GraphMetanetwork` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metanet.nn.layers import FourierFeatures, check_weightspace, mlp_head
from metanet.weightspace import WeightSpace, WeightSpaceSpec


class WeightSpaceModel(nn.Module):
    """Base of the weight-space metanetworks: what DWSNet, NFN, NFNEquivariant, UNF,
    UNFEquivariant, StatNN and StatFeaturizer have in common.

    It owns

    * ``input_kind = "weightspace"``, which tells metanet's tasks to feed :class:`WeightSpace`
      batches;
    * the ``spec`` argument: a :class:`WeightSpaceSpec` (or, for models that list more in
      :attr:`spec_types`, e.g. UNF's :class:`~metanet.nn.unf_terms.PermSpec`), or anything with
      a ``.spec`` (a :class:`WeightSpace`, a ``WeightSpaceDataModule``); anything else is a
      one-line ``TypeError`` naming the model;
    * the shared hyperparameters under one name each, kept as attributes: ``out_dim``
      (``None`` for equivariant models, which return weights), ``hidden`` (channels or width),
      ``num_layers`` (at least :attr:`min_layers`), ``dropout``;
    * builders of the parts several models share: the invariant head
      (:meth:`_invariant_head`, ``head_layers`` linear layers ``head_hidden`` wide), the
      residual output of the equivariant models (:meth:`_residual_scale`) and the Fourier
      value encoding (:func:`value_encoding`);
    * :meth:`check_input` (the input is a :class:`WeightSpace` of ``spec`` with finite
      values) and :meth:`extra_repr`.

    Subclasses keep their full keyword signature (names and defaults are the public API),
    pass the shared keywords to ``super().__init__`` and build only what is their own.

    Data statistics: none. Unlike the graph models (value standardization, PNA degrees), the
    weight-space models need no statistics of the training data (StatNN's batch norm learns
    its own), so they have no ``set_data_statistics`` and tasks leave them as they are.

    Args:
        spec: weight space of the input networks, or an object with a ``.spec``.
        out_dim: outputs of an invariant model (``None``: equivariant, or set by the subclass).
        hidden: channels of the equivariant layers (StatNN: width of its MLP).
        num_layers: equivariant layers (StatNN: hidden layers of its MLP).
        dropout: dropout rate.
    """

    input_kind = "weightspace"
    #: spec types the model reads (UNF adds PermSpec)
    spec_types: tuple[type, ...] = (WeightSpaceSpec,)
    #: smallest ``num_layers`` that builds a model
    min_layers: int = 1

    def __init__(
        self,
        spec: Any,
        out_dim: int | None = None,
        hidden: int | None = None,
        num_layers: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.spec = self._resolve_spec(spec)
        if num_layers is not None and num_layers < self.min_layers:
            raise ValueError(
                f"{type(self).__name__} needs num_layers >= {self.min_layers}, got {num_layers}"
            )
        self.out_dim, self.hidden, self.num_layers = out_dim, hidden, num_layers
        self.dropout = dropout

    def _resolve_spec(self, spec: Any) -> Any:
        """``spec`` itself, or its ``.spec``, when of one of :attr:`spec_types`."""
        if isinstance(spec, self.spec_types):
            return spec
        inner = getattr(spec, "spec", None)
        if isinstance(inner, self.spec_types):
            return inner
        kinds = " or ".join(t.__name__ for t in self.spec_types)
        raise TypeError(
            f"{type(self).__name__} needs a {kinds} (or an object with .spec, e.g. a "
            f"WeightSpace), got {type(spec).__name__}"
        )

    def _model_name(self) -> str:
        """The model's name in error messages (NFN adds its mode)."""
        return type(self).__name__

    def check_input(self, ws: object) -> WeightSpace:
        """Raise unless ``ws`` is a :class:`WeightSpace` of :attr:`spec` with finite values."""
        return check_weightspace(ws, self.spec, self._model_name())

    def _invariant_head(
        self, in_dim: int, head_layers: int, head_hidden: int, dropout: float = 0.0
    ) -> nn.Module:
        """The readout ``[B, in_dim] -> [B, out_dim]``: one ``Linear`` for ``head_layers=1``,
        else a ReLU MLP of ``head_layers`` linear layers, ``head_hidden`` wide (dropout after
        each hidden one)."""
        if self.out_dim is None:
            raise ValueError(f"{type(self).__name__}: an invariant head needs out_dim")
        if head_layers <= 1:
            return nn.Linear(in_dim, self.out_dim)
        return mlp_head(in_dim, head_hidden, self.out_dim, num_layers=head_layers - 1,
                        dropout=dropout)  # fmt: skip

    def _residual_scale(self, residual: bool) -> None:
        """Equivariant output ``x + scale * f(x)`` (``residual``) or ``f(x)``: set
        ``residual`` and the learned ``scale`` (from ``1e-3``; ``1`` and unused without
        ``residual``)."""
        self.residual = residual
        self.scale = nn.Parameter(torch.tensor(1e-3 if residual else 1.0))

    def extra_repr(self) -> str:
        spec = self.spec
        if isinstance(spec, WeightSpaceSpec):
            parts = [f"layers={spec.num_layers}"]
        else:
            parts = [f"tensors={len(getattr(spec, 'names', ()))}"]
        for key in ("out_dim", "hidden", "num_layers", "dropout"):
            value = getattr(self, key)
            if value is not None and not (key == "dropout" and not value):
                parts.append(f"{key}={value}")
        return ", ".join(parts)


def value_encoding(fourier_features: int, fourier_sigma: float) -> tuple[nn.Module | None, int]:
    """Random Fourier features of the weight values (elementwise, so equivariance is kept):
    ``(encoder, channels)``, or ``(None, 1)`` when ``fourier_features`` is 0."""
    if not fourier_features:
        return None, 1
    enc = FourierFeatures(1, fourier_features, fourier_sigma, axis=1)
    return enc, enc.out_dim


__all__ = ["WeightSpaceModel", "value_encoding"]
