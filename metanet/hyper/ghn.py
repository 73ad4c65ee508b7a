"""Graph hypernetworks (GHN-2/3 style, with a LoGAH low-rank decoder option).

A :class:`GHN` reads the op-level graph of a module (:class:`metanet.graph.arch.ArchGraph`) and
predicts every parameter of it::

    ghn = GHN(hidden=64, layers=3, decoder="lowrank")
    model = ghn.load_into(MyNet())        # MyNet with predicted parameters
    params = ghn.predict(MyNet())         # {param name: tensor}, differentiable w.r.t. the GHN
    params.report                         # InitReport: which tensors were predicted / kept

Pipeline: node embedding (op type embedding + shape-feature MLP) -> ``layers`` rounds of
bidirectional message passing over GHN-2's *virtual edges* (every pair of ops at data-flow
distance ``<= max_dist``, with a learned distance embedding; mean aggregation on the scatter
core, :mod:`metanet.ops`) -> per parameter tensor, the node embedding plus a role embedding
(``weight``/``bias``/...) -> decoder (:class:`~metanet.hyper.decoders.TilingDecoder` or
:class:`~metanet.hyper.decoders.LowRankDecoder`) -> normalisation of the predicted parameters:
``normalize="fan_in"`` (default: GHN-2's fan-in scaling,
:func:`~metanet.hyper.decoders.normalize_param`; checkpoints saved without the key load with it)
or ``normalize="scaled"``
(:func:`~metanet.hyper.decoders.normalize_scaled`, for families with attention: each weight
tensor gets RMS ``gain * sqrt(beta / fan_in)`` exactly, with ``beta = 2`` only where the op
feeds a rectifier and a positive per-tensor gain predicted by the GHN; bounded norm scales and
shifts; tiling GHNs decode the Q, K and V blocks of a fused attention projection apart). Fan-in
scaling lets attention logits grow with the square of an uncontrolled decoder scale, which broke
training of GHN-initialised transformers; "scaled" fixes that when transformers are in the
training family, but lowers the zero-shot accuracy of tiling GHNs on held-out CNNs, so it is not
the default yet (BENCHMARKS.md, "GHN initialisation of transformers").
Buffers (BatchNorm running statistics) are not predicted: recompute them on a few batches with
:func:`metanet.hyper.calibrate.calibrate_batchnorm` (CLI: ``init-weights --calibrate-bn N``).

Ops outside the vocabulary (:data:`metanet.graph.arch.OPS`) raise :class:`GHNVocabularyError`
naming the op and module path; with ``fallback_init=True`` their parameters keep the module's
own initialisation and the op is embedded as ``unknown`` (both logged on the
``metanet.hyper.ghn`` logger). Never silently: :meth:`GHN.predict` returns a
:class:`PredictedParams` dict whose ``report`` (:class:`InitReport`) lists the predicted and the
kept tensors (with the reason), which together are exactly ``module.named_parameters()``.

Shapes: a parameter consumed outside a layer (layer scale ``[C, 1, 1]``, ViT's ``cls_token``
``[1, 1, D]``) is decoded with its size-1 axes dropped and reshaped back; Hugging Face's
``Conv1D`` weight (``[in, out]``) is decoded as ``[out, in]`` and transposed; a tensor shared by
several names (tied embeddings) is predicted once.

Checkpoints: new ops are appended to :data:`~metanet.graph.arch.OPS`, so a checkpoint saved with
a smaller vocabulary loads (:meth:`GHN.load`, ``load_state_dict``, Lightning checkpoints of a
GHN task): its op embedding rows keep their indices and each appended op starts
from the row of the op it specialises (:data:`~metanet.graph.arch.OP_FALLBACK`, e.g.
``group_conv`` from ``conv``, ``hardswish`` from ``silu``; else ``unknown``), i.e. the old GHN
embeds it exactly as it embedded that op before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metanet.graph.arch import OP_FALLBACK, OPS, ArchGraph
from metanet.hyper.decoders import (
    LowRankDecoder,
    TilingDecoder,
    normalize_param,
    normalize_scaled,
)

__all__ = ["GHN", "GHNVocabularyError", "InitReport", "PredictedParams", "ROLES"]

log = logging.getLogger("metanet.hyper.ghn")

#: Parameter roles with their own embedding; anything else is ``other``.
ROLES: tuple[str, ...] = ("weight", "bias", "in_proj_weight", "in_proj_bias", "out_proj.weight",
                          "out_proj.bias", "other")  # fmt: skip
FORMAT = "metanet-ghn/1"


class GHNVocabularyError(ValueError):
    """An op (or parameter) the GHN cannot predict; the message names it and its module path."""


def _scatter_fn() -> Any:
    """metanet's scatter core (``metanet.ops.scatter``), or None while it is unavailable."""
    try:
        import metanet.ops as ops

        fn = getattr(ops, "scatter", None)
        if fn is not None and not callable(fn):  # the submodule, before __init__ re-exports it
            fn = getattr(fn, "scatter", None)
        return fn if callable(fn) else None
    except ImportError:
        return None


