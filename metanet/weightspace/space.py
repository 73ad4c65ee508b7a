"""A batch of networks of one :class:`WeightSpaceSpec`, as per-layer weight and bias tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metanet.weightspace.spec import WeightSpaceError, WeightSpaceSpec


@dataclass
class WeightSpace:
    """``B`` networks of one spec.

    Attributes:
        spec: the shared architecture and symmetry description.
        weights: per layer ``[B, out, in, *kernel]``, exactly the module's layout. A Linear layer
            fed by ``flatten`` keeps its module layout ``[B, out, in * in_repeat]`` (neuron-major:
            input ``c * in_repeat + s`` belongs to neuron ``c``); :meth:`neuron_view` shows it as
            ``[B, out, in, in_repeat]``.
        biases: per layer ``[B, out]`` (zeros where the layer has no bias).
    """

    spec: WeightSpaceSpec
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.weights) != self.spec.num_layers or len(self.biases) != self.spec.num_layers:
            raise WeightSpaceError(
                f"expected {self.spec.num_layers} weights and biases, got "
                f"{len(self.weights)} and {len(self.biases)}"
            )
        batch = self.weights[0].shape[0]
        for layer, w, b in zip(self.spec.layers, self.weights, self.biases):
            if tuple(w.shape[1:]) != layer.module_weight_shape or w.shape[0] != batch:
                raise WeightSpaceError(
                    f"'{layer.weight_key}' has shape {tuple(w.shape)}, expected "
                    f"[{batch}, {', '.join(map(str, layer.module_weight_shape))}]"
                )
            if tuple(b.shape) != (batch, layer.out_features):
                raise WeightSpaceError(
                    f"'{layer.bias_key}' has shape {tuple(b.shape)}, expected "
                    f"[{batch}, {layer.out_features}]"
                )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_state_dicts(
        cls,
        state_dicts: Sequence[Mapping[str, torch.Tensor]],
        spec: WeightSpaceSpec,
        strict: bool = True,
        allow_nonfinite: bool = False,
    ) -> WeightSpace:
        """Stack state_dicts of networks that fit ``spec``.

        Args:
            strict: raise on keys the spec does not know (besides the spec's own keys).
            allow_nonfinite: keep NaN/inf values (default: raise, naming the key), as
                :func:`metanet.graph.from_module` does.

        Raises:
            WeightSpaceError: a missing or extra key, a shape that does not fit, a NaN/inf value;
                the message names the key and the network's position in ``state_dicts``.
        """
        if not state_dicts:
            raise WeightSpaceError("no state_dicts given")
        known = set(spec.param_keys())
        weights: list[list[torch.Tensor]] = [[] for _ in spec.layers]
        biases: list[list[torch.Tensor]] = [[] for _ in spec.layers]
        for n, sd in enumerate(state_dicts):
            extra = sorted(set(sd) - known)
            if strict and extra:
                raise WeightSpaceError(f"network {n}: unexpected keys {extra} for this spec")
            for i, layer in enumerate(spec.layers):
                w = _get(sd, layer.weight_key, n)
                if tuple(w.shape) != layer.module_weight_shape:
                    raise WeightSpaceError(
                        f"network {n}: '{layer.weight_key}' has shape {tuple(w.shape)}, "
                        f"expected {layer.module_weight_shape}"
                    )
                if layer.has_bias:
                    b = _get(sd, layer.bias_key, n)
                    if tuple(b.shape) != (layer.out_features,):
                        raise WeightSpaceError(
                            f"network {n}: '{layer.bias_key}' has shape {tuple(b.shape)}, "
                            f"expected ({layer.out_features},)"
                        )
                else:
                    b = torch.zeros(layer.out_features, dtype=w.dtype, device=w.device)
                if not allow_nonfinite:
                    _check_finite(w, layer.weight_key, n)
                    _check_finite(b, layer.bias_key, n)
                weights[i].append(w.detach())
                biases[i].append(b.detach())
        return cls(spec, [torch.stack(w) for w in weights], [torch.stack(b) for b in biases])

    @classmethod
    def from_modules(
        cls, modules: Sequence[nn.Module], spec: WeightSpaceSpec | None = None, **kwargs
    ) -> WeightSpace:
        """Stack networks given as modules (spec inferred from the first one by default)."""
        if not modules:
            raise WeightSpaceError("no modules given")
        spec = spec or WeightSpaceSpec.from_module(modules[0])
        sds = [
            {k: v for k, v in m.state_dict().items() if k in set(spec.param_keys())}
            for m in modules
        ]
        return cls.from_state_dicts(sds, spec, **kwargs)

    @classmethod
    def from_stacked_params(
        cls, params: Mapping[str, torch.Tensor], spec: WeightSpaceSpec
    ) -> WeightSpace:
        """The inverse of :meth:`stacked_params`: a batch from ``{key: [B, ...]}`` (other keys,
        such as buffers, are ignored; layers without a bias get zero biases)."""
        weights, biases = [], []
        n = next(iter(params.values())).shape[0]
        for layer in spec.layers:
            w = params[layer.weight_key]
            weights.append(w)
            biases.append(params[layer.bias_key] if layer.has_bias else
                          torch.zeros(n, layer.out_features, dtype=w.dtype))  # fmt: skip
        return cls(spec, weights, biases)

    @classmethod
    def from_module(cls, module: nn.Module, spec: WeightSpaceSpec | None = None) -> WeightSpace:
        """A batch of one network."""
        return cls.from_modules([module], spec)

    @classmethod
    def cat(cls, spaces: Sequence[WeightSpace]) -> WeightSpace:
        """Concatenate batches of the same spec."""
        if not spaces:
            raise WeightSpaceError("nothing to concatenate")
        spec = spaces[0].spec
        for s in spaces[1:]:
            if s.spec != spec:
                raise WeightSpaceError("cannot concatenate weight spaces of different specs")
        return cls(
            spec,
            [torch.cat([s.weights[i] for s in spaces]) for i in range(spec.num_layers)],
            [torch.cat([s.biases[i] for s in spaces]) for i in range(spec.num_layers)],
        )

    @classmethod
    def zeros(cls, spec: WeightSpaceSpec, batch: int = 1, **tensor_kwargs) -> WeightSpace:
        """An all-zero batch (useful as a template for unflatten and for model outputs)."""
        return cls(
            spec,
            [torch.zeros(batch, *l.module_weight_shape, **tensor_kwargs) for l in spec.layers],
            [torch.zeros(batch, l.out_features, **tensor_kwargs) for l in spec.layers],
        )

    # -- conversion back ------------------------------------------------------------------
    def to_state_dict(self, index: int = 0) -> dict[str, torch.Tensor]:
        """The state_dict of network ``index`` (only the spec's keys)."""
        sd: dict[str, torch.Tensor] = {}
        for layer, w, b in zip(self.spec.layers, self.weights, self.biases):
            sd[layer.weight_key] = w[index].clone()
            if layer.has_bias:
                sd[layer.bias_key] = b[index].clone()
        return sd

    def load_into(self, module: nn.Module, index: int = 0) -> nn.Module:
        """Copy network ``index`` into ``module``'s parameters in place; returns the module."""
        missing, unexpected = module.load_state_dict(self.to_state_dict(index), strict=False)
        missing = [k for k in missing if k in set(self.spec.param_keys())]
        if missing or unexpected:
            raise WeightSpaceError(
                f"{type(module).__name__} does not fit this weight space: "
                f"missing {missing}, unexpected {unexpected}"
            )
        return module

    def neuron_view(self, layer: int) -> torch.Tensor:
        """Weight ``layer`` as ``[B, out, in, *extra]`` with ``in`` counted in neurons.

        ``extra`` is the kernel of a conv, ``(in_repeat,)`` for a Linear fed by ``flatten`` and
        empty otherwise. A view: no copy.
        """
        spec = self.spec.layers[layer]
        w = self.weights[layer]
        if spec.in_repeat == 1:
            return w
        return w.view(w.shape[0], spec.out_features, spec.in_features, spec.in_repeat)

    def stacked_params(self) -> dict[str, torch.Tensor]:
        """``{state_dict key: [B, ...]}``: the batch as stacked parameters for ``torch.func``."""
        out: dict[str, torch.Tensor] = {}
        for layer, w, b in zip(self.spec.layers, self.weights, self.biases):
            out[layer.weight_key] = w
            if layer.has_bias:
                out[layer.bias_key] = b
        return out

    def flatten(self) -> torch.Tensor:
        """One vector per network, ``[B, spec.num_params]`` (layer by layer: weight, then bias)."""
        parts = []
        for layer, w, b in zip(self.spec.layers, self.weights, self.biases):
            parts.append(w.flatten(1))
            if layer.has_bias:
                parts.append(b)
        return torch.cat(parts, dim=1)

    @classmethod
    def unflatten(cls, vectors: torch.Tensor, spec: WeightSpaceSpec) -> WeightSpace:
        """Inverse of :meth:`flatten` for ``vectors`` of shape ``[B, spec.num_params]``."""
        if vectors.dim() != 2 or vectors.shape[1] != spec.num_params:
            raise WeightSpaceError(
                f"expected vectors [B, {spec.num_params}], got {tuple(vectors.shape)}"
            )
        weights, biases, offset = [], [], 0
        batch = vectors.shape[0]
        for layer in spec.layers:
            n = math.prod(layer.module_weight_shape)
            weights.append(
                vectors[:, offset : offset + n].reshape(batch, *layer.module_weight_shape)
            )
            offset += n
            if layer.has_bias:
                biases.append(vectors[:, offset : offset + layer.out_features])
                offset += layer.out_features
            else:
                biases.append(vectors.new_zeros(batch, layer.out_features))
        return cls(spec, weights, biases)

    # -- batch handling ---------------------------------------------------------------------
    def __len__(self) -> int:
        return self.weights[0].shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor | Sequence[int]) -> WeightSpace:
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return WeightSpace(
            self.spec, [w[index] for w in self.weights], [b[index] for b in self.biases]
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over layers as ``(weight, bias)`` pairs."""
        return iter(zip(self.weights, self.biases))

    def map(self, fn) -> WeightSpace:
        """Apply ``fn`` to every weight and bias tensor."""
        return WeightSpace(self.spec, [fn(w) for w in self.weights], [fn(b) for b in self.biases])

    def to(self, *args, **kwargs) -> WeightSpace:
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> WeightSpace:
        return self.map(torch.Tensor.detach)

    def clone(self) -> WeightSpace:
        return self.map(torch.Tensor.clone)

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    def __add__(self, other: WeightSpace) -> WeightSpace:
        return WeightSpace(
            self.spec,
            [a + b for a, b in zip(self.weights, other.weights)],
            [a + b for a, b in zip(self.biases, other.biases)],
        )

    def __mul__(self, scalar: float | torch.Tensor) -> WeightSpace:
        return self.map(lambda t: t * scalar)

    __rmul__ = __mul__

    def allclose(self, other: WeightSpace, atol: float = 1e-6, rtol: float = 1e-5) -> bool:
        """Whether every tensor agrees with ``other``'s to tolerance."""
        return all(
            torch.allclose(a, b, atol=atol, rtol=rtol)
            for a, b in zip(self.weights + self.biases, other.weights + other.biases)
        )

    def max_abs_diff(self, other: WeightSpace) -> float:
        """Largest absolute difference to ``other`` over all tensors."""
        return max(
            float((a - b).abs().max())
            for a, b in zip(self.weights + self.biases, other.weights + other.biases)
        )


def _get(sd: Mapping[str, torch.Tensor], key: str, n: int) -> torch.Tensor:
    if key not in sd:
        raise WeightSpaceError(f"network {n}: missing key '{key}'")
    value = sd[key]
    if not isinstance(value, torch.Tensor):
        raise WeightSpaceError(f"network {n}: '{key}' is a {type(value).__name__}, not a tensor")
    return value


def _check_finite(t: torch.Tensor, key: str, n: int) -> None:
    if not bool(torch.isfinite(t).all()):
        raise WeightSpaceError(f"network {n}: '{key}' contains NaN or inf values")
