"""Metanetworks: permutation-equivariant models over weight spaces and parameter graphs.

Weight-space models (``input_kind = "weightspace"``; first argument a ``WeightSpaceSpec``), all
subclasses of :class:`WeightSpaceModel` (:mod:`metanet.nn.base`), which owns their shared keywords
(``spec``, ``out_dim``, ``hidden``, ``num_layers``, ``dropout``), input check and invariant head:

* :class:`DWSNet` / :class:`DWSLayer` - Deep Weight Space networks (Navon et al. 2023);
* :class:`NFN` / :class:`NFNEquivariant` with :class:`NPLinear` / :class:`HNPLinear` - neural
  functionals (Zhou et al. 2023);
* :class:`UNF` / :class:`UNFEquivariant` / :class:`UNFLayer` - universal neural functionals
  generated from any :class:`PermSpec` (Zhou et al. 2024; the enumeration of their equivariant
  terms is :mod:`metanet.nn.unf_terms`);
* :class:`StatNN` / :class:`StatFeaturizer` - per-layer weight statistics (Unterthiner et al. 2020).

Graph models (``input_kind = "graph"``; input a PyG ``Batch`` of ``ParamGraph``):

* :class:`GMN` / :class:`NGGNN` - message passing with edge updates (Lim et al. 2024; Kofinas
  et al. 2024); :class:`NGT` - the relational transformer; :class:`GraphReadout`;
* :class:`SignGMN` - invariant to hidden-neuron sign flips as well as permutations (networks
  with odd activations: SIRENs, tanh MLPs/CNNs; the sign case of ScaleGMN, Kalogeropoulos et
  al. 2024).
"""

from metanet.nn.base import WeightSpaceModel
from metanet.nn.dws import DWSLayer, DWSNet
from metanet.nn.gmn import GMN, NGGNN
from metanet.nn.graph_features import probe_features
from metanet.nn.nfn import NFN, HNPLinear, NFNEquivariant, NPLinear
from metanet.nn.ngt import NGT
from metanet.nn.readout import GraphReadout
from metanet.nn.sign_gmn import SignGMN
from metanet.nn.statnn import StatFeaturizer, StatNN, layer_statistics
from metanet.nn.unf import UNF, UNFEquivariant, UNFLayer
from metanet.nn.unf_terms import PermSpec

__all__ = [
    "DWSLayer",
    "DWSNet",
    "GMN",
    "GraphReadout",
    "HNPLinear",
    "NFN",
    "NFNEquivariant",
    "NGGNN",
    "NGT",
    "NPLinear",
    "PermSpec",
    "SignGMN",
    "StatFeaturizer",
    "StatNN",
    "UNF",
    "UNFEquivariant",
    "UNFLayer",
    "WeightSpaceModel",
    "layer_statistics",
    "probe_features",
]
