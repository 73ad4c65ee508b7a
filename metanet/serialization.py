"""Reading and writing files safely: files are data, not code.

Every loader in metanet reads files through :func:`load_file`:

* a **safetensors** file (metanet's own format for what it writes: GHNs, exported predictors and
  generators, generated networks) is read with the ``safetensors`` library: tensors plus a JSON
  tree of plain values, no pickle at all;
* a **PyTorch** file (``torch.save``, Lightning ``.ckpt``) is read with
  ``torch.load(weights_only=True)``, which rebuilds tensors and plain Python containers only and
  refuses every other object. A file that holds other objects (a pickled ``nn.Module``, or a
  hostile ``__reduce__``) is refused with :class:`PickleRefusedError`, unless the caller passes
  ``trust_pickle=True`` (``--trust-pickle`` on the command line): only then does the full
  unpickler run, which executes whatever code the file names.

:func:`save_tree` / :func:`load_tree` store any nested structure of dicts, lists, tuples, tensors
and plain values (``None``, bool, int, float, str) as one safetensors file: tensors as
safetensors entries named by their path (``state_dict/layer.weight``), everything else as JSON in
the file's metadata. A file is written to a temporary name and renamed, so an interrupted save
never leaves a partial file under the final name.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from metanet.limits import MemoryLimitError, check_memory

TREE_FORMAT = "metanet-tree/1"
_TREE_KEY = "metanet_tree"
_FORMAT_KEY = "metanet_format"
_TRUST_HINT = "if you trust this file, pass --trust-pickle (trust_pickle=True in Python)"


class FileError(ValueError):
    """A file metanet cannot read: missing, empty, corrupt, too large or of the wrong kind."""


class PickleRefusedError(FileError):
    """A file holds pickled Python objects, which metanet does not run without explicit trust."""


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _pickle_reason(err: BaseException) -> str:
    """The line of torch's weights_only refusal that names the object (``GLOBAL posix.system``)."""
    for line in str(err).splitlines():
        line = line.strip()
        if "Unsupported global" in line or "Unsupported operand" in line:
            line = line[line.index("Unsupported") :].split(" was not ")[0]
            return line.rstrip(".")[:160]
    return _short(err)


def check_file(path: str | os.PathLike) -> int:
    """Raise :class:`FileError` unless ``path`` is a non-empty regular file that fits the memory
    limit; returns its size in bytes."""
    p = Path(path)
    if not p.exists():
        raise FileError(f"{p}: no such file")
    if p.is_dir():
        raise FileError(f"{p} is a folder, not a file")
    size = p.stat().st_size
    if size == 0:
        raise FileError(f"{p} is empty (0 bytes)")
    try:
        check_memory(size, f"reading {p}")
    except MemoryLimitError as err:
        raise FileError(str(err)) from None
    return size


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte header length, then ``{``)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= os.path.getsize(path) - 8


