"""Hand-batched training of many plain-chain networks at once: the zoo builder's fast engine.

For MLPs, CNNs without norm layers or residual blocks, and SIRENs (:func:`supports`), the
networks of a chunk are trained without ``torch.func``: every layer of all networks is one batched
matmul over stacked weights, and each network gets its own exact gradient (the chunk's loss is
the sum of the networks' independent losses):

* ``Linear``: ``torch.baddbmm`` of ``[N, B, in]`` with ``[N, in, out]``;
* ``Conv2d``: feature maps are channels-last rows ``[N, B, H, W*C]``; a convolution is one GEMM
  per output row (:class:`Band`): the ``k`` input rows it reads ``[N, B*Ho, k*W*C]`` times a
  banded matrix ``[N, k*W*C, Wo*Co]`` gathered from the weights. On 8x8 maps with 1-8 channels
  this runs GEMMs with tens of columns instead of ``C_out``, at the price of zeros in the band
  (the grouped convolution ``vmap`` makes of a batched conv has a slow backward on CPU). The
  first layer's row patches of the whole data set are computed once;
* ReLU chains (MLP or CNN, with dropout, flatten or average-pool heads) use a hand-written
  backward (:meth:`BatchedNet.ce_grad`: softmax minus one-hot, then ``bmm``s and the transposes
  of the row gathers); other chains autograd through the batched forward;
* dropout: per-network rates ``[N]``, masks from 16-bit draws of a hash keyed by (network,
  step) (:func:`metanet.zoo.schedule.dropout_multipliers`, the C kernels' masks).

All networks' parameters live in one flat buffer ``[M, D]`` (``state_dict`` order, one row per
*lane*), so the optimizer step (:class:`metanet.zoo.optim.RowOptimizer`, the one optimizer of
every engine: SGD with momentum and coupled weight decay on the first rows, AdamW on the others;
per-row learning rate, weight decay, momentum and step count) is a few in-place elementwise ops,
and snapshots are row copies. Lanes (:func:`metanet.zoo.schedule.plan_lanes`) train their
networks one after another, so no row idles while short runs finish. Sample indices, labels and
loss weights of every step come from the per-network, per-epoch sample orders every engine reads
(:func:`metanet.zoo.schedule.sample_orders`), drawn up front. This module imports nothing from
:mod:`metanet.zoo.train` (the engine interface imports it).
Evaluation shares the input across networks: one GEMM (MLP/SIREN) or one convolution with
``N * C_out`` channels (CNN, oneDNN forward) for the first layer of all networks.

On the CPU, ReLU chains trained with cross-entropy run their training steps and evaluation
through the fused C kernels of :mod:`metanet.zoo.native` (:func:`native_chain`; several times
faster on tiny networks, where these PyTorch ops spend their time on memory traffic and per-op
overhead); everything else, and machines without a C compiler, use the PyTorch ops below.

The results equal :mod:`metanet.zoo.train`'s ``torch.func`` engine and plain per-network
``torch.optim`` training up to float rounding (tested, with and without the C kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metanet.zoo.architectures import (
    ACTIVATIONS,
    SampledDropout,
    Sine,
    build_module,
    normalize_arch,
)
from metanet.zoo.optim import RowOptimizer, optimizer_hparams, uses_adam
from metanet.zoo.schedule import (
    ChunkData,
    ChunkResult,
    assemble_records,
    dropout_keys,
    dropout_multipliers,
    hparam_column,
    init_rows,
    kept_records,
    plan_lanes,
    psnr_targets,
    sample_orders,
    step_schedule,
)


# ------------------------------------------------------------------------------------------------
# convolutions as banded GEMMs over rows (channels-last)
# ------------------------------------------------------------------------------------------------
def _out_size(size: int, k: int, s: int, pad: int) -> int:
    return (size + 2 * pad - k) // s + 1


@dataclass(frozen=True)
class Band:
    """A ``k x k`` convolution (stride ``s``, zero padding ``pad``) of ``[H, W, C]`` maps to
    ``[Ho, Wo, Co]`` maps (channels-last) as one GEMM per output row: output row ``i`` is the
    ``k`` input rows ``s*i - pad .. s*i - pad + k - 1`` (``[k*W*C]``, zero rows outside the map)
    times a banded matrix ``[k*W*C, Wo*Co]`` filled from the conv weight. Tiny convolutions
    (8x8 maps, 1-8 channels) then run as GEMMs with tens of columns instead of ``C_out``.

    ``rows`` ``[Ho*k]``: the row of the row-padded map (``pad`` zero rows above and below) each
    output row reads; ``index`` ``[k*W*C, Wo*Co]``: the entry of the flat weight
    ``[Co*C*k*k]`` (PyTorch order) at each entry of the banded matrix, ``Co*C*k*k`` for zeros.
    """

    h: int
    w: int
    c: int
    co: int
    k: int
    s: int
    pad: int

    @property
    def ho(self) -> int:
        return _out_size(self.h, self.k, self.s, self.pad)

    @property
    def wo(self) -> int:
        return _out_size(self.w, self.k, self.s, self.pad)

    @property
    def n_weights(self) -> int:
        return self.co * self.c * self.k * self.k

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        i = torch.arange(self.ho).view(-1, 1) * self.s
        return (i + torch.arange(self.k).view(1, -1)).reshape(-1)

    @functools.cached_property
    def index(self) -> torch.Tensor:
        k, c, co = self.k, self.c, self.co
        dy = torch.arange(k).view(k, 1, 1, 1, 1)
        x = torch.arange(self.w).view(1, -1, 1, 1, 1)
        ci = torch.arange(c).view(1, 1, c, 1, 1)
        j = torch.arange(self.wo).view(1, 1, 1, -1, 1)
        o = torch.arange(co).view(1, 1, 1, 1, co)
        dx = x + self.pad - self.s * j
        flat = ((o * c + ci) * k + dy) * k + dx.clamp(0, k - 1)
        flat = torch.where((dx >= 0) & (dx < k), flat, self.n_weights)
        return flat.reshape(k * self.w * c, self.wo * co)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """Conv weights ``[N, Co, C, k, k]`` -> banded matrices ``[N, k*W*C, Wo*Co]``."""
        flat = weight.reshape(weight.shape[0], -1)
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], dim=1)
        return flat[:, self.index.to(flat.device)]

    def weight_grad(self, grad_matrix: torch.Tensor) -> torch.Tensor:
        """Gradient of :meth:`matrix`: ``[N, k*W*C, Wo*Co]`` -> ``[N, Co*C*k*k]``."""
        n = grad_matrix.shape[0]
        out = grad_matrix.new_zeros(n, self.n_weights + 1)
        out.index_add_(1, self.index.to(out.device).reshape(-1), grad_matrix.reshape(n, -1))
        return out[:, :-1]

    def bias_row(self, bias: torch.Tensor) -> torch.Tensor:
        """Bias ``[N, Co]`` -> ``[N, 1, Wo*Co]`` (repeated over the output row)."""
        return bias.repeat(1, self.wo).unsqueeze(1)

    def cols(self, x: torch.Tensor) -> torch.Tensor:
        """Row patches of maps ``[..., H, W*C]``: ``[..., Ho, k*W*C]`` (``k`` strided row slices
        of the row-padded map, stacked)."""
        if self.pad:
            x = F.pad(x, (0, 0, self.pad, self.pad))
        span = self.s * (self.ho - 1) + 1
        out = torch.stack([x[..., dy : dy + span : self.s, :] for dy in range(self.k)], dim=-2)
        return out.view(*x.shape[:-2], self.ho, self.k * x.shape[-1])

    def cols_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient of :meth:`cols`: ``[..., Ho, k*W*C]`` -> ``[..., H, W*C]``."""
        lead = grad.shape[:-2]
        wc = self.w * self.c
        g = grad.reshape(*lead, self.ho, self.k, wc)
        out = grad.new_zeros(*lead, self.h + 2 * self.pad, wc)
        span = self.s * (self.ho - 1) + 1
        for dy in range(self.k):
            out[..., dy : dy + span : self.s, :] += g[..., dy, :]
        return out[..., self.pad : self.pad + self.h, :] if self.pad else out


