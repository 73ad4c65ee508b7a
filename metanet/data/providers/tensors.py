"""``provider: tensors`` - arrays in ``.pt``, ``.npz``, ``.npy`` or ``.safetensors`` files.

Files are read as tensors only, never as pickled Python objects: ``torch.load(weights_only=True)``,
``numpy.load(allow_pickle=False)``, ``safetensors``. Give the data one of three ways:

* ``path``: one file holding ``x_key`` / ``y_key`` (default ``x`` / ``y``; test and val carved by
  the split keys) or per-split keys ``<x_key>_train``, ``<y_key>_train``, ``<x_key>_test``, ... .
* ``x`` and ``y``: one file each (e.g. two ``.npy``), then split like a single pool.
* ``train`` (and ``test`` / ``val``): each a file path, ``{path: ..., x_key: ..., y_key: ...}``
  or ``{x: ..., y: ...}``.

A ``.npy`` larger than the memory limit (``$METANET_MEMORY_LIMIT_GB``, default 75% of RAM) is
memory-mapped and ``.safetensors`` read in slices (the split's ``x`` is a
:class:`~metanet.data.tasks.LazyArray`); ``.pt`` and ``.npz`` files over the limit are refused.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metanet.data.providers.assemble import Part, SplitOptions, assemble_task, to_float_x
from metanet.data.providers.config import ProviderConfig, check_fits_memory, memory_limit_bytes
from metanet.data.tasks import SPLITS, LazyArray, TaskData, register_provider

__all__ = ["SUFFIXES", "tensors_provider"]

SUFFIXES = (".pt", ".pth", ".npz", ".npy", ".safetensors")
_PICKLED = "holds pickled Python objects; metanet reads tensors only"
_Array = Any  # torch.Tensor | np.ndarray | LazyArray


def _suffix(cfg: ProviderConfig, key: str, path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise cfg.error(key, f"unsupported file type {suffix or '(none)'!r} "
                        f"(use one of {list(SUFFIXES)})", path)  # fmt: skip
    return suffix


def _fits(nbytes: int) -> bool:
    return nbytes <= memory_limit_bytes()


class _Files:
    """The tensor files of one load, each read once; errors name the config key and the file."""

    def __init__(self, cfg: ProviderConfig) -> None:
        self.cfg = cfg
        self._torch: dict[str, dict[str, Any]] = {}

    def fail(self, key: str, why: str, path: str) -> Exception:
        return self.cfg.error(key, why, path)

    # -- per format ------------------------------------------------------------------------------
    def _torch_file(self, key: str, path: str) -> dict[str, Any]:
        if path not in self._torch:
            check_fits_memory(os.path.getsize(path), self.cfg, key, path,
                              "save x as .npy or .safetensors to read it from disk")  # fmt: skip
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                raise self.fail(key, _PICKLED, path) from None
            except Exception as err:  # noqa: BLE001 - torch.load raises many types
                raise self.fail(key, f"cannot be read as a torch file: {err}", path) from None
            if not isinstance(obj, dict):
                raise self.fail(key, f"holds a {type(obj).__name__}, not a dict of tensors", path)
            self._torch[path] = obj
        return self._torch[path]

    def _npz(self, key: str, path: str, name: str | None) -> tuple[list[str], np.ndarray | None]:
        check_fits_memory(os.path.getsize(path), self.cfg, key, path,
                          "save x as .npy to memory-map it")  # fmt: skip
        try:
            with np.load(path, allow_pickle=False) as npz:
                return list(npz.files), (npz[name] if name in npz.files else None)
        except ValueError as err:
            if "pickle" in str(err):
                raise self.fail(key, _PICKLED, path) from None
            raise self.fail(key, f"cannot be read as .npz: {err}", path) from None
        except (OSError, EOFError) as err:
            raise self.fail(key, f"cannot be read as .npz: {err}", path) from None

    def _npy(self, key: str, path: str, lazy_ok: bool) -> _Array:
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            if "pickle" in str(err) or "Python objects" in str(err):
                raise self.fail(key, _PICKLED, path) from None
            raise self.fail(key, f"cannot be read as .npy: {err}", path) from None
        except (OSError, EOFError) as err:
            raise self.fail(key, f"cannot be read as .npy: {err}", path) from None
        if mm.ndim == 0:
            raise self.fail(key, "holds a scalar, not an array of samples", path)
        if mm.dtype.kind not in "biuf":
            raise self.fail(key, f"holds {mm.dtype} values, not real numbers", path)
        if _fits(mm.size * 4) or not lazy_ok:
            check_fits_memory(mm.size * mm.itemsize, self.cfg, key, path, "targets must fit")
            return np.array(mm)
        where = f"{self.cfg.key(key)} ({path})"
        return LazyArray(mm.shape, lambda rows: to_float_x(np.asarray(mm[rows])), where)

    def _safetensors(self, key: str, path: str, name: str | None, lazy_ok: bool):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
                if name not in names:
                    return names, None
                shape = tuple(f.get_slice(name).get_shape())
                if _fits(int(np.prod(shape, dtype=np.int64)) * 4) or not lazy_ok:
                    return names, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise self.fail(key, f"cannot be read as safetensors: {err}", path) from None
        return names, LazyArray(shape, _safetensors_reader(path, name),
                                f"{self.cfg.key(key)} ({path})")  # fmt: skip

    # -- entry points ----------------------------------------------------------------------------
    def keys(self, key: str, path: str) -> list[str]:
        """The array names in the file at ``path`` (``key`` names it in errors)."""
        suffix = _suffix(self.cfg, key, path)
        if suffix == ".npy":
            raise self.fail(key, "a .npy file holds one array; give x and y (one file each)", path)
        if suffix in (".pt", ".pth"):
            return list(self._torch_file(key, path))
        if suffix == ".npz":
            return self._npz(key, path, None)[0]
        return self._safetensors(key, path, None, False)[0]

    def array(self, key: str, path: str, name: str, name_key: str, inputs: bool) -> _Array:
        """Array ``name`` of the file (the array of a ``.npy``); inputs may stay on disk.

        ``name_key`` is the option that chose ``name`` (``x_key`` / ``y_key``), for the error.
        """
        suffix = _suffix(self.cfg, key, path)
        if suffix == ".npy":
            return self._npy(key, path, lazy_ok=inputs)
        if suffix in (".pt", ".pth"):
            found = self._torch_file(key, path)
            names, value = list(found), found.get(name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise self.fail(key, f"key {name!r} holds a {type(value).__name__}, "
                                "not a tensor", path)  # fmt: skip
        elif suffix == ".npz":
            names, value = self._npz(key, path, name)
        else:
            names, value = self._safetensors(key, path, name, lazy_ok=inputs)
        if value is None:
            raise self.fail(key, f"has no key {name!r} (has {sorted(names)}); set "
                            f"{self.cfg.key(name_key)} to name it", path)  # fmt: skip
        return value


def _safetensors_reader(path: str, name: str):
    def read(rows: np.ndarray) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            piece = f.get_slice(name)
            lo, hi = int(rows.min()), int(rows.max()) + 1
            if hi - lo == len(rows) and bool((np.diff(rows) == 1).all()):
                out = piece[lo:hi]
            else:
                out = torch.cat([piece[int(i) : int(i) + 1] for i in rows])
        return to_float_x(out)

    return read


def _numeric(value: _Array) -> bool:
    if isinstance(value, LazyArray):
        return True  # checked when the memory map was opened
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    return not value.is_complex()


def _inputs(value: _Array) -> torch.Tensor | LazyArray:
    return value if isinstance(value, LazyArray) else to_float_x(value)


def _targets(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value


@dataclass(frozen=True)
class _Source:
    """Where one split's x and y are: config keys (for errors), files and array names."""

    split: str
    key_x: str
    key_y: str
    x_path: str
    y_path: str
    names: tuple[str, str]

    def read(self, files: _Files) -> Part:
        x = files.array(self.key_x, self.x_path, self.names[0], "x_key", inputs=True)
        y = files.array(self.key_y, self.y_path, self.names[1], "y_key", inputs=False)
        for key, path, name, value in ((self.key_x, self.x_path, self.names[0], x),
                                       (self.key_y, self.y_path, self.names[1], y)):  # fmt: skip
            if not _numeric(value):
                raise files.fail(key, f"array {name!r} holds {value.dtype} values, not real "
                                 "numbers", path)  # fmt: skip
        same = self.x_path == self.y_path
        return Part(_inputs(x), _targets(y), self.key_x,
                    self.x_path if same else f"{self.x_path}, {self.y_path}")  # fmt: skip


