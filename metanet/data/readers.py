"""Readers for model zoos in public layouts a user may already have on disk.

Both readers return an :class:`InMemoryZoo`, with the interface of
:class:`metanet.data.zoo_store.Zoo` (``zoo.architectures``, ``zoo[name]`` -> a group with
``len``, ``state_dict(i)``, ``module(i)``,
``weight_space(indices)``, ``params(indices)``, ``metrics``, ``hparams``, ``spec``), so the
DataModules of :mod:`metanet.data.datamodules` read them like built zoos.
:func:`write_zoo` converts one to metanet's HDF5 format where the architecture has an arch dict.

* :func:`read_small_cnn_zoo` - the "Small CNN Zoo" of Unterthiner et al. 2020 ("Predicting Neural
  Network Accuracy from Weights"): a folder with ``weights.npy`` ``[N, D]`` (one flattened
  TensorFlow checkpoint per row, memory-mapped), ``metrics.csv`` or ``metrics.csv.gz`` (one row per
  weights row: ``test_accuracy``, ``train_accuracy``, ``test_loss``, ``train_loss``, ``step``,
  ``modeldir`` and ``config.*`` hyperparameters) and ``layout.csv`` (``varname``, ``start_idx``,
  ``end_idx``, ``shape`` per TF variable, e.g. ``sequential/conv2d/kernel:0``). TF kernels are
  converted to PyTorch layout (conv ``HWIO -> OIHW``, dense ``(in, out) -> (out, in)``). The
  networks are ``[Conv2d(3x3, stride 2, no padding) + activation] * k``, global average pooling,
  Linear (or ``Flatten`` + Linear layers for the zoo's fully connected variant).
* :func:`read_checkpoint_folder` - a folder of checkpoint files (``.pt``, ``.ckpt``,
  ``.safetensors``: state_dicts, Lightning-style ``{"state_dict": ...}`` dicts or, with
  ``trust_pickle=True``, pickled modules) plus a CSV of
  metrics with a filename column. Files with different parameter shapes become different groups.
"""

from __future__ import annotations

import ast
import copy
import csv
import gzip
import hashlib
import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from metanet.weightspace import WeightSpace, WeightSpaceError, WeightSpaceSpec

__all__ = [
    "InMemoryZoo",
    "InMemoryZooGroup",
    "SmallCNNZooGroup",
    "ZooReadError",
    "read_checkpoint_folder",
    "read_small_cnn_zoo",
    "small_cnn_zoo_module",
    "write_zoo",
]

# metric names of the public layouts -> metanet's names (ZooGroup.metrics)
_METRIC_ALIASES = {
    "test_accuracy": "test_acc",
    "train_accuracy": "train_acc",
    "val_accuracy": "val_acc",
    "step": "epoch",
}
_INT_METRICS = ("epoch", "run_id", "seed", "label")


class ZooReadError(ValueError):
    """A zoo folder or file that cannot be read; the message names the file (and row/key)."""


# ------------------------------------------------------------------------------------------------
# in-memory groups
# ------------------------------------------------------------------------------------------------
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
        if indices is None:
            return np.arange(self._num)
        if isinstance(indices, slice):
            return np.arange(self._num)[indices]
        idx = np.asarray(
            indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices
        ).reshape(-1)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got {idx.dtype}")
        idx = np.where(idx < 0, idx + self._num, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self._num):
            raise IndexError(f"{self.name}: index out of range for {self._num} records")
        return idx

    def params(self, indices: Any = None) -> dict[str, torch.Tensor]:
        """Stacked state_dict entries ``{key: [k, *shape]}`` of records ``indices`` (None: all).

        Raises:
            MemoryLimitError: the copy would exceed metanet's memory limit.
        """
        from metanet.limits import check_memory

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


