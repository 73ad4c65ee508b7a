"""From the raw arrays a provider read to a checked :class:`~metanet.data.tasks.TaskData`.

* :func:`to_float_x` / :func:`pil_to_tensor` - the input conventions (float32, images CHW, PIL
  images and uint8 arrays scaled to [0, 1]).
* :func:`holdout` - a seeded (stratified for classes) split of sample indices.
* :func:`assemble_task` - checks every split (lengths, shapes, labels, NaN/inf, emptiness), infers
  the target kind and class count, carves missing test / val splits and builds the task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metanet.data.providers.config import ProviderConfig
from metanet.data.tasks import TARGET_KINDS, LazyArray, Split, TaskData

__all__ = [
    "DEFAULT_TEST_FRACTION",
    "Part",
    "SplitOptions",
    "assemble_task",
    "holdout",
    "is_grayscale_mode",
    "pil_to_tensor",
    "to_float_x",
]

DEFAULT_TEST_FRACTION = 0.2
_GRAY_MODES = ("L", "LA", "I", "I;16", "I;16L", "I;16B", "F")
_SALT = {"test": 0, "val": 1}


# ------------------------------------------------------------------------------------------------
# conversions
# ------------------------------------------------------------------------------------------------
def to_float_x(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Inputs as float32: uint8 scaled to [0, 1], other dtypes keep their values."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            return torch.from_numpy(x.astype(np.float32) / 255.0)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"arrays of dtype {x.dtype} are not numeric data")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if x.is_complex():
        raise TypeError(f"tensors of dtype {x.dtype} are not real data")
    return x.to(torch.float32)


def is_grayscale_mode(mode: str) -> bool:
    """Whether a PIL image mode has one intensity band (``LA``: alpha aside)."""
    return mode in _GRAY_MODES or mode == "1"


def pil_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image as a float32 CHW tensor in [0, 1] (16-bit images divided by 65535)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode not in _GRAY_MODES + ("RGB", "RGBA"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if arr.dtype == np.uint8:
        scale = 255.0
    elif image.mode.startswith("I"):
        scale = 65535.0
    else:
        scale = 1.0
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / scale)


# ------------------------------------------------------------------------------------------------
# splitting
# ------------------------------------------------------------------------------------------------
def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` spread over classes in proportion to ``counts`` (largest remainders first)."""
    exact = counts * total / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: total - int(quota.sum())]] += 1
    return quota


def holdout(
    y: torch.Tensor, fraction: float, seed: int, salt: int = 0, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``(kept, held)`` holding out ``ceil(fraction * N)`` samples.

    Seeded by ``(seed, salt)``; with ``stratify`` every label keeps its share (up to rounding).
    """
    n = int(y.shape[0])
    n_held = min(n, int(math.ceil(fraction * n)))
    rng = np.random.default_rng([seed, salt])
    if stratify:
        _, inverse, counts = np.unique(y.numpy(), return_inverse=True, return_counts=True)
        parts = [
            rng.permutation(np.flatnonzero(inverse == c))[:k]
            for c, k in enumerate(_quotas(counts, n_held))
        ]
        held = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    else:
        held = np.sort(rng.permutation(n)[:n_held])
    kept = np.setdiff1d(np.arange(n), held)
    return kept.astype(np.int64), held.astype(np.int64)


def _take(split: Split, idx: np.ndarray) -> Split:
    if isinstance(split.x, LazyArray):
        x = split.x.subset(idx)
    else:
        x = split.x.index_select(0, torch.from_numpy(idx))
    return Split(x, split.y.index_select(0, torch.from_numpy(idx)))


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One split as a provider read it, and where from (for error messages).

    ``key`` is the config key that named the data (``path``, ``test``, ``class_path``); ``where``
    the file or class (``None`` if the key says it all).
    """

    x: torch.Tensor | LazyArray
    y: torch.Tensor | np.ndarray
    key: str
    where: Any = None


@dataclass(frozen=True)
class SplitOptions:
    """The keys every pool-splitting provider shares; read them with :meth:`read`."""

    val_fraction: float
    test_fraction: float | None
    split_seed: int
    target_kind: str | None
    num_classes: int | None

    @classmethod
    def read(cls, cfg: ProviderConfig) -> SplitOptions:
        """``val_fraction`` (0), ``test_fraction`` (when no test split is given: 0.2),
        ``split_seed`` (0), ``target_kind`` (inferred) and ``num_classes`` (inferred)."""
        return cls(
            val_fraction=cfg.fraction("val_fraction", 0.0),
            test_fraction=cfg.fraction("test_fraction", None),
            split_seed=cfg.integer("split_seed", 0),
            target_kind=cfg.choice("target_kind", TARGET_KINDS),
            num_classes=cfg.integer("num_classes", None, minimum=1),
        )


def _check_y(cfg: ProviderConfig, part: Part, name: str, kind: str) -> torch.Tensor:
    y = torch.as_tensor(part.y)
    bad = lambda why: cfg.error(part.key, f"{name} split: {why}", part.where)  # noqa: E731
    if y.ndim == 0:
        raise bad("targets must have a sample dimension (got a scalar)")
    if y.is_complex() or (kind == "regression" and y.dtype == torch.bool):
        raise bad(f"targets must be real numbers (got {y.dtype})")
    return _regression_targets(y, bad) if kind == "regression" else _class_labels(y, bad)


def _regression_targets(y: torch.Tensor, bad) -> torch.Tensor:
    y = y.to(torch.float32)
    finite = torch.isfinite(y.reshape(y.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        raise bad(f"target of sample {int((~finite).nonzero()[0])} is NaN or inf")
    return y


def _class_labels(y: torch.Tensor, bad) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise bad(f"class labels must be [N] (got shape {tuple(y.shape)})")
    if y.dtype.is_floating_point:
        wrong = ~(torch.isfinite(y) & (y == torch.round(y)))
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0])
            raise bad(
                f"non-integer label {float(y[i])!r} at sample {i} for target_kind 'classes' "
                "(set data.target_kind: regression for real-valued targets)"
            )
    return y.to(torch.int64)


def _check_x(cfg: ProviderConfig, part: Part, name: str, n: int) -> None:
    bad = lambda why: cfg.error(part.key, f"{name} split: {why}", part.where)  # noqa: E731
    x = part.x
    if x.ndim < 1:
        raise bad("inputs must have a sample dimension (got a scalar)")
    if len(x) != n:
        raise bad(f"x has {len(x)} samples but y has {n}")
    if n == 0:
        raise bad("no samples (the split is empty)")
    if isinstance(x, LazyArray):
        return  # checked for NaN/inf on every read
    finite = torch.isfinite(x.reshape(n, -1)).all(dim=1)
    if not bool(finite.all()):
        raise bad(f"sample {int((~finite).nonzero()[0])} has NaN or inf values")


def _infer_kind(parts: Mapping[str, Part], given: str | None) -> str:
    if given is not None:
        return given
    y = torch.as_tensor(next(iter(parts.values())).y)
    return "regression" if (y.dtype.is_floating_point or y.is_complex()) else "classes"


def _check_labels(cfg: ProviderConfig, parts, ys, given: int | None, classes) -> int:
    if given is not None:
        num, source = given, "data.num_classes"
    elif classes is not None:
        num, source = len(classes), "the class names"
    else:
        num = max(int(y.max()) for y in ys.values()) + 1
        source = None
    for name, y in ys.items():
        wrong = (y < 0) | (y >= num)
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0])
            limit = f"[0, {num}) ({source})" if source else f"[0, {num})"
            part = parts[name]
            raise cfg.error(
                part.key, f"{name} split: label {int(y[i])} at sample {i} is outside {limit}",
                part.where,
            )  # fmt: skip
    return num


