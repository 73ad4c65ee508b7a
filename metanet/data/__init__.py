"""Zoo storage (HDF5), readers for public zoo layouts, and LightningDataModules.

* :mod:`metanet.data.zoo_store` - ``Zoo.open(path)``, ``ZooWriter`` (metanet's HDF5 format).
* :mod:`metanet.data.zoo_protocol` - ``ZooLike`` / ``ZooGroupLike``, the interface every zoo
  (HDF5 or read from another layout) satisfies.
* :mod:`metanet.data.readers` - one module per layout: ``read_small_cnn_zoo`` (Unterthiner et
  al. 2020), ``read_checkpoint_folder`` (``*.pt`` files + metrics CSV), ``write_zoo`` (to HDF5).
* :mod:`metanet.data.datamodules` - ``WeightSpaceDataModule``, ``ParamGraphDataModule``.
* :mod:`metanet.data.digits` - scikit-learn's digits with metanet's fixed split.
* :mod:`metanet.data.tasks` - ``load_task_data(config)`` -> ``TaskData`` (train / val / test
  ``Split`` s, ``fingerprint()``), the one data interface of every job; ``register_provider``,
  ``available_providers``, ``TaskDataError``, ``LazyArray`` (data larger than memory).
* :mod:`metanet.data.providers` - the providers (``digits``, ``dataset``, ``tensors``,
  ``image_folder``, ``signals``); ``ProviderConfig`` (for writing one), ``SignalData`` and
  ``coordinates`` (images / 1-D signals as coordinate -> value samples for INRs).

Names are imported lazily, so ``import metanet.data.digits`` does not pull in Lightning or h5py.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Digits": "metanet.data.digits",
    "load_digits": "metanet.data.digits",
    "digit_image_coordinates": "metanet.data.digits",
    "LazyArray": "metanet.data.tasks",
    "Split": "metanet.data.tasks",
    "TaskData": "metanet.data.tasks",
    "TaskDataError": "metanet.data.tasks",
    "available_providers": "metanet.data.tasks",
    "load_task_data": "metanet.data.tasks",
    "register_provider": "metanet.data.tasks",
    "ProviderConfig": "metanet.data.providers.config",
    "SignalData": "metanet.data.providers.signals",
    "coordinates": "metanet.data.providers.signals",
    "Zoo": "metanet.data.zoo_store",
    "ZooGroup": "metanet.data.zoo_store",
    "ZooWriter": "metanet.data.zoo_store",
    "ZooFormatError": "metanet.data.zoo_store",
    "ZooLike": "metanet.data.zoo_protocol",
    "ZooGroupLike": "metanet.data.zoo_protocol",
    "InMemoryZoo": "metanet.data.readers",
    "InMemoryZooGroup": "metanet.data.readers",
    "ZooReadError": "metanet.data.readers",
    "read_checkpoint_folder": "metanet.data.readers",
    "read_small_cnn_zoo": "metanet.data.readers",
    "write_zoo": "metanet.data.readers",
    "LayerStats": "metanet.data.datamodules",
    "ParamGraphDataModule": "metanet.data.datamodules",
    "WeightSpaceDataModule": "metanet.data.datamodules",
    "open_zoo": "metanet.data.datamodules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metanet.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
