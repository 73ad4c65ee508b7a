"""The fused C multi-aggregation (metanet.ops._fused) against the separate PyTorch reductions."""

from __future__ import annotations

import itertools

import pytest
import torch

from metanet import ops
from metanet.ops import _fused, backend

pytestmark = pytest.mark.skipif(_fused.library() is None, reason="no C compiler")

ALL = ("sum", "mean", "min", "max", "std")


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = dict(backend._state)
    yield
    backend._state.update(previous)


def csr(n: int = 12, f: int = 5, dtype=torch.float32, max_degree: int = 6):
    """Random messages ``[E, f]`` and a CSR pointer over ``n`` destinations, some empty."""
    degree = torch.randint(0, max_degree + 1, (n,))
    degree[[0, n // 2]] = 0
    ptr = torch.zeros(n + 1, dtype=torch.long)
    ptr[1:] = degree.cumsum(0)
    return torch.randn(int(ptr[-1]), f, dtype=dtype), ptr


def aggregate(x, ptr, aggrs, name, scalers=("identity", "amplification")):
    with ops.use_backend(name):
        return ops.multi_aggregate(x, None, ptr.numel() - 1, aggrs, scalers, ptr=ptr,
                                   avg_log_degree=1.4)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "aggrs", [ALL, ("mean", "min", "max", "std"), ("min",), ("std",), ("sum", "max")]
)
def test_fused_values_and_gradients_equal_the_separate_kernels(dtype, aggrs):
    x, ptr = csr(dtype=dtype)
    x.requires_grad_(True)
    fused, separate = aggregate(x, ptr, aggrs, "auto"), aggregate(x, ptr, aggrs, "native")
    torch.testing.assert_close(fused, separate)
    g = torch.randn_like(fused)
    (gf,) = torch.autograd.grad(fused, x, g)
    (gs,) = torch.autograd.grad(separate, x, g)
    torch.testing.assert_close(gf, gs)


def test_fused_gradcheck_in_double():
    x, ptr = csr(n=7, f=3, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: aggregate(v, ptr, ALL, "auto"), (x,))


def test_auto_uses_the_fused_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = _fused.aggregate
    monkeypatch.setattr(_fused, "aggregate", lambda *a: calls.append(1) or real(*a))
    x, ptr = csr()
    index = ops.ptr_to_index(ptr)
    aggregate(x, ptr, ALL, "auto")
    assert calls == [1]
    aggregate(x, ptr, ALL, "native")  # the "native" backend means torch operators only
    with ops.use_backend("auto"):
        ops.multi_aggregate(x, index, ptr.numel() - 1, ALL)  # unsorted-capable index path
        ops.multi_aggregate(x.half(), None, ptr.numel() - 1, ("sum",), ptr=ptr)
    assert calls == [1]


def test_without_the_library_the_separate_kernels_run(monkeypatch):
    x, ptr = csr()
    expected = aggregate(x, ptr, ALL, "native")
    monkeypatch.setattr(_fused, "library", lambda: None)
    torch.testing.assert_close(aggregate(x, ptr, ALL, "auto"), expected)


def test_strided_input_and_empty_segments():
    wide, ptr = csr(f=10)
    x = wide[:, 2:7]  # a column slice, as a chunk of a wider linear output
    assert not x.is_contiguous()
    out = aggregate(x, ptr, ALL, "auto", scalers=("identity",))
    torch.testing.assert_close(out, aggregate(x.contiguous(), ptr, ALL, "native", ("identity",)))
    empty = (ptr.diff() == 0).nonzero().flatten()
    assert len(empty) >= 2 and bool((out[empty] == 0).all())


def test_ties_send_the_gradient_to_the_first_extreme_row():
    x = torch.tensor([[1.0], [3.0], [3.0], [0.0], [0.0]], requires_grad=True)
    ptr = torch.tensor([0, 5])
    out = aggregate(x, ptr, ("min", "max"), "auto", scalers=("identity",))
    assert out.tolist() == [[0.0, 3.0]]
    out.sum().backward()
    assert x.grad.flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_nan_propagates_through_min_and_max():
    x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [-1.0, 5.0]])
    ptr = torch.tensor([0, 3])
    for order in itertools.permutations(range(3)):
        out = aggregate(x[list(order)], ptr, ("min", "max"), "auto", scalers=("identity",))
        assert torch.isnan(out[0, [0, 2]]).all(), order
        assert out[0, [1, 3]].tolist() == [0.0, 5.0]


