"""Pieces shared by metanet's tasks: building the metanetwork, reading batches, checkpoint payloads.

A task receives its metanetwork as

* a *factory* ``Callable[[WeightSpaceSpec], nn.Module]`` (what jsonargparse makes of
  ``model: {class_path: metanet.nn.nfn.NFN, init_args: {...}}``, or a ``functools.partial`` /
  class in Python) for weight-space models, called with the data module's spec in ``setup()``;
* the same kind of factory for a graph model (``input_kind = "graph"``), called without a spec;
* an ``nn.Module`` instance, used as is;
* a recipe dict ``{"class_path": ..., "init_args": {...}}`` (what checkpoints store).

Checkpoints of metanet tasks carry a ``"metanet"`` entry (:data:`PAYLOAD_KEY`) with only plain
python values (loadable with ``torch.load(weights_only=True)``): the task name, the model recipe,
the input kind, the weight-space spec the model was built for, and the arch dicts seen in training.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from metanet.weightspace import WeightSpace, WeightSpaceSpec

PAYLOAD_KEY = "metanet"
PAYLOAD_VERSION = 1
INPUT_KINDS = ("weightspace", "graph")


class TaskConfigError(ValueError):
    """A task was given a metanetwork or data it cannot use (the message says which and why)."""


class TrainingDivergedError(RuntimeError):
    """A fit's training loss became NaN or infinite (the message says at which step)."""


# ------------------------------------------------------------------------------------------------
# metanetwork factories
# ------------------------------------------------------------------------------------------------
def import_object(path: str) -> Any:
    """``"pkg.module.Name"`` -> the object (a clear error when it does not exist)."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise TaskConfigError(f"'{path}' is not a dotted path 'package.module.Name'")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise TaskConfigError(f"cannot import '{path}': {err}") from None


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def factory_class(model: Any) -> type | None:
    """The class a factory builds (``None`` when it cannot be told)."""
    if isinstance(model, type):
        return model
    if isinstance(model, nn.Module):
        return type(model)
    if isinstance(model, Mapping) and "class_path" in model:
        cls = import_object(str(model["class_path"]))
        return cls if isinstance(cls, type) else None
    if isinstance(model, functools.partial):
        if isinstance(model.func, type):
            return model.func
        # jsonargparse: partial(call_without_instantiate_context, instantiator, cls, **kwargs)
        classes = [a for a in model.args if isinstance(a, type)]
        return classes[-1] if classes else None
    return None


def describe_factory(model: Any) -> dict[str, Any] | None:
    """A recipe ``{"class_path", "init_args"}`` that rebuilds the metanetwork, or ``None``.

    Works for recipe dicts, classes, ``functools.partial(cls, **kwargs)`` and jsonargparse's
    class factories; for a module instance it reads constructor arguments stored under their own
    names (``self.hidden = hidden``), scikit-learn style, and gives up if a required one is missing.
    """
    if isinstance(model, Mapping) and "class_path" in model:
        recipe = {
            "class_path": str(model["class_path"]),
            "init_args": dict(model.get("init_args") or {}),
        }
        return recipe if _jsonable(recipe) else None
    cls = factory_class(model)
    if cls is None:
        return None
    if isinstance(model, functools.partial):
        kwargs = dict(model.keywords)
    elif isinstance(model, nn.Module):
        kwargs = {}
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if name == "spec":
                continue
            if hasattr(model, name) and _jsonable(getattr(model, name)):
                kwargs[name] = getattr(model, name)
            elif param.default is inspect.Parameter.empty:
                return None
    else:
        kwargs = {}
    kwargs.pop("spec", None)
    recipe = {"class_path": _class_path(cls), "init_args": kwargs}
    return recipe if _jsonable(recipe) else None


def input_kind_of(model: Any) -> str:
    """``"weightspace"`` or ``"graph"``: the ``input_kind`` attribute of the metanetwork class."""
    cls = factory_class(model)
    kind = getattr(cls, "input_kind", None) if cls is not None else None
    if kind is None and not isinstance(model, (type, Mapping)):
        kind = getattr(model, "input_kind", None)
    if kind not in INPUT_KINDS:
        name = cls.__name__ if cls is not None else repr(model)
        raise TaskConfigError(
            f"metanetwork {name} has no class attribute input_kind in {INPUT_KINDS} "
            f"(got {kind!r}); every model in metanet.nn declares one"
        )
    return kind


def build_metanetwork(
    model: Any, spec: WeightSpaceSpec | None, graph_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """Instantiate the metanetwork ``model`` describes.

    Args:
        model: module instance, factory or recipe dict (see the module docstring).
        spec: the weight space of the data (required for weight-space factories).
        graph_kwargs: constructor arguments a graph model needs from the data (e.g. feature dims);
            only those the constructor accepts and the factory does not set are passed.
    """
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, Mapping):
        recipe = describe_factory(model)
        if recipe is None:
            raise TaskConfigError(f"malformed model recipe {dict(model)!r}")
        cls = import_object(recipe["class_path"])
        model = functools.partial(cls, **recipe["init_args"])
    if not callable(model):
        raise TaskConfigError(
            f"model must be an nn.Module or a factory, got {type(model).__name__}"
        )
    kind = input_kind_of(model)
    if kind == "weightspace":
        if spec is None:
            raise TaskConfigError(
                "a weight-space metanetwork needs the data's WeightSpaceSpec; the data module has "
                "none (an architecture with norm layers/residuals, or several architectures): "
                "use a graph model (metanet.nn.gmn / metanet.nn.ngt) for such zoos"
            )
        net = model(spec)
    else:
        cls = factory_class(model)
        given = (  # a None keyword (a CLI factory's default) does not count as set
            {k for k, v in model.keywords.items() if v is not None}
            if isinstance(model, functools.partial)
            else set()
        )
        kwargs = {}
        if cls is not None and graph_kwargs:
            params = inspect.signature(cls.__init__).parameters
            kwargs = {k: v for k, v in graph_kwargs.items() if k in params and k not in given}
        net = model(**kwargs)
    if not isinstance(net, nn.Module):
        raise TaskConfigError(f"the model factory returned {type(net).__name__}, not an nn.Module")
    return net


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
_INPUT_KEYS = ("ws", "weightspace", "weights", "graph", "graphs", "batch", "x", "inputs")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of a data-module batch.

    Accepts ``(inputs, targets)`` pairs, dicts with an input key (``ws``/``graph``/``x`` ...) and
    a target key (``y``/``target``/``label`` ...), and PyG batches carrying ``y``.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        target = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if inputs is not None and target is not None:
            return inputs, target
        raise TaskConfigError(f"cannot find inputs and targets in a batch with keys {list(batch)}")
    y = getattr(batch, "y", None)
    if isinstance(y, torch.Tensor):
        return batch, y
    raise TaskConfigError(f"cannot read a batch of type {type(batch).__name__}")


def batch_size_of(inputs: Any) -> int:
    """Number of networks in a batch of weight spaces or graphs."""
    if isinstance(inputs, WeightSpace):
        return len(inputs)
    n = getattr(inputs, "num_graphs", None)
    if n is not None:
        return int(n)
    return len(inputs)


def check_input(inputs: Any, kind: str) -> None:
    """Raise a clear error when a batch does not match the metanetwork's input kind."""
    is_ws = isinstance(inputs, WeightSpace)
    if kind == "weightspace" and not is_ws:
        raise TaskConfigError(
            f"the metanetwork reads WeightSpace batches but the data gives {type(inputs).__name__}"
            "; use WeightSpaceDataModule with weight-space models"
        )
    if kind == "graph" and is_ws:
        raise TaskConfigError(
            "the metanetwork reads ParamGraph batches but the data gives WeightSpace; use "
            "ParamGraphDataModule with graph models"
        )