def _scatter_mean(src: Tensor, index: Tensor, size: int) -> Tensor:
    """Mean of ``src [E, F]`` rows per ``index`` (``[size, F]``), on metanet's scatter core."""
    fn = _scatter_fn()
    if fn is None:  # native fallback
        out = src.new_zeros(size, src.shape[1]).index_add_(0, index, src)
        cnt = src.new_zeros(size).index_add_(0, index, src.new_ones(index.shape[0]))
        return out / cnt.clamp_min(1.0)[:, None]
    return fn(src, index, dim=0, dim_size=size, reduce="mean")


@dataclass
class _Slot:
    """One parameter tensor to predict: decoded as ``decode_shape``, then transposed (HF
    ``Conv1D``) and reshaped to ``shape``."""

    name: str
    node: int
    role: int
    shape: tuple[int, ...]
    op: str
    role_name: str
    last: bool
    fan_in: int
    decode_shape: tuple[int, ...] = ()
    transpose: bool = False
    beta: float = 2.0  # gain of the scaled normalisation: 2 where the op feeds a rectifier

    def finish(self, t: Tensor) -> Tensor:
        """The decoded tensor in the parameter's own layout."""
        if self.transpose:
            t = t.t()
        return t.reshape(self.shape)


@dataclass
class InitReport:
    """Which parameters of a module a GHN predicted and which keep the module's own init.

    Attributes:
        predicted: parameter names (as in ``module.named_parameters()``) the GHN predicts.
        kept: ``name -> reason`` for parameters left to the module's own initialisation.
        tied: other names of shared tensors -> the predicted / kept name they alias.
        numel: ``name -> number of elements`` of every parameter above.
    """

    predicted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def num_predicted(self) -> int:
        """Elements of the predicted tensors."""
        return sum(self.numel.get(k, 0) for k in self.predicted)

    @property
    def num_kept(self) -> int:
        """Elements of the kept tensors."""
        return sum(self.numel.get(k, 0) for k in self.kept)

    def summary(self) -> str:
        """One line: tensor and element counts."""
        return (f"predicted {len(self.predicted)} tensors ({self.num_predicted} parameters), "
                f"kept the module's own init for {len(self.kept)} tensors "
                f"({self.num_kept} parameters)")  # fmt: skip

    def lines(self) -> list[str]:
        """The summary, then one line per kept tensor (with its reason) and per tied alias."""
        out = [self.summary()]
        out += [f"  kept {k}: {why}" for k, why in self.kept.items()]
        out += [f"  tied {k} -> {v}" for k, v in self.tied.items()]
        return out


class PredictedParams(dict):
    """``{parameter name: predicted tensor}`` with the :class:`InitReport` as ``.report``."""

    report: InitReport

    def __init__(self, params: dict[str, Tensor], report: InitReport) -> None:
        super().__init__(params)
        self.report = report


@dataclass
class _Prepared:
    """Tensors of one ArchGraph the GHN consumes, and the parameters it predicts."""

    ops: Tensor  # [N]
    feats: Tensor  # [N, 8]
    edges: Tensor  # [2, E] virtual edges
    dist: Tensor  # [E]
    slots: list[_Slot]
    kept: list[str]  # parameters left to the module's own init (fallback)
    reasons: dict[str, str] = field(default_factory=dict)  # kept parameter -> why
    tied: dict[str, str] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)

    def report(self) -> InitReport:
        """The :class:`InitReport` of this graph."""
        return InitReport([s.name for s in self.slots],
                          {k: self.reasons.get(k, "kept") for k in self.kept}, dict(self.tied),
                          dict(self.numel))  # fmt: skip


