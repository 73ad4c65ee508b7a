"""Architectures of zoo networks, described by small dicts that recipes and HDF5 files store.

An *arch dict* fully determines a module's structure (not its weights)::

    {"type": "mlp", "in": 64, "widths": [32, 32], "out": 10, "activation": "relu"}
    {"type": "cnn", "channels": [8, 16], "kernel": 3, "activation": "relu",
     "residual": False, "norm": None, "head": "pool"}
    {"type": "siren", "widths": [32, 32], "w0": 30.0, "init": "siren"}
    {"type": "module", "class_path": "mypackage.models:Net", "init_args": {"width": 64},
     "input_shape": [3, 32, 32]}          # any nn.Module of the user's (``class_path`` alone
                                          # is accepted too and means type "module")

:func:`normalize_arch` fills defaults and rejects unknown keys / impossible values,
:func:`build_module` makes the ``nn.Module`` and :func:`arch_name` gives a stable, readable group
name (the HDF5 group of the architecture). Modules are ``nn.Sequential`` chains (state_dict keys
``"0.weight"``, ...), so :meth:`metanet.weightspace.WeightSpaceSpec.from_module` reads plain MLPs,
CNNs and SIRENs; residual blocks and norm layers make an arch graph-only (:func:`has_weight_space`).

User modules are code: a class named in a *file* (a zoo, a checkpoint's payload) is imported
only when its module is trusted - ``torch.nn`` and ``metanet`` always are; others through
:func:`trust_code`, the ``METANET_TRUST_CODE`` environment variable (comma-separated module
prefixes), or by naming the class in a recipe the user runs (a recipe, like a config, is code).

``"dropout": True`` inserts a :class:`SampledDropout` after each hidden activation: its rate is a
non-persistent buffer (not in the state_dict), so the zoo trainer can give every network of a
``torch.func.vmap`` batch its own rate; in ``eval()`` mode it is the identity.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class ArchError(ValueError):
    """An arch dict with an unknown key or an impossible value (the message names the key)."""


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}
NORMS = (None, "batch", "layer", "group")
SIREN_INITS = ("siren", "dws")
HEADS = ("pool", "flatten")

_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"in": 64, "widths": [32], "out": 10, "activation": "relu", "bias": True,
            "dropout": False},
    "cnn": {"in_channels": 1, "input_size": 8, "channels": [8, 16], "kernel": 3, "strides": None,
            "activation": "relu", "residual": False, "norm": None, "head": "pool", "out": 10,
            "dropout": False},
    "siren": {"in": 2, "widths": [32, 32], "out": 1, "w0": 30.0, "w0_first": None,
              "init": "siren"},
    "module": {"class_path": None, "init_args": {}, "input_shape": None},
}  # fmt: skip

TRUST_ENV = "METANET_TRUST_CODE"
_TRUSTED_PREFIXES: set[str] = {"torch.nn", "metanet"}


def trust_code(*names: str) -> None:
    """Allow metanet to import user classes under these module prefixes (``"mypackage"``) or of
    these class paths (``"mypackage.models:Net"``: its module) when a file names them. Classes
    named in the user's own recipes are trusted this way when the recipe is read."""
    for name in names:
        prefix = name.partition(":")[0].strip().rstrip(".")
        if not prefix:
            raise ValueError(f"trust_code needs a module prefix or class path, got {name!r}")
        _TRUSTED_PREFIXES.add(prefix)


def module_of(class_path: str) -> str:
    """The module part of ``package.module:Class`` or ``package.module.Class``."""
    return class_path.partition(":")[0] if ":" in class_path else class_path.rpartition(".")[0]


def is_trusted(class_path: str) -> bool:
    """Whether the module of ``class_path`` is under a trusted prefix (see :func:`trust_code`)."""
    module = module_of(class_path) or class_path
    env = {p.strip() for p in os.environ.get(TRUST_ENV, "").split(",") if p.strip()}
    return any(module == p or module.startswith(p + ".") for p in _TRUSTED_PREFIXES | env)


