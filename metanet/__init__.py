"""metanet: learning in weight space.

Metanetworks read, edit and write the weights of other neural networks. The names most users
need are here, imported on first use (``import metanet`` stays fast)::

    import metanet
    ws = metanet.WeightSpace.from_module(mlp)           # a batch of networks as tensors
    graph = metanet.from_module(cnn, example_input=x)   # a parameter graph (PyG Data)
    model = metanet.NGT(out_dim=1)                      # a graph metanetwork
    nets = metanet.sample("runs/generate/flow/checkpoints/best.ckpt", 16)
    zoo = metanet.Zoo.open(".cache/zoos/digits-cnn.h5")
    predictor = metanet.load("runs/predict_gen/dws/checkpoints/best.ckpt")

The map of modules is ``docs/architecture.md``: ``weightspace`` and ``graph`` turn networks
into data, ``ops`` is the scatter-kernel core, ``nn`` holds the equivariant models, ``hyper``
and ``generate`` write weights, ``zoo`` and ``data`` build and serve populations of trained
networks, ``tasks`` holds the LightningModules and ``cli`` the ``metanet`` command.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily by __getattr__)
_EXPORTS: dict[str, str] = {
    "WeightSpace": "metanet.weightspace",
    "WeightSpaceSpec": "metanet.weightspace",
    "ParamGraph": "metanet.graph",
    "ArchGraph": "metanet.graph",
    "from_module": "metanet.graph",
    "DWSNet": "metanet.nn",
    "NFN": "metanet.nn",
    "UNF": "metanet.nn",
    "GMN": "metanet.nn",
    "NGGNN": "metanet.nn",
    "NGT": "metanet.nn",
    "StatNN": "metanet.nn",
    "GHN": "metanet.hyper",
    "MIPHyperNetwork": "metanet.hyper",
    "sample": "metanet.generate.sampling",
    "Zoo": "metanet.data.zoo_store",
    "load_task_data": "metanet.data.tasks",
    "load": "metanet.checkpoints",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metanet' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
