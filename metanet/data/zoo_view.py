"""A read-only view of a zoo whose records pass through a weight-space map as they are read.

:class:`MappedZoo` wraps any :class:`~metanet.data.zoo_protocol.ZooLike` and applies one map
``WeightSpace -> WeightSpace`` (e.g. :func:`metanet.weightspace.symmetry.sign_canonical`, which
puts every network of a sine or tanh zoo in sign-canonical form) to every record that
``weight_space``, ``params``, ``state_dict`` and ``module`` return. Metrics, hyperparameters and
the file are untouched. The DataModules use it for their ``canonicalize`` argument, so the
statistics, the augmentations and every split see the mapped networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from metanet.data.zoo_protocol import ZooGroupLike, ZooLike
from metanet.weightspace import WeightSpace

__all__ = ["MappedGroup", "MappedZoo"]

WeightSpaceMap = Callable[[WeightSpace], WeightSpace]


class MappedGroup:
    """One architecture group of a :class:`MappedZoo`: reads go through ``fn``.

    Raises:
        ValueError: the group has no weight space (norm layers, residual blocks), so ``fn``
            cannot be applied to it.
    """

    def __init__(self, group: ZooGroupLike, fn: WeightSpaceMap) -> None:
        if group.spec is None:
            raise ValueError(f"group '{group.name}' has no weight space (norm layers or residual "
                             f"blocks): {getattr(fn, '__name__', fn)} cannot be applied to it")
        self._group, self._fn = group, fn

    def __getattr__(self, name: str) -> Any:  # name, arch, keys, spec, path, metrics, hparams
        if name.startswith("_"):  # not delegated (and no recursion while unpickling)
            raise AttributeError(name)
        return getattr(self._group, name)

    def __len__(self) -> int:
        return len(self._group)

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

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The state_dict of record ``index``, mapped."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"state_dict needs an int index, got {type(index).__name__}")
        return {k: v[0] for k, v in self.params([int(index)]).items()}

    def module(self, index: int) -> nn.Module:
        """A fresh module with the mapped record ``index`` loaded, in eval mode."""
        module = self._group.module(index)
        module.load_state_dict(self.state_dict(index))
        return module.eval()


class MappedZoo:
    """A :class:`~metanet.data.zoo_protocol.ZooLike` view of ``zoo`` whose records are read
    through ``fn`` (see the module docstring). Groups are checked when first read."""

    def __init__(self, zoo: ZooLike, fn: WeightSpaceMap) -> None:
        self._zoo, self._fn = zoo, fn
        self.path = zoo.path
        self._groups: dict[str, MappedGroup] = {}

    @property
    def architectures(self) -> list[str]:
        return self._zoo.architectures

    def __getitem__(self, name: str) -> MappedGroup:
        if name not in self._groups:
            self._groups[name] = MappedGroup(self._zoo[name], self._fn)
        return self._groups[name]

    def __contains__(self, name: str) -> bool:
        return name in self._zoo

    def __iter__(self) -> Iterator[MappedGroup]:
        return iter(self.groups())

    def __len__(self) -> int:
        return len(self._zoo)

    def groups(self) -> list[MappedGroup]:
        return [self[name] for name in self.architectures]

    def iter_records(self) -> Iterator[tuple[str, int]]:
        return self._zoo.iter_records()

    def close(self) -> None:
        self._zoo.close()
