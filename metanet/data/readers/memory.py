"""In-memory zoos: :class:`InMemoryZoo` and its groups, what every reader returns.

They satisfy :class:`metanet.data.zoo_protocol.ZooLike` / ``ZooGroupLike`` like the HDF5
:class:`metanet.data.zoo_store.Zoo`, so the DataModules read both alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from metanet.data.readers.base import ZooReadError
from metanet.data.zoo_protocol import record_indices
from metanet.limits import check_memory
from metanet.weightspace import WeightSpace, WeightSpaceSpec

__all__ = ["InMemoryZoo", "InMemoryZooGroup"]


class InMemoryZooGroup:
    """The records of one architecture read from a foreign layout (interface of ``ZooGroup``).

    Attributes:
        name: group name.
        arch: metanet arch dict (:mod:`metanet.zoo.architectures`) or ``None`` when the networks
            are not expressible as one (then :attr:`module_factory` builds them).
        spec: :class:`WeightSpaceSpec`, or ``None`` for graph-only networks.
        keys: state_dict keys of every record.
        input_shape: shape of one input sample, where known (for tracing graphs).
        path: the folder or file the records came from.
    """

    def __init__(
        self,
        name: str,
        params: Mapping[str, torch.Tensor],
        metrics: Mapping[str, np.ndarray],
        hparams: Mapping[str, np.ndarray] | None = None,
        spec: WeightSpaceSpec | None = None,
        arch: dict | None = None,
        module_factory: Callable[[int], nn.Module] | None = None,
        input_shape: tuple[int, ...] | None = None,
        path: str = "",
    ) -> None:
        self.name = name
        self._params = {k: torch.as_tensor(v) for k, v in params.items()}
        self.keys = list(self._params)
        sizes = {v.shape[0] for v in self._params.values()}
        if len(sizes) != 1:
            raise ZooReadError(f"{path}: group '{name}' params disagree on the record count")
        self._num = sizes.pop()
        self._init_common(metrics, hparams, spec, arch, module_factory, input_shape, path)

    def _init_common(self, metrics, hparams, spec, arch, module_factory, input_shape, path):
        self.metrics = {k: np.asarray(v) for k, v in metrics.items()}
        self.hparams = {k: np.asarray(v) for k, v in (hparams or {}).items()}
        for what, cols in (("metric", self.metrics), ("hparam", self.hparams)):
            for k, v in cols.items():
                if v.shape != (self._num,):
                    raise ZooReadError(
                        f"{path}: {what} '{k}' of group '{self.name}' has shape {v.shape}, "
                        f"expected ({self._num},)"
                    )
        self.spec = spec
        self.arch = arch
        self.module_factory = module_factory
        self.input_shape = input_shape
        self.path = path

    def __len__(self) -> int:
        return self._num

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, records={self._num})"

    def _index(self, indices: Any) -> np.ndarray:
        return record_indices(indices, self._num, self.name)

    def params(self, indices: Any = None) -> dict[str, torch.Tensor]:
        """Stacked state_dict entries ``{key: [k, *shape]}`` of records ``indices`` (None: all).

        Raises:
            MemoryLimitError: the copy would exceed metanet's memory limit.
        """
        idx = torch.from_numpy(self._index(indices))
        per_record = sum(v[0].numel() * v.element_size() for v in self._params.values() if len(v))
        check_memory(
            per_record * idx.numel(),
            f"{self.path}: reading {idx.numel():,} records of '{self.name}'",
        )
        return {k: v.index_select(0, idx) for k, v in self._params.items()}

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The state_dict of record ``index``."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"state_dict needs an int index, got {type(index).__name__}")
        return {k: v[0] for k, v in self.params([int(index)]).items()}

    def module(self, index: int) -> nn.Module:
        """A fresh module with record ``index`` loaded, in eval mode."""
        if self.module_factory is None:
            raise ZooReadError(
                f"{self.path}: group '{self.name}' has no module factory; pass module_factory= "
                "or arch= to the reader"
            )
        module = self.module_factory(int(index))
        try:
            module.load_state_dict(self.state_dict(index))
        except RuntimeError as err:
            raise ZooReadError(
                f"{self.path}: record {index} of '{self.name}' does not fit the module: {err}"
            ) from None
        return module.eval()

    def weight_space(self, indices: Any = None) -> WeightSpace:
        """Records ``indices`` (default all) as a :class:`WeightSpace` batch, in request order."""
        if self.spec is None:
            raise ZooReadError(
                f"{self.path}: group '{self.name}' has no weight space (norm layers, buffers or an "
                "unknown layer order); read it as graphs via .module(i)"
            )
        params = self.params(indices)
        n = next(iter(params.values())).shape[0]
        weights, biases = [], []
        for layer in self.spec.layers:
            w = params[layer.weight_key]
            weights.append(w)
            biases.append(
                params[layer.bias_key]
                if layer.has_bias
                else torch.zeros(n, layer.out_features, dtype=w.dtype)
            )
        return WeightSpace(self.spec, weights, biases)


class InMemoryZoo:
    """Groups read from a foreign layout, with the interface of :class:`metanet.data.Zoo`."""

    def __init__(self, groups: Sequence[InMemoryZooGroup], path: str = "") -> None:
        self._groups = {g.name: g for g in groups}
        if len(self._groups) != len(groups):
            raise ValueError("group names must be unique")
        self.path = path

    @property
    def architectures(self) -> list[str]:
        return list(self._groups)

    def __getitem__(self, name: str) -> InMemoryZooGroup:
        if name not in self._groups:
            raise KeyError(f"{self.path} has no architecture '{name}'; has {self.architectures}")
        return self._groups[name]

    def __contains__(self, name: str) -> bool:
        return name in self._groups

    def __iter__(self) -> Iterator[InMemoryZooGroup]:
        return iter(self._groups.values())

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def groups(self) -> list[InMemoryZooGroup]:
        return list(self._groups.values())

    def iter_records(self) -> Iterator[tuple[str, int]]:
        for name, g in self._groups.items():
            for i in range(len(g)):
                yield name, i

    def close(self) -> None:
        """Nothing to close (present for interface parity with ``Zoo``)."""

    def __repr__(self) -> str:
        return f"InMemoryZoo({self.path!r}, {dict((n, len(g)) for n, g in self._groups.items())})"
