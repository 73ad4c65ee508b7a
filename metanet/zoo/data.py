"""The data a zoo's networks train on: a recipe's ``data:`` key, read by :mod:`metanet.data.tasks`.

A recipe names its data as any task-data provider (``digits``, a ``Dataset`` class path, tensor
files, an image folder, ...)::

    data: {provider: dataset, class_path: mypackage.data:Glyphs, init_args: {size: 28},
           test_fraction: 0.2}

The old digits form (``data: {split_seed: 0, test_fraction: 0.25}``, no ``provider``) reads as
before and is stored as before, so the fingerprints of existing digits zoos do not change. Any
other provider is stored as its normalized config plus the data's fingerprint
(:meth:`metanet.data.tasks.TaskData.fingerprint`): a zoo resumed after the data changed on disk
is refused instead of mixing networks trained on two data sets.

SIREN recipes add ``train_images`` / ``test_images`` (how many images of each split get an
INR) to the same mapping.

The sizes of the recipe's architectures that follow from the data are filled in from it
(:func:`fill_arch_from_data`): an MLP's ``in``/``out``, a CNN's ``in_channels``/``input_size``/
``out``, a user module's ``input_shape``, a SIREN's ``in``/``out``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from metanet.data.tasks import TaskData, TaskDataError, load_task_data
from metanet.zoo.architectures import TRUST_ENV, is_trusted, module_of, trust_code

LEGACY_DIGITS_KEYS = ("split_seed", "test_fraction")
SIREN_COUNT_KEYS = ("train_images", "test_images")
Fail = Callable[[str, str], Exception]


def normalize_data(raw: Any, kind: str, fail: Fail) -> dict[str, Any]:
    """The ``data:`` entry of a recipe as the zoo stores it (plain, part of its fingerprint).

    Raises (through ``fail(key, why)``): an unknown key of the digits form, an impossible value,
    or data the provider cannot read (the provider's one-line message).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, (Mapping, str)):
        raise fail("data", "must be a provider name or a mapping")
    raw = dict(raw) if isinstance(raw, Mapping) else raw
    counts: dict[str, Any] = {}
    if kind == "siren" and isinstance(raw, dict):
        counts = {k: raw.pop(k) for k in SIREN_COUNT_KEYS if k in raw}
    if isinstance(raw, dict) and "provider" not in raw:
        data = _legacy_digits(raw, fail)
    else:
        trust_code(*(module_of(c) or c for c in class_paths(raw)))  # the user's own code
        try:
            task = load_task_data(raw)
        except TaskDataError as err:
            raise fail("data", str(err)) from None
        data = {"dataset": task.name, "provider": _plain(task.config), "fingerprint":
                task.fingerprint()}  # fmt: skip
    if kind == "siren":
        for key in SIREN_COUNT_KEYS:
            value = counts.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise fail(f"data.{key}", f"must be an integer >= 0 (got {value!r})")
            data[key] = value
        if data["train_images"] + data["test_images"] == 0:
            raise fail("data.train_images", "a siren zoo needs at least one image")
    return data


def _legacy_digits(raw: dict[str, Any], fail: Fail) -> dict[str, Any]:
    bad = sorted(set(raw) - set(LEGACY_DIGITS_KEYS))
    if bad:
        raise fail(f"data.{bad[0]}", f"unknown key (the digits form allows "
                   f"{list(LEGACY_DIGITS_KEYS)}; other data needs a 'provider:')")  # fmt: skip
    data = {"split_seed": raw.get("split_seed", 0), "test_fraction": raw.get("test_fraction", 0.25)}
    if not isinstance(data["split_seed"], int) or data["split_seed"] < 0:
        raise fail("data.split_seed", f"must be an integer >= 0 (got {data['split_seed']!r})")
    tf = data["test_fraction"]
    if not isinstance(tf, (int, float)) or isinstance(tf, bool) or not 0 < tf < 1:
        raise fail("data.test_fraction", f"must be in (0, 1) (got {tf!r})")
    data["dataset"] = "digits"
    return data


def _plain(config: Any) -> Any:
    """``config`` as JSON-able plain data (tuples to lists), for YAML and HDF5 attributes."""
    return json.loads(json.dumps(config, default=str))


def recipe_task(data: Mapping[str, Any]) -> TaskData:
    """The :class:`TaskData` of a stored recipe ``data`` entry, read once per process.

    Raises:
        TaskDataError: the data cannot be read, or its fingerprint is not the one recorded (the
            data changed since the recipe was read; the message names both fingerprints).
    """
    return _recipe_task(json.dumps(dict(data), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _recipe_task(key: str) -> TaskData:
    data = json.loads(key)
    if "provider" not in data:
        return load_task_data({"provider": "digits", "split_seed": data["split_seed"],
                               "test_fraction": data["test_fraction"]})  # fmt: skip
    untrusted = [c for c in class_paths(data["provider"]) if not is_trusted(c)]
    if untrusted:
        raise TaskDataError(
            f"data.class_path ({untrusted[0]}): user code named in a file is imported only when "
            f"trusted: set {TRUST_ENV}={untrusted[0].split('.')[0].split(':')[0]} or call "
            "metanet.zoo.architectures.trust_code(...)"
        )
    task = load_task_data(data["provider"])
    if data.get("fingerprint") and task.fingerprint() != data["fingerprint"]:
        raise TaskDataError(
            f"data ({task.name}): its fingerprint is {task.fingerprint()[:16]}, the recipe was "
            f"read with {str(data['fingerprint'])[:16]}: the data changed on disk"
        )
    return task


def class_paths(config: Any) -> list[str]:
    """Every ``class_path`` value in a (nested) data config."""
    if isinstance(config, Mapping):
        own = [config["class_path"]] if isinstance(config.get("class_path"), str) else []
        return own + [c for v in config.values() for c in class_paths(v)]
    if isinstance(config, list):
        return [c for v in config for c in class_paths(v)]
    return []


def in_memory(split: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors of a split (a lazy split is read into memory, within the limit)."""
    x, y = split
    if not isinstance(x, torch.Tensor):
        from metanet.limits import check_memory

        check_memory(math.prod(x.shape) * 4, f"the {where} split of the zoo's data")
        x = x.materialize()
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    return x, y


def fits_in_memory(x: Any) -> bool:
    """Whether the inputs ``x`` of a split (a tensor, or a lazy array read from disk) fit in
    memory within metanet's limit (a tensor is in memory already)."""
    if isinstance(x, torch.Tensor):
        return True
    from metanet.limits import memory_limit_bytes

    return math.prod(x.shape) * 4 <= memory_limit_bytes()


def streamed(split: Any, where: str) -> tuple[Any, torch.Tensor]:
    """``(x, y)`` of a split for a job that can stream its inputs: ``x`` read into memory when
    it fits (faster), else left on disk as the split's :class:`~metanet.data.tasks.LazyArray`
    (the job reads the rows it needs); ``y`` is always a tensor."""
    x, y = split
    if fits_in_memory(x):
        return in_memory(split, where)
    return x, (y if isinstance(y, torch.Tensor) else torch.as_tensor(y))


def streams(task: TaskData) -> bool:
    """Whether a job that streams would stream ``task`` (some split's inputs do not fit in
    memory, see :func:`streamed`): such jobs then train with engines that read rows on demand."""
    return any(not fits_in_memory(split.x) for split in task.splits.values())


def check_stream_batch(rows: int, x: Any, what: str) -> None:
    """Raise :class:`~metanet.limits.MemoryLimitError` (one line) when ``rows`` samples of the
    streamed inputs ``x`` (``what``: the job's batch, for the message) do not fit in memory:
    streaming cannot go below one batch."""
    from metanet.limits import check_memory

    check_memory(rows * math.prod(x.shape[1:]) * 4, f"{what} ({rows} samples of {x.where})")


def stream_rows(x: Any, max_bytes: int = 1 << 26) -> int:
    """Samples per chunk when a job reads the streamed inputs ``x`` in order (evaluation): at
    most ``max_bytes`` and an eighth of the memory limit per chunk, at least one sample."""
    from metanet.limits import memory_limit_bytes

    budget = min(max_bytes, memory_limit_bytes() // 8)
    return max(1, budget // max(1, math.prod(x.shape[1:]) * 4))


# ------------------------------------------------------------------------------------------------
# architectures sized from the data
# ------------------------------------------------------------------------------------------------
def expand_module_choices(arch: Mapping[str, Any], fail: Fail, where: str) -> list[dict]:
    """A user-module arch whose ``init_args`` hold ``{choice: [...]}`` values, expanded into one
    arch per combination (each is its own HDF5 group); other archs are returned as they are."""
    arch = dict(arch)
    args = arch.get("init_args")
    if "class_path" not in arch or not isinstance(args, Mapping):
        return [arch]
    keys, options = [], []
    for key, value in args.items():
        if isinstance(value, Mapping) and len(value) == 1 and "choice" in value:
            values = value["choice"]
            if not isinstance(values, list) or not values:
                raise fail(f"{where}.init_args.{key}", "'choice' needs a non-empty list")
            keys.append(key)
            options.append(values)
        elif isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in (
            "uniform", "log_uniform", "int_uniform"
        ):  # fmt: skip
            raise fail(f"{where}.init_args.{key}", "only {choice: [...]} can vary an "
                       "architecture (each value is its own group of the zoo)")  # fmt: skip
    if not keys:
        return [arch]
    return [
        {**arch, "init_args": {**args, **dict(zip(keys, combo))}}
        for combo in itertools.product(*options)
    ]


def fill_arch_from_data(arch: Mapping[str, Any], task: TaskData, kind: str, fail: Fail,
                        where: str) -> dict[str, Any]:  # fmt: skip
    """``arch`` with the sizes that follow from the data filled in where the recipe left them
    out; a size the recipe gives that contradicts the data is an error naming the key."""
    from metanet.zoo.architectures import ArchError, normalize_arch

    raw = dict(arch)
    if "class_path" in raw and "type" not in raw:
        raw["type"] = "module"
    kind_of_arch = raw.get("type")
    shape = tuple(task.input_shape)
    sizes: dict[str, Any] = {}
    if kind == "siren":
        from metanet.data.providers.signals import signal_layout

        dims, channels = signal_layout(task)
        sizes = {"in": dims, "out": channels}
    elif kind_of_arch == "mlp":
        sizes = {"in": math.prod(shape), "out": task.num_classes}
    elif kind_of_arch == "cnn":
        if len(shape) != 3 or shape[1] != shape[2]:
            raise fail(f"{where}.type", f"a cnn arch needs square images [C, H, H]; the data's "
                       f"inputs are {list(shape)}")  # fmt: skip
        sizes = {"in_channels": shape[0], "input_size": shape[1], "out": task.num_classes}
    elif kind_of_arch == "module":
        sizes = {"input_shape": list(shape)}
    for key, value in sizes.items():
        if key not in raw:
            raw[key] = value
        elif raw[key] != value and not (key == "input_shape" and list(raw[key]) == value):
            raise fail(f"{where}.{key}", f"is {raw[key]!r}, but the data ({task.name}) needs "
                       f"{value!r}")  # fmt: skip
    try:
        return normalize_arch(raw)
    except ArchError as err:
        raise fail(where, str(err)) from None


def check_module_output(arch: Mapping[str, Any], task: TaskData, fail: Fail, where: str) -> None:
    """Build a user-module arch once and check it maps the data's inputs to one logit per class
    (``[batch, num_classes]``); errors name the recipe key and the class."""
    from metanet.zoo.architectures import ArchError, build_module

    try:
        module = build_module(arch).eval()
    except ArchError as err:
        raise fail(where, str(err)) from None
    x = torch.zeros(2, *task.input_shape)
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as err:  # noqa: BLE001 - the user's forward can raise anything
        raise fail(where, f"{arch['class_path']} fails on the data's inputs {list(x.shape)} "
                   f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                   ) from None  # fmt: skip
    want = (2, task.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise fail(where, f"{arch['class_path']} maps inputs {list(x.shape)} to {got}; a "
                   f"classifier of this data must give {list(want)}")  # fmt: skip
