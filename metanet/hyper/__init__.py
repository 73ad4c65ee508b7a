"""Hypernetworks: networks that write the parameters of other networks.

* :mod:`metanet.hyper.mip` — :class:`MIPHyperNetwork`: conditioning input -> parameters of any
  target module (Magnitude Invariant Parametrizations, or the plain baseline with ``mip=False``).
* :mod:`metanet.hyper.ghn` — :class:`GHN`: graph hypernetwork over
  :class:`metanet.graph.arch.ArchGraph`, with tiling or low-rank decoders
  (:mod:`metanet.hyper.decoders`); ``ghn.apply(model)``.
* :mod:`metanet.hyper.family` — architecture families (YAML recipes) to train GHNs on.
* :mod:`metanet.hyper.cli` — ``metanet init-weights``.
"""

from metanet.hyper.ghn import GHN, GHNVocabularyError
from metanet.hyper.mip import ConditioningError, MIPHyperNetwork, encode_condition

__all__ = ["GHN", "ConditioningError", "GHNVocabularyError", "MIPHyperNetwork", "encode_condition"]