def resolve_module_class(class_path: str) -> type[nn.Module]:
    """Import the ``nn.Module`` subclass ``package.module:Class`` (or ``package.module.Class``).

    Raises:
        ArchError: the module is not trusted (see :func:`trust_code`), does not import, lacks the
            class, or the class is not an ``nn.Module`` subclass.
    """
    if not isinstance(class_path, str) or not module_of(class_path):
        raise ArchError(f"arch key 'class_path': must look like package.module:Class "
                        f"(got {class_path!r})")  # fmt: skip
    if not is_trusted(class_path):
        raise ArchError(
            f"arch key 'class_path': {class_path!r} is user code named in a file; metanet imports "
            f"it only when trusted: set {TRUST_ENV}={module_of(class_path).split('.')[0]} or call "
            "metanet.zoo.architectures.trust_code(...)"
        )
    module_name = module_of(class_path)
    attr = class_path.partition(":")[2] if ":" in class_path else class_path.rpartition(".")[2]
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's to see
        raise ArchError(f"arch key 'class_path': cannot import {module_name!r} "
                        f"({type(err).__name__}: {err})") from None  # fmt: skip
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ArchError(f"arch key 'class_path': {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArchError(f"arch key 'class_path': {class_path!r} is not an nn.Module subclass")
    return obj


class Sine(nn.Module):
    """``sin(w0 * x)``: the SIREN activation (no parameters)."""

    def __init__(self, w0: float = 30.0) -> None:
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


class SampledDropout(nn.Module):
    """Inverted dropout whose rate ``p`` is a non-persistent buffer (0 by default).

    The zoo trainer passes a per-network ``p`` through ``torch.func.functional_call``; masks are
    drawn with ``torch.rand_like`` so ``vmap(..., randomness="different")`` gives every network its
    own mask. Identity in ``eval()`` mode and when ``p == 0``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("p", torch.zeros(()), persistent=False)
        # the zoo trainer's multipliers for this step (metanet.zoo.train.dropout_multipliers,
        # the masks every engine draws); empty: masks from torch.rand_like
        self.register_buffer("mult", torch.ones(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.mult.numel():
            return x * self.mult
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep / (1.0 - self.p).clamp_min(1e-6)


class ResidualConv(nn.Module):
    """``x + act(norm(conv(x)))`` for a conv whose input and output shapes agree."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ArchError(f"arch key '{key}': {why} (got {value!r})")


def _int_list(arch: dict, key: str, allow_empty: bool = False) -> list[int]:
    value = arch[key]
    _check(isinstance(value, (list, tuple)), key, value, "must be a list of positive integers")
    _check(allow_empty or len(value) > 0, key, value, "must not be empty")
    for v in value:
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, value,
               "must be a list of positive integers")  # fmt: skip
    return [int(v) for v in value]


def _pos_int(arch: dict, key: str) -> int:
    value = arch[key]
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value,
           "must be a positive integer")  # fmt: skip
    return int(value)


