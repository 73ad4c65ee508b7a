"""The "Small CNN Zoo" of Unterthiner et al. 2020 ("Predicting Neural Network Accuracy from
Weights"): :func:`read_small_cnn_zoo`, :class:`SmallCNNZooGroup`, :func:`small_cnn_zoo_module`.

The layout is a folder with ``weights.npy`` ``[N, D]`` (one flattened TensorFlow checkpoint per
row, memory-mapped), ``metrics.csv`` or ``metrics.csv.gz`` (one row per weights row:
``test_accuracy``, ``train_accuracy``, ``test_loss``, ``train_loss``, ``step``, ``modeldir`` and
``config.*`` hyperparameters) and ``layout.csv`` (``varname``, ``start_idx``, ``end_idx``,
``shape`` per TF variable, e.g. ``sequential/conv2d/kernel:0``). TF kernels are converted to
PyTorch layout (conv ``HWIO -> OIHW``, dense ``(in, out) -> (out, in)``). The networks are
``[Conv2d(3x3, stride 2, no padding) + activation] * k``, global average pooling, Linear (or
``Flatten`` + Linear layers for the zoo's fully connected variant).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch import nn

from metanet.data.readers.base import ZooReadError
from metanet.data.readers.memory import InMemoryZoo, InMemoryZooGroup
from metanet.data.readers.table import factorize, read_csv, split_table
from metanet.limits import check_memory, format_bytes, tensor_bytes
from metanet.weightspace import WeightSpaceSpec

__all__ = ["SmallCNNZooGroup", "read_small_cnn_zoo", "small_cnn_zoo_module"]

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
    header, body = read_csv(layout_path)
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

    header, body = read_csv(m_path)
    if len(body) != weights.shape[0]:
        raise ZooReadError(
            f"{m_path} has {len(body)} rows but {w_path} has {weights.shape[0]} networks"
        )
    ckpt_col = header[0] if header[0] in ("", "Unnamed: 0", "index") else None
    metrics, hparams = split_table(header, body, skip=(ckpt_col,) if ckpt_col is not None else ())
    if ckpt_col is not None:
        hparams["checkpoint"] = np.array([r[0] for r in body], dtype=str)
    if "modeldir" in hparams:
        metrics["run_id"] = factorize(hparams["modeldir"])
    elif "checkpoint" in hparams:
        metrics["run_id"] = factorize(
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
