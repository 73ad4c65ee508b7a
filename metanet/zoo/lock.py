"""One build per zoo file: an exclusive lock held while ``build_zoo`` writes ``<out>``.

Two builds of the same output would train the same chunks twice and race on its parts folder and
on the merge. :func:`build_lock` takes an advisory lock (``fcntl.flock``; ``msvcrt.locking`` on
Windows) on ``<out dir>/.<out name>.lock`` without waiting, and writes the holder's PID and host
into it. The operating system releases the lock when the holder exits, however it exits (SIGKILL
included), so a killed build never leaves a stale lock behind. A second build of the same output
raises :class:`ZooBuildLocked` naming the PID that holds it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ZooBuildLocked", "build_lock", "lock_path"]


class ZooBuildLocked(OSError):
    """Another live process is building the same zoo file."""


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of the zoo file ``output`` (hidden, next to it)."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def build_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold the build lock of zoo file ``output`` for the ``with`` block; yields the lock path.

    Raises:
        ZooBuildLocked: another process holds it (the message names its PID and host).
    """
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise ZooBuildLocked(
                f"{output}: another build of this zoo is running ({_holder(path)}); "
                f"wait for it to finish or stop it, then run this command again"
            )
        if _same_file(fd, path):
            break
        os.close(fd)  # locked a file its holder unlinked on finishing: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}".encode())
        try:
            yield path
        finally:
            # unlink while still holding the lock; a build that locks the old file after this
            # finds its path gone (``_same_file``) and locks the new one instead
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)