# ------------------------------------------------------------------------------------------------
# CSV helpers
# ------------------------------------------------------------------------------------------------
def _read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a (possibly gzipped) CSV file."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", newline="") as fh:
                text = fh.read()
        else:
            with open(path, newline="") as fh:
                text = fh.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ZooReadError(f"{path}: cannot be read as CSV: {err}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise ZooReadError(f"{path}: empty CSV file")
    header, body = rows[0], [r for r in rows[1:] if r]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ZooReadError(f"{path}: row {i + 2} has {len(r)} fields, the header {len(header)}")
    return header, body


def _column(values: list[str]) -> np.ndarray:
    """Numbers when every entry parses as one (ints stay ints), else strings."""
    try:
        arr = np.array([float(v) if v.strip() else np.nan for v in values], dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=str)
    if (
        np.all(np.isfinite(arr))
        and np.all(arr == np.round(arr))
        and all("." not in v and "e" not in v.lower() for v in values)
    ):
        return arr.astype(np.int64)
    return arr


def _factorize(values: np.ndarray) -> np.ndarray:
    """Integer ids in order of first appearance."""
    ids: dict[Any, int] = {}
    return np.array([ids.setdefault(v, len(ids)) for v in values.tolist()], dtype=np.int64)


def _split_table(
    header: list[str], body: list[list[str]], skip: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Columns -> (metrics, hparams): ``config.*`` and text columns are hyperparameters."""
    metrics: dict[str, np.ndarray] = {}
    hparams: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        if name in skip:
            continue
        col = _column([r[j] for r in body])
        if name.startswith("config."):
            hparams[name[len("config.") :]] = col
        elif col.dtype.kind in "US":
            hparams[name] = col
        else:
            key = _METRIC_ALIASES.get(name, name)
            metrics[key] = col.astype(np.int64) if key in _INT_METRICS else col
    return metrics, hparams


# ------------------------------------------------------------------------------------------------
# Unterthiner et al. Small CNN Zoo
# ------------------------------------------------------------------------------------------------
_TF_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "selu": nn.SELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "linear": nn.Identity,
    "none": nn.Identity,
}
_INPUT_SIZES = {"mnist": 28, "fashion_mnist": 28, "cifar10": 32, "svhn_cropped": 32}


def small_cnn_zoo_module(
    layers: Sequence[tuple[str, tuple[int, ...]]],
    activation: str = "relu",
    stride: int = 2,
) -> nn.Sequential:
    """The PyTorch module of a Small-CNN-Zoo network.

    Args:
        layers: ``(kind, torch weight shape)`` per layer in order, kind ``"conv"`` or ``"dense"``.
        activation: TF activation name (relu, tanh, sigmoid, selu, elu, softplus, linear).
        stride: conv stride (the zoo's ``cnn_stride``; TF ``valid`` padding = no padding).
    """
    act = _TF_ACTIVATIONS.get(str(activation).lower())
    if act is None:
        raise ZooReadError(
            f"unsupported activation {activation!r}; known: {sorted(_TF_ACTIVATIONS)}"
        )
    mods: list[nn.Module] = []
    prev_kind = None
    for i, (kind, shape) in enumerate(layers):
        last = i == len(layers) - 1
        if kind == "conv":
            if prev_kind == "dense":
                raise ZooReadError("a conv layer after a dense layer is not a Small-CNN-Zoo net")
            out_c, in_c, *k = shape
            conv = nn.Conv2d if len(k) == 2 else nn.Conv1d
            mods.append(conv(in_c, out_c, tuple(k), stride=stride))
        else:
            if prev_kind == "conv":
                pool = (
                    nn.AdaptiveAvgPool2d(1)
                    if len(layers[i - 1][1]) == 4
                    else nn.AdaptiveAvgPool1d(1)
                )
                mods += [pool, nn.Flatten()]
            elif prev_kind is None:
                mods.append(nn.Flatten())
            mods.append(nn.Linear(shape[1], shape[0]))
        if not last:
            mods.append(act())
        prev_kind = kind
    return nn.Sequential(*mods)


class SmallCNNZooGroup(InMemoryZooGroup):
    """Networks of the Small CNN Zoo, read lazily from a memory-mapped ``weights.npy``.

    Each record is one row of ``weights.npy`` (``rows[i]``); its parameters are cut out of the row
    following ``layout.csv`` and converted to PyTorch layout on access.
    """

    def __init__(
        self,
        name: str,
        weights: np.ndarray,
        rows: np.ndarray,
        slots: list[tuple[str, int, int, tuple[int, ...], tuple[int, ...] | None]],
        layer_kinds: list[tuple[str, tuple[int, ...]]],
        metrics: Mapping[str, np.ndarray],
        hparams: Mapping[str, np.ndarray],
        stride: int,
        default_activation: str,
        input_shape: tuple[int, ...],
        path: str,
    ) -> None:
        self.name = name
        self._weights = weights
        self._rows = rows
        self._slots = slots  # (torch key, start, end, tf shape, transpose or None)
        self._layer_kinds = layer_kinds
        self._stride = stride
        self._default_activation = default_activation
        self._num = len(rows)
        self.keys = [s[0] for s in slots]
        template = small_cnn_zoo_module(layer_kinds, "relu", stride)
        spec = WeightSpaceSpec.from_module(template)
        self._init_common(metrics, hparams, spec, None, self._build, input_shape, path)

    def _build(self, index: int) -> nn.Module:
        acts = self.hparams.get("activation")
        act = str(acts[index]) if acts is not None else self._default_activation
        try:
            return small_cnn_zoo_module(self._layer_kinds, act, self._stride)
        except ZooReadError as err:
            raise ZooReadError(f"{self.path}: record {index}: {err}") from None

    def params(self, indices: Any = None) -> dict[str, torch.Tensor]:
        """Records ``indices`` (None: all) cut out of ``weights.npy`` rows, in PyTorch layout.

        Raises:
            MemoryLimitError: the rows (read, then converted: twice their size) would exceed
                metanet's memory limit.
        """
        from metanet.limits import check_memory, tensor_bytes

        idx = self._index(indices)
        check_memory(
            2 * tensor_bytes((idx.size, self._weights.shape[1]), np.float32),
            f"{self.path}: reading {idx.size:,} records of '{self.name}'",
        )
        rows = self._rows[idx]
        order = np.argsort(rows, kind="stable")
        data = np.empty((len(rows), self._weights.shape[1]), dtype=np.float32)
        data[order] = self._weights[rows[order]]  # sorted reads from the memory map
        out = {}
        for key, start, end, shape, transpose in self._slots:
            arr = data[:, start:end].reshape(len(rows), *shape)
            if transpose is not None:
                arr = arr.transpose(0, *(t + 1 for t in transpose))
            out[key] = torch.from_numpy(np.ascontiguousarray(arr))
        return out


def _parse_shape(text: str, where: str) -> tuple[int, ...]:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise ZooReadError(f"{where}: shape {text!r} is not a tuple of ints")
    return tuple(value)


def _layout_slots(layout_path: str, num_cols: int):
    header, body = _read_csv(layout_path)
    need = ("varname", "start_idx", "end_idx", "shape")
    missing = [c for c in need if c not in header]
    if missing:
        raise ZooReadError(f"{layout_path}: missing column(s) {missing}; has {header}")
    col = {c: header.index(c) for c in need}
    entries = []
    for i, r in enumerate(body):
        where = f"{layout_path} row {i + 2}"
        try:
            start, end = int(r[col["start_idx"]]), int(r[col["end_idx"]])
        except ValueError:
            raise ZooReadError(f"{where}: start_idx/end_idx are not integers") from None
        shape = _parse_shape(r[col["shape"]], where)
        if end - start != int(np.prod(shape)):
            raise ZooReadError(
                f"{where}: '{r[col['varname']]}' spans {end - start} columns but has shape {shape}"
            )
        if start < 0 or end > num_cols:
            raise ZooReadError(
                f"{where}: columns {start}:{end} outside the {num_cols} columns of weights.npy"
            )
        entries.append((start, end, r[col["varname"]], shape))
    entries.sort()
    # layers in order of their first parameter in the flat vector
    layers: dict[str, dict[str, Any]] = {}
    for start, end, var, shape in entries:
        base = var.split(":")[0]
        if "/" not in base or base.rsplit("/", 1)[1] not in ("kernel", "bias"):
            raise ZooReadError(
                f"{layout_path}: variable '{var}' is neither a '.../kernel:0' nor a '.../bias:0'"
            )
        prefix, kind = base.rsplit("/", 1)
        layers.setdefault(prefix, {})[kind] = (start, end, shape, var)
    slots, layer_kinds = [], []
    module_index = 0  # provisional key "<layer number>.weight", renamed by _fix_keys
    for prefix, parts in layers.items():
        if "kernel" not in parts:
            raise ZooReadError(f"{layout_path}: layer '{prefix}' has a bias but no kernel")
        start, end, shape, var = parts["kernel"]
        if len(shape) in (3, 4):  # TF conv kernel (*spatial, in, out) -> (out, in, *spatial)
            transpose = (len(shape) - 1, len(shape) - 2, *range(len(shape) - 2))
            kind = "conv"
        elif len(shape) == 2:  # dense (in, out) -> (out, in)
            transpose, kind = (1, 0), "dense"
        else:
            raise ZooReadError(f"{layout_path}: kernel '{var}' has unsupported shape {shape}")
        torch_shape = tuple(shape[t] for t in transpose)
        layer_kinds.append((kind, torch_shape))
        slots.append((f"{module_index}.weight", start, end, shape, transpose))
        if "bias" in parts:
            b_start, b_end, b_shape, b_var = parts["bias"]
            if b_shape != (torch_shape[0],):
                raise ZooReadError(
                    f"{layout_path}: bias '{b_var}' has shape {b_shape}, expected "
                    f"({torch_shape[0]},)"
                )
            slots.append((f"{module_index}.bias", b_start, b_end, b_shape, None))
        module_index += 1
    return slots, layer_kinds


def _fix_keys(slots, layer_kinds, stride: int):
    """Rename provisional ``<layer>.weight`` keys to the Sequential's real module indices."""
    module = small_cnn_zoo_module(layer_kinds, "relu", stride)
    names = [
        n for n, m in module.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]
    fixed = []
    for key, *rest in slots:
        layer, what = key.split(".")
        fixed.append((f"{names[int(layer)]}.{what}", *rest))
    return fixed


def _find(folder: str, names: Sequence[str]) -> str:
    for n in names:
        p = os.path.join(folder, n)
        if os.path.exists(p):
            return p
    raise ZooReadError(f"{folder}: none of {list(names)} found (Small CNN Zoo layout)")


def _check_npy_size(path: str) -> None:
    """Refuse a ``.npy`` file whose header declares more data than the file holds (nothing is
    read but the header)."""
    from numpy.lib import format as npy_format

    from metanet.limits import format_bytes, tensor_bytes

    try:
        with open(path, "rb") as fh:
            version = npy_format.read_magic(fh)
            read = (
                npy_format.read_array_header_1_0
                if version == (1, 0)
                else npy_format.read_array_header_2_0
            )
            shape, _, dtype = read(fh)
            offset = fh.tell()
    except (OSError, ValueError, EOFError) as err:
        raise ZooReadError(f"{path}: cannot be read as a .npy array: {err}") from None
    declared = tensor_bytes(shape, dtype)
    held = os.path.getsize(path) - offset
    if declared > held:
        raise ZooReadError(
            f"{path}: header declares a {dtype} array of shape {tuple(shape)} "
            f"({format_bytes(declared)}) but the file holds {format_bytes(held)} of data "
            "(truncated or corrupt)"
        )


def read_small_cnn_zoo(
    folder: str | os.PathLike,
    steps: int | Sequence[int] | None = None,
    stride: int = 2,
    activation: str = "relu",
    input_size: int | None = None,
    name: str | None = None,
) -> InMemoryZoo:
    """Read the Small CNN Zoo (Unterthiner et al. 2020) from ``folder``.

    Args:
        folder: holds ``weights.npy``, ``metrics.csv.gz`` (or ``metrics.csv``) and ``layout.csv``.
        steps: keep only checkpoints at these ``step`` values (e.g. ``86``: end of training).
        stride: conv stride of the zoo's networks (the training script's default, 2).
        activation: activation used when the metrics lack ``config.activation``.
        input_size: input image side (default from ``config.dataset``: 28 for (fashion) MNIST,
            32 for CIFAR-10 / SVHN; 28 when unknown).
        name: group name (default ``small-cnn-zoo[-<dataset>]``).

    Returns:
        An :class:`InMemoryZoo` with one :class:`SmallCNNZooGroup`. Metrics are renamed to metanet's
        (``test_acc``, ``train_acc``, ``epoch`` = step, ``run_id`` from ``modeldir``);
        ``config.*`` columns become hyperparameters without the prefix.

    Raises:
        ZooReadError: missing or malformed files, a ``weights.npy`` whose header declares more
            data than the file holds, or tables that disagree (naming the file).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ZooReadError(f"{folder}: not a folder")
    w_path = _find(folder, ["weights.npy"])
    m_path = _find(folder, ["metrics.csv.gz", "metrics.csv"])
    l_path = _find(folder, ["layout.csv"])
    _check_npy_size(w_path)
    try:
        weights = np.load(w_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ZooReadError(f"{w_path}: cannot be read as a .npy array: {err}") from None
    if weights.ndim != 2 or weights.dtype.kind != "f":
        raise ZooReadError(
            f"{w_path}: expected a float matrix [N, D], got {weights.dtype} {weights.shape}"
        )
    slots, layer_kinds = _layout_slots(l_path, weights.shape[1])
    slots = _fix_keys(slots, layer_kinds, stride)
    covered = sum(e - s for _, s, e, _, _ in slots)
    if covered != weights.shape[1]:
        raise ZooReadError(
            f"{l_path}: layout covers {covered} columns, {w_path} has {weights.shape[1]}"
        )

    header, body = _read_csv(m_path)
    if len(body) != weights.shape[0]:
        raise ZooReadError(
            f"{m_path} has {len(body)} rows but {w_path} has {weights.shape[0]} networks"
        )
    ckpt_col = header[0] if header[0] in ("", "Unnamed: 0", "index") else None
    metrics, hparams = _split_table(header, body, skip=(ckpt_col,) if ckpt_col is not None else ())
    if ckpt_col is not None:
        hparams["checkpoint"] = np.array([r[0] for r in body], dtype=str)
    if "modeldir" in hparams:
        metrics["run_id"] = _factorize(hparams["modeldir"])
    elif "checkpoint" in hparams:
        metrics["run_id"] = _factorize(
            np.array([os.path.dirname(c) for c in hparams["checkpoint"]], dtype=str)
        )
    else:
        metrics["run_id"] = np.arange(len(body), dtype=np.int64)
    if "seed" not in metrics:
        seeds = hparams.get("random_seed")
        metrics["seed"] = (
            seeds.astype(np.int64)
            if seeds is not None and seeds.dtype.kind in "iuf"
            else np.full(len(body), -1, dtype=np.int64)
        )

    rows = np.arange(weights.shape[0])
    if steps is not None:
        if "epoch" not in metrics:
            raise ZooReadError(f"{m_path}: no 'step' column to select steps {steps} from")
        wanted = [steps] if isinstance(steps, int) else list(steps)
        rows = rows[np.isin(metrics["epoch"], wanted)]
        if rows.size == 0:
            raise ZooReadError(f"{m_path}: no checkpoint has step in {wanted}")
    metrics = {k: v[rows] for k, v in metrics.items()}
    hparams = {k: v[rows] for k, v in hparams.items()}

    datasets = np.unique(hparams["dataset"]) if "dataset" in hparams else np.array([])
    dataset = str(datasets[0]) if datasets.size == 1 else None
    size = input_size or _INPUT_SIZES.get(dataset or "", 28)
    conv_dims = len(layer_kinds[0][1]) - 2 if layer_kinds[0][0] == "conv" else 0
    in_ch = layer_kinds[0][1][1]
    input_shape = (in_ch, *([size] * conv_dims)) if conv_dims else (in_ch,)
    group = SmallCNNZooGroup(
        name or ("small-cnn-zoo" + (f"-{dataset}" if dataset else "")),
        weights,
        rows,
        slots,
        layer_kinds,
        metrics,
        hparams,
        stride,
        activation,
        input_shape,
        folder,
    )
    return InMemoryZoo([group], path=folder)


# ------------------------------------------------------------------------------------------------
# folder of torch checkpoints
# ------------------------------------------------------------------------------------------------
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def _load_checkpoint(
    path: str, trust_pickle: bool
) -> tuple[dict[str, torch.Tensor], nn.Module | None]:
    from metanet.serialization import FileError, check_state_dict, load_file

    try:
        obj = load_file(path, trust_pickle=trust_pickle)
    except FileError as err:
        raise ZooReadError(str(err)) from None
    module = None
    if isinstance(obj, nn.Module):
        module, obj = obj, obj.state_dict()
    elif isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(wrapper)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ZooReadError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict or an nn.Module"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ZooReadError(f"{path}: entries {bad[:5]} are not tensors (not a state_dict)")
    try:
        check_state_dict(obj, path)
    except FileError as err:
        raise ZooReadError(str(err)) from None
    return {str(k): v.detach() for k, v in obj.items()}, module


def _infer_spec(sd: Mapping[str, torch.Tensor], module: nn.Module | None) -> WeightSpaceSpec | None:
    """The weight space of a plain Linear/Conv chain, or None when it is not one."""
    if module is not None:
        try:
            return WeightSpaceSpec.from_module(module)
        except WeightSpaceError:
            return None
    names = []
    for key, value in sd.items():
        prefix, _, what = key.rpartition(".")
        if what == "weight" and value.dim() in (2, 3, 4):
            names.append(prefix)
        elif what == "bias" and f"{prefix}.weight" in sd and sd[f"{prefix}.weight"].dim() >= 2:
            continue
        else:  # norm layers, buffers, anything else: not a plain chain
            return None
    try:
        return WeightSpaceSpec.from_state_dict(sd, names)
    except WeightSpaceError:
        return None


def read_checkpoint_folder(
    folder: str | os.PathLike,
    metrics: str | None = "metrics.csv",
    filename_column: str = "filename",
    module_factory: Callable[[], nn.Module] | None = None,
    arch: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> InMemoryZoo:
    """Read a folder of torch checkpoints plus a CSV of metrics.

    Args:
        folder: the folder.
        metrics: CSV file name (relative to ``folder``) with one row per checkpoint: a
            ``filename_column`` and metric columns (``test_acc``/``test_accuracy``, ``epoch``,
            ``run_id``, ...; text columns and ``config.*`` become hyperparameters). ``None``: every
            checkpoint file of the folder (``CHECKPOINT_SUFFIXES``), no metrics.
        filename_column: column naming each checkpoint file (relative to ``folder``).
        module_factory: builds the networks' module (default: from ``arch``, or a copy of a
            pickled module); needed for ``module(i)`` and graph DataModules.
        arch: metanet arch dict (:func:`metanet.zoo.architectures.build_module`) of the networks.
        trust_pickle: allow files that hold pickled ``nn.Module`` objects (runs pickle code: only
            for files you trust); otherwise only tensors are loaded.

    Returns:
        An :class:`InMemoryZoo`; checkpoints whose keys/shapes differ go to different groups.
        Records get ``run_id`` (from a ``run_id`` column, else one run per file) and ``epoch``
        (else 0).

    Raises:
        ZooReadError: a missing folder/CSV/column, a listed file that is missing or does not load,
            a file that is not a state_dict (each naming the file).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ZooReadError(f"{folder}: not a folder")
    if metrics is not None:
        csv_path = os.path.join(folder, metrics)
        if not os.path.exists(csv_path):
            raise ZooReadError(f"{csv_path}: metrics CSV not found")
        header, body = _read_csv(csv_path)
        if filename_column not in header:
            raise ZooReadError(
                f"{csv_path}: no '{filename_column}' column (has {header}); pass filename_column="
            )
        files = [r[header.index(filename_column)] for r in body]
        table_metrics, table_hparams = _split_table(header, body, skip=(filename_column,))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(CHECKPOINT_SUFFIXES))
        if not files:
            raise ZooReadError(f"{folder}: no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
        table_metrics, table_hparams = {}, {}
    n = len(files)
    table_metrics.setdefault("run_id", np.arange(n, dtype=np.int64))
    table_metrics.setdefault("epoch", np.zeros(n, dtype=np.int64))
    table_hparams["filename"] = np.array(files, dtype=str)

    if arch is not None and module_factory is None:
        from metanet.zoo.architectures import build_module

        arch_dict = dict(arch)

        def module_factory() -> nn.Module:
            return build_module(arch_dict)

    groups: dict[str, dict[str, Any]] = {}
    for row, fname in enumerate(files):
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise ZooReadError(f"{path}: listed in the metrics CSV but not found")
        sd, module = _load_checkpoint(path, trust_pickle)
        sig = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sd.items())
        g = groups.setdefault(sig, {"rows": [], "sds": [], "module": None, "file": path})
        if g["module"] is None and module is not None:  # a pickled module is the group's template
            g["module"] = module
        g["rows"].append(row)
        g["sds"].append(sd)

    out = []
    for sig, g in groups.items():
        rows = np.array(g["rows"])
        template = module_factory() if module_factory is not None else g["module"]
        if template is not None:
            own = template.state_dict()
            if set(own) != set(g["sds"][0]):
                raise ZooReadError(
                    f"{g['file']}: keys do not fit the given module: only in file "
                    f"{sorted(set(g['sds'][0]) - set(own))[:5]}, only in module "
                    f"{sorted(set(own) - set(g['sds'][0]))[:5]}"
                )
        if module_factory is not None:
            factory = _Factory(module_factory)
        elif template is not None:
            factory = _Factory(template, copy_template=True)
        else:
            factory = None
        if arch is not None:
            from metanet.zoo.architectures import arch_name

            name = arch_name(arch) if len(groups) == 1 else f"{arch_name(arch)}-{len(out)}"
        else:
            name = (
                "checkpoints"
                if len(groups) == 1
                else ("ckpt-" + hashlib.sha1(sig.encode()).hexdigest()[:8])
            )
        params = {k: torch.stack([sd[k] for sd in g["sds"]]) for k in g["sds"][0]}
        out.append(
            InMemoryZooGroup(
                name,
                params,
                {k: v[rows] for k, v in table_metrics.items()},
                {k: v[rows] for k, v in table_hparams.items()},
                spec=_infer_spec(g["sds"][0], template),
                arch=dict(arch) if arch is not None else None,
                module_factory=factory,
                path=folder,
            )
        )
    return InMemoryZoo(out, path=folder)


class _Factory:
    """Picklable ``index -> fresh module`` (for DataLoader workers)."""

    def __init__(self, source: Any, copy_template: bool = False) -> None:
        self.source, self.copy_template = source, copy_template

    def __call__(self, index: int = 0) -> nn.Module:
        if self.copy_template:
            return copy.deepcopy(self.source)
        return self.source()


# ------------------------------------------------------------------------------------------------
# conversion to metanet's HDF5 store
# ------------------------------------------------------------------------------------------------
def write_zoo(
    zoo: InMemoryZoo, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None
) -> None:
    """Write ``zoo`` as a metanet HDF5 zoo file (atomically, via ``ZooWriter``).

    Every group needs a metanet arch dict (``read_checkpoint_folder(..., arch=...)``); required
    metrics that the source lacks are filled with NaN (losses/accuracies) or -1 (seed).

    Raises:
        ZooReadError: a group without an arch dict (e.g. the Small CNN Zoo's TF architecture).
    """
    from metanet.data.zoo_store import REQUIRED_METRICS, ZooWriter

    for g in zoo:
        if g.arch is None:
            raise ZooReadError(
                f"group '{g.name}' of {zoo.path} has no metanet arch dict; the HDF5 store needs "
                "one (read it with arch=...), or use the reader's object directly"
            )
    with ZooWriter(
        path, attrs={"name": os.path.basename(zoo.path) or "imported", **(attrs or {})}
    ) as w:
        for g in zoo:
            metrics = dict(g.metrics)
            for m in REQUIRED_METRICS:
                if m not in metrics:
                    metrics[m] = (
                        np.full(len(g), -1, dtype=np.int64)
                        if m in _INT_METRICS
                        else np.full(len(g), np.nan)
                    )
            w.add(g.arch, g.params(), metrics, g.hparams)
