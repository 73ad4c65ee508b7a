"""Resource limits: graph building and zoo loading refuse, with one line, what would not fit.

Measured while writing ``metanet.graph.memory`` (RSS high-water mark of ``from_module`` in a
fresh process, float32, ``max_kernel_size=9`` unless noted; "graph" = bytes of the finished
graph, which the estimate matches exactly up to the flatten / residual allowances):

========================================  ======  ========  =========  ===============
network                                   edges   graph     peak meas  peak est
========================================  ======  ========  =========  ===============
MLP 3000-3000-3000-10                     18.0 M  1170 MiB  1626 MiB   2031 MiB, 1.25x
MLP 3000-3000-3000-10, K=1                18.0 M  619 MiB   1041 MiB   1205 MiB, 1.16x
MLP 1500-1500-1500-10                     4.5 M   293 MiB   465 MiB    646 MiB, 1.39x
2 convs, Linear(16384, 1024) (VGG-like)   16.8 M  1091 MiB  1813 MiB   2182 MiB, 1.20x
2 convs, Linear(16384, 256)               4.2 M   274 MiB   468 MiB    548 MiB, 1.17x
5 convs x 256 channels + BN               0.27 M  17 MiB    52 MiB     45 MiB, 0.87x
5 convs x 512 channels + BN               1.06 M  69 MiB    186 MiB    179 MiB, 0.96x
5 convs x 1024 channels + BN              4.2 M   274 MiB   482 MiB    568 MiB, 1.18x
5 convs x 1536 channels + BN              9.5 M   615 MiB   1063 MiB   1274 MiB, 1.20x
========================================  ======  ========  =========  ===============

(Before the chunked finalize the first MLP peaked at 3379 MiB, 2.9x its graph.) VGG-11
(132.9 M parameters) is estimated at 124.7 M edges, 7.9 GiB of graph and a 15.2 GiB peak.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metanet.data.readers import InMemoryZooGroup, ZooReadError, read_small_cnn_zoo
from metanet.data.zoo_store import (
    REQUIRED_METRICS,
    Zoo,
    ZooFormatError,
    ZooWriter,
    check_declared_size,
    merge_zoos,
)
from metanet.graph import estimate_graph_memory, from_module, fx_builder
from metanet.limits import ENV_VAR, MemoryLimitError, format_bytes, memory_limit
from metanet.zoo.architectures import arch_name, build_module

GIB = 1024**3
MIB = 1024**2

# ----------------------------------------------------------------------------- networks


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def cnn_flat() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 12 * 12, 10),
    )  # fmt: skip


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNetish(nn.Module):
    """Stem, three residual blocks with BatchNorm, global pooling, a Linear head."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(_Block(c), _Block(c), _Block(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Transformer(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2, self.head = nn.Linear(d, 64), nn.Linear(64, d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(dim=1))


NETWORKS = [
    ("mlp", mlp, None),
    ("cnn_flat", cnn_flat, (2, 3, 16, 16)),
    ("resnetish", ResNetish, (2, 3, 8, 8)),
    ("transformer", Transformer, (2, 5, 32)),
    ("wide_stem", lambda: nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.ReLU(),
                                        nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.ReLU(),
                                        nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(36, 3)),
     (2, 3, 10, 10)),  # 7x7 stem and 5x5 depthwise wider than max_kernel_size=9
    ("zoo_cnn", lambda: build_module({"type": "cnn", "channels": [8, 16], "head": "flatten"}),
     None),
]  # fmt: skip


def graph_bytes(g) -> int:
    """Bytes the graph holds: its tensors, the layout's parameter rows and extras."""
    total = sum(v.numel() * v.element_size() for _, v in g if isinstance(v, torch.Tensor))
    total += sum(s.storage_bytes for s in g.layout.slots.values())
    total += sum(v.numel() * v.element_size() for v in g.layout.extras.values())
    return total


def vgg11(device: str = "meta") -> nn.Module:
    """VGG-11 (132.9 M parameters) on the meta device: shapes only, nothing allocated."""
    layers: list[nn.Module] = []
    c = 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, device=device), nn.ReLU()]
            c = v
    head = [nn.Linear(512 * 7 * 7, 4096, device=device), nn.ReLU(),
            nn.Linear(4096, 4096, device=device), nn.ReLU(), nn.Linear(4096, 1000, device=device)]
    return nn.Sequential(*layers, nn.Flatten(), *head)  # fmt: skip


# ----------------------------------------------------------------------------- graphs


