"""A provider's config mapping with checked getters, and the memory limit data loads respect.

Errors are :class:`~metanet.data.tasks.TaskDataError` s of one line that start with the dotted
key (``data.test.init_args``) and, where known, the file or class in parentheses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from metanet.data.errors import TaskDataError, one_line
from metanet.limits import ENV_VAR as MEMORY_LIMIT_ENV

__all__ = ["MEMORY_LIMIT_ENV", "ProviderConfig", "check_fits_memory", "memory_limit_bytes"]

_GB = 1024**3


class ProviderConfig:
    """The ``data:`` mapping of one provider, read through getters that name failing keys.

    Every getter records the value it returns (defaults included) in :attr:`resolved` - the
    normalized config a :class:`~metanet.data.tasks.TaskData` keeps and fingerprints - and
    :meth:`finish` rejects keys that no getter read (typos), listing those that were read.
    """

    def __init__(self, raw: Mapping[str, Any], prefix: str = "data") -> None:
        self.raw = dict(raw)
        self.prefix = prefix
        self.resolved: dict[str, Any] = {}
        self._read: set[str] = set()
        self._children: list[ProviderConfig] = []

    # -- errors ----------------------------------------------------------------------------------
    def key(self, name: str) -> str:
        """The dotted name of key ``name``, e.g. ``data.test.class_path``."""
        return f"{self.prefix}.{name}"

    def error(self, name: str | None, why: str, where: Any = None) -> TaskDataError:
        """A one-line :class:`TaskDataError` for key ``name`` (``None``: this mapping)."""
        label = self.prefix if name is None else self.key(name)
        if where is not None:
            label += f" ({where})"
        return TaskDataError(one_line(f"{label}: {why}"))

    # -- getters ---------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        """Whether key ``name`` is given (and not null)."""
        return self.raw.get(name) is not None

    def get(self, name: str, default: Any = None) -> Any:
        """The raw value of ``name`` (``default`` when absent or null), recorded as read."""
        self._read.add(name)
        value = self.raw.get(name)
        value = default if value is None else value
        if value is not None:
            self.resolved[name] = value
        return value

    def text(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        """A string value; ``required`` makes a missing one an error."""
        value = self.get(name, default)
        if value is None and required:
            raise self.error(name, "missing")
        if value is not None and not isinstance(value, str):
            raise self.error(name, f"must be a string (got {value!r})")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean value."""
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false (got {value!r})")
        return value

    def integer(self, name: str, default: int | None, minimum: int = 0) -> int | None:
        """An integer ``>= minimum`` (or ``None`` when absent and ``default`` is ``None``)."""
        value = self.get(name, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(name, f"must be an integer >= {minimum} (got {value!r})")
        return value

    def fraction(self, name: str, default: float | None = 0.0) -> float | None:
        """A number in [0, 1) (a share of samples to hold out)."""
        value = self.get(name, default)
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not 0 <= value < 1:
            raise self.error(name, f"must be a number in [0, 1) (got {value!r})")
        return float(value)

    def choice(self, name: str, options: tuple[str, ...], default: str | None = None) -> str | None:
        """One of ``options`` (or ``default``)."""
        value = self.get(name, default)
        if value is not None and value not in options:
            raise self.error(name, f"must be one of {list(options)} (got {value!r})")
        return value

    def shape(self, name: str, length: int) -> tuple[int, ...] | None:
        """A list of ``length`` positive integers (e.g. an image ``size: [H, W]``)."""
        value = self.get(name)
        if value is None:
            return None
        ok = isinstance(value, (list, tuple)) and len(value) == length
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                             for v in value):  # fmt: skip
            raise self.error(name, f"must be a list of {length} positive integers (got {value!r})")
        self.resolved[name] = list(value)
        return tuple(value)

    def mapping(self, name: str) -> dict[str, Any] | None:
        """A mapping value, copied (``None`` when absent)."""
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(name, f"must be a mapping (got {type(value).__name__})")
        return dict(value)

    def file(self, name: str, value: str | None = None, folder: bool = False) -> str:
        """An existing file (or ``folder``) path: the value of ``name``, or ``value`` if given."""
        path = self.text(name, required=True) if value is None else value
        if not isinstance(path, str) or not path:
            raise self.error(name, f"must be a path (got {path!r})")
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise self.error(name, "does not exist", where=path)
        if folder and not os.path.isdir(path):
            raise self.error(name, "is not a folder", where=path)
        if not folder and os.path.isdir(path):
            raise self.error(name, "is a folder, not a file", where=path)
        return path

    def sub(self, name: str, default: Mapping[str, Any] | None = None) -> ProviderConfig | None:
        """Key ``name`` as a nested config (``None`` when absent); its keys read as ``name.*``."""
        value = self.get(name, default)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(name, f"must be a mapping (got {type(value).__name__})")
        child = ProviderConfig(value, prefix=self.key(name))
        self.resolved[name] = child.resolved
        self._children.append(child)
        return child

    def finish(self, children: bool = True) -> None:
        """Reject keys no getter read (here and, with ``children``, in nested configs)."""
        unknown = sorted(set(self.raw) - self._read - {"provider"})
        if unknown:
            allowed = sorted(self._read | {"provider"})
            raise self.error(unknown[0], f"unknown key (allowed: {allowed})")
        for child in self._children if children else ():
            child.finish()


def memory_limit_bytes() -> int:
    """Bytes a provider may load into memory: :func:`metanet.limits.memory_limit_bytes`
    (``$METANET_MEMORY_LIMIT_GB`` if set, else 75% of the machine's RAM)."""
    from metanet import limits

    try:
        return limits.memory_limit_bytes()
    except ValueError as err:
        raise TaskDataError(str(err)) from None


def check_fits_memory(nbytes: int, cfg: ProviderConfig, key: str, where: Any, hint: str) -> None:
    """Raise (naming ``key`` and ``where``) when ``nbytes`` is over :func:`memory_limit_bytes`;
    ``hint`` says what to do instead (e.g. ``"set data.stream: true"``)."""
    limit = memory_limit_bytes()
    if nbytes > limit:
        raise cfg.error(
            key,
            f"{nbytes / _GB:.3g} GB is over the memory limit of {limit / _GB:.3g} GB "
            f"({MEMORY_LIMIT_ENV}, default 75% of RAM); {hint}",
            where=where,
        )
