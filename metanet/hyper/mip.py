"""Hypernetworks over any ``nn.Module``: Magnitude Invariant Parametrizations and a plain baseline.

A hypernetwork maps a conditioning input ``x`` (``[cond_dim]`` or ``[B, cond_dim]``) to the
parameters of a *target* module. The target stays an ordinary ``nn.Module``; parameters are
substituted with :func:`torch.func.functional_call`, so any module works::

    target = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    hnet = MIPHyperNetwork(target, cond_dim=1, hidden=(64, 64), mip=True)
    params = hnet(torch.tensor([0.3]))             # {"0.weight": [32, 64], ...}
    logits = hnet.functional_call(params, images)  # same as target with those parameters
    logits = hnet.forward_target(torch.tensor([0.3]), images)

MIP (Ortiz et al., "Magnitude Invariant Parametrizations Improve Hypernetwork Learning",
ICLR 2024) makes two changes to the plain hypernetwork ``W = h(x)``:

* the input is encoded with constant magnitude: ``x`` in ``[low, high]`` is rescaled to
  ``z`` in ``[0, 1]`` and fed as ``[z, 1 - z]`` (L1 norm 1 for every ``x``);
* the output is an additive residual on independent learned base parameters,
  ``W = W0 + h(x)``, with ``W0`` initialised from the target's own initialisation and the
  residual head initialised to zero (``residual_init=0``) so training starts from the target's
  ordinarily-initialised network.

``mip=False`` gives the plain hypernetwork with the same API (input ``z``, output ``h(x)``, every
layer with PyTorch's default initialisation). Conditioning inputs outside ``[low, high]`` or
non-finite raise :class:`ConditioningError` in both modes.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["ConditioningError", "MIPHyperNetwork", "encode_condition"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class ConditioningError(ValueError):
    """A conditioning input of the wrong shape, non-finite, or outside the declared range."""


def encode_condition(
    x: Tensor, low: Tensor | float = 0.0, high: Tensor | float = 1.0, mip: bool = True
) -> Tensor:
    """Rescale ``x [..., d]`` from ``[low, high]`` to ``z`` in ``[0, 1]``; MIP returns ``[z, 1-z]``
    (``[..., 2d]``), plain returns ``z`` (``[..., d]``).

    Raises:
        ConditioningError: ``x`` has NaN/inf or a value outside ``[low, high]`` (the message gives
            the offending value, its index and the range).
    """
    low_t = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    high_t = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    if not torch.isfinite(x).all():
        raise ConditioningError(f"conditioning input contains NaN or inf: {x.tolist()}")
    tol = 1e-6 * (high_t - low_t).abs().max().clamp_min(1.0)
    bad = (x < low_t - tol) | (x > high_t + tol)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        lo = low_t.expand_as(x)[idx].item()
        hi = high_t.expand_as(x)[idx].item()
        raise ConditioningError(
            f"conditioning input {x[idx].item():.6g} at index {idx} is outside the range "
            f"[{lo:.6g}, {hi:.6g}] the hypernetwork was built for (cond_range)"
        )
    z = ((x - low_t) / (high_t - low_t)).clamp(0.0, 1.0)
    return torch.cat([z, 1.0 - z], dim=-1) if mip else z


def _select(names: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    if patterns is None:
        return list(names)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise KeyError(f"parameter pattern {p!r} matches no parameter of the target "
                           f"(parameters: {list(names)})")  # fmt: skip
    return chosen


class MIPHyperNetwork(nn.Module):
    """A hypernetwork predicting (some of) the parameters of ``target`` from a conditioning input.

    Args:
        target: the module whose parameters are predicted (kept as ``self.target``; its own
            predicted parameters are frozen placeholders, the others stay trainable).
        cond_dim: size ``d`` of the conditioning input ``x [d]`` / ``[B, d]``.
        hidden: widths of the hypernetwork's hidden layers.
        mip: MIP (encoding ``[z, 1-z]`` + residual on ``W0``) or the plain hypernetwork.
        cond_range: ``(low, high)`` of every conditioning coordinate (floats or ``[d]`` lists).
        params: names or glob patterns of the target parameters to predict (default: all).
        activation: hypernetwork activation (``relu``, ``leaky_relu``, ``gelu``, ``silu``,
            ``tanh``).
        residual_init: MIP only; the residual head's weights are drawn from PyTorch's default
            init times this factor (0: ``W == W0`` at initialisation, for every ``x``).
    """

    def __init__(
        self,
        target: nn.Module,
        cond_dim: int = 1,
        hidden: Sequence[int] = (64, 64),
        mip: bool = True,
        cond_range: tuple[Any, Any] = (0.0, 1.0),
        params: Sequence[str] | None = None,
        activation: str = "relu",
        residual_init: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(target, nn.Module):
            raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
        if cond_dim < 1:
            raise ValueError(f"cond_dim must be >= 1, got {cond_dim}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        low = torch.as_tensor(cond_range[0], dtype=torch.float32).expand(cond_dim).clone()
        high = torch.as_tensor(cond_range[1], dtype=torch.float32).expand(cond_dim).clone()
        if not (high > low).all():
            raise ValueError(f"cond_range must have low < high, got {cond_range}")
        self.target = target
        self.cond_dim = int(cond_dim)
        self.mip = bool(mip)
        self.register_buffer("cond_low", low)
        self.register_buffer("cond_high", high)
        named = dict(target.named_parameters())
        self.param_names: list[str] = _select(list(named), params)
        if not self.param_names:
            raise ValueError("the target has no parameters to predict")
        self.param_shapes: dict[str, torch.Size] = {n: named[n].shape for n in self.param_names}
        for n in self.param_names:
            named[n].requires_grad_(False)
        sizes = [int(math.prod(s)) for s in self.param_shapes.values()]
        self._sizes = sizes

        layers: list[nn.Module] = []
        prev = 2 * cond_dim if mip else cond_dim
        for w in hidden:
            layers += [nn.Linear(prev, int(w)), _ACTIVATIONS[activation]()]
            prev = int(w)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, sum(sizes))
        if mip:
            # W0: independent base parameters, initialised as the target's own parameters.
            self.base = nn.ParameterList(
                [nn.Parameter(named[n].detach().clone()) for n in self.param_names]
            )
            with torch.no_grad():
                self.head.weight.mul_(float(residual_init))
                self.head.bias.zero_()
        else:
            self.base = nn.ParameterList()

    # -- parameters -------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Check and encode ``x [d]`` / ``[B, d]`` (see :func:`encode_condition`)."""
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x, dtype=torch.float32)
        if x.dim() == 0:
            x = x.reshape(1)
        if x.dim() not in (1, 2) or x.shape[-1] != self.cond_dim:
            raise ConditioningError(
                f"conditioning input must have shape [{self.cond_dim}] or [B, {self.cond_dim}], "
                f"got {list(x.shape)}"
            )
        x = x.to(self.cond_low.device, self.cond_low.dtype)
        return encode_condition(x, self.cond_low, self.cond_high, mip=self.mip)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Predicted parameters for ``x``: ``{name: [*shape]}`` for ``x [d]``, ``{name: [B,
        *shape]}`` for ``x [B, d]``."""
        enc = self.encode(x)
        batched = enc.dim() == 2
        flat = self.head(self.body(enc if batched else enc[None]))  # [B, P]
        chunks = flat.split(self._sizes, dim=-1)
        out: dict[str, Tensor] = {}
        for i, name in enumerate(self.param_names):
            p = chunks[i].reshape(flat.shape[0], *self.param_shapes[name])
            if self.mip:
                p = self.base[i] + p
            out[name] = p if batched else p[0]
        return out

    def functional_call(
        self, params: Mapping[str, Tensor], *args: Any, batched: bool | None = None, **kwargs: Any
    ) -> Any:
        """Run the target with ``params`` substituted (``torch.func.functional_call``).

        With batched parameters (``[B, *shape]``, from ``x [B, d]``) every positional input must
        have a matching leading dim ``B``; the target runs once per condition (``torch.vmap``).
        """
        if batched is None:
            name = self.param_names[0]
            batched = params[name].dim() == len(self.param_shapes[name]) + 1
        if not batched:
            return functional_call(self.target, dict(params), args, kwargs)
        nb = next(iter(params.values())).shape[0]
        for i, a in enumerate(args):
            if not isinstance(a, Tensor) or a.shape[0] != nb:
                raise ValueError(
                    f"batched parameters (B={nb}) need every input batched along dim 0 with B; "
                    f"input {i} has shape {list(a.shape) if isinstance(a, Tensor) else type(a)}"
                )

        def run(p: dict[str, Tensor], *a: Tensor) -> Any:
            return functional_call(self.target, p, a, kwargs)

        return torch.vmap(run, randomness="different")(dict(params), *args)

    def forward_target(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """``functional_call(self(x), *args)``: the target's output under the predicted params."""
        return self.functional_call(self(x), *args, **kwargs)

    def load_into(self, module: nn.Module, condition: Tensor) -> nn.Module:
        """Write the parameters predicted for one condition ``[d]`` into ``module`` (the
        target, ``self.target``, or any module with the target's parameter names and shapes)
        and return it.

        Raises:
            ConditioningError: a batch of conditions, or a module whose parameters differ from
                the target's (naming the parameter).
        """
        with torch.no_grad():
            params = self(condition)
            named = dict(module.named_parameters())
            for n, p in params.items():
                if p.dim() != len(self.param_shapes[n]):
                    raise ConditioningError("load_into takes one condition [d], not a batch")
                if n not in named or tuple(named[n].shape) != tuple(p.shape):
                    got = tuple(named[n].shape) if n in named else "missing"
                    raise ConditioningError(
                        f"module parameter '{n}' is {got}, the target's is {tuple(p.shape)}"
                    )
                named[n].copy_(p)
        return module

    def num_hyper_parameters(self) -> int:
        """Trainable parameters of the hypernetwork itself (body, head and ``W0``)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("target."))
