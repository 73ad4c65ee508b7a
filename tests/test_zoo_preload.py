"""Zoos held in memory once read (``in_memory``): the same batches as reads from the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metanet.data import datamodules as dm_mod
from metanet.data.datamodules import ParamGraphDataModule, WeightSpaceDataModule
from metanet.data.zoo_store import Zoo
from metanet.data.zoo_view import PreloadedZoo
from metanet.limits import MemoryLimitError, memory_limit


def _ws_module(zoo_path, **kwargs) -> WeightSpaceDataModule:
    from tiny_zoo import MLP

    from metanet.zoo.architectures import arch_name

    return WeightSpaceDataModule(zoo_path, group=arch_name(MLP), splits=(0.5, 0.25, 0.25),
                                 batch_size=4, **kwargs)  # fmt: skip


def _all_batches(loader) -> list:
    return list(loader)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_weight_space_batches_are_the_same_in_memory_and_from_the_file(zoo_path, split):
    torch.manual_seed(0)
    read = _ws_module(zoo_path, in_memory=False)
    held = _ws_module(zoo_path, in_memory=True)
    read.setup(), held.setup()
    assert isinstance(held.zoo, PreloadedZoo) and isinstance(read.zoo, Zoo)
    torch.manual_seed(1)
    batches_r = _all_batches(getattr(read, f"{split}_dataloader")())
    torch.manual_seed(1)
    batches_h = _all_batches(getattr(held, f"{split}_dataloader")())
    assert len(batches_r) == len(batches_h) > 0
    for (ws_r, y_r), (ws_h, y_h) in zip(batches_r, batches_h):
        assert ws_r.max_abs_diff(ws_h) == 0.0 and torch.equal(y_r, y_h)
    torch.testing.assert_close(read.weight_stats.weight_mean, held.weight_stats.weight_mean,
                               rtol=0, atol=0)  # fmt: skip


def test_graph_batches_are_the_same_in_memory_and_from_the_file(zoo_path):
    read = ParamGraphDataModule(zoo_path, splits=(0.5, 0.25, 0.25), batch_size=4, in_memory=False)
    held = ParamGraphDataModule(zoo_path, splits=(0.5, 0.25, 0.25), batch_size=4, in_memory=True)
    read.setup(), held.setup()
    assert isinstance(held.zoo, PreloadedZoo)
    for (g_r, y_r), (g_h, y_h) in zip(read.val_dataloader(), held.val_dataloader()):
        assert torch.equal(g_r.x, g_h.x) and torch.equal(g_r.edge_attr, g_h.edge_attr)
        assert torch.equal(g_r.edge_index, g_h.edge_index) and torch.equal(y_r, y_h)
    torch.testing.assert_close(read.graph_stats.edge_std, held.graph_stats.edge_std, rtol=0,
                               atol=0)  # fmt: skip


def test_auto_holds_small_file_zoos_only(zoo_path, monkeypatch):
    auto = _ws_module(zoo_path)
    auto.setup()
    assert isinstance(auto.zoo, PreloadedZoo)
    monkeypatch.setattr(dm_mod, "PRELOAD_AUTO_BYTES", 1)  # now the zoo is too large for auto
    big = _ws_module(zoo_path)
    big.setup()
    assert isinstance(big.zoo, Zoo)
    # a reader's zoo is in memory already: auto leaves it alone
    from metanet.data.readers import InMemoryZoo, InMemoryZooGroup

    with Zoo.open(zoo_path) as zoo:
        g = zoo[_ws_module(zoo_path).group]
        mem = InMemoryZoo([InMemoryZooGroup(g.name, g.params(), g.metrics, g.hparams,
                                            spec=g.spec, arch=g.arch)])  # fmt: skip
    monkeypatch.setattr(dm_mod, "PRELOAD_AUTO_BYTES", 2**40)
    reader = WeightSpaceDataModule(mem, splits=(0.5, 0.25, 0.25), batch_size=4)
    reader.setup()
    assert reader.zoo is mem


def test_in_memory_past_the_memory_limit_is_refused_with_the_zoo_named(zoo_path):
    with memory_limit(50_000):  # a batch of 4 records fits, all 24 (132 KB) do not
        read = _ws_module(zoo_path, in_memory=False)
        read.setup()
        assert len(next(iter(read.val_dataloader()))[0]) == 4
        held = _ws_module(zoo_path, in_memory=True)
        with pytest.raises(MemoryLimitError, match=r"tiny_zoo.h5: reading params of 24 records"):
            held.setup()
            next(iter(held.val_dataloader()))
    with pytest.raises(ValueError, match="in_memory must be true, false or 'auto', got 'yes'"):
        _ws_module(zoo_path, in_memory="yes")


def test_a_held_zoo_loads_in_worker_processes_without_its_copy(zoo_path):
    import pickle

    held = _ws_module(zoo_path, in_memory=True)
    held.setup()
    group = held.zoo[held.group_names[0]]
    group.load()
    copy = pickle.loads(pickle.dumps(group))
    assert copy._cache is None  # a spawned worker reads the records itself
    assert np.array_equal(copy.params([2, 0])["0.weight"].numpy(),
                          group.params([2, 0])["0.weight"].numpy())  # fmt: skip
    workers = _ws_module(zoo_path, in_memory=True, num_workers=2)
    for (a, _), (b, _) in zip(held.val_dataloader(), workers.val_dataloader()):
        assert a.max_abs_diff(b) == 0.0


def test_the_data_loading_benchmark_prints_identical_batches(zoo_path, capsys):
    from script_module import load_script
    from tiny_zoo import MLP

    from metanet.zoo.architectures import arch_name

    bench = load_script("bench_data_loading")
    argv = ["--zoo", zoo_path, "--batches", "2", "--batch-size", "2", "--group", arch_name(MLP),
            "--steps", "2"]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    reads, steps = lines[2:4], lines[6:]
    assert all(row.rstrip(" |").endswith("True") for row in reads)
    assert [row.split("|")[2].strip() for row in steps] == ["NFN-HNP", "GMN"]