def plain(value: Any) -> Any:
    """``value`` with numpy/tensor scalars and tuples turned into plain python (for payloads)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def archs_of(datamodule: Any) -> list[dict]:
    """Arch dicts of the zoo groups a data module serves (empty when it does not say)."""
    zoo, names = getattr(datamodule, "zoo", None), getattr(datamodule, "group_names", None)
    if zoo is not None and names:
        archs = [getattr(zoo[n], "arch", None) for n in names]
        return [plain(dict(a)) for a in archs if isinstance(a, Mapping)]
    arch = getattr(datamodule, "arch", None)
    if isinstance(arch, Mapping):
        return [plain(dict(arch))]
    return []


def weight_normalization_of(datamodule: Any) -> dict[str, Any] | None:
    """The per-layer input normalization a WeightSpaceDataModule applies (``normalize_weights``),
    as plain python (``LayerStats`` fields), or ``None``."""
    if not getattr(datamodule, "normalize_weights", False):
        return None
    stats = datamodule.weight_stats
    return {
        "names": list(stats.names),
        "weight_mean": plain(stats.weight_mean),
        "weight_std": plain(stats.weight_std),
        "bias_mean": plain(stats.bias_mean),
        "bias_std": plain(stats.bias_std),
    }


def apply_weight_normalization(ws: WeightSpace, norm: Mapping[str, Any] | None) -> WeightSpace:
    """Apply a recorded :func:`weight_normalization_of` to a batch (identity for ``None``)."""
    if not norm:
        return ws
    from metanet.data.datamodules import LayerStats

    stats = LayerStats(
        list(norm["names"]),
        *(torch.tensor(norm[k], dtype=torch.float32)
          for k in ("weight_mean", "weight_std", "bias_mean", "bias_std")),
    )  # fmt: skip
    return stats.normalize(ws)
