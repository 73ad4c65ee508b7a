"""Read-only views of a zoo: records mapped as they are read, or held in memory once read.

:class:`MappedZoo` wraps any :class:`~metanet.data.zoo_protocol.ZooLike` and applies one map
``WeightSpace -> WeightSpace`` (e.g. :func:`metanet.weightspace.symmetry.sign_canonical`, which
puts every network of a sine or tanh zoo in sign-canonical form) to every record that
``weight_space``, ``params``, ``state_dict`` and ``module`` return. Metrics, hyperparameters and
the file are untouched. The DataModules use it for their ``canonicalize`` argument, so the
statistics, the augmentations and every split see the mapped networks.

:class:`PreloadedZoo` wraps any zoo and reads each group's parameters once, on first use; later
reads index them in memory. The DataModules use it for ``in_memory`` (on by default when the
selected groups fit in a small budget): an HDF5 zoo read in random batches otherwise
decompresses every chunk each batch touches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from metanet.data.zoo_protocol import ZooGroupLike, ZooLike, record_indices
from metanet.weightspace import WeightSpace

__all__ = ["MappedGroup", "MappedZoo", "PreloadedGroup", "PreloadedZoo", "preload_bytes"]

WeightSpaceMap = Callable[[WeightSpace], WeightSpace]


class _GroupView:
    """A group whose records are read through :meth:`params`; every other attribute (name,
    arch, keys, spec, path, metrics, hparams) is the wrapped group's."""

    def __init__(self, group: ZooGroupLike) -> None:
        self._group = group

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not delegated (and no recursion while unpickling)
            raise AttributeError(name)
        return getattr(self._group, name)

    def __len__(self) -> int:
        return len(self._group)

    def params(self, indices: Any = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weight_space(self, indices: Any = None) -> WeightSpace:
        """Records ``indices`` (None: all) as one ``WeightSpace`` batch."""
        if self._group.spec is None:  # the wrapped group's own error
            return self._group.weight_space(indices)
        return WeightSpace.from_stacked_params(self.params(indices), self._group.spec)

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The state_dict of record ``index``, as this view reads it."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"state_dict needs an int index, got {type(index).__name__}")
        return {k: v[0] for k, v in self.params([int(index)]).items()}

    def module(self, index: int) -> nn.Module:
        """A fresh module with record ``index`` (as this view reads it) loaded, in eval mode."""
        module = self._group.module(index)
        module.load_state_dict(self.state_dict(index))
        return module.eval()


class MappedGroup(_GroupView):
    """One architecture group of a :class:`MappedZoo`: reads go through ``fn``.

    Raises:
        ValueError: the group has no weight space (norm layers, residual blocks), so ``fn``
            cannot be applied to it.
    """

    def __init__(self, group: ZooGroupLike, fn: WeightSpaceMap) -> None:
        if group.spec is None:
            raise ValueError(f"group '{group.name}' has no weight space (norm layers or residual "
                             f"blocks): {getattr(fn, '__name__', fn)} cannot be applied to it")
        super().__init__(group)
        self._fn = fn

    def weight_space(self, indices: Any = None) -> WeightSpace:
        """Records ``indices`` (None: all), mapped, as one ``WeightSpace`` batch."""
        return self._mapped(self._group.weight_space(indices))

    def _mapped(self, ws: WeightSpace) -> WeightSpace:
        ws = self._fn(ws)
        spec = self._group.spec
        if not isinstance(ws, WeightSpace) or (ws.spec is not spec and ws.spec != spec):
            raise TypeError(f"the zoo map {getattr(self._fn, '__name__', self._fn)} must return "
                            "a WeightSpace of the group's spec")
        return ws

    def params(self, indices: Any = None) -> dict[str, torch.Tensor]:
        """Stacked state_dict entries of records ``indices``: the mapped weights and biases, every
        other entry (buffers) as stored."""
        params = self._group.params(indices)
        ws = WeightSpace.from_stacked_params(params, self._group.spec)
        return {**params, **self._mapped(ws).stacked_params()}


class PreloadedGroup(_GroupView):
    """One architecture group of a :class:`PreloadedZoo`: every record's parameters are read
    once, on first use (in each process), and later reads index them in memory.

    The first read is checked against metanet's memory limit
    (:class:`~metanet.limits.MemoryLimitError` beyond it). Pickling keeps only the wrapped group,
    so a ``DataLoader`` worker started by ``spawn`` reads the records itself; a forked one shares
    the parent's copy.
    """

    def __init__(self, group: ZooGroupLike) -> None:
        super().__init__(group)
        self._cache: dict[str, torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_group": self._group, "_cache": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def load(self) -> dict[str, torch.Tensor]:
        """Every record's stacked state_dict entries ``{key: [N, *shape]}`` (read once)."""
        if self._cache is None:
            self._cache = self._group.params(None)
        return self._cache

    def params(self, indices: Any = None) -> dict[str, torch.Tensor]:
        """Stacked state_dict entries ``{key: [k, *shape]}`` of records ``indices`` (None: all),
        in request order, from memory."""
        cache = self.load()
        if indices is None:
            return dict(cache)
        rows = torch.from_numpy(record_indices(indices, len(self._group), self._group.name))
        return {k: v.index_select(0, rows) for k, v in cache.items()}


class _ZooView:
    """A :class:`~metanet.data.zoo_protocol.ZooLike` whose groups are views of ``zoo``'s,
    made by :meth:`_view` when first read."""

    def __init__(self, zoo: ZooLike) -> None:
        self._zoo = zoo
        self.path = zoo.path
        self._groups: dict[str, Any] = {}

    def _view(self, group: ZooGroupLike) -> Any:
        raise NotImplementedError

    @property
    def architectures(self) -> list[str]:
        return self._zoo.architectures

    def __getitem__(self, name: str) -> Any:
        if name not in self._groups:
            self._groups[name] = self._view(self._zoo[name])
        return self._groups[name]

    def __contains__(self, name: str) -> bool:
        return name in self._zoo

    def __iter__(self) -> Iterator[Any]:
        return iter(self.groups())

    def __len__(self) -> int:
        return len(self._zoo)

    def groups(self) -> list[Any]:
        return [self[name] for name in self.architectures]

    def iter_records(self) -> Iterator[tuple[str, int]]:
        return self._zoo.iter_records()

    def close(self) -> None:
        self._zoo.close()


class MappedZoo(_ZooView):
    """A :class:`~metanet.data.zoo_protocol.ZooLike` view of ``zoo`` whose records are read
    through ``fn`` (see the module docstring). Groups are checked when first read."""

    def __init__(self, zoo: ZooLike, fn: WeightSpaceMap) -> None:
        super().__init__(zoo)
        self._fn = fn

    def _view(self, group: ZooGroupLike) -> MappedGroup:
        return MappedGroup(group, self._fn)


class PreloadedZoo(_ZooView):
    """A :class:`~metanet.data.zoo_protocol.ZooLike` view of ``zoo`` that holds each group's
    parameters in memory once read (:class:`PreloadedGroup`): batches of random records then
    cost an index, not a read of every compressed HDF5 chunk they touch."""

    def _view(self, group: ZooGroupLike) -> PreloadedGroup:
        return PreloadedGroup(group)


def preload_bytes(zoo: ZooLike, names: Sequence[str]) -> int | None:
    """Bytes the parameters of every record of groups ``names`` take in memory, or ``None``
    when the groups do not say (groups that are in memory already, e.g. the readers')."""
    total = 0
    for name in names:
        per_record = getattr(zoo[name], "record_bytes", None)
        if per_record is None:
            return None
        total += int(per_record) * len(zoo[name])
    return total
