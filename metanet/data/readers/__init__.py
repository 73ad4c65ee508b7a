"""Readers for model zoos in public layouts a user may already have on disk, one module per format.

Every reader returns an :class:`InMemoryZoo` (:mod:`~metanet.data.readers.memory`), which
satisfies :class:`metanet.data.zoo_protocol.ZooLike` like metanet's HDF5
:class:`metanet.data.zoo_store.Zoo` (``zoo.architectures``, ``zoo[name]`` -> a group with
``len``, ``state_dict(i)``, ``module(i)``, ``weight_space(indices)``, ``params(indices)``,
``metrics``, ``hparams``, ``spec``), so the DataModules of :mod:`metanet.data.datamodules` read
them like built zoos.

* :mod:`~metanet.data.readers.small_cnn_zoo` - :func:`read_small_cnn_zoo`, the "Small CNN Zoo"
  of Unterthiner et al. 2020 (``weights.npy`` + ``metrics.csv(.gz)`` + ``layout.csv``).
* :mod:`~metanet.data.readers.checkpoints` - :func:`read_checkpoint_folder`, a folder of
  checkpoint files (``.pt``, ``.ckpt``, ``.safetensors``) plus a CSV of metrics.
* :mod:`~metanet.data.readers.hdf5` - :func:`write_zoo`, conversion to metanet's HDF5 format
  where the architecture has an arch dict.
* :mod:`~metanet.data.readers.table` - the CSV parsing the readers share;
  :mod:`~metanet.data.readers.base` - :class:`ZooReadError`.
"""

from metanet.data.readers.base import ZooReadError
from metanet.data.readers.checkpoints import CHECKPOINT_SUFFIXES, read_checkpoint_folder
from metanet.data.readers.hdf5 import write_zoo
from metanet.data.readers.memory import InMemoryZoo, InMemoryZooGroup
from metanet.data.readers.small_cnn_zoo import (
    SmallCNNZooGroup,
    read_small_cnn_zoo,
    small_cnn_zoo_module,
)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "InMemoryZoo",
    "InMemoryZooGroup",
    "SmallCNNZooGroup",
    "ZooReadError",
    "read_checkpoint_folder",
    "read_small_cnn_zoo",
    "small_cnn_zoo_module",
    "write_zoo",
]