# ------------------------------------------------------------------------------------------------
# the batched network
# ------------------------------------------------------------------------------------------------
_ACT_TYPES = tuple(ACTIVATIONS.values())


def supports(arch: dict[str, Any]) -> bool:
    """Whether ``arch`` is a plain chain this engine trains (MLP, SIREN, CNN without norm layers
    and residual blocks)."""
    a = normalize_arch(arch)
    if a["type"] == "module":  # a user's module: the reference (vmap) engine trains any
        return False
    if a["type"] != "cnn":
        return True
    return a["norm"] is None and not any(
        not isinstance(
            m, (nn.Conv2d, nn.Linear, nn.Flatten, nn.AvgPool2d, SampledDropout, *_ACT_TYPES)
        )  # fmt: skip
        for m in build_module(a)
    )


@dataclass
class _Op:
    kind: str  # linear | conv | act | dropout | pool | flatten
    index: int = -1  # parameter slot (weights at 2*index, bias at 2*index+1) for linear/conv
    module: nn.Module | None = None  # activation
    band: Band | None = None  # conv
    chw: tuple[int, int, int] | None = None  # linear after flatten of a [C, H, W] map
    hwc: tuple[int, int, int] | None = None  # pool: input map size


class BatchedNet:
    """``N`` networks of one plain-chain ``arch`` as batched tensor ops on a flat buffer.

    ``keys``/``shapes`` are the module's ``state_dict`` entries (all parameters; these archs
    have no buffers); :meth:`pack` / :meth:`unpack` convert ``{key: [N, *shape]}`` to and from
    the flat ``[N, D]`` buffer. :meth:`prepare` turns data ``[n, *input_shape]`` into what
    :meth:`forward` consumes (for CNNs: the first layer's row patches ``[n, Ho, k*W*C]``). CNN
    feature maps are ``[N, B, H, W*C]`` (channels-last rows), convolutions :class:`Band` GEMMs.
    """

    def __init__(self, arch: dict[str, Any]) -> None:
        if not supports(arch):
            raise ValueError(f"the batched engine does not train {arch} (norm/residual layers)")
        self.arch = normalize_arch(arch)
        template = build_module(self.arch)
        named = list(template.named_parameters())
        self.keys = [k for k, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.dim = self.offsets[-1]
        self.conv = self.arch["type"] == "cnn"
        ops: list[_Op] = []
        layer = 0
        size = self.arch.get("input_size", 0)
        chw: tuple[int, int, int] | None = None
        channels = self.arch.get("in_channels", 0)
        for m in template:
            if isinstance(m, nn.Linear):
                if m.bias is None:
                    raise ValueError("the batched engine needs biases (arch 'bias: false')")
                ops.append(_Op("linear", layer, chw=chw))
                layer, chw = layer + 1, None
            elif isinstance(m, nn.Conv2d):
                if m.bias is None:
                    raise ValueError("the batched engine needs biases (arch 'bias: false')")
                band = Band(size, size, channels, m.out_channels, m.kernel_size[0], m.stride[0],
                            m.padding[0])  # fmt: skip
                ops.append(_Op("conv", layer, band=band))
                size, channels = band.ho, m.out_channels
                layer += 1
            elif isinstance(m, SampledDropout):
                ops.append(_Op("dropout"))
            elif isinstance(m, nn.AvgPool2d):
                ops.append(_Op("pool", hwc=(size, size, channels)))
                size = 1
            elif isinstance(m, nn.Flatten):
                if size > 1:
                    chw = (channels, size, size)
                ops.append(_Op("flatten"))
            elif isinstance(m, (Sine, *_ACT_TYPES)):
                ops.append(_Op("act", module=m))
            else:  # pragma: no cover - supports() filters these
                raise ValueError(f"unsupported layer {type(m).__name__}")
        self.ops = ops
        self.first = ops[0]
        # ReLU chains get a hand-written backward (:meth:`ce_grad`): far fewer ops per step
        self.manual = all(
            o.kind in ("linear", "conv", "dropout", "flatten", "pool")
            or (o.kind == "act" and type(o.module) is nn.ReLU)
            for o in ops
        )

    def op_shapes(self) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
        """``(input, output)`` per-sample shapes ``(C, H, W)`` of every op (flat features are
        ``(F, 1, 1)``): the layout the C kernels and the dropout masks index units in."""
        size = self.arch.get("input_size", 1)
        chw = ((self.arch.get("in_channels", 1), size, size) if self.conv
               else (self.arch["in"], 1, 1))  # fmt: skip
        shapes = []
        for op in self.ops:
            c, h, w = chw
            if op.kind == "conv":
                out = (op.band.co, op.band.ho, op.band.wo)
            elif op.kind == "linear":
                out = (self.shapes[2 * op.index][0], 1, 1)
            elif op.kind == "pool":
                out = (c, 1, 1)
            elif op.kind == "flatten":
                out = (c * h * w, 1, 1)
            else:  # activation, dropout
                out = chw
            shapes.append((chw, out))
            chw = out
        return shapes

    def dropout_mult(self, j: int, h: torch.Tensor, dropout: tuple[torch.Tensor, torch.Tensor]
                     ) -> torch.Tensor:  # fmt: skip
        """The multipliers of dropout op ``j`` for activations ``h`` (this engine's layout:
        ``[M, B, F]``, or ``[M, B, H, W*C]`` after convolutions), from ``dropout`` = (rates
        ``[M]``, keys ``[M]``): :func:`metanet.zoo.schedule.dropout_multipliers`, the C kernels'
        masks."""
        rate, keys = dropout
        (c, hh, ww), _ = self.op_shapes()[j]
        m, b = h.shape[0], h.shape[1]
        mult = dropout_multipliers(keys, rate, j, b, c * hh * ww)  # units in (C, H, W) order
        if h.dim() == 4:  # conv maps here are [M, B, H, W*C]
            mult = mult.view(m, b, c, hh, ww).permute(0, 1, 3, 4, 2).reshape(h.shape)
        return mult.view(h.shape)

    # -- parameters ------------------------------------------------------------------------------
    def pack(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{key: [N, *shape]}`` -> flat ``[N, D]``."""
        n = params[self.keys[0]].shape[0]
        return torch.cat([params[k].reshape(n, -1) for k in self.keys], dim=1).contiguous()

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``[N, D]`` -> ``{key: [N, *shape]}`` (copies)."""
        n = flat.shape[0]
        return {
            k: flat[:, o : o + s].reshape(n, *shape).clone()
            for k, o, s, shape in zip(self.keys, self.offsets, self.sizes, self.shapes)
        }

    def views(self, flat: torch.Tensor, requires_grad: bool) -> list[torch.Tensor]:
        """Per-parameter ``[N, *shape]`` views of ``flat`` (leaves when ``requires_grad``)."""
        n = flat.shape[0]
        out = []
        for o, s, shape in zip(self.offsets, self.sizes, self.shapes):
            v = flat[:, o : o + s].view(n, *shape)
            out.append(v.detach().requires_grad_() if requires_grad else v)
        return out

    # -- data ----------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Data ``[n, *input_shape]`` -> the input of :meth:`forward` (``[n, in]`` for MLP/SIREN,
        first-layer row patches ``[n, Ho, k*W*C]`` for CNNs)."""
        if not self.conv:
            return x.reshape(x.shape[0], -1)
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n, h, w * c)  # channels-last rows
        return self.first.band.cols(rows)

    # -- forward -------------------------------------------------------------------------------
    @staticmethod
    def _affine(x: torch.Tensor, wm: torch.Tensor, b: torch.Tensor, shared: bool) -> torch.Tensor:
        """``x @ wm + b`` per network: ``wm [N, in, out]``, ``b [N, 1, out]``; ``x`` is
        ``[N, ..., in]`` or (``shared``) ``[..., in]`` for all networks (then one GEMM with the
        weights of all networks side by side). Returns ``[N, ..., out]``."""
        n, d_in, d_out = wm.shape
        if shared:
            lead = x.shape[:-1]
            flat = x.reshape(-1, d_in) @ wm.permute(1, 0, 2).reshape(d_in, n * d_out)
            out = flat.view(-1, n, d_out).transpose(0, 1) + b
            return out.reshape(n, *lead, d_out)
        out = torch.baddbmm(b, x.reshape(n, -1, d_in), wm)
        return out.view(n, *x.shape[1:-1], d_out)

    def _linear_weight(self, op: _Op, w: torch.Tensor) -> torch.Tensor:
        """Linear weights ``[N, out, in]`` -> ``[N, in, out]``, inputs in this engine's
        channels-last flatten order where the layer follows a flattened map."""
        if op.chw is not None:  # Flatten order (C, H, W) -> our (H, W, C)
            n, c, (hh, ww) = w.shape[0], op.chw[0], op.chw[1:]
            w = w.view(n, -1, c, hh, ww).permute(0, 1, 3, 4, 2).reshape(n, -1, c * hh * ww)
        return w.transpose(1, 2)

    def _linear_weight_grad(self, op: _Op, g: torch.Tensor) -> torch.Tensor:
        """Gradient ``[N, out, in]`` of :meth:`_linear_weight` (inputs in this engine's order)
        -> ``[N, out * in]`` (PyTorch order)."""
        if op.chw is not None:
            n, c, (hh, ww) = g.shape[0], op.chw[0], op.chw[1:]
            g = g.reshape(n, -1, hh, ww, c).permute(0, 1, 4, 2, 3)
        return g.reshape(g.shape[0], -1)

    def forward(
        self,
        p: Sequence[torch.Tensor],
        x: torch.Tensor,
        dropout: tuple[torch.Tensor, torch.Tensor] | None = None,
        shared: bool = False,
    ) -> torch.Tensor:
        """Outputs ``[N, B, out]`` of the ``N`` networks with parameters ``p`` (:meth:`views`).

        Args:
            x: prepared input (:meth:`prepare`), ``[N, B, ...]`` per network or ``[B, ...]``
                for all networks (``shared``).
            dropout: per-network dropout rates and mask keys ``([N], [N])`` (training,
                :func:`metanet.zoo.schedule.dropout_keys`) or ``None`` (evaluation).
        """
        n = p[0].shape[0]
        h = x
        for j, op in enumerate(self.ops):
            first = shared and j == 0
            if op.kind == "conv":
                band = op.band
                cols = h if j == 0 else band.cols(h)
                w, b = band.matrix(p[2 * op.index]), band.bias_row(p[2 * op.index + 1])
                h = self._affine(cols, w, b, first)  # [N, B, Ho, Wo*Co]
            elif op.kind == "linear":
                w = self._linear_weight(op, p[2 * op.index])
                h = self._affine(h, w, p[2 * op.index + 1].unsqueeze(1), first)
            elif op.kind == "act":
                h = op.module(h)
            elif op.kind == "dropout":
                if dropout is not None:  # inverted dropout, rate and mask key per network
                    h = h * self.dropout_mult(j, h, dropout)
            elif op.kind == "pool":
                hh, ww, c = op.hwc
                h = h.reshape(n, h.shape[1], hh * ww, c).mean(2)  # [N, B, C]
            elif op.kind == "flatten":
                h = h.reshape(n, h.shape[1], -1)
        return h

    @torch.no_grad()
    def ce_grad(
        self,
        flat: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        dropout: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Gradient ``[M, D]`` (flat layout) of each network's weighted cross-entropy
        ``sum_b w[m, b] * CE(net_m(x[m, b]), y[m, b])`` for a ReLU chain (:attr:`manual`):
        forward with per-network dropout, then the backward written out by hand (softmax minus
        one-hot, then ``bmm``s and the transposes of the row gathers)."""
        m = flat.shape[0]
        p = self.views(flat, requires_grad=False)
        grads: list[torch.Tensor | None] = [None] * len(p)
        tape: list[tuple[_Op, Any]] = []  # each op with what its backward needs
        h = x
        for j, op in enumerate(self.ops):
            if op.kind == "conv":
                cols = h if j == 0 else op.band.cols(h)
                wm = op.band.matrix(p[2 * op.index])
                tape.append((op, (cols, wm)))
                h = self._affine(cols, wm, op.band.bias_row(p[2 * op.index + 1]), False)
            elif op.kind == "linear":
                wm = self._linear_weight(op, p[2 * op.index])
                tape.append((op, (h, wm)))
                h = torch.baddbmm(p[2 * op.index + 1].unsqueeze(1), h, wm)
            elif op.kind == "act":
                mult = h > 0
                h = h * mult
                tape.append((op, mult))
            elif op.kind == "dropout" and dropout is not None:
                mult = self.dropout_mult(j, h, dropout)
                h = h * mult
                tape.append((op, mult))
            elif op.kind == "pool":
                tape.append((op, h.shape))
                hh, ww, c = op.hwc
                h = h.reshape(m, h.shape[1], hh * ww, c).mean(2)
            elif op.kind == "flatten":
                tape.append((op, h.shape))
                h = h.reshape(m, h.shape[1], -1)
        g = torch.softmax(h, dim=-1)  # [M, B, C]
        g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(g[..., :1], -1.0))
        g.mul_(w.unsqueeze(-1))
        for j in range(len(tape) - 1, -1, -1):
            op, saved = tape[j]
            if op.kind in ("act", "dropout"):
                g = g * saved
            elif op.kind == "flatten":
                g = g.reshape(saved)
            elif op.kind == "pool":
                hh, ww, c = op.hwc
                g = (g / (hh * ww)).unsqueeze(2).expand(m, g.shape[1], hh * ww, c)
                g = g.reshape(saved)
            elif op.kind == "linear":
                inp, wm = saved
                g = g.reshape(m, -1, wm.shape[2])
                gw = torch.bmm(g.transpose(1, 2), inp.reshape(m, -1, wm.shape[1]))
                grads[2 * op.index] = self._linear_weight_grad(op, gw)
                grads[2 * op.index + 1] = g.sum(dim=1)
                if j > 0:
                    g = torch.bmm(g, wm.transpose(1, 2)).view(inp.shape)
            else:  # conv
                cols, wm = saved
                band = op.band
                g2 = g.reshape(m, -1, wm.shape[2])  # [M, B*Ho, Wo*Co]
                gm = torch.bmm(cols.reshape(m, -1, wm.shape[1]).transpose(1, 2), g2)
                grads[2 * op.index] = band.weight_grad(gm)
                grads[2 * op.index + 1] = g2.sum(dim=1).view(m, band.wo, band.co).sum(1)
                if j > 0:
                    gc = torch.bmm(g2, wm.transpose(1, 2)).view(cols.shape)
                    g = band.cols_grad(gc)
        return torch.cat([t.reshape(m, -1) for t in grads], dim=1)

    @torch.no_grad()
    def forward_eval(self, p: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Evaluation outputs ``[N, B, out]`` (no dropout) of the ``N`` networks on the same
        data ``x`` (raw, ``[B, *input_shape]``). CNNs run as one convolution with ``N * C_out``
        channels (first layer) and grouped convolutions (oneDNN's forward kernels beat the
        banded GEMMs here, where all networks share the input); others use :meth:`forward`
        (``shared``: the first layer of all networks is one GEMM)."""
        if not self.conv:
            return self.forward(p, self.prepare(x), None, shared=True)
        n = p[0].shape[0]
        h = x
        first_conv = True
        for op in self.ops:
            if op.kind == "conv":
                w, b = p[2 * op.index], p[2 * op.index + 1]
                h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), stride=op.band.s,
                             padding=op.band.pad, groups=1 if first_conv else n)  # fmt: skip
                first_conv = False
            elif op.kind == "act":
                h = op.module(h)
            elif op.kind == "pool":
                h = h.mean(dim=(2, 3))  # [B, N*C]
            elif op.kind == "flatten":
                h = h.reshape(h.shape[0], n, -1).transpose(0, 1)  # [N, B, C*H*W] (torch order)
            elif op.kind == "linear":
                w, b = p[2 * op.index], p[2 * op.index + 1]
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        return h


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def native_chain(net: BatchedNet, device: torch.device, regression: bool = False) -> Any:
    """The fused C kernels (:class:`metanet.zoo.native.NativeChain`) for ``net`` where they
    apply (a ReLU chain trained with cross-entropy on the CPU, the kernels compiled), else
    ``None`` (the PyTorch ops of this module)."""
    from metanet.zoo import native

    if regression or not net.manual or torch.device(device).type != "cpu":
        return None
    if native.library() is None:
        return None
    return native.NativeChain(net)


def train_chunk_batched(
    arch: dict[str, Any],
    plans: Sequence[Any],
    data: ChunkData,
    keep_fractions: Sequence[float],
    device: torch.device | str = "cpu",
    generator_seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    eval_batch: int = 512,
    extra_metrics: dict[str, Sequence[Any]] | None = None,
    compact: bool = True,
) -> ChunkResult:
    """:func:`metanet.zoo.train.train_chunk` with the hand-batched engine (same arguments,
    same records). The schedule, the random draws and the optimizer are those of every engine
    (:mod:`metanet.zoo.schedule`, :mod:`metanet.zoo.optim`); only the arithmetic is this
    module's (or the C kernels').

    ``compact`` (chunks with a ``psnr_target``): networks that stopped for good (at the target,
    or diverged) leave the batch with their parameters, optimizer state and targets once at
    least 1/16 of the rows have stopped, their later checkpoints written at once (they equal
    the frozen weights), and the chunk ends when every network has stopped, so it costs the
    steps its networks really take. A row whose lane has a network still to train keeps its
    place (frozen) until that network starts, and one stopped row stays as a frozen filler where
    the batch would otherwise shrink to one row before it does without compaction (a one-row
    batch runs other kernels, with other rounding). ``False`` keeps every stopped row until its
    lane ends. Both give bit-identical records.
    """
    if any(not isinstance(x, torch.Tensor) for x in (data.x_train, *data.x_eval.values())):
        raise ValueError("the batched engine needs the data in memory, and it is over the memory "
                         "limit (use engine='vmap', which streams it)")  # fmt: skip
    device = torch.device(device)
    net = BatchedNet(arch)
    n = len(plans)
    flat0 = init_rows(arch, plans).to(device)  # net.keys order = named_parameters order
    is_adam = uses_adam(plans)

    regression = data.regression
    native = native_chain(net, device, regression)
    x_all = net.prepare(data.x_train.to(device)) if native is None else data.x_train.flatten(1)
    n_train = x_all.shape[0]
    subset = data.subset.to(device)
    subset_size = subset.sum(1)
    batch, spe, epochs, keep = step_schedule(plans, subset_size, n_train, keep_fractions, device)
    total = epochs * spe
    full = bool((batch >= n_train).all()) and bool(subset.all())  # every step: all samples
    y_all = data.y_train.to(device)

    lr_all, wd_all, mom_all = optimizer_hparams(plans, device)
    dropout = hparam_column(plans, "dropout", 0.0, device=device)
    use_dropout = bool((dropout > 0).any()) and any(o.kind == "dropout" for o in net.ops)
    snap_at = keep * spe[:, None]  # [N, K] local step after which slot k is snapshotted

    # Continuous batching: each row ("lane") of the batch trains its networks one after another,
    # so rows stay busy while short runs finish (SGD lanes first, then AdamW lanes).
    tot = total.tolist()
    lanes = plan_lanes(tot, [int(a) for a in is_adam])
    k_sgd = sum(1 for lane in lanes if not is_adam[lane[0]])
    start_at = [0] * n  # global step at which each network starts
    events_start: dict[int, list[tuple[int, int]]] = {}  # step -> [(lane, net)]
    events_snap: dict[int, list[tuple[int, int, int]]] = {}  # step -> [(lane, net, slot)]
    lane_end = []
    for j, lane in enumerate(lanes):
        t0 = 0
        for i in lane:
            start_at[i] = t0
            if t0 > 0:
                events_start.setdefault(t0, []).append((j, i))
            for k_slot, at in enumerate(snap_at[i].tolist()):
                events_snap.setdefault(t0 + at, []).append((j, i, k_slot))
            t0 += tot[i]
        lane_end.append(t0)
    t_max = max(lane_end)
    events_end: dict[int, list[int]] = {}
    for j, end in enumerate(lane_end):
        events_end.setdefault(end, []).append(j)
    # the step after which each network's checkpoint slots are taken (compaction writes those
    # still to come when a stopped network leaves), and each lane's last network
    snap_step = [[start_at[i] + at for at in snap_at[i].tolist()] for i in range(n)]
    lane_last = torch.tensor([lane[-1] for lane in lanes], dtype=torch.long, device=device)
    first = torch.tensor([lane[0] for lane in lanes], dtype=torch.long, device=device)
    lane_row = list(range(len(lanes)))  # lane -> row of the batch (-1 once the lane is done)
    flat = flat0[first].clone()
    opt = RowOptimizer(flat, lr_all[first], wd_all[first], mom_all[first], k_sgd)
    st: dict[str, torch.Tensor] = {"net": first, "drop": dropout[first],
                                   "y": y_all[first] if full else y_all[:0]}  # fmt: skip
    frozen = torch.zeros(len(lanes), dtype=torch.bool, device=device)  # diverged: no updates
    filler = torch.zeros_like(frozen)  # rows kept, frozen, after their lane is done (compact)
    n_slots = len(keep_fractions)
    snaps = flat0.new_zeros(n_slots, n, net.dim)
    mse_target, has_target = psnr_targets(plans, device)
    stop_step = total.clone()  # updates each network made (early stop: fewer)
    diverged = torch.zeros(n, dtype=torch.bool, device=device)

    # Sample order: one permutation of its own train subset per network and epoch, drawn up
    # front (keys of samples outside the subset sort last); steps read it through a schedule
    # (sample indices, labels, loss weights) built for windows of steps.
    e_max = int(epochs.max())
    b_max = int(batch.max())
    perm = torch.empty(0, dtype=torch.long, device=device)
    if not full:
        perm = sample_orders(subset, e_max, generator_seed, device).view(-1)  # [N * E * n_train]
    y_flat = y_all.reshape(n * n_train, *y_all.shape[2:]) if not full else y_all
    arange_b = torch.arange(b_max, device=device)
    window = max(1, 1_000_000 // (len(lanes) * b_max))
    q_max = max(len(lane) for lane in lanes)
    big = t_max + 1
    lane_starts = torch.tensor([[start_at[i] for i in lane] + [big] * (q_max - len(lane))
                                for lane in lanes], device=device)  # fmt: skip
    lane_nets = torch.tensor([lane + [lane[-1]] * (q_max - len(lane)) for lane in lanes],
                             device=device)  # fmt: skip
    start_t = torch.tensor(start_at, device=device)
    row_lane = torch.arange(len(lanes), device=device)  # lane of each row

    def schedule(t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample indices, labels and loss weights ``[M, W, B]`` of steps ``t0..t1-1``."""
        ts = torch.arange(t0, t1, device=device).repeat(row_lane.shape[0], 1)  # [M, W]
        q = torch.searchsorted(lane_starts[row_lane], ts, right=True) - 1
        nets = lane_nets[row_lane].gather(1, q.clamp(min=0))  # [M, W] network at each step
        u = ts - start_t[nets]  # local step
        spe_ = spe[nets]
        ep = (u // spe_).clamp(max=e_max - 1)
        offs = (u % spe_)[..., None] * batch[nets][..., None] + arange_b  # [M, W, B]
        valid = (arange_b < batch[nets][..., None]) & (offs < subset_size[nets][..., None])
        base = ((nets * e_max + ep) * n_train)[..., None]
        idx = perm[base + offs.clamp(max=n_train - 1)]
        ys = y_flat[nets[..., None] * n_train + idx]
        w = valid.float()
        return idx, ys, w / w.sum(-1, keepdim=True).clamp_min(1.0)

    manual = net.manual and not regression and not full
    sched: tuple[torch.Tensor, ...] = ()
    w0 = w1 = 0
    full_w = torch.full((1, n_train), 1.0 / n_train, device=device)

    def drop_rows(keep_rows: torch.Tensor) -> None:
        nonlocal flat, st, sched, frozen, filler, row_lane
        flat, frozen, row_lane = flat[keep_rows], frozen[keep_rows], row_lane[keep_rows]
        filler = filler[keep_rows]
        st = {k: v[keep_rows] if v.shape[0] else v for k, v in st.items()}
        sched = tuple(v[keep_rows] for v in sched)
        opt.select(keep_rows)

    for t in range(t_max):
        starting = events_start.get(t)
        if starting:  # next networks of their lanes: initial weights, fresh optimizer state
            rows = torch.tensor([lane_row[j] for j, _ in starting], device=device)
            nets = torch.tensor([i for _, i in starting], device=device)
            flat[rows] = flat0[nets]
            opt.reset(rows, lr_all[nets], wd_all[nets], mom_all[nets])
            st["net"][rows], st["drop"][rows] = nets, dropout[nets]
            if full:
                st["y"][rows] = y_all[nets]
            frozen[rows] = False
        m = flat.shape[0]
        if full:
            xb, yb, wb, shared = x_all, st["y"], full_w, True
            if native is not None:
                xb, wb = x_all.expand(m, *x_all.shape), full_w.expand(m, -1)
        else:
            if t >= w1:
                w0, w1 = t, min(t_max, t + window)
                sched = schedule(w0, w1)
            idx, yb, wb = (v[:, t - w0] for v in sched)
            xb = x_all[idx]
            shared = False
        drop = None
        if use_dropout:  # masks keyed by (network, its own step): the same in every engine
            drop = (st["drop"], dropout_keys(generator_seed, st["net"], t - start_t[st["net"]]))
        if native is not None:  # fused C kernels (metanet.zoo.native)
            grad, losses = native.ce_grad(flat, xb, yb, wb, *(drop or (None, None)))
        elif manual:  # non-finite logits give non-finite gradients: the test below sees them
            grad = net.ce_grad(flat, xb, yb, wb, drop)
            losses = grad[:, 0]
        else:
            leaves = net.views(flat, requires_grad=True)
            out = net.forward(leaves, xb, drop, shared=shared)
            if regression:
                per = ((out - yb) ** 2).mean(-1)
            else:
                per = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1),
                                      reduction="none").view(m, -1)  # fmt: skip
            losses = (per * wb).sum(1)
            grads = torch.autograd.grad(losses.sum(), leaves)
            grad = torch.cat([g.reshape(m, -1) for g in grads], dim=1)
        # one reduction instead of an elementwise test: a non-finite entry makes the row sum
        # non-finite (finite rows overflow only past ~1e38, i.e. diverged anyway)
        bad = ~torch.isfinite(losses + grad.sum(1)) & ~filler
        if bool(bad.any()):  # diverged: frozen at the last finite parameters until its end
            diverged[st["net"][bad]] = True
            frozen |= bad
        if has_target:  # early stop: this step's full-batch loss already reaches the target
            newly = ~frozen & (losses <= mse_target[st["net"]])
            if bool(newly.any()):
                stop_step[st["net"][newly]] = t - start_t[st["net"][newly]]
                frozen |= newly
        opt.step(flat, grad, frozen)
        snapping = events_snap.get(t + 1)
        if snapping:
            for k_slot in range(n_slots):
                hits = [(lane_row[j], i) for j, i, k in snapping if k == k_slot
                        and lane_row[j] >= 0]  # fmt: skip
                if hits:
                    rows = torch.tensor([r for r, _ in hits], device=device)
                    snaps[k_slot, torch.tensor([i for _, i in hits], device=device)] = flat[rows]
        if on_step is not None:
            on_step(t + 1, t_max)
        ending = [j for j in events_end.get(t + 1, ()) if lane_row[j] >= 0]
        if t + 1 >= t_max:
            continue
        stopped: list[int] = []  # rows of stopped networks with nothing after them in the lane
        if compact and has_target and bool(frozen.any()):
            last = frozen & (st["net"] == lane_last[row_lane])
            count = int(last.sum())
            if count and count >= max(1, m // 16):
                stopped = last.nonzero().flatten().tolist()
                for r in stopped:  # its later checkpoints: the frozen weights it leaves with
                    i = int(st["net"][r])
                    for k_slot, at in enumerate(snap_step[i]):
                        if at > t + 1:
                            snaps[k_slot, i] = flat[r]
        if ending or stopped:  # lanes with no network left leave the batch
            leaving = [int(lane_row[j]) for j in ending]
            leaving += [r for r in stopped if int(row_lane[r]) not in ending]
            if m - len(leaving) == 0:  # every network left has stopped (or ended)
                break
            # a batch of one row runs other kernels than a batch of several (other rounding):
            # while the batch without compaction would hold several rows, a stopped (or ended)
            # row stays as a frozen filler, so every network's arithmetic is the same as there
            live_ref = sum(1 for end in lane_end if end > t + 1)
            if m - len(leaving) == 1 and live_ref >= 2:
                fill = leaving.pop(len(ending) if len(leaving) > len(ending) else 0)
                frozen[fill], filler[fill] = True, True
            if leaving:
                keep_rows = torch.ones(m, dtype=torch.bool, device=device)
                for r in leaving:
                    keep_rows[r] = False
                    lane_row[int(row_lane[r])] = -1
                live = [j for j in range(len(lanes)) if lane_row[j] >= 0]
                for r, j in enumerate(live):
                    lane_row[j] = r
                drop_rows(keep_rows)

    # -- evaluation of each distinct (network, kept epoch) ---------------------------------------
    records = kept_records(keep)  # (network, slot, epoch)
    rec_net = torch.tensor([r[0] for r in records], dtype=torch.long, device=device)
    rec_slot = torch.tensor([r[1] for r in records], dtype=torch.long, device=device)
    rec_flat = snaps[rec_slot, rec_net]  # [R, D]
    stats = _evaluate(net, rec_flat, rec_net, data, device, eval_batch, native=native)
    params = net.unpack(rec_flat.cpu())
    if has_target:
        extra_metrics = {**(extra_metrics or {}), "steps": stop_step.tolist()}
    return assemble_records(
        plans, records, params, stats, epochs.cpu(), diverged.cpu(), regression,
        extra_metrics or {},
    )  # fmt: skip


@torch.no_grad()
def _evaluate(
    net: BatchedNet,
    rec_flat: torch.Tensor,
    rec_net: torch.Tensor,
    data: Any,
    device: torch.device,
    eval_batch: int,
    nets_per_pass: int = 64,
    native: Any = None,
) -> dict[str, torch.Tensor]:
    """Loss and accuracy ``[R]`` of each record on the train and test splits (``{split}_loss``,
    ``{split}_acc``); SIRENs: MSE and the fraction of pixels within 1/32."""
    regression = data.regression
    r_total = rec_flat.shape[0]
    out: dict[str, torch.Tensor] = {}
    if net.conv:
        eval_batch = min(eval_batch, 256)
    for split, x in data.x_eval.items():
        xp = x.to(device)
        y = data.y_eval[split].to(device)
        shared_y = y.dim() == (1 if not regression else 2)
        scored = data.eval_masks.get(split)  # [N, n] samples each network is scored on
        scored = scored.to(device).float()[rec_net] if scored is not None else None
        loss = torch.zeros(r_total, device=device)
        acc = torch.zeros(r_total, device=device)
        for r0 in range(0, r_total, nets_per_pass):
            rows = slice(r0, min(r0 + nets_per_pass, r_total))
            p = net.views(rec_flat[rows], requires_grad=False)
            nets = rec_net[rows]
            for s in range(0, xp.shape[0], eval_batch):
                if native is not None:  # fused C kernel
                    o = native.forward(rec_flat[rows], xp[s : s + eval_batch])
                else:
                    o = net.forward_eval(p, xp[s : s + eval_batch])  # [r, b, C]
                yb = y[s : s + eval_batch] if shared_y else y[nets, s : s + eval_batch]
                if shared_y:
                    yb = yb.expand(o.shape[0], *yb.shape)
                if regression:
                    err = o - yb
                    loss[rows] += (err**2).mean(-1).sum(1)
                    acc[rows] += (err.abs() < 1.0 / 32.0).float().mean(-1).sum(1)
                else:
                    w = scored[rows, s : s + eval_batch] if scored is not None else 1.0
                    ce = F.cross_entropy(o.reshape(-1, o.shape[-1]), yb.reshape(-1),
                                         reduction="none").view(o.shape[0], -1)  # fmt: skip
                    loss[rows] += (ce * w).sum(1)
                    acc[rows] += ((o.argmax(-1) == yb).float() * w).sum(1)
        count = scored.sum(1).clamp_min(1) if scored is not None else xp.shape[0]
        out[f"{split}_loss"] = (loss / count).cpu()
        out[f"{split}_acc"] = (acc / count).cpu()
    return out
