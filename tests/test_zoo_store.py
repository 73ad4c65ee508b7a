"""metanet's HDF5 zoo format: round trips, sharded (virtual) zoos, bad files, DataLoader workers."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from metanet.data.zoo_store import (
    REQUIRED_METRICS,
    Zoo,
    ZooFormatError,
    ZooWriter,
    merge_zoos,
    write_virtual_zoo,
)
from metanet.weightspace import WeightSpace
from metanet.zoo.architectures import arch_name, build_module

MLP = {"type": "mlp", "in": 64, "widths": [6, 5], "out": 10}
CNN = {"type": "cnn", "channels": [3, 4], "strides": [1, 2], "head": "flatten"}
RES = {"type": "cnn", "channels": [3, 3], "residual": True, "norm": "batch"}
SIREN = {"type": "siren", "widths": [8]}
INPUTS = {"mlp": (64,), "cnn": (1, 8, 8), "siren": (2,)}


def _records(arch: dict, n: int, offset: int = 0):
    modules = [build_module(arch) for _ in range(n)]
    if arch.get("norm") == "batch":  # give the running statistics non-default values
        for m in modules:
            m.train()(torch.randn(16, *INPUTS[arch["type"]]))
    sds = [m.state_dict() for m in modules]
    params = {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}
    metrics = {k: np.arange(n, dtype=float) + offset for k in REQUIRED_METRICS}
    metrics["run_id"] = np.arange(n) + offset
    optimizers = ["sgd", "adam"] * (n // 2) + ["sgd"] * (n % 2)
    hparams = {"lr": np.linspace(0.1, 0.2, n), "optimizer": optimizers}
    return modules, params, metrics, hparams


def _write(path, archs=(MLP, CNN, RES, SIREN), n=3, offset=0):
    out = {}
    with ZooWriter(path, attrs={"name": "test", "data": {"split_seed": 0}}) as w:
        for arch in archs:
            modules, params, metrics, hparams = _records(arch, n, offset)
            w.add(arch, params, metrics, hparams)
            out[arch_name(arch)] = modules
    return out


def test_round_trip_recomputes_the_same_function(tmp_path):
    path = tmp_path / "zoo.h5"
    modules = _write(path)
    zoo = Zoo.open(path)
    assert sorted(zoo.architectures) == sorted(modules)
    assert len(zoo) == 12 and zoo.attrs["name"] == "test" and zoo.attrs["data"] == {"split_seed": 0}
    for name, mods in modules.items():
        g = zoo[name]
        kind = g.arch["type"]
        x = torch.randn(5, *INPUTS[kind])
        for i, m in enumerate(mods):
            torch.testing.assert_close(g.module(i)(x), m.eval()(x), rtol=0, atol=0)
        assert (g.spec is None) == (name == arch_name(RES))
        np.testing.assert_array_equal(g.metrics["run_id"], np.arange(3))
        assert g.hparams["optimizer"].tolist() == ["sgd", "adam", "sgd"]
        assert g.hparams["lr"].dtype == np.float64
    g = zoo[arch_name(MLP)]
    ws = g.weight_space([2, 0])  # request order is kept
    ref = WeightSpace.from_modules([modules[g.name][2], modules[g.name][0]])
    assert ws.spec == ref.spec and ws.allclose(ref, atol=0, rtol=0)
    with pytest.raises(ZooFormatError, match="no weight space"):
        zoo[arch_name(RES)].weight_space()
    with pytest.raises(IndexError):
        g.params([3])
    assert list(zoo.iter_records())[:2] == [(zoo.architectures[0], 0), (zoo.architectures[0], 1)]


def test_writer_rejects_inconsistent_records(tmp_path):
    _, params, metrics, hparams = _records(MLP, 2)
    with pytest.raises(ValueError, match="lack"), ZooWriter(tmp_path / "a.h5") as w:
        w.add(MLP, params, {"test_acc": [0, 1]})
    with pytest.raises(ValueError, match="'lr' has shape"), ZooWriter(tmp_path / "a.h5") as w:
        w.add(MLP, params, metrics, {"lr": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="keys"), ZooWriter(tmp_path / "a.h5") as w:
        w.add(MLP, params, metrics, hparams)
        w.add(MLP, {k: v for k, v in params.items() if k != "0.bias"}, metrics, hparams)
    assert not (tmp_path / "a.h5").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_failed_write_leaves_existing_zoo_untouched(tmp_path):
    path = tmp_path / "zoo.h5"
    _write(path, archs=(MLP,))
    before = path.read_bytes()
    reader = Zoo.open(path)
    with pytest.raises(RuntimeError, match="boom"), ZooWriter(path) as w:
        _, params, metrics, hparams = _records(CNN, 2)
        w.add(CNN, params, metrics, hparams)
        raise RuntimeError("boom")
    assert path.read_bytes() == before
    # a successful rewrite replaces the file atomically: an open reader keeps its consistent view
    old = reader[arch_name(MLP)].params([1])
    _write(path, archs=(CNN,))
    torch.testing.assert_close(reader[arch_name(MLP)].params([1]), old)
    assert Zoo.open(path).architectures == [arch_name(CNN)]


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    path = tmp_path / "zoo.h5"
    _write(path, archs=(MLP,))
    data = path.read_bytes()
    trunc = tmp_path / "truncated.h5"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ZooFormatError, match="truncated.h5"):
        Zoo.open(trunc)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ZooFormatError, match="foreign.h5.*not a metanet zoo"):
        Zoo.open(foreign)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(ZooFormatError, match="text.h5"):
        Zoo.open(text)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        Zoo.open(tmp_path / "missing.h5")
    assert path.read_bytes() == data  # reading never modifies a zoo
    # a group whose datasets are shorter than its record count (damaged by hand)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(data)
    with h5py.File(bad, "r+") as f:
        f[arch_name(MLP)].attrs["num_records"] = 7
    with pytest.raises(ZooFormatError, match="bad.h5.*expected 7"):
        Zoo.open(bad)


def test_virtual_zoo_over_shards_equals_merged_zoo(tmp_path):
    a, b = tmp_path / "shards" / "a.h5", tmp_path / "shards" / "b.h5"
    _write(a, archs=(MLP, CNN), n=2)
    _write(b, archs=(MLP, SIREN), n=3, offset=10)
    write_virtual_zoo(tmp_path / "virtual.h5", [a, b], attrs={"name": "v"})
    merge_zoos([a, b], tmp_path / "merged.h5", attrs={"name": "m"})
    # moving the folder keeps the virtual zoo readable (shard paths are relative)
    os.rename(tmp_path, str(tmp_path) + "-moved")
    moved = str(tmp_path) + "-moved"
    v, m = Zoo.open(f"{moved}/virtual.h5"), Zoo.open(f"{moved}/merged.h5")
    assert v.architectures == m.architectures and len(v[arch_name(MLP)]) == 5
    for name in v.architectures:
        for key, t in v[name].params().items():
            torch.testing.assert_close(t, m[name].params()[key], rtol=0, atol=0)
        np.testing.assert_array_equal(v[name].metrics["run_id"], m[name].metrics["run_id"])
        assert v[name].hparams["optimizer"].tolist() == m[name].hparams["optimizer"].tolist()
    np.testing.assert_array_equal(v[arch_name(MLP)].metrics["run_id"], [0, 1, 10, 11, 12])
    os.remove(f"{moved}/shards/b.h5")
    with pytest.raises(ZooFormatError, match="b.h5 is missing"):
        Zoo.open(f"{moved}/virtual.h5")


class _RecordDataset(torch.utils.data.Dataset):
    def __init__(self, zoo: Zoo, name: str) -> None:
        self.zoo, self.name = zoo, name

    def __len__(self) -> int:
        return len(self.zoo[self.name])

    def __getitem__(self, i: int):
        return self.zoo[self.name].state_dict(i)["0.weight"], os.getpid()


def test_zoo_reads_from_dataloader_workers(tmp_path):
    path = tmp_path / "zoo.h5"
    _write(path, archs=(MLP,), n=6)
    zoo = Zoo.open(path)
    zoo[arch_name(MLP)].params([0])  # parent has an open handle before the workers start
    loader = torch.utils.data.DataLoader(
        _RecordDataset(zoo, arch_name(MLP)), batch_size=2, num_workers=2
    )
    weights, pids = zip(*loader)
    assert len(set(torch.cat(pids).tolist()) - {os.getpid()}) == 2
    torch.testing.assert_close(torch.cat(weights), zoo[arch_name(MLP)].params()["0.weight"])
