"""metanet.ops: every reduction against a dense python reference, on every backend."""

from __future__ import annotations

import pytest
import torch

from metanet import ops
from metanet.ops import backend

pytestmark = pytest.mark.native_backend

BACKENDS = ops.available_backends()
NEEDS_TS = pytest.mark.skipif(not ops.HAS_TORCH_SCATTER, reason="torch_scatter not installed")


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = dict(backend._state)
    yield
    backend._state.update(previous)


def reference(src: torch.Tensor, index: torch.Tensor, n: int, reduce: str) -> torch.Tensor:
    """Dense loop over groups along dim 0; empty groups give 0."""
    outs = []
    for g in range(n):
        rows = src[index == g]
        if rows.numel() == 0:
            outs.append(torch.zeros_like(src[0]))
            continue
        fn = {
            "sum": lambda r: r.sum(0),
            "mean": lambda r: r.mean(0),
            "max": lambda r: r.amax(0),
            "min": lambda r: r.amin(0),
            "std": lambda r: r.std(0, unbiased=False),
            "mul": lambda r: r.prod(0),
        }[reduce]
        outs.append(fn(rows))
    return torch.stack(outs)


def graph(e: int = 40, n: int = 9, sort: bool = False, dtype=torch.float32):
    """Random ``src [e, 3, 2]`` and ``index [e]`` with groups 0, 4 and n-1 empty."""
    groups = torch.tensor([g for g in range(n) if g not in (0, 4, n - 1)])
    index = groups[torch.randint(len(groups), (e,))]
    if sort:
        index = index.sort().values
    return torch.randn(e, 3, 2, dtype=dtype), index


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduce", ops.REDUCTIONS)
def test_scatter_and_segment_match_reference(name, reduce):
    src, index = graph(sort=True)
    expected = reference(src, index, 9, reduce)
    with ops.use_backend(name):
        out = ops.scatter(src, index, dim=0, dim_size=9, reduce=reduce)
        seg = ops.segment(src, ops.index_to_ptr(index, 9), reduce=reduce)
    assert out.shape == (9, 3, 2)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(seg, expected)
    assert (out[[0, 4, 8]] == 0).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_high_degree_csr_kernels(name):
    """Mean degree >= HIGH_DEGREE switches the CSR kernel table; results must not change."""
    index = torch.arange(3).repeat_interleave(torch.tensor([300, 0, 200]))
    src = torch.randn(500, 4, dtype=torch.float64)
    assert ops.reduce.layout_of(src, ops.index_to_ptr(index, 3)) == "csr_high_degree"
    with ops.use_backend(name):
        for reduce in ("sum", "max", "min", "std"):
            out = ops.segment(src, ops.index_to_ptr(index, 3), reduce)
            torch.testing.assert_close(out, reference(src, index, 3, reduce))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "std"])
def test_scatter_unsorted_other_dim(name, reduce):
    src, index = graph()
    src = src.permute(1, 0, 2).contiguous()  # [3, E, 2], reduce dim 1 (= -2)
    expected = reference(src.movedim(1, 0), index, 9, reduce).movedim(0, 1)
    with ops.use_backend(name):
        out = ops.scatter(src, index, dim=-2, dim_size=9, reduce=reduce)
    assert out.shape == (3, 9, 2)
    torch.testing.assert_close(out, expected)


def test_dim_size_defaults_to_max_plus_one_and_int32_index():
    src, index = graph()
    out = ops.scatter(src, index.int(), reduce="sum")
    assert out.shape[0] == int(index.max()) + 1
    torch.testing.assert_close(out, reference(src, index, out.shape[0], "sum"))


@pytest.mark.parametrize("reduce", ops.REDUCTIONS)
def test_gradcheck_native(reduce):
    src, index = graph(e=12, n=6, sort=True, dtype=torch.float64)
    src = src[:, :1, :].contiguous().requires_grad_(True)
    ptr = ops.index_to_ptr(index, 6)
    with ops.use_backend("native"):
        check = torch.autograd.gradcheck
        assert check(lambda s: ops.scatter(s, index, 0, 6, reduce), (src,), fast_mode=True)
        assert check(lambda s: ops.segment(s, ptr, reduce), (src,), fast_mode=True)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "std"])
