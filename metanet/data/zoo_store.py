"""metanet's model-zoo file format (HDF5 via h5py): writing, merging, sharding and lazy reading.

Layout (format version :data:`FORMAT_VERSION`)::

    /                         attrs: metanet_zoo_format (int), name, data (JSON), recipe (YAML),
                                     fingerprint, num_networks
    /<arch_name>/             attrs: arch (JSON arch dict), spec (JSON WeightSpaceSpec or ""),
                                     keys (JSON list of state_dict keys), num_records
    /<arch_name>/params/<key> [R, *shape]  one dataset per state_dict entry (chunked, gzip)
    /<arch_name>/metrics/<m>  [R]          test_acc, train_acc, test_loss, train_loss, epoch,
                                           run_id, seed (+ label, ... for INR zoos)
    /<arch_name>/hparams/<h>  [R]          sampled hyperparameters (numbers or fixed-length bytes)

One *record* is one checkpoint; the checkpoints of one training run share ``run_id``.

Crash safety: a zoo file is never modified in place. :class:`ZooWriter` writes to a temporary file
in the same folder, flushes and fsyncs it, then ``os.replace``-s it onto the final name, so any
file under a zoo name is complete (a reader that has the old file open keeps reading the old one;
no SWMR needed). Sharded builds write one such file per rank; :func:`write_virtual_zoo` then makes
the zoo file a set of HDF5 *virtual datasets* over the shards (relative paths: move the folder as a
whole), which :class:`Zoo` reads like any other zoo.

Reading: :meth:`Zoo.open` checks the format and opens the HDF5 file lazily, once per process
(the handle is re-opened after ``fork`` and dropped when pickled), so a ``Zoo`` can be handed to
``DataLoader`` workers.

Limits (:mod:`metanet.limits`): opening refuses, with a :class:`ZooFormatError` naming the file,
the dataset and its declared shape, any dataset that declares more bytes than the file could
hold (:func:`check_declared_size`: contiguous or unfiltered data must fit in the file, filtered
chunks may compress up to :data:`MAX_COMPRESSION_RATIO` times). Reads of many records at once
(``params()``, ``weight_space()``, ``metrics``, :func:`merge_zoos`) estimate their bytes first
and raise :class:`~metanet.limits.MemoryLimitError` past the memory limit; reading a few records
(``state_dict(i)``, ``params([i, j])``) works for zoos of any size.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from metanet.data.zoo_protocol import record_indices
from metanet.limits import check_memory, format_bytes, tensor_bytes

FORMAT_VERSION = 1
FORMAT_ATTR = "metanet_zoo_format"
REQUIRED_METRICS = ("test_acc", "train_acc", "test_loss", "train_loss", "epoch", "run_id", "seed")
STRING_DTYPE = "S64"
#: how many times its share of the file a filtered (compressed) chunked dataset may declare:
#: gzip/deflate cannot exceed ~1032:1, so a larger declared size is a corrupt or forged shape
MAX_COMPRESSION_RATIO = 1000


class ZooFormatError(ValueError):
    """A file that is not a readable metanet zoo (truncated, foreign, inconsistent); the message
    names the file."""


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _column(name: str, value: Any, rows: int, where: str) -> np.ndarray:
    """A metric/hparam column as a numpy array of ``rows`` numbers or fixed-length bytes."""
    arr = _to_numpy(value)
    if arr.ndim != 1 or arr.shape[0] != rows:
        raise ValueError(f"{where} '{name}' has shape {arr.shape}, expected ({rows},)")
    if arr.dtype.kind in "US" or arr.dtype == object:
        enc = [s if isinstance(s, bytes) else str(s).encode() for s in arr.tolist()]
        if any(len(s) > int(STRING_DTYPE[1:]) for s in enc):
            raise ValueError(f"{where} '{name}': strings longer than {STRING_DTYPE[1:]} bytes")
        return np.array(enc, dtype=STRING_DTYPE)
    if arr.dtype.kind == "b":
        return arr.astype(np.int8)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    raise ValueError(f"{where} '{name}' has unsupported dtype {arr.dtype}")


def _chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Records per HDF5 chunk: about 64 KiB per chunk, 1..1024 records."""
    per_record = max(1, int(np.prod(shape)) * itemsize)
    return int(min(1024, max(1, 65536 // per_record)))


def _append(group: h5py.Group, name: str, data: np.ndarray, compress: bool) -> None:
    if name in group:
        ds = group[name]
        if ds.shape[1:] != data.shape[1:] or ds.dtype != data.dtype:
            raise ValueError(
                f"'{group.name}/{name}': cannot append {data.dtype}{list(data.shape[1:])} to "
                f"{ds.dtype}{list(ds.shape[1:])}"
            )
        n = ds.shape[0]
        ds.resize(n + data.shape[0], axis=0)
        ds[n:] = data
        return
    kwargs: dict[str, Any] = {}
    if compress and data.ndim > 1:
        kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    group.create_dataset(
        name,
        data=data,
        maxshape=(None, *data.shape[1:]),
        chunks=(_chunk_rows(data.shape[1:], data.dtype.itemsize), *data.shape[1:]),
        **kwargs,
    )


class ZooWriter:
    """Write a zoo file atomically: records go to a temporary file that replaces ``path`` on
    :meth:`close` (or on leaving the ``with`` block without an exception; on an exception the
    temporary file is deleted and ``path`` is untouched).

    Example::

        with ZooWriter("zoo.h5", attrs={"name": "toy"}) as w:
            w.add(arch, params={"0.weight": w0 [R, 32, 64], ...},
                  metrics={"test_acc": [R], ...}, hparams={"lr": [R]})
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None) -> None:
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=folder
        )
        os.close(fd)
        self._file: h5py.File | None = h5py.File(self._tmp, "w")
        self._file.attrs[FORMAT_ATTR] = FORMAT_VERSION
        for key, value in (attrs or {}).items():
            self._file.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(
                value
            )

    def add(
        self,
        arch: Mapping[str, Any],
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        hparams: Mapping[str, Any] | None = None,
        compress: bool = True,
    ) -> None:
        """Append ``R`` records of ``arch``.

        Args:
            arch: arch dict (:mod:`metanet.zoo.architectures`); its group is created on first use.
            params: state_dict key -> ``[R, *shape]`` (tensor or array), every key of the module.
            metrics: name -> ``[R]``; must include :data:`REQUIRED_METRICS`.
            hparams: name -> ``[R]`` numbers or strings.
        """
        from metanet.zoo.architectures import arch_name, arch_to_json, has_weight_space

        if self._file is None:
            raise RuntimeError(f"ZooWriter for {self.path} is closed")
        name = arch_name(arch)
        arrays = {k: _to_numpy(v) for k, v in params.items()}
        if not arrays:
            raise ValueError(f"no parameters given for architecture '{name}'")
        rows = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if len(rows) != 1 or -1 in rows:
            raise ValueError(f"params of '{name}' disagree on the number of records: {rows}")
        (r,) = rows
        missing = [m for m in REQUIRED_METRICS if m not in metrics]
        if missing:
            raise ValueError(f"metrics for '{name}' lack {missing}")
        cols = {k: _column(k, v, r, "metric") for k, v in metrics.items()}
        hcols = {k: _column(k, v, r, "hparam") for k, v in (hparams or {}).items()}
        if name not in self._file:
            group = self._file.create_group(name)
            group.attrs["arch"] = arch_to_json(arch)
            group.attrs["keys"] = json.dumps(list(arrays))
            group.attrs["spec"] = _spec_json(arch) if has_weight_space(arch) else ""
            group.attrs["num_records"] = 0
            for sub in ("params", "metrics", "hparams"):
                group.create_group(sub)
        group = self._file[name]
        keys = json.loads(group.attrs["keys"])
        if sorted(keys) != sorted(arrays):
            raise ValueError(
                f"params of '{name}' have keys {sorted(arrays)}, the group has {sorted(keys)}"
            )
        for sub, cols_ in (("metrics", cols), ("hparams", hcols)):
            have = set(group[sub].keys())
            if group.attrs["num_records"] and have != set(cols_):
                raise ValueError(
                    f"{sub} of '{name}': got {sorted(cols_)}, group has {sorted(have)}"
                )
        for key in keys:
            data = arrays[key]
            data = data.astype(np.float32) if data.dtype.kind == "f" else data.astype(np.int64)
            _append(group["params"], key, data, compress=compress)
        for k, v in cols.items():
            _append(group["metrics"], k, v, compress=False)
        for k, v in hcols.items():
            _append(group["hparams"], k, v, compress=False)
        group.attrs["num_records"] = int(group.attrs["num_records"]) + r

    def set_attr(self, key: str, value: Any) -> None:
        """Set a root attribute (dicts/lists are stored as JSON)."""
        assert self._file is not None
        self._file.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value

    def close(self) -> None:
        """Finish the file and move it onto ``path`` atomically."""
        if self._file is None:
            return
        self._file.flush()
        self._file.close()
        self._file = None
        with open(self._tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Drop everything written; ``path`` is untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> ZooWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _spec_json(arch: Mapping[str, Any]) -> str:
    from metanet.weightspace import WeightSpaceSpec
    from metanet.zoo.architectures import build_module

    return json.dumps(WeightSpaceSpec.from_module(build_module(arch)).to_dict())


def remove_stale_temporaries(dest: str | os.PathLike) -> None:
    """Delete the temporary files (``.<name>.*.tmp`` beside ``dest``) that a killed writer of
    ``dest`` left, so a rerun leaves no partial file behind (one writer per ``dest`` at once)."""
    dest_name = os.path.basename(os.fspath(dest))
    folder = os.path.dirname(os.path.abspath(dest))
    if os.path.isdir(folder):
        for stale in os.listdir(folder):
            if stale.startswith(f".{dest_name}.") and stale.endswith(".tmp"):
                os.remove(os.path.join(folder, stale))


def merge_zoos(
    sources: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Copy the records of zoo files ``sources`` (in order) into one new zoo file ``dest``
    (written atomically). Root attributes come from ``attrs`` (the first source's otherwise).

    The temporary files of an earlier merge into ``dest`` that was killed (``.<name>.*.tmp``
    beside it) are removed first, so a rerun leaves no partial file behind; two merges into the
    same ``dest`` at once are not supported."""
    if not sources:
        raise ValueError("merge_zoos needs at least one source file")
    remove_stale_temporaries(dest)
    zoos = [Zoo.open(s) for s in sources]
    root = dict(attrs) if attrs is not None else zoos[0].attrs
    with ZooWriter(dest, attrs=root) as writer:
        for zoo in zoos:
            for name in zoo.architectures:
                g = zoo[name]
                if len(g) == 0:
                    continue
                # read once and converted once by the writer: twice the group in memory
                g._check_read("params", len(g), copies=2.0)
                writer.add(g.arch, g.params(), g.metrics, g._raw_hparams())
    for z in zoos:
        z.close()


def write_virtual_zoo(
    dest: str | os.PathLike,
    shards: Sequence[str | os.PathLike],
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write ``dest`` as a zoo of HDF5 virtual datasets concatenating the zoo files ``shards``.

    Shard paths are stored relative to ``dest``'s folder. Every shard must be a complete zoo; an
    architecture may be missing from some shards. Written atomically like :class:`ZooWriter`
    (temporaries of a killed earlier write are removed first).
    """
    dest = os.fspath(dest)
    remove_stale_temporaries(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    zoos = [Zoo.open(s) for s in shards]
    if not zoos:
        raise ValueError("write_virtual_zoo needs at least one shard")
    names: list[str] = []
    for z in zoos:
        names += [n for n in z.architectures if n not in names]
    writer = ZooWriter(dest, attrs=dict(attrs) if attrs is not None else zoos[0].attrs)
    try:
        f = writer._file
        assert f is not None
        for name in names:
            parts = [(z, z[name]) for z in zoos if name in z.architectures and len(z[name])]
            if not parts:
                continue
            first = parts[0][1]
            total = sum(len(g) for _, g in parts)
            group = f.create_group(name)
            for key in ("arch", "keys", "spec"):
                group.attrs[key] = first._group().attrs[key]
            group.attrs["num_records"] = total
            for sub in ("params", "metrics", "hparams"):
                group.create_group(sub)
                columns = list(first._group()[sub].keys())
                for z, g in parts:
                    if sorted(g._group()[sub].keys()) != sorted(columns):
                        raise ZooFormatError(
                            f"shard {z.path}: {sub} of '{name}' differ from {first.path}"
                        )
                for col in columns:
                    ref = first._group()[sub][col]
                    layout = h5py.VirtualLayout(shape=(total, *ref.shape[1:]), dtype=ref.dtype)
                    offset = 0
                    for z, g in parts:
                        ds = g._group()[sub][col]
                        if ds.shape[1:] != ref.shape[1:] or ds.dtype != ref.dtype:
                            raise ZooFormatError(f"shard {z.path}: '{name}/{sub}/{col}' differs")
                        n = len(g)
                        rel = os.path.relpath(os.path.abspath(z.path), folder)
                        layout[offset : offset + n] = h5py.VirtualSource(
                            rel, ds.name, shape=ds.shape
                        )[:n]
                        offset += n
                    group[sub].create_virtual_dataset(col, layout)
    except BaseException:
        writer.abort()
        raise
    finally:
        for z in zoos:
            z.close()
    writer.close()


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def check_declared_size(ds: h5py.Dataset, path: str, file_bytes: int | None = None) -> int:
    """Refuse a dataset whose declared shape the file cannot hold; return its declared bytes.

    Nothing is read. Contiguous (and compact) datasets and chunked ones without filters store
    every element, so their ``shape x itemsize`` must fit in ``file_bytes``; filtered
    (compressed) and virtual datasets may declare up to :data:`MAX_COMPRESSION_RATIO` times it.

    Args:
        ds: an open dataset.
        path: the file, for the message.
        file_bytes: bytes that can back the dataset (default ``os.path.getsize(path)``; for a
            virtual zoo, the file plus its shards).

    Raises:
        ZooFormatError: ``"<file>: dataset '<name>' declares shape (...) <dtype> (<size>), ..."``.
    """
    declared = tensor_bytes(ds.shape, ds.dtype) if ds.shape is not None else 0
    size = os.path.getsize(path) if file_bytes is None else int(file_bytes)
    if ds.is_virtual:
        ratio, how = MAX_COMPRESSION_RATIO, f"{MAX_COMPRESSION_RATIO}x its shard files"
    elif ds.chunks is not None and ds.id.get_create_plist().get_nfilters() > 0:
        ratio, how = MAX_COMPRESSION_RATIO, f"{MAX_COMPRESSION_RATIO}x compression"
    else:
        ratio, how = 1, "uncompressed"
    if declared > ratio * size:
        raise ZooFormatError(
            f"{path}: dataset '{ds.name}' declares shape {tuple(ds.shape)} {ds.dtype} "
            f"({format_bytes(declared)}), more than the {format_bytes(size)} file can hold "
            f"({how}); the file is corrupt or forged"
        )
    return declared


class ZooGroup:
    """The records of one architecture in a zoo (lazy: parameters are read on demand).

    Attributes:
        name: the group name (:func:`metanet.zoo.architectures.arch_name`).
        arch: arch dict for :func:`metanet.zoo.architectures.build_module`.
        spec: the :class:`WeightSpaceSpec`, or ``None`` for archs with norm layers / residuals.
        keys: state_dict keys stored per record.
    """

    def __init__(self, zoo: Zoo, name: str) -> None:
        self.zoo = zoo
        self.name = name
        g = self._group()
        try:
            self.arch: dict[str, Any] = json.loads(g.attrs["arch"])
            self.keys: list[str] = json.loads(g.attrs["keys"])
            spec = g.attrs["spec"]
            self._num = int(g.attrs["num_records"])
        except (KeyError, ValueError) as err:
            raise ZooFormatError(
                f"{zoo.path}: group '{name}' lacks valid attributes ({err})"
            ) from None
        self._spec_json = spec if isinstance(spec, str) else spec.decode()
        self._spec = None
        self._metrics: dict[str, np.ndarray] | None = None
        self._hparams: dict[str, np.ndarray] | None = None
        # bytes of one record of every column, per sub-group (shapes are fixed once written)
        self._row_bytes: dict[str, dict[str, int]] = {"params": {}, "metrics": {}, "hparams": {}}
        for sub in ("params", "metrics", "hparams"):
            if sub not in g:
                raise ZooFormatError(f"{zoo.path}: group '{name}' has no '{sub}' group")
        for key in self.keys:
            if key not in g["params"]:
                raise ZooFormatError(f"{zoo.path}: group '{name}' has no parameter '{key}'")
        for sub in ("params", "metrics", "hparams"):
            for col, ds in g[sub].items():
                if not isinstance(ds, h5py.Dataset) or not ds.shape:
                    raise ZooFormatError(
                        f"{zoo.path}: '{name}/{sub}/{col}' is not a dataset with a record axis"
                    )
                check_declared_size(ds, zoo.path, zoo._backing_bytes)
                self._row_bytes[sub][col] = tensor_bytes(ds.shape[1:], ds.dtype)
                if ds.shape[0] < self._num:
                    raise ZooFormatError(
                        f"{zoo.path}: '{name}/{sub}/{col}' has {ds.shape[0]} records, "
                        f"expected {self._num} (truncated file?)"
                    )
        for m in REQUIRED_METRICS:
            if m not in g["metrics"]:
                raise ZooFormatError(f"{zoo.path}: group '{name}' has no metric '{m}'")

    @property
    def path(self) -> str:
        return self.zoo.path

    def _group(self) -> h5py.Group:
        return self.zoo._handle()[self.name]

    @property
    def record_bytes(self) -> int:
        """Bytes of one record's parameters (all state_dict entries) once read."""
        return sum(self._row_bytes["params"][k] for k in self.keys)

    def _check_read(self, sub: str, records: int, copies: float = 1.0) -> None:
        """Refuse reading ``records`` rows of every column of ``sub`` past the memory limit."""
        row = self._row_bytes[sub]
        columns = self.keys if sub == "params" else list(row)
        sizes = [row[c] * records for c in columns]
        # the largest column is held twice while it is put in request order
        estimate = sum(sizes) * copies + max(sizes, default=0)
        check_memory(
            estimate, f"{self.path}: reading {sub} of {records:,} records of '{self.name}'"
        )

    def __len__(self) -> int:
        return self._num

    def __repr__(self) -> str:
        return f"ZooGroup({self.name!r}, records={self._num})"

    @property
    def spec(self):
        """The WeightSpaceSpec of the group (``None`` when networks are graph-only)."""
        if self._spec is None and self._spec_json:
            from metanet.weightspace import WeightSpaceSpec

            self._spec = WeightSpaceSpec.from_dict(json.loads(self._spec_json))
        return self._spec

    def _rows(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique rows to read and the positions that put them back in request order."""
        idx = record_indices(indices, self._num, self.name)
        rows, inverse = np.unique(idx, return_inverse=True)
        return rows, inverse

    def params(self, indices: Any = None) -> dict[str, torch.Tensor]:
        """Stacked state_dict entries ``{key: [k, *shape]}`` of records ``indices`` (all: None)."""
        rows, inverse = self._rows(indices)
        self._check_read("params", int(inverse.size))
        params = self._group()["params"]
        out = {}
        for key in self.keys:
            ds = params[key]
            if rows.size == 0:
                data = np.zeros((0, *ds.shape[1:]), dtype=ds.dtype)
            elif rows.size == rows[-1] - rows[0] + 1:
                data = ds[int(rows[0]) : int(rows[-1]) + 1]
            else:
                data = ds[rows]
            out[key] = torch.from_numpy(np.ascontiguousarray(data[inverse]))
        return out

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The full state_dict of record ``index`` (loads into ``build_module(self.arch)``)."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"state_dict needs an int index, got {type(index).__name__}")
        return {k: v[0] for k, v in self.params([int(index)]).items()}

    def module(self, index: int) -> nn.Module:
        """A fresh module of the group's arch with record ``index`` loaded, in eval mode."""
        from metanet.zoo.architectures import build_module

        module = build_module(self.arch)
        module.load_state_dict(self.state_dict(index))
        return module.eval()

    def weight_space(self, indices: Any = None):
        """Records ``indices`` (default: all) as a :class:`WeightSpace` (batch in request order).

        Raises:
            ZooFormatError: the architecture has no weight space (norm layers / residuals).
        """
        spec = self.spec
        if spec is None:
            raise ZooFormatError(
                f"{self.path}: '{self.name}' has norm layers or residual blocks and no weight "
                "space; read it as graphs (metanet.graph) via .module(i) / .state_dict(i)"
            )
        from metanet.weightspace import WeightSpace

        return WeightSpace.from_stacked_params(self.params(indices), spec)

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """name -> ``[len(self)]`` array (read once, then cached)."""
        if self._metrics is None:
            self._check_read("metrics", self._num)
            g = self._group()["metrics"]
            self._metrics = {k: ds[: self._num] for k, ds in g.items()}
        return self._metrics

    def _raw_hparams(self) -> dict[str, np.ndarray]:
        self._check_read("hparams", self._num)
        g = self._group()["hparams"]
        return {k: ds[: self._num] for k, ds in g.items()}

    @property
    def hparams(self) -> dict[str, np.ndarray]:
        """name -> ``[len(self)]`` array (strings decoded to ``str``; cached)."""
        if self._hparams is None:
            out = {}
            for k, v in self._raw_hparams().items():
                out[k] = v.astype(str) if v.dtype.kind == "S" else v
            self._hparams = out
        return self._hparams


class Zoo:
    """A zoo file opened for reading: ``zoo.architectures``, ``zoo[name] -> ZooGroup``.

    Satisfies :class:`metanet.data.zoo_protocol.ZooLike` (its groups ``ZooGroupLike``), like the
    readers' in-memory zoos.

    The HDF5 handle is opened lazily and once per process, so a Zoo can be used by several
    ``DataLoader`` workers; pickling keeps only the path.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._fh: h5py.File | None = None
        self._pid: int | None = None
        f = self._handle()
        version = f.attrs.get(FORMAT_ATTR)
        if version is None:
            self.close()
            raise ZooFormatError(
                f"{self.path} is an HDF5 file but not a metanet zoo (no '{FORMAT_ATTR}' attribute)"
            )
        if int(version) > FORMAT_VERSION:
            self.close()
            raise ZooFormatError(
                f"{self.path} has zoo format {int(version)}; this metanet reads <= {FORMAT_VERSION}"
            )
        self._backing_bytes = os.path.getsize(self.path) + self._check_virtual_sources(f)
        try:
            self._groups = {name: ZooGroup(self, name) for name in f.keys()}
        except Exception:
            self.close()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike) -> Zoo:
        """Open a zoo file (metadata only; parameters are read on demand).

        Raises:
            FileNotFoundError: no such file.
            ZooFormatError: not HDF5, truncated, not a metanet zoo, missing shard files, an
                inconsistent group, or a dataset whose declared shape the file cannot hold (see
                :func:`check_declared_size`); the message names the file.
        """
        return cls(path)

    def _handle(self) -> h5py.File:
        pid = os.getpid()
        if self._fh is None or self._pid != pid:
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"zoo file {self.path} does not exist")
            try:
                self._fh = h5py.File(self.path, "r", locking=False)
            except OSError as err:
                raise ZooFormatError(
                    f"{self.path} cannot be read as an HDF5 zoo (truncated or not HDF5): {err}"
                ) from None
            self._pid = pid
        return self._fh

    def _check_virtual_sources(self, f: h5py.File) -> int:
        """Check that every shard of a virtual zoo exists and is a zoo; their total bytes."""
        folder = os.path.dirname(os.path.abspath(self.path))
        seen: set[str] = set()
        total = [0]

        def visit(_name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                for src in obj.virtual_sources():
                    if src.file_name in seen or src.file_name == ".":
                        continue
                    seen.add(src.file_name)
                    full = os.path.join(folder, src.file_name)
                    if not os.path.exists(full):
                        raise ZooFormatError(f"{self.path}: shard file {full} is missing")
                    total[0] += os.path.getsize(full)
                    try:
                        with h5py.File(full, "r", locking=False) as sf:
                            if FORMAT_ATTR not in sf.attrs:
                                raise ZooFormatError(f"{self.path}: shard {full} is not a zoo")
                    except OSError as err:
                        raise ZooFormatError(
                            f"{self.path}: shard file {full} is unreadable: {err}"
                        ) from None

        f.visititems(visit)
        return total[0]

    @property
    def architectures(self) -> list[str]:
        """Group names (one per architecture), in file order."""
        return list(self._groups)

    def __getitem__(self, name: str | ZooGroup) -> ZooGroup:
        if isinstance(name, ZooGroup):
            name = name.name
        if name not in self._groups:
            raise KeyError(f"{self.path} has no architecture '{name}'; has {self.architectures}")
        return self._groups[name]

    def __contains__(self, name: str) -> bool:
        return name in self._groups

    def __len__(self) -> int:
        """Total number of records over all architectures."""
        return sum(len(g) for g in self._groups.values())

    def __iter__(self) -> Iterator[ZooGroup]:
        return iter(self._groups.values())

    def groups(self) -> list[ZooGroup]:
        return list(self._groups.values())

    def iter_records(self) -> Iterator[tuple[str, int]]:
        """``(group name, index)`` for every record of every architecture."""
        for name, g in self._groups.items():
            for i in range(len(g)):
                yield name, i

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (``name``, ``data``, ``recipe``, ``fingerprint`` ...), JSON decoded."""
        out: dict[str, Any] = {}
        for k, v in self._handle().attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, str) and v[:1] in "{[":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            out[k] = v.item() if isinstance(v, np.generic) else v
        return out

    def close(self) -> None:
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fh"] = None
        state["_pid"] = None
        return state

    def __enter__(self) -> Zoo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Zoo({self.path!r}, {dict((n, len(g)) for n, g in self._groups.items())})"
