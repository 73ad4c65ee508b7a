"""The interface every model zoo offers, whatever its storage: `ZooLike`, `ZooGroupLike`.

A zoo is a set of architecture groups; a group holds the records (trained networks) of one
architecture with per-record metrics and hyperparameters. metanet's HDF5
:class:`metanet.data.zoo_store.Zoo` and the readers' :class:`metanet.data.readers.InMemoryZoo`
both satisfy these protocols (structurally; neither inherits from them), so the DataModules and
:func:`metanet.data.readers.write_zoo` take either. Both are ``runtime_checkable``:
``isinstance(obj, ZooLike)`` checks that the members exist (not their signatures).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from metanet.weightspace import WeightSpace, WeightSpaceSpec

__all__ = ["ZooGroupLike", "ZooLike", "record_indices"]


def record_indices(indices: Any, num: int, name: str, unit: str = "records") -> np.ndarray:
    """The record positions ``int64 [k]`` that ``indices`` of a group of ``num`` records means
    (``None``: all; a slice; ints, as a sequence, array or tensor, negative from the end), as
    every group's ``params`` reads them (and :class:`metanet.data.tasks.LazyArray` its samples).

    Raises:
        TypeError: the indices are not integers.
        IndexError: one is out of range (the message names ``name`` and counts ``unit``).
    """
    import numpy as np
    import torch

    if indices is None:
        return np.arange(num)
    if isinstance(indices, slice):
        return np.arange(num)[indices]
    idx = np.asarray(
        indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices
    ).reshape(-1)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got {idx.dtype}")
    idx = np.where(idx < 0, idx + num, idx).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num):
        raise IndexError(f"{name}: index out of range for {num} {unit}")
    return idx


@runtime_checkable
class ZooGroupLike(Protocol):
    """The records of one architecture in a zoo.

    Attributes:
        name: the group name.
        arch: metanet arch dict (:func:`metanet.zoo.architectures.build_module`), or ``None``
            when the networks are not expressible as one.
        spec: the networks' :class:`~metanet.weightspace.WeightSpaceSpec`, or ``None`` when they
            have no weight space (norm layers, residuals: read them as graphs).
        keys: the state_dict keys of every record.
        path: the file or folder the records come from.
    """

    name: str
    arch: dict[str, Any] | None
    keys: list[str]

    @property
    def spec(self) -> WeightSpaceSpec | None: ...

    @property
    def path(self) -> str: ...

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """Per-record metric columns ``{name: [N]}`` (``test_acc``, ``epoch``, ``run_id`` ...)."""
        ...

    @property
    def hparams(self) -> dict[str, np.ndarray]:
        """Per-record hyperparameter columns ``{name: [N]}``."""
        ...

    def __len__(self) -> int: ...

    def params(self, indices: Any = None) -> dict[str, torch.Tensor]:
        """Stacked state_dict entries ``{key: [k, *shape]}`` of records ``indices`` (None: all)."""
        ...

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The state_dict of record ``index``."""
        ...

    def module(self, index: int) -> nn.Module:
        """A fresh module with record ``index`` loaded, in eval mode."""
        ...

    def weight_space(self, indices: Any = None) -> WeightSpace:
        """Records ``indices`` (None: all) as one ``WeightSpace`` batch."""
        ...


@runtime_checkable
class ZooLike(Protocol):
    """A model zoo: architecture groups by name (``zoo[name]``), iterable, closable.

    Attributes:
        path: the file or folder the zoo comes from (``""`` for one built in memory).
    """

    path: str

    @property
    def architectures(self) -> list[str]:
        """Group names, one per architecture, in storage order."""
        ...

    def __getitem__(self, name: str) -> ZooGroupLike: ...

    def __contains__(self, name: str) -> bool: ...

    def __iter__(self) -> Iterator[ZooGroupLike]: ...

    def __len__(self) -> int:
        """Total number of records over all groups."""
        ...

    def groups(self) -> list[ZooGroupLike]:
        """The groups, in the order of :attr:`architectures`."""
        ...

    def iter_records(self) -> Iterator[tuple[str, int]]:
        """``(group name, index)`` for every record of every group."""
        ...

    def close(self) -> None:
        """Release file handles (a no-op for in-memory zoos)."""
        ...
