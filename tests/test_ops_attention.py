"""metanet.ops.relational_attention: the fused C kernel against the definition, and NG-T
across backends."""

from __future__ import annotations

import pytest
import torch

from metanet import ops
from metanet.ops import _fused, backend

NEEDS_C = pytest.mark.skipif(_fused.library() is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = dict(backend._state)
    yield
    backend._state.update(previous)


def inputs(n=12, f=8, terms=4, dtype=torch.float32, reverse=False, seed=0):
    """Node ``q | k | v`` and edge terms as column slices of wider tensors (as a Linear's
    output chunks would be), senders, a CSR pointer with empty segments, a row permutation."""
    gen = torch.Generator().manual_seed(seed)
    degree = torch.randint(0, 7, (n,), generator=gen)
    degree[[0, n - 1]] = 0
    ptr = torch.zeros(n + 1, dtype=torch.long)
    ptr[1:] = degree.cumsum(0)
    e = int(ptr[-1])
    node = torch.randn(n, 3 * f + 2, dtype=dtype, generator=gen)[:, 1:-1].requires_grad_(True)
    edge = torch.randn(e, terms * f, dtype=dtype, generator=gen).requires_grad_(True)
    sender = torch.randint(0, n, (e,), generator=gen)
    rows = torch.randperm(e, generator=gen) if reverse else None
    return node, edge, sender, ptr, rows


def definition(node, edge, sender, ptr, heads, rows):
    """Each receiver's softmax over its edges, written out one node at a time."""
    f = node.size(1) // 3
    if rows is not None:
        edge = edge[rows]
    q, k, v = node.split(f, 1)
    out = []
    for i in range(ptr.numel() - 1):
        a, b = int(ptr[i]), int(ptr[i + 1])
        if a == b:
            out.append(node.new_zeros(f))
            continue
        s, ed = sender[a:b], edge[a:b]
        qq, kk = q[i] + ed[:, :f], k[s] + ed[:, f:2 * f]
        shift = ed[:, 2 * f:3 * f]
        vv = v[s] * ed[:, 3 * f:] + shift if ed.size(1) == 4 * f else v[s] + shift
        dh = f // heads
        score = (qq * kk).view(b - a, heads, dh).sum(-1) / dh**0.5
        attn = score.softmax(0)
        out.append((attn.unsqueeze(-1) * vv.view(b - a, heads, dh)).sum(0).flatten())
    return torch.stack(out)


@pytest.mark.parametrize("name", ["auto", "native"])
@pytest.mark.parametrize("terms", [3, 4])
@pytest.mark.parametrize("reverse", [False, True])
def test_relational_attention_equals_the_definition(name, terms, reverse):
    node, edge, sender, ptr, rows = inputs(terms=terms, reverse=reverse)
    with ops.use_backend(name):
        out = ops.relational_attention(node, edge, sender, ptr, heads=2, rows=rows)
    expected = definition(node, edge, sender, ptr, 2, rows)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (node, edge), g),
                    torch.autograd.grad(expected, (node, edge), g)):  # fmt: skip
        torch.testing.assert_close(a, b)


@NEEDS_C
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_attention_gradcheck_in_double(reverse):
    node, edge, sender, ptr, rows = inputs(n=7, f=4, dtype=torch.float64, reverse=reverse)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.relational_attention(a, b, sender, ptr, heads=2, rows=rows),
        (node, edge),
    )  # fmt: skip


@NEEDS_C
def test_fused_attention_is_stable_for_large_scores():
    node, edge, sender, ptr, _ = inputs()
    node = (node.detach() * 300).requires_grad_(True)
    out = ops.relational_attention(node, edge, sender, ptr, heads=4)
    assert torch.isfinite(out).all()
    with ops.use_backend("native"):
        torch.testing.assert_close(
            out, ops.relational_attention(node, edge, sender, ptr, heads=4), rtol=1e-4, atol=1e-3
        )  # fmt: skip


def test_relational_attention_rejects_bad_input():
    node, edge, sender, ptr, _ = inputs()
    with pytest.raises(ValueError, match="3F"):
        ops.relational_attention(node[:, :-1], edge, sender, ptr, heads=2)
    with pytest.raises(ValueError, match="edge_qkv"):
        ops.relational_attention(node, edge[:, :-3], sender, ptr, heads=2)
    with pytest.raises(ValueError, match="heads"):
        ops.relational_attention(node, edge, sender, ptr, heads=3)
    with pytest.raises(ValueError, match="out of range"):
        ops.relational_attention(node, edge, sender + 100, ptr, heads=2)
    with pytest.raises(ValueError, match="node_qkv has"):
        ops.relational_attention(node[:-1], edge, sender, ptr, heads=2)


@NEEDS_C
@pytest.mark.parametrize("bidirectional", [True, False])
def test_ngt_outputs_and_gradients_agree_across_backends(bidirectional):
    """The fused attention changes nothing NG-T computes on a real network's graph."""
    from backend_agreement import assert_backends_agree, mlp_batch

    from metanet.nn.ngt import NGT

    model = NGT(hidden=8, edge_dim=8, num_layers=2, heads=2, bidirectional=bidirectional)
    assert_backends_agree(model, mlp_batch(seed=4, hidden=8))
