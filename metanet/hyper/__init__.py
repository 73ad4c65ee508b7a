"""Hypernetworks: networks that write the parameters of other networks.

* :mod:`metanet.hyper.mip` — :class:`MIPHyperNetwork`: conditioning input -> parameters of any
  target module (Magnitude Invariant Parametrizations, or the plain baseline with ``mip=False``).
* :mod:`metanet.hyper.ghn` — :class:`GHN`: graph hypernetwork over
  :class:`metanet.graph.arch.ArchGraph`, with tiling or low-rank decoders
  (:mod:`metanet.hyper.decoders`); ``ghn.load_into(model)``.
* :mod:`metanet.hyper.calibrate` — BatchNorm running statistics recomputed on a few batches
  after a prediction (``calibrate_batchnorm``; ``init-weights --calibrate-bn N``).
* :mod:`metanet.hyper.family` — architecture families (YAML recipes) to train GHNs on.
* :mod:`metanet.hyper.cli` — ``metanet init-weights``.
"""

from metanet.hyper.calibrate import calibrate_batchnorm, task_batches
from metanet.hyper.ghn import GHN, GHNVocabularyError
from metanet.hyper.mip import ConditioningError, MIPHyperNetwork, encode_condition

__all__ = [
    "GHN",
    "ConditioningError",
    "GHNVocabularyError",
    "MIPHyperNetwork",
    "calibrate_batchnorm",
    "encode_condition",
    "task_batches",
]