def test_degree_larger_than_a_cache_line_and_wide_features():
    x, ptr = csr(n=5, f=67, max_degree=300)
    x.requires_grad_(True)
    fused, separate = aggregate(x, ptr, ALL, "auto"), aggregate(x, ptr, ALL, "native")
    torch.testing.assert_close(fused, separate)
    (gf,) = torch.autograd.grad(fused.sum(), x)
    (gs,) = torch.autograd.grad(separate.sum(), x)
    torch.testing.assert_close(gf, gs)


def film_inputs(n: int = 14, m: int = 11, f: int = 4, dtype=torch.float32, reverse: bool = False):
    """Edge FiLM factors as column slices of one ``[E, 4f]`` tensor (as GMN's), sender and
    receiver features as slices of node tensors, senders, a CSR pointer and, with ``reverse``,
    a row permutation."""
    _, ptr = csr(n=n, f=1)
    e = int(ptr[-1])
    film = torch.randn(e, 4 * f, dtype=dtype, requires_grad=True)
    nodes = torch.randn(max(n, m), 4 * f, dtype=dtype, requires_grad=True)
    sender = torch.randint(0, m, (e,))
    rows = torch.randperm(e) if reverse else None
    parts = (film[:, f:2 * f], film[:, 3 * f:], nodes[:m, :f], nodes[:n, 2 * f:3 * f])
    return film, nodes, parts, sender, ptr, rows


def explicit(scale, shift, a, b, sender, ptr, rows, aggrs, scalers):
    """The messages built one by one, then ``multi_aggregate``d (the definition)."""
    receiver = ops.ptr_to_index(ptr)
    if rows is not None:
        scale, shift = scale[rows], shift[rows]
    m = scale * (a[sender] + b[receiver]) + shift
    with ops.use_backend("native"):
        return ops.multi_aggregate(m, None, b.size(0), aggrs, scalers, ptr=ptr,
                                   avg_log_degree=1.4)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("aggrs", [ALL, ("mean", "min", "max", "std"), ("max",), ("sum", "std")])
@pytest.mark.parametrize("name", ["auto", "native"])
def test_film_aggregate_equals_the_explicit_messages(dtype, reverse, aggrs, name):
    film, nodes, parts, sender, ptr, rows = film_inputs(dtype=dtype, reverse=reverse)
    scalers = ("identity", "amplification")
    with ops.use_backend(name):
        out = ops.film_multi_aggregate(*parts, sender, ptr, rows=rows, aggrs=aggrs,
                                       scalers=scalers, avg_log_degree=1.4)  # fmt: skip
    expected = explicit(*parts, sender, ptr, rows, aggrs, scalers)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (film, nodes), g)
    want = torch.autograd.grad(expected, (film, nodes), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reverse", [False, True])
def test_film_aggregate_gradcheck_in_double(reverse):
    _, _, parts, sender, ptr, rows = film_inputs(n=6, m=5, f=2, dtype=torch.float64,
                                                 reverse=reverse)  # fmt: skip
    leaves = [p.detach().clone().requires_grad_(True) for p in parts]
    assert torch.autograd.gradcheck(
        lambda *p: ops.film_multi_aggregate(*p, sender, ptr, rows=rows, aggrs=ALL), leaves
    )  # fmt: skip


def test_film_aggregate_rejects_bad_input():
    _, _, (scale, shift, a, b), sender, ptr, _ = film_inputs()
    with pytest.raises(ValueError, match="feature width"):
        ops.film_multi_aggregate(scale, shift[:, :2], a, b, sender, ptr)
    with pytest.raises(ValueError, match="receiver_x has"):
        ops.film_multi_aggregate(scale, shift, a, b[:-1], sender, ptr)
    with pytest.raises(ValueError, match="out of range"):
        ops.film_multi_aggregate(scale, shift, a, b, sender + a.size(0), ptr)
    with pytest.raises(ValueError, match="2-D"):
        ops.film_multi_aggregate(scale[:, 0], shift, a, b, sender, ptr)
    with pytest.raises(ValueError, match="ptr"):
        ops.film_multi_aggregate(scale, shift, a, b, sender, ptr.flip(0))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_gmn_outputs_and_gradients_agree_across_backends(bidirectional):
    """The fused kernels change nothing a GMN computes: its outputs and every parameter's
    gradient match the separate PyTorch reductions (native backend) on a real network's
    graph."""
    from backend_agreement import assert_backends_agree, mlp_batch

    from metanet.nn.gmn import GMN

    model = GMN(hidden=8, num_layers=2, bidirectional=bidirectional)
    assert_backends_agree(model, mlp_batch(seed=3, hidden=7))