def _decode_plan(node_attrs: dict[str, Any], op: str, role: str,
                 shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:  # fmt: skip
    """``(decode_shape, transpose)`` of a parameter (see the module docstring)."""
    if node_attrs.get("transposed") and len(shape) == 2 and role == "weight":
        return (shape[1], shape[0]), True
    if _squeezed(op, role, shape):
        return tuple(d for d in shape if d != 1) or (1,), False
    return shape, False


def _squeezed(op: str, role: str, shape: tuple[int, ...]) -> bool:
    """Whether a parameter is decoded without its size-1 axes: one consumed outside a layer
    (by a tensor op such as ``x * gamma``, ``x + pos``, ``cat(cls, x)``) or a scalar."""
    return role.startswith("other") or op in _TENSOR_OPS or len(shape) == 0


_TENSOR_OPS = {"layer_scale", "add", "mul", "cat", "matmul", "mask"}
#: Activations after which He's gain (``beta = 2``) keeps the variance.
_RECTIFIERS = {"relu", "leaky_relu", "gelu", "silu", "elu", "hardswish"}
#: Ops looked through when finding what a parametrised op feeds.
_THROUGH = {"reshape", "permute", "flatten", "split", "pad"}
#: Normalisations of predicted parameters (see the module docstring).
NORMALIZATIONS = ("scaled", "fan_in")


_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) == 1


def _gain(z: Tensor) -> Tensor:
    """The per-tensor gain of the scaled normalisation: ``softplus(z + log(e - 1))``, positive,
    1 at ``z = 0``, growing linearly (not exponentially) in ``z``."""
    return torch.nn.functional.softplus(z + _SOFTPLUS_ONE)


def _fused_parts(slot: _Slot) -> int:
    """3 for the fused query/key/value projection of ``nn.MultiheadAttention`` (weight
    ``[3 D, D]``, bias ``[3 D]``), decoded as three tensors; else 1."""
    if slot.role_name in ("in_proj_weight", "in_proj_bias") and slot.decode_shape[0] % 3 == 0:
        return 3
    return 1


def _feeds_rectifier(graph: ArchGraph) -> list[bool]:
    """Per node: whether its output reaches a rectifier through view ops only."""
    succ: list[list[int]] = [[] for _ in graph.nodes]
    for s, d in graph.edge_index.t().tolist():
        succ[s].append(d)
    out = []
    for i in range(len(graph.nodes)):
        stack, seen, hit = list(succ[i]), set(), False
        while stack and not hit:
            j = stack.pop()
            if j in seen:
                continue
            seen.add(j)
            op = graph.nodes[j].op
            hit = op in _RECTIFIERS
            if op in _THROUGH:
                stack.extend(succ[j])
        out.append(hit)
    return out


