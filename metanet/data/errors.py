"""The error of unusable task data and its one-line message helper, below both
:mod:`metanet.data.tasks` and :mod:`metanet.data.providers` (which import them from here)."""

from __future__ import annotations

__all__ = ["TaskDataError", "one_line"]


class TaskDataError(ValueError):
    """Data that cannot be used; the one-line message names the config key and the file/class."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())
