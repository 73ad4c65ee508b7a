"""Parameter graphs: a network's neurons as nodes and its weights as edges (``ParamGraph``).

``from_module(module, example_input=None)`` traces a module with torch.fx and builds a
:class:`ParamGraph` (a ``torch_geometric.data.Data``); ``ParamGraph.to_state_dict`` /
``load_into`` go back exactly. See :mod:`metanet.graph.paramgraph` for the stored tensors and
:mod:`metanet.graph.tracing` for the constructions. ``ArchGraph.from_module`` gives the op-level
computational graph (one node per op) that graph hypernetworks read.
``estimate_graph_memory(module)`` gives the nodes, edges and bytes ``from_module`` will need
(it refuses, with :class:`metanet.limits.MemoryLimitError`, graphs over the memory limit).
"""

from metanet.graph.arch import ArchGraph, ArchTraceError
from metanet.graph.memory import GraphMemoryEstimate, estimate_graph_memory
from metanet.graph.paramgraph import (
    NODE_FEATURES,
    EdgeType,
    NodeType,
    ParamGraph,
    ParamLayout,
    ParamSlot,
)
from metanet.graph.tracing import UnsupportedOpError, from_module, graphs_from_state_dicts

__all__ = [
    "ArchGraph",
    "ArchTraceError",
    "NODE_FEATURES",
    "EdgeType",
    "GraphMemoryEstimate",
    "NodeType",
    "ParamGraph",
    "ParamLayout",
    "ParamSlot",
    "UnsupportedOpError",
    "estimate_graph_memory",
    "from_module",
    "graphs_from_state_dicts",
]
