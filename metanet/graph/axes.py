"""Where a value's neurons lie after a view-like op (reshape, permute, basic indexing).

A traced value keeps its neurons as a tensor of graph-node ids ``nodes`` laid over tensor axes
``axes`` (ascending; ``nodes.shape[i] == value.shape[axes[i]]``). Most values have one neuron
axis (channels, features); attention splits it into ``(heads, head_dim)`` and channel shuffles
into ``(groups, channels_per_group)``. These pure functions move that description through ops
from their concrete input / output shapes; they raise :class:`AxisError` when an op would mix
neurons with other axes (the caller turns it into an ``UnsupportedOpError``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "AxisError", "index_neurons", "moved_last", "permute_neurons", "reshape_neurons",
    "unique_rows", "view_groups",
]  # fmt: skip


class AxisError(ValueError):
    """A view-like op that does not keep neuron identity (message says why)."""


def view_groups(s_in: Sequence[int], s_out: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape ``s_in -> s_out`` into groups of input axes and output axes with equal
    products (size-1 axes form their own groups). ``[2, 12] -> [2, 3, 4]`` gives
    ``[([0], [0]), ([1], [1, 2])]``."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n, m = len(s_in), len(s_out)
    while i < n or j < m:
        one_in = i < n and s_in[i] == 1
        one_out = j < m and s_out[j] == 1
        if one_in and one_out:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        if one_in or j >= m:
            groups.append(([i], []))
            i += 1
            continue
        if one_out or i >= n:
            groups.append(([], [j]))
            j += 1
            continue
        ins, outs = [i], [j]
        pi, pj = s_in[i], s_out[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= s_in[i]
                ins.append(i)
                i += 1
            else:
                pj *= s_out[j]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    return groups


def reshape_neurons(
    s_in: Sequence[int], s_out: Sequence[int], axes: Sequence[int], nodes: Tensor,
    copies: Sequence[int] = (),
) -> tuple[tuple[int, ...], Tensor] | None:  # fmt: skip
    """Neuron axes and node ids after ``reshape(s_in -> s_out)``.

    ``copies``: input axes along which the tensor holds copies of one value (stride 0, from
    ``expand``). Merging a neuron axis with copy axes after it repeats each neuron (Hugging
    Face's ``repeat_kv`` of grouped-query attention: ``[B, Hkv, g, S, d] -> [B, Hkv * g, S,
    d]`` gives each key / value head's node ids ``g`` times).

    Returns:
        ``(new_axes, new_nodes)``, or ``None`` when the reshape is a *flatten* of one neuron
        axis with the non-neuron axes after it (the caller adds flatten nodes).
    Raises:
        AxisError: any other mixing of neuron and non-neuron axes.
    """
    axes = list(axes)
    axes_set = set(axes)
    copy_set = set(copies)
    new_axes: list[int] = []
    new_shape: list[int] = []
    for ins, outs in view_groups(s_in, s_out):
        neuron_in = [a for a in ins if a in axes_set]
        if not neuron_in:
            continue
        other = [a for a in ins if a not in axes_set and s_in[a] != 1]
        if other and len(neuron_in) == 1 and len(outs) == 1 and all(a in copy_set for a in other) \
                and neuron_in[0] < min(other):  # fmt: skip
            rep = math.prod(s_in[a] for a in other)
            nodes = nodes.repeat_interleave(rep, dim=axes.index(neuron_in[0]))
            other = []
        if other:
            first_other = min(other)
            if len(axes) == 1 and all(a < first_other for a in neuron_in) and len(outs) == 1:
                return None
            raise AxisError(
                f"reshape {tuple(s_in)} -> {tuple(s_out)} merges neuron axes {neuron_in} with "
                f"axes {other}"
            )
        if not outs:
            raise AxisError(f"reshape {tuple(s_in)} -> {tuple(s_out)} drops a neuron axis")
        keep = [b for b in outs if s_out[b] != 1] or outs[-1:]
        new_axes += keep
        new_shape += [s_out[b] for b in keep]
    return tuple(new_axes), nodes.reshape(new_shape)


def permute_neurons(dims: Sequence[int], axes: Sequence[int],
                    nodes: Tensor) -> tuple[tuple[int, ...], Tensor]:  # fmt: skip
    """Neuron axes and nodes after ``permute(dims)`` (output axis ``i`` is input axis
    ``dims[i]``); the node tensor's dims are reordered to keep ``axes`` ascending."""
    where = {d: i for i, d in enumerate(dims)}
    moved = [where[a] for a in axes]
    order = sorted(range(len(axes)), key=lambda i: moved[i])
    return tuple(moved[i] for i in order), nodes.permute(order) if len(order) > 1 else nodes


def index_neurons(index: object, ndim: int, axes: Sequence[int],
                  nodes: Tensor) -> tuple[tuple[int, ...], Tensor]:  # fmt: skip
    """Neuron axes and nodes after basic indexing ``value[index]`` (ints, slices, ``None``,
    ``...``): a slice of a neuron axis keeps those neurons, an int selects one row of the node
    tensor (e.g. ``qkv[0]`` of a fused projection).

    Raises:
        AxisError: tensor / list indices on a neuron axis, or every neuron axis indexed away.
    """
    items = list(index) if isinstance(index, tuple) else [index]
    used = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded = _expand(items, ndim, used)
    in_dim = out_dim = 0
    node_index: list = []
    new_axes: list[int] = []
    for it in expanded:
        if it is None:
            out_dim += 1
            continue
        is_neuron = in_dim in axes
        if isinstance(it, (Tensor, list)):
            if is_neuron:
                raise AxisError("tensor index on a neuron axis")
            if isinstance(it, Tensor) and it.dim() != 1 or sum(
                isinstance(x, (Tensor, list)) for x in expanded
            ) > 1:
                raise AxisError("advanced indexing with several / multi-dimensional indices")
            in_dim, out_dim = in_dim + 1, out_dim + 1
            continue
        if isinstance(it, int):
            if is_neuron:
                node_index.append(it)
            in_dim += 1
            continue
        if is_neuron:
            node_index.append(it)
            new_axes.append(out_dim)
        in_dim, out_dim = in_dim + 1, out_dim + 1
    if not new_axes:
        raise AxisError(f"index {index!r} leaves no neuron axis")
    return tuple(new_axes), nodes[tuple(node_index)]


def _expand(items: list, ndim: int, used: int) -> list:
    """``items`` with ``...`` replaced by full slices and trailing full slices added."""
    out: list = []
    for it in items:
        if it is Ellipsis:
            out += [slice(None)] * (ndim - used)
        else:
            out.append(it)
    consumed = sum(1 for it in out if it is not None)
    return out + [slice(None)] * (ndim - consumed)


def moved_last(t: Tensor, axes: Sequence[int]) -> Tensor:
    """``t`` with ``axes`` moved (in order) to the end and the other axes flattened in front:
    ``[prod(other), prod(axes)]``."""
    rest = [d for d in range(t.dim()) if d not in axes]
    count = 1
    for a in axes:
        count *= t.shape[a]
    return t.permute(*rest, *axes).reshape(-1, count)


def unique_rows(t: Tensor) -> Tensor:
    """The distinct rows of a 2-D integer tensor, in order of first appearance."""
    uniq, inverse = torch.unique(t, dim=0, return_inverse=True)
    first = torch.full((uniq.size(0),), t.size(0), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(t.size(0)), reduce="amin")
    return uniq[torch.argsort(first)]