def test_gradients_agree_across_backends(reduce):
    src, index = graph(sort=True)
    ptr = ops.index_to_ptr(index, 9)
    weight = torch.randn(9, 3, 2)
    grads = {}
    for name in BACKENDS:
        for layout in ("index", "csr"):
            x = src.clone().requires_grad_(True)
            with ops.use_backend(name):
                if layout == "index":
                    out = ops.scatter(x, index, 0, 9, reduce)
                else:
                    out = ops.segment(x, ptr, reduce)
            (out * weight).sum().backward()
            grads[name, layout] = x.grad
    first = grads["native", "index"]
    for key, grad in grads.items():
        torch.testing.assert_close(grad, first, msg=f"{key} vs native/index")


def test_all_empty_segments_give_zero():
    src = torch.randn(0, 4)
    for reduce in ops.REDUCTIONS:
        for name in BACKENDS:
            with ops.use_backend(name):
                out = ops.scatter(src, torch.zeros(0, dtype=torch.long), dim_size=3, reduce=reduce)
                seg = ops.segment(src, torch.zeros(4, dtype=torch.long), reduce=reduce)
            assert out.shape == seg.shape == (3, 4)
            assert (out == 0).all() and (seg == 0).all()


def test_bad_input_errors():
    src, index = graph()
    with pytest.raises(ValueError, match="unknown reduce"):
        ops.scatter(src, index, reduce="median")
    with pytest.raises(ValueError, match="out of range"):
        ops.scatter(src, index, dim_size=5)
    with pytest.raises(ValueError, match="out of range"):
        ops.scatter(src, torch.full_like(index, -1), dim_size=5)
    with pytest.raises(ValueError, match="1-D"):
        ops.scatter(src, index[:-1])
    with pytest.raises(TypeError, match="int64"):
        ops.scatter(src, index.float())
    with pytest.raises(ValueError, match="dim"):
        ops.scatter(src, index, dim=3)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.segment(torch.randn(4, 2), torch.tensor([0, 3, 1, 4]))
    with pytest.raises(ValueError, match="end at"):
        ops.segment(torch.randn(4, 2), torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match="unknown reduce"):
        ops.segment(torch.randn(4, 2), torch.tensor([0, 4]), "median")
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.segment(torch.tensor(1.0), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="src must be a tensor"):
        ops.segment([1.0, 2.0], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="sorted"):
        ops.index_to_ptr(torch.tensor([0, 2, 1]), 3)
    with pytest.raises(ValueError, match="unknown scatter backend"):
        ops.set_backend("cuda_magic")
    with pytest.raises(TypeError, match="floating"):
        ops.scatter_softmax(torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_backend_selection_env_and_context(monkeypatch):
    monkeypatch.setenv("METANET_SCATTER_BACKEND", "native")
    ops.set_backend(None)  # re-reads the environment
    assert ops.get_backend() == "native"
    with ops.use_backend("auto"):
        assert ops.get_backend() == "auto"
    assert ops.get_backend() == "native"
    monkeypatch.setenv("METANET_SCATTER_BACKEND", "bogus")
    ops.set_backend(None)
    with pytest.raises(ValueError, match="METANET_SCATTER_BACKEND"):
        ops.get_backend()
    monkeypatch.delenv("METANET_SCATTER_BACKEND")
    ops.set_backend(None)
    assert ops.get_backend() == "auto"
    with ops.use_backend("native"):
        assert not backend.kernel_for("sum", "csr").startswith("ts_")
        assert not backend.kernel_for("max", "index").startswith("ts_")


@NEEDS_TS
def test_torch_scatter_backend_uses_its_kernels():
    with ops.use_backend("torch_scatter"):
        assert backend.kernel_for("sum", "csr") == "ts_segment"
        assert backend.kernel_for("max", "index") == "ts_scatter"


def test_auto_falls_back_to_native_without_torch_scatter(monkeypatch):
    monkeypatch.setattr(backend, "HAS_TORCH_SCATTER", False)
    monkeypatch.setitem(backend.AUTO_TABLE, ("sum", "csr"), "ts_segment")
    with ops.use_backend("auto"):
        assert backend.kernel_for("sum", "csr") == backend.NATIVE_TABLE["sum", "csr"]
    with pytest.raises(ValueError, match="not installed"):
        ops.set_backend("torch_scatter")


@pytest.mark.parametrize("name", BACKENDS)
def test_scatter_softmax(name):
    src, index = graph()
    src = src.movedim(0, -1).contiguous()  # [3, 2, E], groups along the last dim
    with ops.use_backend(name):
        out = ops.scatter_softmax(src * 10, index, dim=-1, dim_size=9)
    assert out.shape == src.shape
    sums = ops.scatter(out, index, dim=-1, dim_size=9)
    present = torch.bincount(index, minlength=9) > 0
    torch.testing.assert_close(sums[..., present], torch.ones(3, 2, int(present.sum())))
    g = int(index[0])
    torch.testing.assert_close(out[..., index == g], torch.softmax(src[..., index == g] * 10, -1))


def dense_multi(src, index, n, aggrs, scalers, avg_log, avg_lin):
    """Per-node loop: concat over scalers of concat over aggrs (PyG's layout)."""
    rows = []
    for v in range(n):
        msgs = src[index == v]
        deg = max(msgs.shape[0], 1)
        parts = []
        for a in aggrs:
            if msgs.shape[0] == 0:
                parts.append(torch.zeros(src.shape[1]))
                continue
            parts.append({"sum": msgs.sum(0), "mean": msgs.mean(0), "max": msgs.amax(0),
                          "min": msgs.amin(0), "std": msgs.std(0, unbiased=False)}[a])
        agg = torch.cat(parts)
        logd = torch.log(torch.tensor(deg + 1.0))
        factor = {"identity": 1.0, "amplification": logd / avg_log, "attenuation": avg_log / logd,
                  "linear": deg / avg_lin, "inverse_linear": avg_lin / deg}
        rows.append(torch.cat([agg * factor[s] for s in scalers]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("use_ptr", [False, True])
def test_multi_aggregate_matches_dense(name, use_ptr):
    src, index = graph(e=50, sort=True)
    src = src.reshape(50, 6)
    aggrs = ops.AGGREGATIONS
    scalers = ops.SCALERS
    ptr = ops.index_to_ptr(index, 9) if use_ptr else None
    with ops.use_backend(name):
        out = ops.multi_aggregate(src, index, 9, aggrs, scalers, ptr=ptr,
                                  avg_log_degree=1.7, avg_degree=5.0)
    assert out.shape == (9, len(aggrs) * len(scalers) * 6)
    torch.testing.assert_close(out, dense_multi(src, index, 9, aggrs, scalers, 1.7, 5.0))


def test_multi_aggregate_batch_degree_statistics_and_module():
    src, index = graph(e=50)
    src = src.reshape(50, 6)
    count = torch.bincount(index, minlength=9).double()
    avg_log, avg_lin = ops.degree_statistics(torch.bincount(count.long()))
    assert avg_log == pytest.approx(float((count + 1).log().mean()))
    assert avg_lin == pytest.approx(float(count.mean()))
    module = ops.MultiAggregation(("mean", "max"), ("identity", "linear"))
    out = module(src, index, dim_size=9)
    assert out.shape == (9, module.out_channels(6)) == (9, 24)
    torch.testing.assert_close(
        out, dense_multi(src, index, 9, ("mean", "max"), ("identity", "linear"), avg_log, avg_lin)
    )
    hist_module = ops.MultiAggregation.from_degree_histogram(
        torch.bincount(count.long()), aggrs=("mean", "max"), scalers=("identity", "linear")
    )
    torch.testing.assert_close(hist_module(src, index, dim_size=9), out)
    with pytest.raises(ValueError, match="aggrs"):
        ops.MultiAggregation(("mean", "median"))
    with pytest.raises(ValueError, match="dim_size"):
        ops.multi_aggregate(src, index, 9, ptr=torch.tensor([0, 10, 50]))


def test_multi_aggregate_gradcheck():
    src, index = graph(e=14, n=6, sort=True, dtype=torch.float64)
    src = src[:, :, 0].contiguous().requires_grad_(True)
    ptr = ops.index_to_ptr(index, 6)
    with ops.use_backend("native"):
        assert torch.autograd.gradcheck(
            lambda s: ops.multi_aggregate(s, index, 6, scalers=("identity", "amplification"),
                                          ptr=ptr), (src,), fast_mode=True)


def test_index_ptr_round_trip():
    index = torch.tensor([1, 1, 3, 3, 3, 5])
    ptr = ops.index_to_ptr(index, 7)
    assert ptr.tolist() == [0, 0, 2, 2, 5, 5, 6, 6]
    assert torch.equal(ops.ptr_to_index(ptr), index)


def test_ptr_cache_follows_in_place_changes():
    src = torch.randn(6, 2)
    ptr = torch.tensor([0, 2, 6])
    torch.testing.assert_close(ops.segment(src, ptr), torch.stack([src[:2].sum(0), src[2:].sum(0)]))
    ptr[1] = 4  # in place: cached index / matrix / validation must not be reused
    torch.testing.assert_close(ops.segment(src, ptr), torch.stack([src[:4].sum(0), src[4:].sum(0)]))
    expected = reference(src, ptr_index(ptr), 2, "max")
    torch.testing.assert_close(ops.segment(src, ptr, "max"), expected)
    ptr[1] = 7
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.segment(src, ptr)


def ptr_index(ptr: torch.Tensor) -> torch.Tensor:
    return torch.arange(ptr.numel() - 1).repeat_interleave(ptr.diff())


def test_ptr_cache_drops_dead_pointers():
    from metanet.ops import _kernels

    before = len(_kernels._PTR_CACHE)
    for _ in range(20):
        ops.segment(torch.randn(5, 3), torch.tensor([0, 1, 5]), "mean")
    assert len(_kernels._PTR_CACHE) <= before + 1


def test_max_gradient_ties_are_shared_like_torch():
    src = torch.tensor([[1.0, 2.0], [1.0, 5.0], [0.5, 2.0], [3.0, 3.0]])
    index = torch.tensor([0, 0, 0, 1])
    weight = torch.tensor([[2.0, 3.0], [5.0, 7.0]])
    x = src.clone().requires_grad_(True)
    with ops.use_backend("native"):
        (ops.scatter(x, index, 0, 2, "max") * weight).sum().backward()
    y = src.clone().requires_grad_(True)
    out = torch.zeros(2, 2).scatter_reduce(0, index.view(-1, 1).expand(4, 2), y, "amax",
                                           include_self=False)
    (out * weight).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert x.grad[0, 0] == x.grad[1, 0] == 1.0  # tie at 1.0 shares the weight 2


def test_integer_src_mean_and_std_are_float():
    src = torch.arange(10).view(5, 2)
    index = torch.tensor([0, 0, 1, 1, 1])
    for reduce in ("mean", "std"):
        expected = reference(src.double(), index, 2, reduce).float()
        torch.testing.assert_close(ops.scatter(src, index, 0, 2, reduce), expected)
        torch.testing.assert_close(ops.segment(src, ops.index_to_ptr(index, 2), reduce), expected)


@pytest.mark.parametrize("name", BACKENDS)
def test_std_gradient_closed_form_matches_autograd(name):
    """The custom std backward equals autograd through torch.std; constant groups get 0."""
    src, index = graph(e=30, n=7, sort=True, dtype=torch.float64)
    src[index == int(index[0])] = 1.5  # a zero-variance group: std 0, gradient 0
    weight = torch.randn(7, 3, 2, dtype=torch.float64)
    x = src.clone().requires_grad_(True)
    with ops.use_backend(name):
        (ops.segment(x, ops.index_to_ptr(index, 7), "std") * weight).sum().backward()
    expected = torch.zeros_like(src)
    for g in index.unique().tolist():
        rows = src[index == g].clone().requires_grad_(True)
        if g != int(index[0]):
            (rows.std(0, unbiased=False) * weight[g]).sum().backward()
            expected[index == g] = rows.grad
    torch.testing.assert_close(x.grad, expected)
    assert (x.grad[index == int(index[0])] == 0).all()


def test_mean_divisor_cache_follows_in_place_changes():
    src = torch.randn(6, 2)
    ptr = torch.tensor([0, 2, 6])
    torch.testing.assert_close(ops.segment(src, ptr, "mean")[0], src[:2].mean(0))
    ptr[1] = 3
    torch.testing.assert_close(ops.segment(src, ptr, "mean")[0], src[:3].mean(0))
    torch.testing.assert_close(ops.segment(src, ptr, "std")[1], src[3:].std(0, unbiased=False))