def _carve(cfg: ProviderConfig, splits: dict[str, Split], name: str, fraction: float | None,
           seed: int, stratify: bool) -> None:  # fmt: skip
    """Move ``fraction`` of train into split ``name`` (if it is not given already)."""
    key = f"{name}_fraction"
    if name in splits:
        if fraction:
            raise cfg.error(key, f"give either a {name} split or {key}, not both")
        return
    if name == "test" and fraction is None:
        fraction = DEFAULT_TEST_FRACTION
        cfg.resolved[key] = fraction
    if not fraction:
        if name == "test":
            raise cfg.error(key, "must be in (0, 1) when no test split is given")
        return
    train = splits["train"]
    kept, held = holdout(train.y, fraction, seed, _SALT[name], stratify)
    if len(held) == 0 or len(kept) == 0:
        raise cfg.error(
            key, f"{fraction} of {train.num_samples} samples leaves the "
            f"{name if len(held) == 0 else 'train'} split empty",
        )  # fmt: skip
    splits["train"], splits[name] = _take(train, kept), _take(train, held)


def assemble_task(
    cfg: ProviderConfig,
    name: str,
    parts: Mapping[str, Part],
    options: SplitOptions,
    classes: tuple[str, ...] | None = None,
) -> TaskData:
    """Check ``parts`` (``train`` and optionally ``val`` / ``test``) and build the task.

    Missing test / val splits are carved from train with ``options`` (test: ``test_fraction``,
    default 0.2; val: ``val_fraction``, default none), stratified by label for classes.
    """
    kind = _infer_kind(parts, options.target_kind)
    ys = {k: _check_y(cfg, p, k, kind) for k, p in parts.items()}
    for k, p in parts.items():
        _check_x(cfg, p, k, int(ys[k].shape[0]))
    shape = tuple(parts["train"].x.shape[1:])
    for k, p in parts.items():
        if tuple(p.x.shape[1:]) != shape:
            raise cfg.error(p.key, f"{k} samples have shape {tuple(p.x.shape[1:])}, "
                            f"train samples {shape}", p.where)  # fmt: skip
        if tuple(ys[k].shape[1:]) != tuple(ys["train"].shape[1:]):
            raise cfg.error(p.key, f"{k} targets have shape {tuple(ys[k].shape[1:])}, "
                            f"train targets {tuple(ys['train'].shape[1:])}", p.where)  # fmt: skip
    num_classes = None
    if kind == "classes":
        num_classes = _check_labels(cfg, parts, ys, options.num_classes, classes)
    elif options.num_classes is not None:
        raise cfg.error("num_classes", "is for target_kind 'classes' (the targets are real values)")
    splits = {k: Split(p.x, ys[k]) for k, p in parts.items()}
    stratify = kind == "classes"
    _carve(cfg, splits, "test", options.test_fraction, options.split_seed, stratify)
    _carve(cfg, splits, "val", options.val_fraction, options.split_seed, stratify)
    return TaskData(
        name=name,
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
        target_kind=kind,
        input_shape=shape,
        num_classes=num_classes,
        classes=tuple(classes) if classes is not None else None,
    )