def load_file(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """The contents of a safetensors or PyTorch file, read without running code from it.

    Args:
        path: a ``.safetensors`` file (returned as :func:`load_tree` gives it) or a file written
            by ``torch.save`` (a state_dict, a Lightning checkpoint, ...).
        trust_pickle: allow a full unpickle of a PyTorch file that holds other objects than
            tensors and plain containers. That runs code named in the file: pass it only for
            files from a source you trust.

    Raises:
        FileError: missing, empty, too large or unreadable file (the message names it).
        PickleRefusedError: the file needs the full unpickler and ``trust_pickle`` is False.
    """
    check_file(path)
    if is_safetensors(path):
        return _read_tree(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # neither torch's zip nor a pickle
        raise FileError(f"{path} is not a readable PyTorch file (neither zip archive nor pickle)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise PickleRefusedError(
                f"{path} holds pickled Python objects ({_pickle_reason(err)}); metanet reads "
                f"tensors only: {_TRUST_HINT}"
            ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise FileError(f"{path} is not a readable PyTorch file ({_short(err)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # noqa: BLE001
        raise FileError(f"{path} is not a readable PyTorch file ({_short(err)})") from None


# ------------------------------------------------------------------------------------------------
# trees of tensors and plain values in one safetensors file
# ------------------------------------------------------------------------------------------------
_MARKERS = ("__tensor__", "__tuple__", "__items__")


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = path or "tensor"
        if name in tensors:
            raise ValueError(f"two tensors would be stored under the name {name!r}")
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) and k not in _MARKERS for k in obj)
        if plain:
            return {k: _encode(v, f"{path}/{k}" if path else k, tensors) for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, f"{path}/key{i}", tensors), _encode(v, f"{path}/{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(
        f"cannot store a {type(obj).__name__} at {path or '<root>'!r} without pickle (only "
        "tensors, dicts, lists, tuples, None, bool, int, float and str)"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        name = obj["__tensor__"]
        if name not in tensors:
            raise FileError(f"{where}: the metadata names a tensor {name!r} the file lacks")
        return tensors[name]
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {
            _hashable(_decode(k, tensors, where)): _decode(v, tensors, where)
            for k, v in obj["__items__"]
        }
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it to ``path``: a reader
    sees the old file or the whole new one, and an interrupted write leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_tree(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (nested dicts/lists/tuples of tensors and plain values) to one safetensors
    file at ``path``, atomically (temporary file + rename). Returns the path.

    Raises:
        TypeError: ``obj`` holds a value that cannot be stored without pickle (names its path).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, "", tensors)
    metadata = {_FORMAT_KEY: TREE_FORMAT, _TREE_KEY: json.dumps(tree)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
def load_tree(path: str | os.PathLike) -> Any:
    """Read a file written by :func:`save_tree`; a plain safetensors file (no metanet metadata)
    reads as a dict of its tensors. No pickle is involved.

    Raises:
        FileError: not a readable safetensors file, or one whose metadata is inconsistent.
    """
    check_file(path)
    return _read_tree(path)


def _read_tree(path: str | os.PathLike) -> Any:
    """:func:`load_tree` of a file :func:`check_file` has passed."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FileError(f"{path} is not a readable safetensors file ({_short(err)})") from None
    if _TREE_KEY not in metadata:
        return tensors
    if metadata.get(_FORMAT_KEY) != TREE_FORMAT:
        raise FileError(
            f"{path}: written in format {metadata.get(_FORMAT_KEY)!r}, this metanet reads "
            f"{TREE_FORMAT!r}"
        )
    try:
        tree = json.loads(metadata[_TREE_KEY])
    except json.JSONDecodeError as err:
        raise FileError(f"{path}: its metadata is not valid JSON ({_short(err)})") from None
    return _decode(tree, tensors, str(path))


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write a state_dict atomically as a plain safetensors file (readable by any safetensors
    tool), or with ``torch.save`` when ``path`` ends in ``.pt``/``.pth`` (still loadable
    tensors-only). Returns the path."""
    from safetensors.torch import save_file

    sd = {str(k): v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    if Path(path).suffix in (".pt", ".pth"):
        return atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp)))


def check_state_dict(state_dict: Mapping[str, Any], where: str) -> None:
    """Raise :class:`FileError` (naming ``where`` and the key) unless every entry of a network's
    state_dict is a tensor, weights and biases are floating point, and no float is NaN or inf."""
    if not state_dict:
        raise FileError(f"{where} holds no parameters")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise FileError(f"{where}: entry '{key}' is a {type(value).__name__}, not a tensor")
        leaf = str(key).rsplit(".", 1)[-1]
        if leaf in ("weight", "bias") and not value.is_floating_point():
            raise FileError(
                f"{where}: parameter '{key}' has dtype {value.dtype}, expected a floating point "
                "dtype"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FileError(f"{where}: parameter '{key}' contains NaN or inf values")
