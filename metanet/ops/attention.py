"""Edge-modulated multi-head attention over the incoming edges of every node (NG-T's
relational attention, Kofinas et al. 2024), as one op.

Per edge ``j -> i`` (row ``k`` of receiver ``i``'s CSR segment, edge row ``r``):

* ``q = q_i + eq_r``, ``k = k_j + ek_r``, ``v = v_j * evs_r + evh_r`` (or ``v_j + evh_r``
  without value modulation), from node projections ``q | k | v`` and edge projections
  ``eq | ek | evh (| evs)``;
* per head, ``a = softmax_j(<q, k> * scale)`` over the receiver's edges;
* ``out_i = sum_j a * v`` (heads concatenated).

Under the "auto" backend on the CPU one C pass per segment computes it without storing
anything per edge (:mod:`metanet.ops._fused`); elsewhere the same is built from PyTorch ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metanet.ops import _fused
from metanet.ops import _kernels as K
from metanet.ops.backend import get_backend
from metanet.ops.reduce import check_segments, max_segment_length, segment
from metanet.ops.softmax import scatter_softmax


def relational_attention(
    node_qkv: Tensor,
    edge_qkv: Tensor,
    sender: Tensor,
    ptr: Tensor,
    heads: int,
    rows: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Edge-modulated attention of every receiving node over its CSR segment of edges.

    Args:
        node_qkv: ``[N, 3F]`` node queries, keys and values (``q | k | v`` columns).
        edge_qkv: ``[E, 4F]`` edge terms ``eq | ek | evh | evs`` (value shift and scale), or
            ``[E, 3F]`` ``eq | ek | evh`` (values shifted only).
        sender: ``[E]`` sender node of each segment row.
        ptr: ``[N+1]`` CSR pointer of the rows (receiver ``i`` owns rows ``ptr[i]:ptr[i+1]``).
        heads: attention heads (must divide ``F``).
        rows: ``[E]`` permutation: segment row ``k`` reads ``edge_qkv[rows[k]]`` (attention
            over outgoing edges reads edge-ordered terms in source order); default identity.
        scale: score scale (default ``1 / sqrt(F / heads)``).

    Returns:
        ``[N, F]``; nodes without edges get 0.
    """
    if not isinstance(node_qkv, Tensor) or node_qkv.dim() != 2 or node_qkv.size(1) % 3:
        raise ValueError(f"node_qkv must be [N, 3F], got {getattr(node_qkv, 'shape', None)}")
    n, f = node_qkv.size(0), node_qkv.size(1) // 3
    if not isinstance(edge_qkv, Tensor) or edge_qkv.dim() != 2 or edge_qkv.size(1) not in (
        3 * f, 4 * f
    ):  # fmt: skip
        raise ValueError(f"edge_qkv must be [E, 3F] or [E, 4F] with F = {f}, got "
                         f"{getattr(edge_qkv, 'shape', None)}")  # fmt: skip
    if heads < 1 or f % heads:
        raise ValueError(f"heads={heads} must divide the width F = {f}")
    e = edge_qkv.size(0)
    ptr, sender, rows = check_segments(ptr, e, (n, "node_qkv"), sender, n, rows)
    scale = 1.0 / math.sqrt(f // heads) if scale is None else float(scale)
    if get_backend() == "auto" and _fused.available(node_qkv, ("sum",), edge_qkv):
        max_degree = max_segment_length(ptr)
        return _fused.attention(node_qkv, edge_qkv, sender, rows, ptr, heads, scale, max_degree)
    if rows is not None:
        edge_qkv = edge_qkv.index_select(0, rows)
    receiver = K.ptr_to_index(ptr)
    q, k, v = node_qkv.chunk(3, dim=1)
    parts = edge_qkv.chunk(edge_qkv.size(1) // f, dim=1)
    qq = q.index_select(0, receiver) + parts[0]
    kk = k.index_select(0, sender) + parts[1]
    vv = v.index_select(0, sender)
    vv = torch.addcmul(parts[2], vv, parts[3]) if len(parts) == 4 else vv + parts[2]
    score = (qq * kk).view(e, heads, f // heads).sum(-1) * scale
    attn = scatter_softmax(score, receiver, dim=0, dim_size=n)
    out = (attn.unsqueeze(-1) * vv.view(e, heads, f // heads)).view(e, f)
    return segment(out, ptr, reduce="sum")
