"""Building model zoos: many small networks trained at once with ``torch.func.vmap``.

* :mod:`metanet.zoo.architectures` - arch dicts -> modules (``build_module``, ``arch_name``).
* :mod:`metanet.zoo.recipe` - YAML recipes (``Recipe.load``) and per-network hparam sampling.
* :mod:`metanet.zoo.schedule` - what every engine shares: step schedule, random draws (initial
  weights, sample orders, dropout masks), chunk data and results.
* :mod:`metanet.zoo.optim` - ``RowOptimizer``, the one SGD/AdamW of every engine.
* :mod:`metanet.zoo.train` - the reference engine (vmap over any module) and engine choice.
* :mod:`metanet.zoo.batched` - the fast hand-batched engine for MLPs, plain CNNs and SIRENs
  (C kernels in :mod:`metanet.zoo.native`).
* :mod:`metanet.zoo.build` - resumable, sharded zoo building (``build_zoo``).
* :mod:`metanet.zoo.cli` - ``metanet zoo build RECIPE.yaml``.

Names are imported lazily (``from metanet.zoo import build_zoo`` works without importing Lightning
at ``import metanet.zoo`` time).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ArchError": "metanet.zoo.architectures",
    "arch_name": "metanet.zoo.architectures",
    "build_module": "metanet.zoo.architectures",
    "has_weight_space": "metanet.zoo.architectures",
    "normalize_arch": "metanet.zoo.architectures",
    "Recipe": "metanet.zoo.recipe",
    "RecipeError": "metanet.zoo.recipe",
    "train_chunk": "metanet.zoo.train",
    "build_zoo": "metanet.zoo.build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metanet.zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
