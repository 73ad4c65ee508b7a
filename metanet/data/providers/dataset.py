"""``provider: dataset`` - any map-style ``torch.utils.data.Dataset``, by import path.

Keys: ``class_path`` (``pkg.mod.Class`` or ``pkg.mod:Class``), ``init_args`` (constructor keyword
arguments), optional ``test:`` / ``val:`` sub-configs of the same form (a missing ``class_path``
there means the same class, and their ``init_args`` update the top-level ones), ``stream``
(false: read every item into tensors once; true: read items on demand) and the shared split keys
of :mod:`metanet.data.providers`.

Items are ``(x, y)`` pairs; ``x`` a tensor, a numpy array or a PIL image (-> float CHW in [0, 1]),
``y`` an int label or a number / vector target. With ``stream: true`` the labels are taken from
``dataset.targets`` where the class has them (torchvision's do), else read item by item.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from metanet.data.providers.assemble import Part, SplitOptions, assemble_task, pil_to_tensor
from metanet.data.providers.assemble import to_float_x as _to_float_x
from metanet.data.providers.config import ProviderConfig, check_fits_memory
from metanet.data.tasks import LazyArray, TaskData, register_provider

__all__ = ["dataset_provider", "import_class"]

_PROGRESS_MIN_ITEMS = 1000


def import_class(path: str) -> Any:
    """The object at ``"pkg.mod.Class"`` or ``"pkg.mod:Class"`` (ImportError/AttributeError)."""
    if "." not in path and ":" not in path:
        raise ValueError(f"{path!r} is not an import path like pkg.mod.Class")
    if ":" in path:
        module_name, _, attrs = path.partition(":")
        obj = importlib.import_module(module_name)
        names = attrs.split(".")
    else:
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:cut])
            try:
                obj = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                missing = err.name or ""
                if module_name != missing and not module_name.startswith(missing + "."):
                    raise  # the module exists but an import inside it failed
                continue
            names = parts[cut:]
            break
        else:
            raise ModuleNotFoundError(f"No module named {parts[0]!r}")
    for name in names:
        obj = getattr(obj, name)
    return obj


def _instantiate(cfg: ProviderConfig, class_path: str, init_args: dict[str, Any]) -> Any:
    try:
        cls = import_class(class_path)
    except (ImportError, AttributeError, ValueError) as err:
        raise cfg.error("class_path", f"cannot import: {type(err).__name__}: {err}",
                        class_path) from None  # fmt: skip
    if not callable(cls):
        raise cfg.error("class_path", "is not a class", class_path)
    try:
        dataset = cls(**init_args)
    except Exception as err:  # noqa: BLE001 - a user's constructor may raise anything
        raise cfg.error("init_args", f"constructor raised {type(err).__name__}: {err}",
                        class_path) from None  # fmt: skip
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        raise cfg.error("class_path", "is not a map-style Dataset (needs len() and indexing)",
                        class_path)  # fmt: skip
    return dataset


def _as_x(obj: Any) -> torch.Tensor:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _to_float_x(obj)
    if hasattr(obj, "mode") and hasattr(obj, "getbands"):  # a PIL image
        return pil_to_tensor(obj)
    raise TypeError(f"x is a {type(obj).__name__}; expected a tensor, numpy array or PIL image")


def _as_y(obj: Any) -> torch.Tensor:
    if isinstance(obj, (str, bytes)) or obj is None:
        raise TypeError(f"y is a {type(obj).__name__}; expected a number or a tensor")
    return torch.as_tensor(np.asarray(obj.numpy() if isinstance(obj, torch.Tensor) else obj))


class _Items:
    """Reads ``(x, y)`` items of one dataset, with errors naming the config key and class."""

    def __init__(self, cfg: ProviderConfig, class_path: str, dataset: Any, stream_key: str) -> None:
        self.cfg, self.key, self.where, self.dataset = cfg, "class_path", class_path, dataset
        self.stream_key = stream_key
        self.n = len(dataset)

    def fail(self, why: str) -> Exception:
        return self.cfg.error(self.key, why, self.where)

    def item(self, i: int) -> tuple[Any, Any]:
        try:
            item = self.dataset[i]
        except Exception as err:  # noqa: BLE001 - a user's __getitem__ may raise anything
            raise self.fail(f"reading item {i} raised {type(err).__name__}: {err}") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise self.fail(f"item {i} is a {type(item).__name__}, not an (x, y) pair")
        return item

    def x(self, i: int, raw: Any, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        try:
            x = _as_x(raw)
        except TypeError as err:
            raise self.fail(f"item {i}: {err}") from None
        if shape is not None and tuple(x.shape) != shape:
            raise self.fail(f"samples of different shapes: item {i} has {tuple(x.shape)}, "
                            f"item 0 {shape}")  # fmt: skip
        return x

    def y(self, i: int, raw: Any) -> torch.Tensor:
        try:
            return _as_y(raw)
        except (TypeError, ValueError, RuntimeError) as err:
            raise self.fail(f"item {i}: {err}") from None

    def stack_y(self, ys: list[torch.Tensor]) -> torch.Tensor:
        shapes = {tuple(y.shape) for y in ys}
        if len(shapes) != 1:
            raise self.fail(f"targets of different shapes: {sorted(shapes)}")
        return torch.from_numpy(np.stack([y.numpy() for y in ys]))

    def targets(self) -> torch.Tensor | None:
        """``dataset.targets`` as labels, where it lists one per item unchanged by a transform."""
        targets = getattr(self.dataset, "targets", None)
        if targets is None or getattr(self.dataset, "target_transform", None) is not None:
            return None
        try:
            if len(targets) != self.n:
                return None
            return torch.as_tensor(np.asarray(targets))
        except (TypeError, ValueError, RuntimeError):
            return None

    def progress(self, what: str):
        from tqdm.auto import tqdm

        return tqdm(range(self.n), desc=f"{what} {self.where}", unit="item",
                    disable=self.n <= _PROGRESS_MIN_ITEMS, dynamic_ncols=True)  # fmt: skip


def _first_x(items: _Items) -> torch.Tensor:
    if items.n == 0:
        raise items.fail("the dataset is empty (0 items)")
    return items.x(0, items.item(0)[0])


def _materialize(items: _Items) -> Part:
    first = _first_x(items)
    shape = tuple(first.shape)
    check_fits_memory(items.n * first.numel() * 4, items.cfg, items.key, items.where,
                      f"set {items.stream_key}: true")  # fmt: skip
    x = torch.empty((items.n, *shape))
    ys = []
    for i in items.progress("reading"):
        xi, yi = items.item(i)
        x[i] = items.x(i, xi, shape)
        ys.append(items.y(i, yi))
    return Part(x, items.stack_y(ys), items.key, items.where)


def _stream(items: _Items) -> Part:
    shape = tuple(_first_x(items).shape)

    def read(rows: np.ndarray) -> torch.Tensor:
        return torch.stack([items.x(int(i), items.item(int(i))[0], shape) for i in rows])

    lazy = LazyArray((items.n, *shape), read, f"{items.cfg.key(items.key)} ({items.where})")
    y = items.targets()
    if y is None:
        y = items.stack_y([items.y(i, items.item(i)[1]) for i in items.progress("labels of")])
    return Part(lazy, y, items.key, items.where)


def _class_names(dataset: Any) -> tuple[str, ...] | None:
    """``dataset.classes`` where it is a list of names (torchvision's are), else ``None``."""
    names = getattr(dataset, "classes", None)
    if isinstance(names, (list, tuple)) and names and all(isinstance(c, str) for c in names):
        return tuple(names)
    return None


def _class_path(cfg: ProviderConfig, default: str | None = None) -> str:
    """``class_path`` in its dotted form (``pkg.mod:Class`` -> ``pkg.mod.Class``)."""
    path = cfg.text("class_path", default, required=True).replace(":", ".")
    cfg.resolved["class_path"] = path
    return path


def _sub_source(cfg: ProviderConfig, name: str, class_path: str, init_args: dict[str, Any]):
    sub = cfg.sub(name)
    if sub is None:
        return None
    sub_path = _class_path(sub, class_path)
    sub_args = sub.mapping("init_args") or {}
    if sub_path == class_path:
        sub_args = {**init_args, **sub_args}
        sub.resolved["init_args"] = sub_args
    return sub, sub_path, sub_args


@register_provider("dataset")
def dataset_provider(cfg: ProviderConfig) -> TaskData:
    """Read a user's Dataset class (and its test / val counterparts) into a task."""
    class_path = _class_path(cfg)
    init_args = cfg.mapping("init_args") or {}
    sources = {"train": (cfg, class_path, init_args)}
    for name in ("test", "val"):
        sub = _sub_source(cfg, name, class_path, init_args)
        if sub is not None:
            sources[name] = sub
    stream = cfg.flag("stream", False)
    options = SplitOptions.read(cfg)
    cfg.finish()
    parts, classes = {}, None
    for name, (sub, path, args) in sources.items():
        dataset = _instantiate(sub, path, args)
        items = _Items(sub, path, dataset, cfg.key("stream"))
        parts[name] = _stream(items) if stream else _materialize(items)
        parts[name].key = "class_path" if sub is cfg else f"{name}.class_path"
        if name == "train" and options.target_kind != "regression":
            classes = _class_names(dataset)
    return assemble_task(cfg, class_path.rsplit(".", 1)[-1], parts, options, classes=classes)