class GHN(nn.Module):
    """Graph hypernetwork.

    Args:
        hidden: node embedding size.
        layers: message-passing rounds.
        decoder: ``"lowrank"`` (LoGAH) or ``"tiling"`` (GHN-2/3).
        decoder_hidden: width of the decoder MLP.
        rank: low-rank decoder rank ``r``.
        max_dim: low-rank decoder factor length (widths beyond are tiled).
        chunk: tiling decoder chunk ``(chunk, chunk)`` along out/in.
        kernel: spatial size of predicted kernels (others cropped/tiled).
        max_dist: virtual-edge distance (1 = real edges only).
        normalize: normalisation of predicted parameters, ``"fan_in"`` (GHN-2's, default) or
            ``"scaled"`` (for attention families; see the module docstring).
    """

    def __init__(
        self,
        hidden: int = 64,
        layers: int = 3,
        decoder: str = "lowrank",
        decoder_hidden: int = 64,
        rank: int = 8,
        max_dim: int = 256,
        chunk: int = 32,
        kernel: int = 3,
        max_dist: int = 3,
        normalize: str = "fan_in",
    ) -> None:
        super().__init__()
        if decoder not in ("lowrank", "tiling"):
            raise ValueError(f"decoder must be 'lowrank' or 'tiling', got {decoder!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
        self.config: dict[str, Any] = dict(
            hidden=hidden, layers=layers, decoder=decoder, decoder_hidden=decoder_hidden,
            rank=rank, max_dim=max_dim, chunk=chunk, kernel=kernel, max_dist=max_dist,
            normalize=normalize,
        )  # fmt: skip
        self.normalize = normalize
        self.vocab = OPS
        self.max_dist = int(max_dist)
        self.op_embed = nn.Embedding(len(OPS), hidden)
        self.shape_enc = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.dist_embed = nn.Embedding(self.max_dist + 1, hidden)
        self.role_embed = nn.Embedding(len(ROLES), hidden)
        self.msg_fwd = nn.ModuleList([self._mlp(hidden) for _ in range(layers)])
        self.msg_bwd = nn.ModuleList([self._mlp(hidden) for _ in range(layers)])
        self.update = nn.ModuleList(
            [nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
             for _ in range(layers)]  # fmt: skip
        )
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(layers + 1)])
        if decoder == "lowrank":
            self.decoder: nn.Module = LowRankDecoder(hidden, decoder_hidden, rank=rank,
                                                     max_dim=max_dim, kernel=kernel)  # fmt: skip
        else:
            self.decoder = TilingDecoder(hidden, decoder_hidden, chunk_out=chunk, chunk_in=chunk,
                                         kernel=kernel)  # fmt: skip
        if normalize == "scaled":  # per-tensor gain softplus(. + log(e - 1)), 1 at init
            self.gain = nn.Linear(hidden, 1)
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.gain.bias)
            if decoder == "tiling":
                self.part_embed = nn.Embedding(3, hidden)  # Q / K / V of a fused in_proj

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Pad an op embedding saved with an older, smaller vocabulary (any loading path:
        :meth:`load`, ``load_state_dict``, Lightning checkpoints of a GHN task)."""
        key = prefix + "op_embed.weight"
        table = state_dict.get(key)
        if isinstance(table, Tensor) and table.dim() == 2 and table.shape[0] < len(self.vocab):
            state_dict[key] = _pad_op_embedding(table, self.vocab)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @staticmethod
    def _mlp(h: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h))

    # -- graphs -----------------------------------------------------------------------------------
    def prepare(
        self,
        graph: ArchGraph,
        module: nn.Module | None = None,
        fallback_init: bool = False,
        keep_output: bool = False,
    ) -> _Prepared:
        """Check ``graph`` against the vocabulary and list the parameters to predict (a tensor
        used by several ops, e.g. tied embeddings, is predicted once, at its first use); the
        result's ``report()`` is the :class:`InitReport` (exact when ``module`` is given).
        With ``keep_output`` the parameters of the output layer (ops flagged ``last``: the
        output is reached from them through no other parametrised op) are left to the module's
        own initialisation and listed as kept (a tensor tied to an earlier op stays predicted).

        Raises:
            GHNVocabularyError: an op outside the vocabulary, a parameter of an unsupported
                shape, or (with ``module``) a parameter no traced op uses; unless
                ``fallback_init`` (then logged and left to the module's own init).
        """
        kept: list[str] = []
        reasons: dict[str, str] = {}
        slots: list[_Slot] = []
        seen: set[str] = set()

        def refuse(what: str, names: Sequence[str]) -> None:
            if not fallback_init:
                raise GHNVocabularyError(
                    f"{what}; the GHN cannot predict it (vocabulary: "
                    f"{', '.join(o for o in self.vocab if o != 'unknown')}). "
                    "Pass fallback_init=True (CLI: --fallback-init) to keep the module's own "
                    "initialisation for it."
                )
            log.warning("GHN fallback: %s -> keeping the module's own initialisation", what)
            for pname in names:
                if pname not in seen:
                    seen.add(pname)
                    kept.append(pname)
                    reasons[pname] = what

        rectified = _feeds_rectifier(graph)
        for i, node in enumerate(graph.nodes):
            where = f"module path '{node.module_path}'" if node.module_path else "the root module"
            if not node.known:
                refuse(f"op '{node.op}' (graph node '{node.name}', {where}) is outside the GHN "
                       "vocabulary", list(node.params.values()))  # fmt: skip
                continue
            main = node.shapes.get("weight") or node.shapes.get("in_proj_weight")
            if main and node.attrs.get("transposed") and len(main) == 2:
                main = (main[1], main[0])
            fan_in = int(math.prod(main[1:])) if main and len(main) >= 2 else 1
            output_layer = keep_output and bool(node.attrs.get("last", False))
            for role, pname in node.params.items():
                if pname in seen:  # a shared tensor, predicted at its first use
                    continue
                if output_layer:
                    seen.add(pname)
                    kept.append(pname)
                    reasons[pname] = (f"output layer ({where}, op '{node.op}'): left to the "
                                      "module's own init (keep_output)")  # fmt: skip
                    continue
                shape = node.shapes[role]
                dshape, transpose = _decode_plan(node.attrs, node.op, role, shape)
                if len(dshape) > 4 or (len(dshape) > 2 and _squeezed(node.op, role, shape)):
                    refuse(f"parameter '{pname}' of op '{node.op}' ({where}) has unsupported "
                           f"shape {list(shape)}", [pname])  # fmt: skip
                    continue
                seen.add(pname)
                r = ROLES.index(role) if role in ROLES else ROLES.index("other")
                # attention's projections feed the softmax / the residual add, never a rectifier
                beta = 2.0 if rectified[i] and node.op not in ("attention", "sdpa") else 1.0
                slots.append(_Slot(pname, i, r, shape, node.op, role,
                                   bool(node.attrs.get("last", False)), fan_in, dshape,
                                   transpose, beta))  # fmt: skip
        numel: dict[str, int] = {}
        tied = dict(graph.tied)
        if module is not None:
            for pname, p in module.named_parameters():
                numel[pname] = p.numel()
                if pname not in seen:
                    refuse(f"parameter '{pname}' is used by no traced op", [pname])
        else:
            for node in graph.nodes:
                for role, pname in node.params.items():
                    numel[pname] = int(math.prod(node.shapes[role]))
        edges, dist = graph.virtual_edges(self.max_dist)
        return _Prepared(graph.op_index(self.vocab), graph.shape_features(), edges, dist, slots,
                         kept, reasons, tied, numel)  # fmt: skip

    def embed(self, prepared: Sequence[_Prepared]) -> list[Tensor]:
        """Node embeddings ``[N_g, hidden]`` of each prepared graph (disjoint-union batch)."""
        dev = self.op_embed.weight.device
        sizes = [p.ops.shape[0] for p in prepared]
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        ops = torch.cat([p.ops for p in prepared]).to(dev)
        feats = torch.cat([p.feats for p in prepared]).to(dev)
        edges = torch.cat([p.edges + o for p, o in zip(prepared, offsets)], dim=1).to(dev)
        dist = torch.cat([p.dist for p in prepared]).to(dev)
        n = ops.shape[0]
        h = self.norms[0](self.op_embed(ops) + self.shape_enc(feats))
        src, dst = edges[0], edges[1]
        de = self.dist_embed(dist)
        for t in range(len(self.update)):
            m_f = _scatter_mean(self.msg_fwd[t](h[src] + de), dst, n)
            m_b = _scatter_mean(self.msg_bwd[t](h[dst] + de), src, n)
            h = self.norms[t + 1](h + self.update[t](torch.cat([h, m_f, m_b], dim=-1)))
        return list(h.split(sizes))

    # -- prediction -------------------------------------------------------------------------------
    def predict_prepared(self, prepared: Sequence[_Prepared]) -> list[dict[str, Tensor]]:
        """Predicted parameters ``{name: tensor}`` for each prepared graph (differentiable)."""
        hs = self.embed(prepared)
        scaled = self.normalize == "scaled"
        # one decoder row per slot, or per part of a fused projection (scaled tiling GHNs: Q, K,
        # V of nn.MultiheadAttention's in_proj are decoded apart, with a part embedding, so that
        # tiling the chunk along the out axis cannot make W_q = W_k = W_v; the low-rank decoder
        # has distinct rows of A for them up to max_dim)
        split = scaled and isinstance(self.decoder, TilingDecoder)
        rows, roles, parts, slots, owner, shapes = [], [], [], [], [], []
        for g, (p, h) in enumerate(zip(prepared, hs)):
            for s in p.slots:
                k = _fused_parts(s) if split else 1
                for part in range(k):
                    rows.append(h[s.node])
                    roles.append(s.role)
                    parts.append(part if k > 1 else 0)
                    slots.append(s)
                    owner.append(g)
                    shapes.append(s.decode_shape if k == 1
                                  else (s.decode_shape[0] // k, *s.decode_shape[1:]))  # fmt: skip
        out: list[dict[str, Tensor]] = [{} for _ in prepared]
        if not slots:
            return out
        dev = self.op_embed.weight.device
        hp = torch.stack(rows) + self.role_embed(torch.tensor(roles, device=dev))
        if split:
            hp = hp + self.part_embed(torch.tensor(parts, device=dev))
        raw: dict[int, Tensor] = {}
        mat = [j for j, shape in enumerate(shapes) if len(shape) >= 2]
        vec = [j for j, shape in enumerate(shapes) if len(shape) == 1]
        if mat:
            for j, t in zip(mat, self.decoder.matrices(hp[mat], [shapes[j] for j in mat])):
                raw[j] = t
        if vec:
            for j, t in zip(vec, self.decoder.vectors(hp[vec], [shapes[j][0] for j in vec])):
                raw[j] = t
        gains = _gain(self.gain(hp).squeeze(-1)) if scaled else None
        pieces: dict[tuple[int, str], list[Tensor]] = {}
        for j, s in enumerate(slots):
            if gains is not None:
                value = normalize_scaled(raw[j], s.role_name, s.op, s.beta, gains[j], s.fan_in)
            else:
                value = normalize_param(raw[j], s.role_name, s.op, s.last, s.fan_in)
            pieces.setdefault((owner[j], s.name), []).append(value)
        for j, s in enumerate(slots):
            key = (owner[j], s.name)
            if s.name not in out[owner[j]]:
                got = pieces[key]
                out[owner[j]][s.name] = s.finish(got[0] if len(got) == 1 else torch.cat(got))
        return out

    def predict(
        self,
        model: nn.Module | ArchGraph,
        fallback_init: bool = False,
        example_input: Tensor | None = None,
        keep_output: bool = False,
    ) -> PredictedParams:
        """Predicted parameters of ``model`` (a module, recorded here, or its ArchGraph).

        Args:
            model: the module (or its :class:`ArchGraph`).
            fallback_init: keep the module's own init for what the GHN cannot predict (logged
                and listed in the report) instead of raising.
            example_input: input to record the module on (guessed when ``None``, see
                :meth:`ArchGraph.from_module`).
            keep_output: leave the output layer (e.g. the classifier head) to the module's own
                init. For an initialisation that will be trained: a GHN trained for zero-shot
                accuracy predicts a confident head (logits ~6x the default init's RMS on the
                digits transformers), which slows training; a fresh head with a predicted body
                trains faster (BENCHMARKS.md, "GHN initialisation of transformers").
        Returns:
            ``{name: tensor}`` for every predicted parameter; ``.report`` (:class:`InitReport`)
            lists the predicted and kept tensors (their union is ``model.named_parameters()``).
        Raises:
            GHNVocabularyError: see :meth:`prepare` (unless ``fallback_init``).
            metanet.graph.arch.ArchTraceError: ``model``'s forward cannot be recorded.
        """
        if isinstance(model, ArchGraph):
            prepared = self.prepare(model, None, fallback_init, keep_output)
        else:
            graph = ArchGraph.from_module(model, example_input)
            prepared = self.prepare(graph, model, fallback_init, keep_output)
        return PredictedParams(self.predict_prepared([prepared])[0], prepared.report())

    @torch.no_grad()
    def load_into(self, model: nn.Module, fallback_init: bool = False,
                  example_input: Tensor | None = None,
                  keep_output: bool = False) -> nn.Module:  # fmt: skip
        """Write the parameters predicted for ``model`` into it (in place) and return it; the
        :class:`InitReport` is logged (INFO) and kept as ``self.last_report``. Arguments as
        for :meth:`predict`.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            GHNVocabularyError: see :meth:`prepare` (unless ``fallback_init``).
            metanet.graph.arch.ArchTraceError: ``model``'s forward cannot be recorded.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"GHN.load_into needs an nn.Module, got {type(model).__name__}")
        params = self.predict(model, fallback_init=fallback_init, example_input=example_input,
                              keep_output=keep_output)  # fmt: skip
        named = dict(model.named_parameters())
        for name, value in params.items():
            named[name].copy_(value.to(named[name].device, named[name].dtype))
        self.last_report = params.report
        for line in params.report.lines():
            log.info("%s: %s", type(model).__name__, line)
        return model

    def num_decoder_parameters(self) -> int:
        """Parameters of the decoder alone."""
        return sum(p.numel() for p in self.decoder.parameters())

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the GHN (config + state_dict) to ``path`` as one safetensors file (no pickle;
        the config is JSON in its metadata), atomically. ``.safetensors`` is the usual suffix."""
        from metanet.serialization import save_tree

        save_tree(path, {"format": FORMAT, "ghn_config": self.config,
                         "state_dict": self.state_dict()})  # fmt: skip

    @classmethod
    def load(
        cls,
        path: str | Path,
        map_location: str | torch.device = "cpu",
        trust_pickle: bool = False,
    ) -> GHN:
        """Load a GHN saved by :meth:`save` or a Lightning checkpoint of
        :class:`metanet.tasks.hypernet.GHNTask` (read tensors-only; ``trust_pickle`` allows a
        full unpickle, which runs code named in the file: only for files you trust).

        Raises:
            FileNotFoundError / ValueError: missing file, or a file that is neither (names it).
        """
        from metanet.serialization import FileError, load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GHN checkpoint not found: {path}")
        try:
            ckpt = load_file(path, trust_pickle=trust_pickle)
        except FileError as exc:
            raise ValueError(f"cannot read GHN checkpoint: {exc}") from None
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path} is not a GHN checkpoint (got {type(ckpt).__name__})")
        if ckpt.get("format") == FORMAT:
            config, state = ckpt["ghn_config"], ckpt["state_dict"]
        elif "hyper_parameters" in ckpt and "state_dict" in ckpt:
            hp = ckpt["hyper_parameters"]
            if "ghn" not in hp:
                raise ValueError(f"{path} is a Lightning checkpoint but not of a GHN task "
                                 "(no 'ghn' hyperparameters)")  # fmt: skip
            config = dict(hp["ghn"])
            state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ghn.")}
        else:
            raise ValueError(f"{path} is not a GHN checkpoint (keys: {sorted(ckpt)[:8]})")
        config = dict(config)
        config.setdefault("normalize", "fan_in")  # saved before the scaled normalisation
        ghn = cls(**config)
        ghn.load_state_dict(state)
        return ghn.to(map_location)


def _pad_op_embedding(table: Tensor, vocab: tuple[str, ...]) -> Tensor:
    """An op embedding table saved with the first ``len(table)`` ops of ``vocab`` (an older
    vocabulary), extended to ``vocab``: each appended op copies the row of its
    :data:`~metanet.graph.arch.OP_FALLBACK` op when that one is stored, else ``unknown``'s."""
    old = vocab[: table.shape[0]]
    if "unknown" not in old:
        oldest = vocab.index("unknown") + 1
        raise ValueError(f"GHN checkpoint has an op embedding of {table.shape[0]} ops, fewer "
                         f"than the {oldest} of the oldest vocabulary")  # fmt: skip
    rows = [table]
    for op in vocab[table.shape[0] :]:
        base = OP_FALLBACK.get(op, "unknown")
        rows.append(table[old.index(base if base in old else "unknown")][None])
    log.info("GHN checkpoint has %d op embeddings; appended ops %s start from older ones",
             table.shape[0], list(vocab[table.shape[0] :]))  # fmt: skip
    return torch.cat(rows)
