"""The shape and symmetry of a family of networks: which layers, and which permutation acts where.

A :class:`WeightSpaceSpec` describes networks made of Linear / Conv1d / Conv2d layers joined by
elementwise activations, pooling and flattening (MLPs, plain CNNs, SIRENs). Each layer's weight is
stored as ``[out, in, *kernel]`` and its bias as ``[out]``. Every axis of the ``out`` / ``in``
dimensions carries the id of the neuron permutation that acts on it, or ``None`` where nothing may
be permuted (the network's input and output neurons). The default spec of a feed-forward chain has
one permutation per hidden layer: permutation ``i`` acts on the rows of layer ``i`` and on the
columns of layer ``i + 1``. Specs built by hand may share a permutation between several layers
(a residual MLP) — the layers of :mod:`metanet.nn` read the axes from the spec, not from the depth.

When a Conv layer feeds a Linear layer through ``flatten``, each channel owns ``in_repeat``
consecutive inputs of the Linear layer (its spatial positions); permuting the channel moves that
whole block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

_LAYER_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}
_ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus, nn.Mish,
    nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip


class WeightSpaceError(ValueError):
    """A network or state_dict does not fit a weight space; the message names the key or layer."""


@dataclass(frozen=True)
class LayerSpec:
    """One Linear/Conv layer of a weight space.

    Attributes:
        name: module path of the layer (``"net.0"``); state_dict keys are ``name.weight``/``.bias``.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        weight_shape: ``(out, in, *kernel)``.
        has_bias: whether the layer has a bias (a missing bias is stored as zeros).
        out_perm: id of the permutation acting on the ``out`` axis (``None``: fixed).
        in_perm: id of the permutation acting on the ``in`` axis (``None``: fixed).
        in_repeat: inputs of this layer owned by one neuron of the previous layer (flatten).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    has_bias: bool = True
    out_perm: int | None = None
    in_perm: int | None = None
    in_repeat: int = 1

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def bias_key(self) -> str:
        return f"{self.name}.bias" if self.name else "bias"

    @property
    def module_weight_shape(self) -> tuple[int, ...]:
        """The weight's shape inside the module (a Linear fed by flatten has ``in * in_repeat``)."""
        out, inp, *kernel = self.weight_shape
        return (out, inp * self.in_repeat, *kernel)


