"""The scatter-kernel core: grouped reductions used by every graph metanetwork.

``scatter`` (any index order), ``segment`` (CSR), ``scatter_softmax``, ``multi_aggregate``
(PNA aggregators + degree scalers) and its module ``MultiAggregation``, and
``film_multi_aggregate`` (the same of edge-conditioned messages that are never stored), and
``relational_attention`` (NG-T's edge-modulated attention over each node's edges).
Backends: native torch or torch-scatter; "auto" picks the fastest measured kernel per
reduction (:data:`metanet.ops.backend.AUTO_TABLE`) and fuses the multi-aggregations in C
(:mod:`metanet.ops._fused`). Select with :func:`set_backend`,
:func:`use_backend` or ``METANET_SCATTER_BACKEND``.
"""

from metanet.ops.aggregate import (
    AGGREGATIONS,
    SCALERS,
    MultiAggregation,
    degree_statistics,
    film_multi_aggregate,
    multi_aggregate,
)
from metanet.ops.attention import relational_attention
from metanet.ops.backend import (
    BACKENDS,
    HAS_TORCH_SCATTER,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from metanet.ops.reduce import REDUCTIONS, index_to_ptr, ptr_to_index, scatter, segment
from metanet.ops.softmax import scatter_softmax

__all__ = [
    "AGGREGATIONS",
    "BACKENDS",
    "HAS_TORCH_SCATTER",
    "REDUCTIONS",
    "SCALERS",
    "MultiAggregation",
    "available_backends",
    "degree_statistics",
    "film_multi_aggregate",
    "get_backend",
    "index_to_ptr",
    "multi_aggregate",
    "ptr_to_index",
    "relational_attention",
    "scatter",
    "scatter_softmax",
    "segment",
    "set_backend",
    "use_backend",
]