def test_from_module_refuses_past_the_limit_before_allocating(monkeypatch):
    model = mlp()
    est = estimate_graph_memory(model)
    g = from_module(model)  # default limit: builds
    assert g.num_edges == est.num_edges
    calls = []
    real = fx_builder._Builder.add_edges

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(fx_builder._Builder, "add_edges", spy)
    with memory_limit(est.peak_bytes // 2):
        with pytest.raises(MemoryLimitError) as info:
            from_module(model)
    msg = str(info.value)
    assert "\n" not in msg and "Sequential" in msg and format_bytes(est.peak_bytes) in msg
    assert f"{est.num_edges:,} edges" in msg and ENV_VAR in msg
    assert calls == []  # refused before the builder allocated a single edge
    assert isinstance(info.value, MemoryError)
    with memory_limit(est.peak_bytes * 2):
        assert from_module(model).num_edges == est.num_edges


def test_vgg11_is_refused_with_its_estimate_and_a_kernel_hint():
    model = vgg11()
    est = estimate_graph_memory(model)
    assert est.num_edges == pytest.approx(124.7e6, rel=0.01)
    assert 5 * GIB < est.graph_bytes < 6 * GIB and 10 * GIB < est.peak_bytes < 14 * GIB
    with memory_limit(8 * GIB), pytest.raises(MemoryLimitError, match=r"VGG|Sequential") as info:
        from_module(model, torch.zeros(1, 3, 224, 224, device="meta"))
    assert format_bytes(est.peak_bytes) in str(info.value)
    linear_only = nn.Sequential(nn.Linear(4096, 4096, device="meta"))
    with memory_limit(64 * MIB), pytest.raises(MemoryLimitError, match="max_kernel_size=1"):
        from_module(linear_only)


def test_a_100m_parameter_graph_is_about_3x_its_parameters_with_scalar_edges():
    # VGG-11 at max_kernel_size=1: every weight one scalar edge (3x3 kernels over kernel-offset
    # nodes): 13 bytes per 4-byte weight, the layout's rows stored as runs
    model = vgg11()
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert param_bytes > 100e6 * 4
    est = estimate_graph_memory(model, max_kernel_size=1)
    assert est.graph_bytes < 3.5 * param_bytes, est.describe()


def test_builder_stops_constructions_the_estimate_misses():
    # a flatten that is the output: its C * H * W new nodes are not in the parameter shapes
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
    x = torch.zeros(1, 1, 300, 300)
    assert estimate_graph_memory(model).peak_bytes < MIB
    with memory_limit(8 * MIB), pytest.raises(MemoryLimitError) as info:
        from_module(model, x)
    msg = str(info.value)
    assert "\n" not in msg and "Sequential" in msg and "nodes" in msg


@pytest.mark.parametrize("name,factory,shape", NETWORKS, ids=[n[0] for n in NETWORKS])
def test_estimate_is_within_a_factor_1_5_of_the_graph(name, factory, shape):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(shape) if shape else None
    for k in (9, 1) if name == "mlp" else (9,):
        g = from_module(model, x, max_kernel_size=k)
        est = estimate_graph_memory(model, max_kernel_size=k)
        actual = graph_bytes(g)
        ratio = est.graph_bytes / actual
        assert 1 / 1.5 <= ratio <= 1.5, (name, k, est.graph_bytes, actual)
        assert est.num_edges >= g.num_edges and est.num_nodes >= g.num_nodes
        assert est.peak_bytes >= actual


def test_many_graphs_from_state_dicts_are_checked():
    from metanet.graph import graphs_from_state_dicts

    model = mlp()
    g = from_module(model)
    sds = [model.state_dict()] * 4
    assert len(graphs_from_state_dicts(g, sds)) == 4
    with memory_limit(g.edge_attr.numel() * 4 * 2), pytest.raises(MemoryLimitError, match="4 "):
        graphs_from_state_dicts(g, sds)


# ----------------------------------------------------------------------------- zoo files
ZOO_MLP = {"type": "mlp", "in": 64, "widths": [16, 12], "out": 10}


def _write_zoo(path, n: int = 6) -> dict[str, torch.Tensor]:
    modules = [build_module(ZOO_MLP) for _ in range(n)]
    sds = [m.state_dict() for m in modules]
    params = {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}
    metrics = {k: np.arange(n, dtype=float) for k in REQUIRED_METRICS}
    with ZooWriter(path, attrs={"name": "limits"}) as w:
        w.add(ZOO_MLP, params, metrics, {"lr": np.linspace(0.1, 0.2, n)})
    return params


def test_absurd_declared_shapes_are_refused_without_reading(tmp_path):
    path = str(tmp_path / "huge.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("chunked", shape=(10**12, 1000), dtype="f4", chunks=(1, 1000))
        f.create_dataset("gzip", shape=(10**12, 1000), dtype="f4", chunks=(16, 1000),
                         compression="gzip")  # fmt: skip
        f.create_dataset("contiguous", shape=(10**9, 1000), dtype="f4")
        f.create_dataset("fine", data=np.zeros((10, 10), dtype="f4"), compression="gzip")
    with memory_limit(GIB), h5py.File(path, "r") as f:
        for name in ("chunked", "gzip", "contiguous"):
            with pytest.raises(ZooFormatError) as info:
                check_declared_size(f[name], path)
            msg = str(info.value)
            assert "\n" not in msg and path in msg and f"'/{name}'" in msg
            assert str(tuple(f[name].shape)) in msg
        assert check_declared_size(f["fine"], path) == 400


def test_zoo_with_a_forged_dataset_is_refused_at_open(tmp_path):
    path = str(tmp_path / "zoo.h5")
    params = _write_zoo(path)
    key = next(iter(params))
    group = arch_name(ZOO_MLP)
    with h5py.File(path, "r+") as f:
        shape = f[group]["params"][key].shape
        del f[group]["params"][key]
        f[group]["params"].create_dataset(
            key, shape=(10**12, *shape[1:]), dtype="f4", chunks=(64, *shape[1:]),
            compression="gzip",
        )  # fmt: skip
    with memory_limit(GIB), pytest.raises(ZooFormatError) as info:
        Zoo.open(path)
    msg = str(info.value)
    assert "\n" not in msg and path in msg and f"/{group}/params/{key}" in msg
    assert str((10**12, *shape[1:])) in msg


def test_whole_loads_are_refused_but_records_still_read(tmp_path):
    path = str(tmp_path / "zoo.h5")
    params = _write_zoo(path, n=6)
    zoo = Zoo.open(path)
    g = zoo[arch_name(ZOO_MLP)]
    assert g.record_bytes == sum(v[0].numel() * 4 for v in params.values())
    with memory_limit(4 * g.record_bytes):
        for read in (g.params, g.weight_space, lambda: g.params(slice(0, 4))):
            with pytest.raises(MemoryLimitError) as info:
                read()
            msg = str(info.value)
            assert "\n" not in msg and path in msg and g.name in msg
        with pytest.raises(MemoryLimitError):
            merge_zoos([path], tmp_path / "merged.h5")
        assert not os.path.exists(tmp_path / "merged.h5")
        sd = g.state_dict(5)
        assert all(torch.equal(sd[k], params[k][5]) for k in sd)
        assert g.module(2)(torch.zeros(1, 64)).shape == (1, 10)
        assert g.params([1, 4])[next(iter(params))].shape[0] == 2
        assert len(g.metrics["test_acc"]) == 6
    zoo.close()


def test_in_memory_and_small_cnn_zoo_reads_are_checked(tmp_path):
    metrics = {k: np.zeros(50) for k in REQUIRED_METRICS}
    group = InMemoryZooGroup("g", {"w": torch.zeros(50, 1000)}, metrics)
    with memory_limit(20_000):
        with pytest.raises(MemoryLimitError, match="50 records of 'g'"):
            group.params()
        assert group.params([3])["w"].shape == (1, 1000)

    from test_readers import _write_cnn_zoo

    folder = tmp_path / "small"
    _write_cnn_zoo(str(folder))
    zoo = read_small_cnn_zoo(folder)
    g = next(iter(zoo))
    row = g._weights.shape[1] * 4
    with memory_limit(5 * row):
        with pytest.raises(MemoryLimitError, match="records of"):
            g.params()
        assert g.state_dict(0)
    weights = np.load(folder / "weights.npy")
    with open(folder / "weights.npy", "wb") as fh:  # the same data under a forged header
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, weights.shape[1])}
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(weights.tobytes())
    with pytest.raises(ZooReadError) as info:
        read_small_cnn_zoo(folder)
    msg = str(info.value)
    assert "\n" not in msg and "weights.npy" in msg and str(10**12) in msg


# ----------------------------------------------------------------------------- configuration


def test_env_var_sets_the_limit_and_bad_values_error(monkeypatch):
    model = mlp()
    monkeypatch.setenv(ENV_VAR, "0.001")  # ~1 MiB
    with pytest.raises(MemoryLimitError, match=r"limit of 1\.0 MiB"):
        from_module(model)
    monkeypatch.setenv(ENV_VAR, "4")
    assert from_module(model).num_edges > 0
    for bad in ("lots", "-1", "0"):
        monkeypatch.setenv(ENV_VAR, bad)
        with pytest.raises(ValueError, match=ENV_VAR):
            from_module(model)
    monkeypatch.setenv(ENV_VAR, "0.001")
    with memory_limit(GIB):  # an explicit override wins over the environment
        assert from_module(model).num_edges > 0