def normalize_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``arch`` with defaults filled in, after checking every key and value.

    Raises:
        ArchError: missing/unknown ``type``, an unknown key, or an impossible value (non-positive
            width, even kernel, unknown activation/norm/head, residual with no shape-preserving
            layer ...); the message names the key.
    """
    if not isinstance(arch, Mapping):
        raise ArchError(f"an arch must be a mapping, got {type(arch).__name__}")
    if "class_path" in arch and "type" not in arch:
        arch = {"type": "module", **arch}
    kind = arch.get("type")
    if kind not in _DEFAULTS:
        raise ArchError(f"arch key 'type': must be one of {sorted(_DEFAULTS)} (got {kind!r})")
    defaults = _DEFAULTS[kind]
    unknown = sorted(set(arch) - set(defaults) - {"type"})
    if unknown:
        raise ArchError(
            f"unknown arch key(s) {unknown} for type '{kind}'; allowed: {sorted(defaults)}"
        )
    out: dict[str, Any] = {"type": kind}
    for key, default in defaults.items():
        value = arch.get(key, default)
        out[key] = list(value) if isinstance(value, tuple) else value
    if kind == "module":
        return _normalize_module_arch(out)
    if kind in ("mlp", "siren"):
        out["in"], out["out"] = _pos_int(out, "in"), _pos_int(out, "out")
        out["widths"] = _int_list(out, "widths", allow_empty=(kind == "mlp"))
    if kind == "mlp":
        _check(out["activation"] in ACTIVATIONS, "activation", out["activation"],
               f"must be one of {sorted(ACTIVATIONS)}")  # fmt: skip
        _check(isinstance(out["bias"], bool), "bias", out["bias"], "must be true or false")
        _check(isinstance(out["dropout"], bool), "dropout", out["dropout"], "must be a bool")
    elif kind == "siren":
        for key in ("w0", "w0_first"):
            value = out[key]
            if key == "w0_first" and value is None:
                continue
            _check(isinstance(value, (int, float)) and not isinstance(value, bool)
                   and math.isfinite(value) and value > 0, key, value,
                   "must be a positive number")  # fmt: skip
            out[key] = float(value)
        _check(out["init"] in SIREN_INITS, "init", out["init"],
               f"must be one of {list(SIREN_INITS)}")  # fmt: skip
        if out["init"] == "siren":
            # the default is left out, so arch JSON, group names and zoo fingerprints of SIRENs
            # from before the key existed stay as they were
            del out["init"]
    else:  # cnn
        for key in ("in_channels", "input_size", "out", "kernel"):
            out[key] = _pos_int(out, key)
        _check(out["kernel"] % 2 == 1, "kernel", out["kernel"], "must be odd ('same' padding)")
        out["channels"] = _int_list(out, "channels")
        if out["strides"] is None:
            out["strides"] = [1] * len(out["channels"])
        out["strides"] = _int_list(out, "strides")
        _check(len(out["strides"]) == len(out["channels"]), "strides", out["strides"],
               "needs one stride per entry of 'channels'")  # fmt: skip
        _check(out["activation"] in ACTIVATIONS, "activation", out["activation"],
               f"must be one of {sorted(ACTIVATIONS)}")  # fmt: skip
        _check(out["norm"] in NORMS, "norm", out["norm"], f"must be one of {list(NORMS)}")
        _check(out["head"] in HEADS, "head", out["head"], f"must be one of {list(HEADS)}")
        _check(isinstance(out["residual"], bool), "residual", out["residual"], "must be a bool")
        _check(isinstance(out["dropout"], bool), "dropout", out["dropout"], "must be a bool")
        if out["residual"]:
            prev, ok = out["in_channels"], False
            for c, s in zip(out["channels"], out["strides"]):
                ok = ok or (c == prev and s == 1)
                prev = c
            _check(ok, "residual", True,
                   "no conv layer keeps its input shape (equal channels, stride 1)")  # fmt: skip
    return out


def _normalize_module_arch(out: dict[str, Any]) -> dict[str, Any]:
    path = out["class_path"]
    _check(isinstance(path, str) and bool(module_of(path)), "class_path", path,
           "must look like package.module:Class")  # fmt: skip
    _check(isinstance(out["init_args"], Mapping), "init_args", out["init_args"],
           "must be a mapping of keyword arguments")  # fmt: skip
    try:
        init_args = json.loads(json.dumps(dict(out["init_args"]), sort_keys=True))
    except (TypeError, ValueError):
        raise ArchError("arch key 'init_args': values must be plain data (numbers, strings, "
                        "lists, mappings)") from None  # fmt: skip
    out["init_args"] = init_args
    if out["input_shape"] is not None:
        out["input_shape"] = _int_list(out, "input_shape")
    return out


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed with plain tensor ops (``F.group_norm`` has no vmap support for
    4-d inputs); same parameters, same state_dict, same outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        g = x.reshape(shape[0], self.num_groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = g.var(-1, unbiased=False, keepdim=True)
        g = (g - mean) / torch.sqrt(var + self.eps)
        x = g.reshape(shape)
        if self.affine:
            view = (1, -1) + (1,) * (len(shape) - 2)
            x = x * self.weight.view(view) + self.bias.view(view)
        return x


def _groups(channels: int) -> int:
    """Groups of a group norm: 4 channels per group where possible, else 2, else 1 group."""
    if channels % 4 == 0:
        return channels // 4
    if channels % 2 == 0:
        return channels // 2
    return 1


def _norm(kind: str | None, channels: int) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return GroupNorm(1, channels)
    return GroupNorm(_groups(channels), channels)


def build_module(arch: Mapping[str, Any]) -> nn.Module:
    """The ``nn.Module`` described by ``arch`` (freshly initialized with PyTorch's defaults).

    MLP: ``[Linear, act, (dropout)] * len(widths) + [Linear]`` on flat inputs ``[N, in]``.
    CNN: per entry of ``channels`` a ``Conv2d(kernel, stride, padding=kernel//2)`` (+ norm) +
    activation (wrapped in a residual block where the shape is kept and ``residual`` is set),
    then ``head``: ``"pool"`` (global average pool as ``AvgPool2d(final size)``, Linear) or
    ``"flatten"`` (Flatten, Linear); input ``[N, in_channels, input_size, input_size]``.
    SIREN: ``[Linear, Sine(w0)] * len(widths) + [Linear]``, input ``[N, in]`` coordinates, output
    ``[N, out]``; initialized by ``init`` (:func:`siren_init_`): ``"siren"`` (default) every layer
    SIREN-scaled with random biases, ``"dws"`` as the MNIST-INR zoos of DWSNets / NFN.
    Module: ``Class(**init_args)`` of the user's ``class_path`` (trusted, see the module
    docstring); input ``[N, *input_shape]``.
    """
    a = normalize_arch(arch)
    kind = a["type"]
    if kind == "module":
        cls = resolve_module_class(a["class_path"])
        try:
            return cls(**a["init_args"])
        except Exception as err:  # noqa: BLE001 - the user's constructor can raise anything
            raise ArchError(f"arch {a['class_path']} with init_args {a['init_args']} does not "
                            f"build ({type(err).__name__}: {err})") from None  # fmt: skip
    layers: list[nn.Module] = []
    if kind == "mlp":
        prev = a["in"]
        for w in a["widths"]:
            layers += [nn.Linear(prev, w, bias=a["bias"]), ACTIVATIONS[a["activation"]]()]
            if a["dropout"]:
                layers.append(SampledDropout())
            prev = w
        layers.append(nn.Linear(prev, a["out"], bias=a["bias"]))
        return nn.Sequential(*layers)
    if kind == "siren":
        scheme = a.get("init", "siren")
        prev = a["in"]
        for i, w in enumerate(a["widths"]):
            lin = nn.Linear(prev, w)
            w0 = a["w0_first"] if (i == 0 and a["w0_first"] is not None) else a["w0"]
            siren_init_(lin, first=(i == 0), w0=a["w0"], scheme=scheme)
            layers += [lin, Sine(w0)]
            prev = w
        last = nn.Linear(prev, a["out"])
        siren_init_(last, first=False, w0=a["w0"], scheme=scheme, last=True)
        layers.append(last)
        return nn.Sequential(*layers)
    # cnn
    prev, size = a["in_channels"], a["input_size"]
    for c, s in zip(a["channels"], a["strides"]):
        block: list[nn.Module] = [
            nn.Conv2d(prev, c, a["kernel"], stride=s, padding=a["kernel"] // 2)
        ]
        norm = _norm(a["norm"], c)
        if norm is not None:
            block.append(norm)
        block.append(ACTIVATIONS[a["activation"]]())
        if a["residual"] and c == prev and s == 1:
            layers.append(ResidualConv(nn.Sequential(*block)))
        else:
            layers += block
        if a["dropout"]:
            layers.append(SampledDropout())
        prev, size = c, (size - 1) // s + 1
    if a["head"] == "pool":
        # AvgPool2d over the whole final map (= global average pooling; unlike
        # AdaptiveAvgPool2d it has a vmap batching rule)
        layers += [nn.AvgPool2d(size), nn.Flatten(), nn.Linear(prev, a["out"])]
    else:
        layers += [nn.Flatten(), nn.Linear(prev * size * size, a["out"])]
    return nn.Sequential(*layers)


DWS_OUTPUT_OFFSET = 0.5
"""The constant the DWSNets / NFN MNIST-INRs add to their output (``f(x) + 0.5``: images in
[0, 1] start centred); ``init: "dws"`` folds it into the last layer's bias."""


def siren_init_(layer: nn.Linear, first: bool, w0: float, generator=None, scheme: str = "siren",
                last: bool = False) -> None:  # fmt: skip
    """Initialize one Linear layer of a SIREN in place.

    Weights of every hidden layer follow SIREN (Sitzmann et al. 2020): U(-1/in, 1/in) for the
    first layer, U(-sqrt(6/in)/w0, sqrt(6/in)/w0) after. Then, by ``scheme``:

    * ``"siren"`` - biases U(-1/sqrt(in), 1/sqrt(in)); the ``last`` (output) layer SIREN-scaled
      like a hidden one.
    * ``"dws"`` - the init of the MNIST-INR zoos of DWSNets and NFN (Navon et al. 2023, Zhou et
      al. 2023), whose INR class builds every sine layer as a hidden one: the *first* layer too
      draws U(-sqrt(6/in)/w0, sqrt(6/in)/w0) (a low-frequency start, not SIREN's U(-1/in, 1/in));
      biases zero; the ``last`` layer keeps PyTorch's default ``nn.Linear``
      init, its bias raised by :data:`DWS_OUTPUT_OFFSET` - the reference's ``+0.5`` on the
      output, folded into the bias (the same function, so the same fitting trajectory, as the
      reference's network and offset).

    Args:
        layer: the layer, changed in place.
        first: whether it is the first layer (reads the coordinates).
        w0: the frequency factor of the sine after the hidden layers.
        generator: random generator of the draws (the default one when None).
        scheme: ``"siren"`` or ``"dws"``.
        last: whether it is the output layer.
    """
    if scheme not in SIREN_INITS:
        raise ArchError(f"arch key 'init': must be one of {list(SIREN_INITS)} (got {scheme!r})")
    fan_in = layer.weight.shape[1]
    with torch.no_grad():
        if scheme == "dws" and last:
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear.reset_parameters, drawn from generator
            layer.weight.uniform_(-bound, bound, generator=generator)
            if layer.bias is not None:
                layer.bias.uniform_(-bound, bound, generator=generator)
                layer.bias.add_(DWS_OUTPUT_OFFSET)
            return
        # the reference INR builds every sine layer with is_first=False: its first layer is
        # scaled like a hidden one (a smooth, low-frequency start the fit has to move away from)
        hidden_scaled = not first or scheme == "dws"
        bound = math.sqrt(6.0 / fan_in) / w0 if hidden_scaled else 1.0 / fan_in
        layer.weight.uniform_(-bound, bound, generator=generator)
        if layer.bias is None:
            return
        if scheme == "dws":
            layer.bias.zero_()
        else:
            b = 1.0 / math.sqrt(fan_in)
            layer.bias.uniform_(-b, b, generator=generator)


def has_weight_space(arch: Mapping[str, Any]) -> bool:
    """Whether networks of ``arch`` form a plain :class:`WeightSpaceSpec` chain (no residual
    blocks, no norm layers); otherwise they are read as graphs (``metanet.graph``)."""
    a = normalize_arch(arch)
    if a["type"] == "module":
        from metanet.weightspace import WeightSpaceError, WeightSpaceSpec

        try:
            WeightSpaceSpec.from_module(build_module(a))
        except (WeightSpaceError, ValueError, TypeError):
            return False
        return True
    if a["type"] != "cnn":
        return True
    return a["norm"] is None and not (
        a["residual"]
        and any(
            c == p and s == 1
            for c, p, s in zip(a["channels"], [a["in_channels"], *a["channels"]], a["strides"])
        )
    )


def input_shape(arch: Mapping[str, Any]) -> tuple[int, ...]:
    """Shape of one input sample (without batch) of networks of ``arch``."""
    a = normalize_arch(arch)
    if a["type"] == "cnn":
        return (a["in_channels"], a["input_size"], a["input_size"])
    if a["type"] == "module":
        if a["input_shape"] is None:
            raise ArchError(f"arch {a['class_path']}: no 'input_shape' (the recipe fills it "
                            "from the data; pass it for a module used on its own)")  # fmt: skip
        return tuple(a["input_shape"])
    return (a["in"],)


def arch_name(arch: Mapping[str, Any]) -> str:
    """A stable, readable name for ``arch`` (the HDF5 group name), e.g. ``cnn-c8x16-k3-relu-pool``.

    Names depend only on the normalized arch: equal archs get equal names, different archs
    different names (every non-default setting appears in the name).
    """
    a = normalize_arch(arch)
    kind = a["type"]
    if kind == "module":
        return _module_arch_name(a)
    if kind == "mlp":
        widths = "x".join(map(str, a["widths"])) or "linear"
        parts = ["mlp", f"i{a['in']}", f"w{widths}", f"o{a['out']}", a["activation"]]
        if not a["bias"]:
            parts.append("nobias")
        if a["dropout"]:
            parts.append("drop")
    elif kind == "siren":
        parts = ["siren", f"i{a['in']}", "w" + "x".join(map(str, a["widths"])), f"o{a['out']}",
                 f"w0-{a['w0']:g}"]  # fmt: skip
        if a["w0_first"] is not None:
            parts.append(f"w0first-{a['w0_first']:g}")
        if a.get("init", "siren") != "siren":
            parts.append(f"init-{a['init']}")
    else:
        parts = ["cnn", f"i{a['in_channels']}x{a['input_size']}",
                 "c" + "x".join(map(str, a["channels"])), f"k{a['kernel']}"]  # fmt: skip
        if any(s != 1 for s in a["strides"]):
            parts.append("s" + "x".join(map(str, a["strides"])))
        parts += [a["activation"], a["head"], f"o{a['out']}"]
        if a["residual"]:
            parts.append("res")
        if a["norm"]:
            parts.append(f"{a['norm']}norm")
        if a["dropout"]:
            parts.append("drop")
    return "-".join(parts).replace(".", "p")


def _module_arch_name(a: Mapping[str, Any]) -> str:
    """``module-<Class>-<key><value>...`` for short scalar init_args, else with a hash."""
    cls = a["class_path"].replace(":", ".").rsplit(".", 1)[-1]
    parts = ["module", cls]
    args = a["init_args"]
    simple = all(isinstance(v, (int, float, str, bool)) and len(str(v)) <= 12
                 for v in args.values())  # fmt: skip
    if simple and len(args) <= 4:
        parts += [f"{k}{v}" for k, v in sorted(args.items())]
    elif args:
        parts.append(hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:8])
    if a["input_shape"] is not None:
        parts.append("i" + "x".join(map(str, a["input_shape"])))
    name = "-".join(parts)
    path_hash = hashlib.sha256(a["class_path"].encode()).hexdigest()[:4]
    return f"{name}-{path_hash}".replace(".", "p").replace("/", "_").replace(" ", "")


def arch_to_json(arch: Mapping[str, Any]) -> str:
    """The normalized arch as canonical JSON (stored as an HDF5 attribute)."""
    return json.dumps(normalize_arch(arch), sort_keys=True)
