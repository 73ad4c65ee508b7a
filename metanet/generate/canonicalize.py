"""Canonicalization of a zoo before generative training, and alignment-aware distances.

Every network of a zoo is one point of a permutation orbit: permuting its hidden neurons gives the
same function at a different place in weight space. A generator trained on raw weights has to model
all ``prod_i n_i!`` copies at once; after *canonicalization* — aligning every network to one
reference network with Git Re-Basin weight matching (:func:`metanet.weightspace.weight_matching`)
— it only sees the copy of each function that is closest to the reference (DeepWeightFlow).

:func:`canonicalize` aligns a batch to a reference; :func:`nearest_distances` measures how far each
generated network is from the nearest training network *after alignment* (both sides brought to the
reference frame), which is what novelty/memorization statistics need.

Networks with BatchNorm (generated through a flat parameter layout,
:class:`metanet.generate.data.FlatLayout`) have no weight space, but a chain of Linear/Conv layers
with BatchNorm between them has the same permutation symmetry: a BatchNorm after a conv owns one
entry of its ``weight``, ``bias``, ``running_mean`` and ``running_var`` per output channel, and
permuting the channels permutes those with them (``num_batches_tracked`` is per layer).
:class:`ChannelPermutations` records that structure for a module (the weight space of its
Linear/Conv layers and, per permutation, the per-channel tensors attached to it);
:func:`match_channels` runs weight matching with the BatchNorm affine parameters (optionally also
the running statistics) in the objective of their permutation, as Git Re-Basin's permutation specs
for VGG/ResNets with BatchNorm do; :func:`canonicalize_params` aligns stacked state dicts
``{key: [N, ...]}`` to a reference and permutes every attached tensor consistently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metanet.weightspace import WeightSpace, WeightSpaceSpec, permute, weight_matching
from metanet.weightspace.spec import _ELEMENTWISE, _LAYER_KINDS, WeightSpaceError

__all__ = [
    "ChannelPermutations",
    "canonicalize",
    "canonicalize_params",
    "match_channels",
    "nearest_distances",
    "permute_params",
    "pick_reference",
]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_AFFINE = ("weight", "bias")
_STATS = ("running_mean", "running_var")


@dataclass(frozen=True)
class ChannelPermutations:
    """The permutation structure of a chain of Linear/Conv layers with norm layers between them.

    Attributes:
        spec: the weight space of the Linear/Conv layers (state_dict keys ``name.weight`` /
            ``name.bias``), a chain: permutation ``i`` reorders the outputs of layer ``i``.
        attached: ``(state_dict key, permutation id, kind)`` of every per-channel tensor outside
            the weight space, ``[n_p]`` each; ``kind`` is ``"affine"`` (a norm layer's weight and
            bias) or ``"stats"`` (BatchNorm running mean and variance). Tensors of a norm layer
            whose channels no permutation reorders (after the output layer, before the first) are
            not listed: they never move.
    """

    spec: WeightSpaceSpec
    attached: tuple[tuple[str, int, str], ...] = ()

    @classmethod
    def from_module(cls, module: nn.Module) -> ChannelPermutations:
        """The structure of ``module``: an ``nn.Sequential`` (nested ones too) of Linear/Conv
        layers, BatchNorm1d/2d (and group norms of one group, or one group per channel) and
        elementwise ops (activations, pooling, flatten, dropout: any leaf module with an empty
        state_dict), what :func:`metanet.zoo.architectures.build_module` builds for
        MLPs and CNNs without residual blocks.

        Raises:
            WeightSpaceError: anything else (a residual block, a user module with its own
                ``forward``, a grouped conv, a norm of another width than the layer before it),
                in one line naming the layer.
        """
        if type(module) is not nn.Sequential:
            raise WeightSpaceError(
                f"{type(module).__name__} is not an nn.Sequential chain: its channel "
                "permutations cannot be read off its layers"
            )
        layers: list[tuple[str, nn.Module]] = []
        norms: list[tuple[str, nn.Module, int]] = []  # (path, norm, index of the layer before)
        for path, sub in module.named_modules():
            if type(sub) is nn.Sequential:
                continue
            if type(sub) in _LAYER_KINDS:
                if isinstance(sub, (nn.Conv1d, nn.Conv2d)) and sub.groups != 1:
                    raise WeightSpaceError(f"grouped convolution at '{path}' is not supported")
                layers.append((path, sub))
            elif isinstance(sub, _BATCHNORMS) or (
                isinstance(sub, nn.GroupNorm) and sub.num_groups in (1, sub.num_channels)
            ):
                norms.append((path, sub, len(layers) - 1))
            elif isinstance(sub, _ELEMENTWISE) or not (list(sub.children()) or sub.state_dict()):
                continue  # elementwise: activations, pooling, flatten, dropout, Sine
            else:
                raise WeightSpaceError(
                    f"layer '{path}' ({type(sub).__name__}) is not a Linear/Conv layer, a "
                    "BatchNorm or an elementwise op of a plain chain: its channel permutations "
                    "are unknown"
                )
        if not layers:
            raise WeightSpaceError(f"{type(module).__name__} has no Linear/Conv layers")
        sd = module.state_dict()
        spec = WeightSpaceSpec.from_state_dict(sd, [p for p, _ in layers])
        attached: list[tuple[str, int, str]] = []
        for path, norm, before in norms:
            if before < 0 or before == len(layers) - 1:
                continue  # input or output channels: never permuted
            perm = spec.layers[before].out_perm
            width = norm.num_features if isinstance(norm, _BATCHNORMS) else norm.num_channels
            if width != spec.perm_sizes[perm]:
                raise WeightSpaceError(
                    f"norm layer '{path}' has {width} channels, the layer '{layers[before][0]}' "
                    f"before it {spec.perm_sizes[perm]}"
                )
            prefix = f"{path}." if path else ""
            for name, kind in [*((n, "affine") for n in _AFFINE), *((n, "stats") for n in _STATS)]:
                if prefix + name in sd:
                    attached.append((prefix + name, perm, kind))
        return cls(spec, tuple(attached))

    @property
    def keys(self) -> list[str]:
        """Every state_dict key the permutations act on (weight space first, then attached)."""
        return [*self.spec.param_keys(), *(k for k, _, _ in self.attached)]

    def weight_space(self, params: Mapping[str, torch.Tensor], what: str) -> WeightSpace:
        """The Linear/Conv layers of stacked ``params`` ``{key: [N, ...]}`` as a WeightSpace.

        Raises:
            WeightSpaceError: a key of the structure is missing or has another shape (one line,
                naming ``what``, the key and both shapes).
        """
        self.check(params, what)
        n = len(params[self.spec.layers[0].weight_key])
        biases = [
            params[l.bias_key] if l.has_bias else params[l.weight_key].new_zeros(n, l.out_features)
            for l in self.spec.layers
        ]
        return WeightSpace(self.spec, [params[l.weight_key] for l in self.spec.layers], biases)

    def check(self, params: Mapping[str, torch.Tensor], what: str) -> None:
        """Raise a one-line :class:`WeightSpaceError` naming ``what`` unless stacked ``params``
        has every key of the structure with the right shape and one batch size (running
        statistics may be absent: a generated network's parameters alone)."""
        shapes = {l.weight_key: l.module_weight_shape for l in self.spec.layers}
        shapes.update({l.bias_key: (l.out_features,) for l in self.spec.layers if l.has_bias})
        shapes.update({k: (self.spec.perm_sizes[p],) for k, p, _ in self.attached})
        optional = {k for k, _, kind in self.attached if kind == "stats"}
        batch = None
        for key, shape in shapes.items():
            if key not in params:
                if key in optional:
                    continue
                raise WeightSpaceError(f"{what}: no tensor '{key}' (not of this architecture)")
            t = params[key]
            if t.dim() < 1 or tuple(t.shape[1:]) != shape:
                raise WeightSpaceError(
                    f"{what}: '{key}' is {tuple(t.shape)}, expected [N, "
                    f"{', '.join(map(str, shape))}] (another architecture?)"
                )
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise WeightSpaceError(f"{what}: '{key}' holds {t.shape[0]} networks, not {batch}")

    def extras(
        self, params: Mapping[str, torch.Tensor], index: int, match_stats: bool
    ) -> dict[int, list[torch.Tensor]]:
        """``{perm id: [tensor [n_p], ...]}`` of network ``index`` for :func:`weight_matching`:
        the affine tensors, and the running statistics too with ``match_stats``."""
        out: dict[int, list[torch.Tensor]] = {}
        for key, perm, kind in self.attached:
            if kind == "affine" or match_stats:
                if key not in params:
                    raise WeightSpaceError(f"match_stats: no running statistic '{key}'")
                out.setdefault(perm, []).append(params[key][index])
        return out


def permute_params(
    params: Mapping[str, torch.Tensor],
    structure: ChannelPermutations,
    perms: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Stacked ``params`` ``{key: [N, ...]}`` with channel permutations ``perms`` applied (each
    ``[n_p]`` or ``[N, n_p]``, as :func:`metanet.weightspace.permute`) to every tensor of
    ``structure``; other keys (``num_batches_tracked``, input/output norm layers) unchanged."""
    ws = permute(structure.weight_space(params, "params"), perms)
    out = dict(params)
    for layer, w, b in zip(structure.spec.layers, ws.weights, ws.biases):
        out[layer.weight_key] = w
        if layer.has_bias:
            out[layer.bias_key] = b
    for key, perm, _ in structure.attached:
        if key not in params:
            continue  # running statistics of parameters alone
        p = perms[perm].to(params[key].device)
        t = params[key]
        out[key] = t.index_select(1, p) if p.dim() == 1 else t.gather(1, p)
    return out


def match_channels(
    reference: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    structure: ChannelPermutations,
    index: int = 0,
    match_stats: bool = False,
    max_iter: int = 100,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Channel permutations aligning network ``index`` of stacked ``params`` to ``reference``.

    Git Re-Basin weight matching over the Linear/Conv weights and biases, with the affine
    parameters of each norm layer in the objective of the permutation of its channels (and the
    BatchNorm running mean/variance too with ``match_stats``).

    Args:
        reference: stacked state dict of one network ``{key: [1, ...]}``.
        params: stacked state dicts ``{key: [N, ...]}``.
        structure: the architecture's :class:`ChannelPermutations`.
        index: which network of ``params``.
        match_stats: also match the running statistics.
        max_iter, seed: passed to :func:`weight_matching`.

    Returns:
        One ``LongTensor [n_p]`` per permutation, for :func:`permute_params`.
    """
    ref_ws = _reference_space(structure, reference)
    ws = structure.weight_space(params, "params")
    return _match(ref_ws, reference, ws, params, structure, index, match_stats, max_iter, seed)


def _reference_space(
    structure: ChannelPermutations, reference: Mapping[str, torch.Tensor]
) -> WeightSpace:
    """The checked one-network weight space of a reference state dict ``{key: [1, ...]}``."""
    ref_ws = structure.weight_space(reference, "reference")
    if len(ref_ws) != 1:
        raise WeightSpaceError(f"the reference must be one network, got {len(ref_ws)}")
    return ref_ws


def _match(
    ref_ws: WeightSpace,
    reference: Mapping[str, torch.Tensor],
    ws: WeightSpace,
    params: Mapping[str, torch.Tensor],
    structure: ChannelPermutations,
    index: int,
    match_stats: bool,
    max_iter: int,
    seed: int,
) -> list[torch.Tensor]:
    """:func:`match_channels` on weight spaces already read (and checked) from the state dicts."""
    return weight_matching(
        ref_ws, ws[index], spec=structure.spec, max_iter=max_iter, seed=seed,
        extra_a=structure.extras(reference, 0, match_stats),
        extra_b=structure.extras(params, index, match_stats),
    )  # fmt: skip


def canonicalize_params(
    params: Mapping[str, torch.Tensor],
    structure: ChannelPermutations,
    reference: Mapping[str, torch.Tensor] | int = 0,
    match_stats: bool = False,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Every network of stacked state dicts ``params`` ``{key: [N, ...]}`` permuted into the frame
    of ``reference`` (same functions): the flat-layout counterpart of :func:`canonicalize`.

    Every tensor attached to a hidden channel moves with it: Linear/Conv weights (rows and the
    next layer's columns) and biases, norm-layer weights and biases, BatchNorm running mean and
    variance; other keys (``num_batches_tracked``) are returned unchanged.

    Args:
        params: ``N`` networks (e.g. ``ZooGroup.params(indices)``, parameters and buffers).
        structure: :meth:`ChannelPermutations.from_module` of the architecture.
        reference: a stacked state dict of one network, or the index of the reference inside
            ``params`` (that network is returned unchanged).
        match_stats, max_iter, seed: passed to :func:`match_channels`.

    Raises:
        WeightSpaceError: a reference or network of another architecture (one line naming the
            key), NaN/inf values.
    """
    structure.check(params, "params")
    n = len(params[structure.spec.layers[0].weight_key])
    if n == 0 and not isinstance(reference, int):
        structure.check(reference, "reference")
        return dict(params)
    if isinstance(reference, int):
        if not -n <= reference < n:
            raise IndexError(f"reference index {reference} out of range for {n} networks")
        reference = {
            k: params[k][reference : reference + 1 or None] for k in structure.keys if k in params
        }
    ref_ws = _reference_space(structure, reference)
    ws = structure.weight_space(params, "params")  # read once, not once per network
    perms = [
        _match(ref_ws, reference, ws, params, structure, i, match_stats, max_iter, seed)
        for i in range(n)
    ]
    stacked = [torch.stack([p[j] for p in perms]) for j in range(structure.spec.num_perms)]
    return permute_params(params, structure, stacked)


def pick_reference(ws: WeightSpace, scores: torch.Tensor | None = None) -> int:
    """Index of the reference network: the best-scoring one, else the medoid of the batch.

    Args:
        ws: ``B`` networks.
        scores: optional ``[B]`` (e.g. test accuracy; higher is better).
    """
    if scores is not None:
        if scores.shape != (len(ws),):
            raise ValueError(f"scores must be [{len(ws)}], got {tuple(scores.shape)}")
        return int(torch.argmax(scores))
    flat = ws.flatten().double()
    return int(torch.cdist(flat, flat).sum(1).argmin())


def canonicalize(
    ws: WeightSpace,
    reference: WeightSpace | int = 0,
    spec: WeightSpaceSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> WeightSpace:
    """Every network of ``ws`` permuted into the frame of ``reference`` (same functions).

    Args:
        ws: ``B`` networks of one spec.
        reference: a one-network WeightSpace, or the index of the reference inside ``ws``
            (that network is returned unchanged).
        spec: permutation structure (default ``ws.spec``).
        max_iter, seed: passed to :func:`weight_matching`.

    Returns:
        A WeightSpace of ``B`` networks; network ``i`` computes the same function as ``ws[i]``.
    """
    if isinstance(reference, int):
        if not -len(ws) <= reference < len(ws):
            raise IndexError(f"reference index {reference} out of range for {len(ws)} networks")
        reference = ws[reference]
    if len(reference) != 1:
        raise ValueError(f"the reference must be one network, got {len(reference)}")
    spec = spec or ws.spec
    out = []
    for i in range(len(ws)):
        perms = weight_matching(reference, ws[i], spec=spec, max_iter=max_iter, seed=seed)
        out.append(permute(ws[i], perms))
    return WeightSpace.cat(out)


def nearest_distances(
    queries: torch.Tensor,
    pool: torch.Tensor,
    exclude_self: bool = False,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query vector to its nearest vector of ``pool``.

    Args:
        queries: ``[Q, D]`` flattened networks (already in a common frame, e.g. canonicalized).
        pool: ``[P, D]``.
        exclude_self: ``queries is pool``: skip the diagonal (nearest *other* network).
        groups: with ``exclude_self``, ``[P]`` ids (e.g. run ids); members of the same group are
            skipped too (checkpoints of one run are not independent networks).

    Returns:
        ``(distance [Q], index [Q])`` of the nearest pool vector.
    """
    if queries.dim() != 2 or pool.dim() != 2 or queries.shape[1] != pool.shape[1]:
        raise ValueError(
            f"expected [Q, D] and [P, D], got {tuple(queries.shape)} and {tuple(pool.shape)}"
        )
    d = torch.cdist(queries.double(), pool.double())
    if exclude_self:
        if queries.shape[0] != pool.shape[0]:
            raise ValueError("exclude_self needs queries and pool of the same networks")
        mask = torch.eye(len(pool), dtype=torch.bool)
        if groups is not None:
            mask |= groups[:, None] == groups[None, :]
        d = d.masked_fill(mask, float("inf"))
    dist, idx = d.min(dim=1)
    return dist.float(), idx
