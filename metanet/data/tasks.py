"""The data of one supervised task, read from a plain config - the one data interface of metanet.

Every job takes its data as a mapping (what a YAML recipe's ``data:`` key holds) and reads it
with :func:`load_task_data` into a :class:`TaskData`: train / val / test :class:`Split` s, the
target kind (``classes`` or ``regression``), the input shape and a :meth:`TaskData.fingerprint`
that a zoo file records. The ``provider:`` key picks who reads the data (default ``digits``)::

    data: digits                                        # scikit-learn's 8x8 digits (bundled)
    data: {provider: dataset, class_path: torchvision.datasets.MNIST,
           init_args: {root: data/mnist}, test: {init_args: {train: false}}}
    data: {provider: tensors, path: data/cifar.npz}     # x_train/y_train/x_test/y_test keys
    data: {provider: image_folder, root: data/shapes, size: [32, 32]}
    data: {provider: signals, source: {provider: image_folder, root: data/faces}}   # for INRs

:mod:`metanet.data.providers` documents each provider's keys; :func:`register_provider` adds one.

Conventions shared by all providers: inputs are float32 ``[N, *input_shape]`` (images CHW; PIL
images and uint8 arrays scaled to [0, 1]); labels are int64 ``[N]`` for ``classes`` and float32
``[N]`` / ``[N, k]`` for ``regression``. Data larger than memory stays on disk as a
:class:`LazyArray` (memory-mapped ``.npy``, safetensors slices, ``stream: true``). Bad data raises
:class:`TaskDataError` with a one-line message naming the config key and the file or class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from metanet.data.errors import TaskDataError

if TYPE_CHECKING:
    from metanet.data.providers.config import ProviderConfig

__all__ = [
    "SPLITS",
    "TARGET_KINDS",
    "LazyArray",
    "Split",
    "TaskData",
    "TaskDataError",
    "available_providers",
    "load_from_config",
    "load_task_data",
    "register_provider",
]

TARGET_KINDS = ("classes", "regression")
SPLITS = ("train", "val", "test")
DEFAULT_PROVIDER = "digits"
# config keys that say where the data lives or how it is shown, not what it is: a fingerprint
# leaves them out, so the same data moved to another folder keeps its fingerprint
_NON_IDENTITY_KEYS = frozenset({"path", "root", "x", "y", "stream", "download", "name"})
_HASH_CHUNK_BYTES = 1 << 24


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------
class LazyArray:
    """Samples of a split read on demand, for data larger than memory.

    ``len(a)``, ``a.shape`` and ``a[i]`` / ``a[start:stop]`` / ``a[indices]`` (float32 tensors)
    work like a tensor's. ``read(rows)`` returns the samples at the int64 ``rows`` (any order)
    as a float32 tensor ``[len(rows), *shape[1:]]``. Every read is checked for NaN/inf; ``where``
    (e.g. ``"data.path (big.npy)"``) starts the :class:`TaskDataError` message.
    """

    dtype = torch.float32

    def __init__(
        self,
        shape: tuple[int, ...],
        read: Callable[[np.ndarray], torch.Tensor],
        where: str,
        rows: np.ndarray | None = None,
    ) -> None:
        self._read = read
        self._rows = rows
        self.where = where
        self.shape = tuple(int(s) for s in shape) if rows is None else (len(rows), *shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, where={self.where!r})"

    def _positions(self, index: Any) -> np.ndarray:
        from metanet.data.zoo_protocol import record_indices

        return record_indices(index, len(self), self.where, unit="samples")

    def _source_rows(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._rows is None else self._rows[positions]

    def __getitem__(self, index: Any) -> torch.Tensor:
        single = isinstance(index, (int, np.integer)) or (
            isinstance(index, torch.Tensor) and index.ndim == 0
        )
        positions = self._positions(index)
        rows = self._source_rows(positions)
        out = self._read(rows) if rows.size else torch.empty((0, *self.shape[1:]))
        bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            raise TaskDataError(
                f"{self.where}: sample {int(rows[int(bad.nonzero()[0])])} has NaN or inf values"
            )
        return out[0] if single else out

    def take(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The samples at an integer ``index`` of any shape, ``[*index.shape, *shape[1:]]``:
        each distinct sample is read once (in increasing order, friendly to memory maps) and
        repeated where the index repeats it, so a batch of ``M`` networks x ``B`` samples reads
        at most ``M * B`` rows, and far fewer where the networks' batches overlap."""
        index = torch.as_tensor(index)
        if index.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"LazyArray indices must be integers, got {index.dtype}")
        unique, inverse = torch.unique(index.reshape(-1).cpu(), return_inverse=True)
        rows = self[unique.numpy()]
        return rows[inverse].reshape(*index.shape, *self.shape[1:])

    def flatten(self, start_dim: int = 1) -> LazyArray:
        """A lazy view of the samples flattened to ``[N, prod(shape[1:])]`` (as
        ``tensor.flatten(1)``, e.g. for MLP inputs); nothing is read."""
        if start_dim != 1:
            raise ValueError(f"LazyArray.flatten flattens the sample dimensions only "
                             f"(start_dim=1), got start_dim={start_dim}")  # fmt: skip
        width = int(np.prod(self.shape[1:], dtype=np.int64))
        read = self._read

        def read_flat(rows: np.ndarray) -> torch.Tensor:
            return read(rows).reshape(len(rows), width)

        return LazyArray((len(self), width), read_flat, self.where, rows=self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes of all samples as float32 (what :meth:`materialize` allocates)."""
        return 4 * int(np.prod(self.shape, dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        """Bytes of one sample as float32."""
        return 4 * int(np.prod(self.shape[1:], dtype=np.int64))

    def subset(self, positions: np.ndarray) -> LazyArray:
        """The samples at ``positions`` (int array) as a new lazy view; nothing is read."""
        rows = self._source_rows(np.asarray(positions, dtype=np.int64))
        return LazyArray(self.shape, self._read, self.where, rows=rows)

    def chunks(self, max_bytes: int = _HASH_CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Every sample in order, as tensors of at most about ``max_bytes`` each."""
        step = _rows_per_chunk(self.shape, 4, max_bytes)
        for start in range(0, len(self), step):
            yield self[start : start + step]

    def materialize(self) -> torch.Tensor:
        """All samples in one tensor (reads everything into memory)."""
        return self[:]


class Split(NamedTuple):
    """One split: inputs ``x`` ``[N, *input_shape]`` (a tensor or a :class:`LazyArray`) and
    targets ``y`` (int64 ``[N]`` labels or float32 ``[N]`` / ``[N, k]`` values).

    ``x, y = task.train`` unpacks it; ``len(split)`` is 2 (a pair), so use :attr:`num_samples`.
    """

    x: torch.Tensor | LazyArray
    y: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.y.shape[0])

    @property
    def lazy(self) -> bool:
        """Whether ``x`` is read from disk on demand."""
        return isinstance(self.x, LazyArray)

    def batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the samples at ``indices`` (ints, a slice or an index tensor)."""
        if isinstance(indices, slice):
            return self.x[indices], self.y[indices]
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        x = self.x[idx.numpy()] if self.lazy else self.x.index_select(0, idx)
        return x, self.y.index_select(0, idx)

    def as_dataset(self) -> torch.utils.data.Dataset:
        """A map-style torch Dataset of ``(x_i, y_i)`` pairs (for a ``DataLoader``)."""
        return _SplitDataset(self)


class _SplitDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return self.split.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.x[index], self.split.y[index]


# ------------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TaskData:
    """The data of one supervised task, as read by :func:`load_task_data`.

    Attributes:
        name: a display name (``digits``, the Dataset class, the file or folder name).
        train, test: the splits; ``val`` is ``None`` unless one was given or asked for.
        target_kind: ``"classes"`` (int64 labels in ``[0, num_classes)``) or ``"regression"``.
        input_shape: shape of one input sample, without the batch dimension.
        num_classes: number of classes, ``None`` for regression.
        classes: class names where the data has them (image folders, ``Dataset.classes``).
        config: the normalized provider config (defaults filled in) that produced the data.
        source: the task this one was derived from (``signals``), else ``None``.
    """

    name: str
    train: Split
    test: Split
    target_kind: str
    input_shape: tuple[int, ...]
    num_classes: int | None
    val: Split | None = None
    classes: tuple[str, ...] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    source: TaskData | None = None
    _cache: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.target_kind not in TARGET_KINDS:
            raise ValueError(f"target_kind must be one of {list(TARGET_KINDS)}")
        if (self.num_classes is None) != (self.target_kind == "regression"):
            raise ValueError("num_classes is an int for 'classes' and None for 'regression'")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v.num_samples}" for k, v in self.splits.items())
        return (
            f"TaskData({self.name!r}, {sizes}, input_shape={self.input_shape}, "
            f"target_kind={self.target_kind!r}, num_classes={self.num_classes})"
        )

    @property
    def splits(self) -> dict[str, Split]:
        """The splits present, in the order train, val, test."""
        return {k: getattr(self, k) for k in SPLITS if getattr(self, k) is not None}

    def split(self, name: str) -> Split:
        """The split called ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLITS or getattr(self, name) is None:
            raise KeyError(f"{self.name} has no split {name!r}; has {list(self.splits)}")
        return getattr(self, name)

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one target: ``()`` for labels and scalar regression, else ``(k, ...)``."""
        return tuple(self.train.y.shape[1:])

    def fingerprint(self) -> str:
        """sha256 hex of the provider config and the data's content (dtypes, shapes, bytes).

        Equal data read with an equal config gives an equal fingerprint in every process; keys
        that only say where data lives (``path``, ``root``, ``x``, ``y``, ``stream``, ...) are left
        out. Computed once (a full pass over lazy data), then cached.
        """
        if "sha256" not in self._cache:
            h = hashlib.sha256()
            head = {
                "v": 1,
                "config": data_identity(self.config),
                "target_kind": self.target_kind,
                "num_classes": self.num_classes,
                "input_shape": list(self.input_shape),
                "classes": list(self.classes) if self.classes is not None else None,
            }
            h.update(json.dumps(head, sort_keys=True, default=str).encode())
            for name in SPLITS:
                split = getattr(self, name)
                h.update(f"|{name}:{'none' if split is None else 'split'}|".encode())
                if split is not None:
                    _hash_array(h, split.x)
                    _hash_array(h, split.y)
            self._cache["sha256"] = h.hexdigest()
        return self._cache["sha256"]


def data_identity(config: Any) -> Any:
    """``config`` without the keys that only say where data lives (what a fingerprint hashes)."""
    if isinstance(config, Mapping):
        return {
            str(k): data_identity(v)
            for k, v in config.items()
            if k not in _NON_IDENTITY_KEYS and not (k in SPLITS and isinstance(v, str))
        }
    if isinstance(config, (list, tuple)):
        return [data_identity(v) for v in config]
    return config


def _rows_per_chunk(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> int:
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return max(1, max_bytes // max(1, row))


def _hash_array(h: Any, array: torch.Tensor | LazyArray) -> None:
    h.update(json.dumps([str(array.dtype), list(array.shape)]).encode())
    if isinstance(array, LazyArray):
        chunks: Iterator[torch.Tensor] = array.chunks()
    else:
        step = _rows_per_chunk(tuple(array.shape), array.element_size(), _HASH_CHUNK_BYTES)
        chunks = (array[i : i + step] for i in range(0, array.shape[0], step))
    for chunk in chunks:
        h.update(chunk.detach().cpu().contiguous().numpy().tobytes())


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------
ProviderFn = Callable[["ProviderConfig"], TaskData]
_PROVIDERS: dict[str, ProviderFn] = {}


def register_provider(name: str, *, replace: bool = False) -> Callable[[ProviderFn], ProviderFn]:
    """Decorator: make ``fn(cfg: ProviderConfig) -> TaskData`` read configs with ``provider: name``.

    ``fn`` reads its keys with ``cfg``'s getters (errors then name the key), calls
    ``cfg.finish()`` before loading anything, and typically returns
    :func:`metanet.data.providers.assemble.assemble_task`'s result.
    """

    def decorate(fn: ProviderFn) -> ProviderFn:
        if not replace and _PROVIDERS.get(name, fn) is not fn:
            raise ValueError(f"a data provider named {name!r} is registered already")
        _PROVIDERS[name] = fn
        return fn

    return decorate


def _builtin_providers() -> dict[str, ProviderFn]:
    importlib.import_module("metanet.data.providers")  # registers the bundled providers
    return _PROVIDERS


def available_providers() -> list[str]:
    """Names accepted by the ``provider:`` key."""
    return sorted(_builtin_providers())


def load_task_data(config: Mapping[str, Any] | str) -> TaskData:
    """Read the task data described by ``config`` (a recipe's ``data:`` value).

    ``config`` is a provider name (``"digits"``) or a mapping with a ``provider:`` key (default
    ``digits``) and that provider's keys. Raises :class:`TaskDataError` (one line, naming the key
    and the file or class) for unknown keys, unreadable files and invalid data.
    """
    from metanet.data.providers.config import ProviderConfig

    if isinstance(config, str):
        config = {"provider": config}
    if not isinstance(config, Mapping):
        raise TaskDataError(
            f"data: must be a provider name or a mapping (got {type(config).__name__})"
        )
    return load_from_config(ProviderConfig(config))


def load_from_config(cfg: ProviderConfig) -> TaskData:
    """Run the provider ``cfg`` names; for providers that wrap another one (``signals``)."""
    providers = _builtin_providers()
    name = cfg.text("provider", DEFAULT_PROVIDER)
    if name not in providers:
        raise cfg.error("provider", f"unknown provider {name!r} (registered: {sorted(providers)})")
    task = providers[name](cfg)
    cfg.finish()
    return dataclasses.replace(task, config=cfg.resolved)
