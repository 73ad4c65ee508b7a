"""A folder of PyTorch checkpoint files plus a CSV of metrics: :func:`read_checkpoint_folder`.

Files are ``.pt``, ``.pth``, ``.ckpt`` or ``.safetensors``: state_dicts, Lightning-style
``{"state_dict": ...}`` dicts or, with ``trust_pickle=True``, pickled modules. Files with
different parameter shapes become different groups.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from metanet.data.readers.base import ZooReadError
from metanet.data.readers.memory import InMemoryZoo, InMemoryZooGroup
from metanet.data.readers.table import read_csv, split_table
from metanet.serialization import FileError, check_state_dict, load_file
from metanet.weightspace import WeightSpaceError, WeightSpaceSpec

__all__ = ["CHECKPOINT_SUFFIXES", "read_checkpoint_folder"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def _load_checkpoint(
    path: str, trust_pickle: bool
) -> tuple[dict[str, torch.Tensor], nn.Module | None]:
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
        header, body = read_csv(csv_path)
        if filename_column not in header:
            raise ZooReadError(
                f"{csv_path}: no '{filename_column}' column (has {header}); pass filename_column="
            )
        files = [r[header.index(filename_column)] for r in body]
        table_metrics, table_hparams = split_table(header, body, skip=(filename_column,))
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