def _split_source(cfg: ProviderConfig, name: str, keys: tuple[str, str]) -> _Source | None:
    """Split ``name`` given as a path or a mapping (``{path, x_key, y_key}`` or ``{x, y}``)."""
    if not cfg.has(name) or isinstance(cfg.raw[name], str):
        path = cfg.file(name) if cfg.has(name) else cfg.get(name)
        return None if path is None else _Source(name, name, name, path, path, keys)
    sub = cfg.sub(name)
    names = (sub.text("x_key", keys[0]), sub.text("y_key", keys[1]))
    if sub.has("path"):
        path = sub.file("path")
        return _Source(name, f"{name}.path", f"{name}.path", path, path, names)
    return _Source(name, f"{name}.x", f"{name}.y", sub.file("x"), sub.file("y"), names)


def _one_file_sources(cfg: ProviderConfig, files: _Files, keys: tuple[str, str]) -> list[_Source]:
    path = cfg.file("path")
    cfg.finish()  # every key is read: check for typos before opening the file
    found = files.keys("path", path)
    if f"{keys[0]}_train" not in found:
        return [_Source("train", "path", "path", path, path, keys)]
    return [
        _Source(split, "path", "path", path, path, (f"{keys[0]}_{split}", f"{keys[1]}_{split}"))
        for split in SPLITS
        if split == "train" or f"{keys[0]}_{split}" in found
    ]


def _sources(cfg: ProviderConfig, files: _Files, keys: tuple[str, str]) -> list[_Source]:
    given = [k for k in ("path", "x", "train") if cfg.has(k)]
    if len(given) != 1:
        why = "missing (or give x and y, or train)" if not given else (
            f"give only one of path, x/y, train (got {given})")  # fmt: skip
        raise cfg.error(given[-1] if given else "path", why)
    if given[0] == "path":
        sources = _one_file_sources(cfg, files, keys)
    elif given[0] == "x":
        sources = [_Source("train", "x", "y", cfg.file("x"), cfg.file("y"), keys)]
    else:
        sources = [s for split in SPLITS if (s := _split_source(cfg, split, keys)) is not None]
    return sources


@register_provider("tensors")
def tensors_provider(cfg: ProviderConfig) -> TaskData:
    """Read ``x`` / ``y`` arrays from tensor files into a task."""
    keys = (cfg.text("x_key", "x"), cfg.text("y_key", "y"))
    options = SplitOptions.read(cfg)
    files = _Files(cfg)
    sources = _sources(cfg, files, keys)
    cfg.finish()
    parts = {s.split: s.read(files) for s in sources}
    name = os.path.splitext(os.path.basename(sources[0].x_path))[0]
    return assemble_task(cfg, name, parts, options)