@dataclass(frozen=True)
class WeightSpaceSpec:
    """The layers of an architecture family and the neuron permutations acting on them."""

    layers: tuple[LayerSpec, ...]
    perm_sizes: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.layers:
            raise WeightSpaceError("a weight space needs at least one layer")
        sizes: dict[int, int] = {}
        for layer in self.layers:
            for perm, n in (
                (layer.out_perm, layer.out_features),
                (layer.in_perm, layer.in_features),
            ):
                if perm is None:
                    continue
                if sizes.setdefault(perm, n) != n:
                    raise WeightSpaceError(
                        f"permutation {perm} acts on axes of size {sizes[perm]} and {n} "
                        f"(layer '{layer.name}')"
                    )
        if sorted(sizes) != list(range(len(sizes))):
            raise WeightSpaceError(f"permutation ids must be 0..P-1, got {sorted(sizes)}")
        object.__setattr__(self, "perm_sizes", tuple(sizes[i] for i in range(len(sizes))))

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def chain(
        cls,
        shapes: Sequence[tuple[int, ...]],
        names: Sequence[str] | None = None,
        has_bias: bool | Sequence[bool] = True,
        in_repeat: Sequence[int] | None = None,
    ) -> WeightSpaceSpec:
        """A feed-forward chain: permutation ``i`` joins layer ``i`` (rows) and ``i+1`` (columns).

        Args:
            shapes: ``(out, in, *kernel)`` per layer, in the weight space's layout.
            names: module paths (default ``"0", "1", ...``).
            has_bias: one flag for all layers or one per layer.
            in_repeat: per layer, inputs owned by one neuron of the previous layer (flatten).
        """
        n = len(shapes)
        names = list(names) if names is not None else [str(i) for i in range(n)]
        biases = [has_bias] * n if isinstance(has_bias, bool) else list(has_bias)
        repeats = list(in_repeat) if in_repeat is not None else [1] * n
        if not (len(names) == len(biases) == len(repeats) == n):
            raise WeightSpaceError("names, has_bias and in_repeat must have one entry per layer")
        layers = []
        for i, shape in enumerate(shapes):
            if i > 0 and shapes[i - 1][0] != shape[1]:
                raise WeightSpaceError(
                    f"layer '{names[i]}' takes {shape[1]} inputs but layer '{names[i - 1]}' "
                    f"gives {shapes[i - 1][0]}"
                )
            kind = {2: "linear", 3: "conv1d", 4: "conv2d"}.get(len(shape))
            if kind is None:
                raise WeightSpaceError(f"layer '{names[i]}': unsupported weight shape {shape}")
            layers.append(
                LayerSpec(
                    name=names[i],
                    kind=kind,
                    weight_shape=tuple(int(s) for s in shape),
                    has_bias=biases[i],
                    out_perm=i if i < n - 1 else None,
                    in_perm=i - 1 if i > 0 else None,
                    in_repeat=repeats[i],
                )
            )
        return cls(tuple(layers))

    @classmethod
    def from_module(cls, module: nn.Module) -> WeightSpaceSpec:
        """Spec of a module made of Linear/Conv layers and elementwise ops, in registration order.

        Raises:
            WeightSpaceError: a layer with parameters that is not Linear/Conv1d/Conv2d (e.g. a
                norm layer: use :mod:`metanet.graph` for those), grouped/dilated-free convs only.
        """
        entries: list[tuple[str, nn.Module]] = []
        for path, sub in module.named_modules():
            if type(sub) in _LAYER_KINDS:
                if isinstance(sub, (nn.Conv1d, nn.Conv2d)) and sub.groups != 1:
                    raise WeightSpaceError(f"grouped convolution at '{path}' is not supported")
                entries.append((path, sub))
            elif isinstance(sub, _ELEMENTWISE) or not list(sub.parameters(recurse=False)):
                continue
            else:
                raise WeightSpaceError(
                    f"layer '{path}' ({type(sub).__name__}) has parameters but is not "
                    "Linear/Conv1d/Conv2d; use metanet.graph.from_module for such networks"
                )
        if not entries:
            raise WeightSpaceError(f"{type(module).__name__} has no Linear/Conv layers")
        shapes, repeats = [], []
        for i, (path, sub) in enumerate(entries):
            shape = tuple(sub.weight.shape)
            repeat = 1
            if i > 0:
                prev_out = entries[i - 1][1].weight.shape[0]
                if shape[1] != prev_out:
                    if isinstance(sub, nn.Linear) and shape[1] % prev_out == 0:
                        repeat = shape[1] // prev_out
                        shape = (shape[0], prev_out)
                    else:
                        raise WeightSpaceError(
                            f"layer '{path}' takes {shape[1]} inputs, which does not fit the "
                            f"{prev_out} outputs of '{entries[i - 1][0]}'"
                        )
            shapes.append(shape)
            repeats.append(repeat)
        return cls.chain(
            shapes,
            names=[p for p, _ in entries],
            has_bias=[s.bias is not None for _, s in entries],
            in_repeat=repeats,
        )

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], layer_names: Sequence[str]
    ) -> WeightSpaceSpec:
        """Spec of the chain of modules ``layer_names`` (in order) of ``state_dict``."""
        shapes, biases, repeats = [], [], []
        for i, name in enumerate(layer_names):
            key = f"{name}.weight" if name else "weight"
            if key not in state_dict:
                raise WeightSpaceError(f"state_dict has no key '{key}' for layer '{name}'")
            shape = tuple(state_dict[key].shape)
            repeat = 1
            if i > 0 and len(shape) == 2 and shape[1] != shapes[-1][0]:
                if shape[1] % shapes[-1][0]:
                    raise WeightSpaceError(
                        f"'{key}' has {shape[1]} inputs, which does not fit {shapes[-1][0]}"
                    )
                repeat = shape[1] // shapes[-1][0]
                shape = (shape[0], shapes[-1][0])
            shapes.append(shape)
            repeats.append(repeat)
            biases.append((f"{name}.bias" if name else "bias") in state_dict)
        return cls.chain(shapes, names=list(layer_names), has_bias=biases, in_repeat=repeats)

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_perms(self) -> int:
        return len(self.perm_sizes)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """Sizes of the neuron permutations (the hidden layer widths of a chain)."""
        return self.perm_sizes

    @property
    def is_chain(self) -> bool:
        """Whether the spec is a plain feed-forward chain (one permutation per hidden layer)."""
        n = self.num_layers
        return all(
            l.out_perm == (i if i < n - 1 else None) and l.in_perm == (i - 1 if i else None)
            for i, l in enumerate(self.layers)
        )

    @property
    def num_params(self) -> int:
        """Scalars per network (weights and present biases)."""
        total = 0
        for layer in self.layers:
            total += int(torch.Size(layer.module_weight_shape).numel())
            total += layer.out_features if layer.has_bias else 0
        return total

    def param_keys(self) -> list[str]:
        """The state_dict keys a network of this spec has, in weight-space order."""
        keys = []
        for layer in self.layers:
            keys.append(layer.weight_key)
            if layer.has_bias:
                keys.append(layer.bias_key)
        return keys

    def to_dict(self) -> dict:
        """A plain-python description (for HDF5 attributes, checkpoints, YAML)."""
        return {
            "layers": [
                {
                    "name": l.name,
                    "kind": l.kind,
                    "weight_shape": list(l.weight_shape),
                    "has_bias": l.has_bias,
                    "out_perm": l.out_perm,
                    "in_perm": l.in_perm,
                    "in_repeat": l.in_repeat,
                }
                for l in self.layers
            ]
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> WeightSpaceSpec:
        """Inverse of :meth:`to_dict`."""
        try:
            layers = tuple(
                LayerSpec(
                    name=str(d["name"]),
                    kind=str(d["kind"]),
                    weight_shape=tuple(int(s) for s in d["weight_shape"]),
                    has_bias=bool(d["has_bias"]),
                    out_perm=d["out_perm"],
                    in_perm=d["in_perm"],
                    in_repeat=int(d.get("in_repeat", 1)),
                )
                for d in data["layers"]
            )
        except (KeyError, TypeError) as err:
            raise WeightSpaceError(f"malformed weight-space spec description: {err!r}") from err
        return cls(layers)
