"""Graph hypernetworks (GHN-2/3 style, with a LoGAH low-rank decoder option).

A :class:`GHN` reads the op-level graph of a module (:class:`metanet.graph.arch.ArchGraph`) and
predicts every parameter of it::

    ghn = GHN(hidden=64, layers=3, decoder="lowrank")
    model = ghn.apply(MyNet())            # MyNet with predicted parameters
    params = ghn.predict(MyNet())         # {param name: tensor}, differentiable w.r.t. the GHN

Pipeline: node embedding (op type embedding + shape-feature MLP) -> ``layers`` rounds of
bidirectional message passing over GHN-2's *virtual edges* (every pair of ops at data-flow
distance ``<= max_dist``, with a learned distance embedding; mean aggregation on the scatter
core, :mod:`metanet.ops`) -> per parameter tensor, the node embedding plus a role embedding
(``weight``/``bias``/...) -> decoder (:class:`~metanet.hyper.decoders.TilingDecoder` or
:class:`~metanet.hyper.decoders.LowRankDecoder`) -> GHN-style fan-in normalisation
(:func:`~metanet.hyper.decoders.normalize_param`). Buffers (BatchNorm running statistics) are not
predicted.

Ops outside the vocabulary (:data:`metanet.graph.arch.OPS`) raise :class:`GHNVocabularyError`
naming the op and module path; with ``fallback_init=True`` their parameters keep the module's
own initialisation and the op is embedded as ``unknown`` (both logged on the
``metanet.hyper.ghn`` logger).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metanet.graph.arch import OPS, ArchGraph
from metanet.hyper.decoders import LowRankDecoder, TilingDecoder, normalize_param

__all__ = ["GHN", "GHNVocabularyError", "ROLES"]

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
    """One parameter tensor to predict."""

    name: str
    node: int
    role: int
    shape: tuple[int, ...]
    op: str
    role_name: str
    last: bool
    fan_in: int


@dataclass
class _Prepared:
    """Tensors of one ArchGraph the GHN consumes, and the parameters it predicts."""

    ops: Tensor  # [N]
    feats: Tensor  # [N, 8]
    edges: Tensor  # [2, E] virtual edges
    dist: Tensor  # [E]
    slots: list[_Slot]
    kept: list[str]  # parameters left to the module's own init (fallback)


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
    ) -> None:
        super().__init__()
        if decoder not in ("lowrank", "tiling"):
            raise ValueError(f"decoder must be 'lowrank' or 'tiling', got {decoder!r}")
        self.config: dict[str, Any] = dict(
            hidden=hidden, layers=layers, decoder=decoder, decoder_hidden=decoder_hidden,
            rank=rank, max_dim=max_dim, chunk=chunk, kernel=kernel, max_dist=max_dist,
        )  # fmt: skip
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

    @staticmethod
    def _mlp(h: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h))

    # -- graphs -----------------------------------------------------------------------------------
    def prepare(
        self, graph: ArchGraph, module: nn.Module | None = None, fallback_init: bool = False
    ) -> _Prepared:
        """Check ``graph`` against the vocabulary and list the parameters to predict.

        Raises:
            GHNVocabularyError: an op outside the vocabulary, a parameter of an unsupported
                shape, or (with ``module``) a parameter no traced op uses; unless
                ``fallback_init`` (then logged and left to the module's own init).
        """
        kept: list[str] = []
        slots: list[_Slot] = []

        def refuse(what: str) -> None:
            if not fallback_init:
                raise GHNVocabularyError(
                    f"{what}; the GHN cannot predict it (vocabulary: {', '.join(OPS[:-1])}). "
                    "Pass fallback_init=True (CLI: --fallback-init) to keep the module's own "
                    "initialisation for it."
                )
            log.warning("GHN fallback: %s -> keeping the module's own initialisation", what)

        for i, node in enumerate(graph.nodes):
            where = f"module path '{node.module_path}'" if node.module_path else "the root module"
            if not node.known:
                refuse(f"op '{node.op}' (fx node '{node.name}', {where}) is outside the GHN "
                       "vocabulary")  # fmt: skip
                kept += list(node.params.values())
                continue
            main = node.shapes.get("weight") or node.shapes.get("in_proj_weight")
            fan_in = int(math.prod(main[1:])) if main and len(main) >= 2 else 1
            for role, pname in node.params.items():
                shape = node.shapes[role]
                if len(shape) == 0 or len(shape) > 4:
                    refuse(f"parameter '{pname}' of op '{node.op}' ({where}) has unsupported "
                           f"shape {list(shape)}")  # fmt: skip
                    kept.append(pname)
                    continue
                r = ROLES.index(role) if role in ROLES else ROLES.index("other")
                slots.append(_Slot(pname, i, r, shape, node.op, role,
                                   bool(node.attrs.get("last", False)), fan_in))  # fmt: skip
        if module is not None:
            covered = {s.name for s in slots} | set(kept)
            for pname, _ in module.named_parameters():
                if pname not in covered:
                    refuse(f"parameter '{pname}' is used by no traced op")
                    kept.append(pname)
        edges, dist = graph.virtual_edges(self.max_dist)
        return _Prepared(graph.op_index(self.vocab), graph.shape_features(), edges, dist, slots,
                         kept)  # fmt: skip

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
        rows, roles, slots, owner = [], [], [], []
        for g, (p, h) in enumerate(zip(prepared, hs)):
            for s in p.slots:
                rows.append(h[s.node])
                roles.append(s.role)
                slots.append(s)
                owner.append(g)
        out: list[dict[str, Tensor]] = [{} for _ in prepared]
        if not slots:
            return out
        dev = self.op_embed.weight.device
        hp = torch.stack(rows) + self.role_embed(torch.tensor(roles, device=dev))
        mat = [j for j, s in enumerate(slots) if len(s.shape) >= 2]
        vec = [j for j, s in enumerate(slots) if len(s.shape) == 1]
        raw: dict[int, Tensor] = {}
        if mat:
            for j, t in zip(mat, self.decoder.matrices(hp[mat], [slots[j].shape for j in mat])):
                raw[j] = t
        if vec:
            for j, t in zip(vec, self.decoder.vectors(hp[vec], [slots[j].shape[0] for j in vec])):
                raw[j] = t
        for j, s in enumerate(slots):
            out[owner[j]][s.name] = normalize_param(raw[j], s.role_name, s.op, s.last, s.fan_in)
        return out

    def predict(
        self, model: nn.Module | ArchGraph, fallback_init: bool = False
    ) -> dict[str, Tensor]:
        """Predicted parameters of ``model`` (a module, traced here, or its ArchGraph)."""
        if isinstance(model, ArchGraph):
            prepared = self.prepare(model, None, fallback_init)
        else:
            prepared = self.prepare(ArchGraph.from_module(model), model, fallback_init)
        return self.predict_prepared([prepared])[0]

    @torch.no_grad()
    def apply(self, model: Any, fallback_init: bool = False) -> Any:  # type: ignore[override]
        """Load predicted parameters into ``model`` (in place) and return it.

        (Given a plain function instead of a module, this is ``nn.Module.apply(fn)``, so code
        that walks module trees with ``.apply(fn)`` keeps working.)

        Raises:
            GHNVocabularyError: see :meth:`prepare` (unless ``fallback_init``).
            metanet.graph.arch.ArchTraceError: ``model``'s forward cannot be traced.
        """
        if not isinstance(model, nn.Module):
            if callable(model):
                return super().apply(model)
            raise TypeError(f"GHN.apply needs an nn.Module, got {type(model).__name__}")
        params = self.predict(model, fallback_init=fallback_init)
        named = dict(model.named_parameters())
        for name, value in params.items():
            named[name].copy_(value.to(named[name].device, named[name].dtype))
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
        ghn = cls(**config)
        ghn.load_state_dict(state)
        return ghn.to(map_location)
