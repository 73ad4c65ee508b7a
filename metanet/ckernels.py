"""Compiling and loading metanet's C kernels (the zoo builder's chains, the scatter core's fused
aggregation).

A kernel source is compiled once per machine with the system C compiler (``cc -O3``, AVX2/FMA
where the CPU has them) into ``~/.cache/metanet/kernels`` (or ``$METANET_CACHE/kernels``), keyed
by a hash of the source and the flags, and loaded with :mod:`ctypes`. Without a compiler, or
with ``METANET_NO_NATIVE=1``, :func:`load` returns ``None`` and callers use their PyTorch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list[str]:
    """The C compiler flags of every kernel on this machine."""
    flags = ["-O3", "-std=c11", "-ffp-contract=fast", "-funroll-loops", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return flags


def cache_dir() -> Path:
    """metanet's cache folder: ``$METANET_CACHE`` or ``~/.cache/metanet``."""
    root = os.environ.get("METANET_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "metanet"


def disabled() -> bool:
    """Whether ``METANET_NO_NATIVE`` turns the C kernels off."""
    return os.environ.get("METANET_NO_NATIVE", "") not in ("", "0")


def load(source: Path, stem: str, fallback: str) -> ctypes.CDLL | None:
    """The library compiled from ``source`` (built on first use), or ``None`` where it is
    unavailable: turned off, no C compiler, a failed compile, an unwritable cache folder (the
    last two with a warning naming why, ending with ``fallback``, what the caller does
    instead)."""
    if disabled():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not source.exists():
        return None
    flags = compile_flags()
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{stem}-{key}-{platform.machine()}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                out = Path(tmp) / target.name
                cmd = [compiler, *flags, str(source.resolve()), "-o", str(out), "-lm"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    warnings.warn(f"metanet: compiling {source} failed; {fallback}:\n"
                                  f"{done.stderr[-2000:]}", stacklevel=3)  # fmt: skip
                    return None
                os.replace(out, target)  # atomic: concurrent builders never load a partial file
        return ctypes.CDLL(str(target))
    except OSError as err:
        warnings.warn(f"metanet: the C kernels at {target} are unavailable ({err}); {fallback}",
                      stacklevel=3)  # fmt: skip
        return None
